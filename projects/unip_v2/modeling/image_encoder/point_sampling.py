"""Point-sampled mask supervision (PointRend / Mask2Former): losses and matching costs are
computed at sampled points instead of every pixel (Uni-Perceiver v2, App. B: 112 x 112
points).

`point_sample` is detectron2's (PointRend's `point_features.point_sample`: grid_sample at
2 * coords - 1; pass align_corners=False). The three functions below have no equivalent
there, or one that does the same job more slowly; each says why it is kept.
"""
import torch
from detectron2.projects.point_rend.point_features import point_sample

__all__ = ["point_sample", "uncertain_point_coords", "mask_logits_at_points", "sample_binary_masks"]


def uncertain_point_coords(mask_logits: torch.Tensor, num_points: int, oversample_ratio: float,
                           importance_sample_ratio: float, group_sizes=None) -> torch.Tensor:
    """Points biased towards uncertain pixels (|logit| small).

    Draws num_points * oversample_ratio uniform candidates, keeps the
    importance_sample_ratio * num_points most uncertain of them and fills the rest with
    fresh uniform points: the algorithm of detectron2's PointRend
    `get_uncertain_point_coords_with_randomness` with uncertainty -|logit|.

    Kept here rather than calling detectron2's, for two reasons:
    - detectron2 takes a sorted top-k; only the set of points matters (the losses average
      over them), and the unsorted top-k is much cheaper. On (64, 1, 80, 80) logits with
      12544 points x 3 candidates, one CPU thread, this function took 54 ms and detectron2's
      86 ms (called per group of 8 rows) or 94 ms (one call), median of 7: the criterion
      calls it for every prediction set of every training step.
    - group_sizes: the rows come in consecutive groups (one per image) whose random numbers
      are drawn group by group, candidates then fill, exactly as one call per group would
      draw them, while sampling and top-k still run once for all rows: batching the images
      of a loss does not change the random stream (nor, therefore, training). detectron2's
      draws all rows' candidates, then all fills.

    Args:
        mask_logits: (N, 1, H, W), detached.
        group_sizes: the sizes of the groups above, summing to N. Default: one group.
    Returns:
        (N, num_points, 2) (x, y) in [0, 1].
    """
    N = mask_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    candidates, fill = [], []
    for n in ([N] if group_sizes is None else group_sizes):
        candidates.append(torch.rand(n, num_sampled, 2, device=mask_logits.device))
        fill.append(torch.rand(n, num_points - num_uncertain, 2, device=mask_logits.device))
    candidates, fill = torch.cat(candidates), torch.cat(fill)
    certainty = point_sample(mask_logits, candidates, align_corners=False)[:, 0].abs()
    # the least certain points (N, num_uncertain), in no particular order
    idx = certainty.topk(num_uncertain, dim=1, largest=False, sorted=False).indices
    picked = candidates.gather(1, idx[..., None].expand(-1, -1, 2))
    return torch.cat((picked, fill), 1)


def mask_logits_at_points(mask_embed: torch.Tensor, mask_features: torch.Tensor,
                          coords: torch.Tensor) -> torch.Tensor:
    """Mask logits of every query at shared points, without building the full masks.

    A mask logit is the dot product of the query's mask embedding with the mask map (Eq. 8),
    so sampling the map first and then taking dot products gives the same values for a
    fraction of the work when points are far fewer than pixels. detectron2 has no such
    function: its point heads always sample masks that already exist.

    Args:
        mask_embed: (B, Q, C); mask_features: (B, C, h, w); coords: (B, K, 2) in [0, 1].
    Returns:
        (B, Q, K).
    """
    return torch.bmm(mask_embed, point_sample(mask_features, coords, align_corners=False))


def sample_binary_masks(masks: torch.Tensor, index: torch.Tensor,
                        coords: torch.Tensor) -> torch.Tensor:
    """Values of binary masks at points, nearest pixel (targets are 0/1, so no interpolation
    is needed, and nothing is copied: one gather).

    detectron2's PointRend reads targets with point_sample on float copies of the masks
    (bilinear, so fractional at edges); this reads the bool masks in place, a flat gather
    of the (mask, pixel) each point falls in.

    Args:
        masks: (T, H, W) bool; index: (M,) which mask each row of coords reads;
        coords: (M, K, 2) (x, y) in [0, 1].
    Returns:
        (M, K) float32 in {0, 1}.
    """
    T, H, W = masks.shape
    x = (coords[..., 0] * W).long().clamp_(0, W - 1)
    y = (coords[..., 1] * H).long().clamp_(0, H - 1)
    # one flat gather (three-tensor advanced indexing was several times slower on a CPU)
    flat = (index[:, None] * H + y) * W + x
    return masks.reshape(-1).take(flat).float()
