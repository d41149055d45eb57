"""Point-sampled mask supervision (PointRend / Mask2Former): losses and matching costs are
computed at sampled points instead of every pixel (Appendix B: 112 x 112 points)."""
import torch
from torch.nn import functional as F

__all__ = ["point_sample", "uncertain_point_coords", "mask_logits_at_points", "sample_binary_masks"]


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of maps at normalised points.

    Args:
        maps: (N, C, H, W); coords: (N, P, 2) (x, y) in [0, 1] (align_corners=False
            convention: 0 and 1 are the outer edges of the border pixels).
    Returns:
        (N, C, P).
    """
    if maps.dim() != 4 or coords.dim() != 3 or coords.shape[0] != maps.shape[0]:
        raise ValueError(f"point_sample: maps must be (N, C, H, W) and coords (N, P, 2); got "
                         f"{tuple(maps.shape)} and {tuple(coords.shape)}")
    grid = coords[:, :, None, :].mul(2.0).sub_(1.0)
    out = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[..., 0]


def uncertain_point_coords(mask_logits: torch.Tensor, num_points: int, oversample_ratio: float,
                           importance_sample_ratio: float, group_sizes=None) -> torch.Tensor:
    """Points biased towards uncertain pixels (|logit| small).

    Draws num_points * oversample_ratio uniform candidates, keeps the
    importance_sample_ratio * num_points most uncertain of them and fills the rest with
    fresh uniform points.

    Args:
        mask_logits: (N, 1, H, W), detached.
        group_sizes: the rows come in consecutive groups (one per image) whose random numbers
            are drawn group by group, candidates then fill, exactly as one call per group
            would draw them: batching the images of a loss does not change the random stream
            (nor, therefore, training). Default: one group.
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
    certainty = point_sample(mask_logits, candidates)[:, 0].abs()  # (N, num_sampled)
    # the least certain points; the set matters, not its order: an unsorted top-k is half
    # the work
    idx = certainty.topk(num_uncertain, dim=1, largest=False, sorted=False).indices
    picked = candidates.gather(1, idx[..., None].expand(-1, -1, 2))
    return torch.cat((picked, fill), 1)


def mask_logits_at_points(mask_embed: torch.Tensor, mask_features: torch.Tensor,
                          coords: torch.Tensor) -> torch.Tensor:
    """Mask logits of every query at shared points, without building the full masks.

    A mask logit is the dot product of the query's mask embedding with the mask map (Eq. 8),
    so sampling the map first and then taking dot products gives the same values for a
    fraction of the work when points are far fewer than pixels.

    Args:
        mask_embed: (B, Q, C); mask_features: (B, C, h, w); coords: (B, K, 2) in [0, 1].
    Returns:
        (B, Q, K).
    """
    return torch.bmm(mask_embed, point_sample(mask_features, coords))


def sample_binary_masks(masks: torch.Tensor, index: torch.Tensor,
                        coords: torch.Tensor) -> torch.Tensor:
    """Values of binary masks at points, nearest pixel (targets are 0/1, so no interpolation
    is needed, and nothing is copied: one gather).

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

