"""Losses of the region proposal network (Sec. 4.1 "Loss Function", Table 7).

Applied to the two-stage (encoder) output ("_interm"), to every decoder layer ("_{i}",
the last one without suffix), to the denoising queries of every layer ("_dn", "_dn_{i}")
and to the objectness of the fused general region proposals ("loss_proposal_ce"):
- loss_ce: sigmoid focal objectness over all queries (matched = object);
- loss_bbox, loss_giou: L1 of normalised (cx, cy, w, h) and 1 - GIoU, matched pairs;
- loss_mask, loss_dice: BCE and dice at importance-sampled points, matched pairs.
Every term is summed over objects and divided by the number of ground-truth boxes in the
batch, averaged over processes (so each process's gradient has the same scale), at least 1.
Returned losses are already multiplied by their weights.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from detectron2.utils import comm

from .matcher import HungarianMatcher
from .point_sampling import point_sample, sample_binary_masks, uncertain_point_coords

__all__ = ["ProposalCriterion", "num_boxes_across_processes"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def num_boxes_across_processes(targets: List[Dict], device) -> float:
    """Mean over processes of the batch's ground-truth count, clamped at 1."""
    n = torch.tensor([float(sum(int(t["boxes"].shape[0]) for t in targets))], device=device)
    if comm.get_world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / comm.get_world_size()
    return max(float(n.item()), 1.0)


class ProposalCriterion(nn.Module):
    """
    Args:
        matcher: HungarianMatcher.
        weights: {"ce", "bbox", "giou", "mask", "dice", "proposal_ce"} loss coefficients.
        num_points, oversample_ratio, importance_sample_ratio: mask point sampling.
    """

    def __init__(self, matcher: HungarianMatcher, weights: Dict[str, float], num_points: int,
                 oversample_ratio: float, importance_sample_ratio: float,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        expected = {"ce", "bbox", "giou", "mask", "dice", "proposal_ce"}
        if set(weights) != expected:
            raise ValueError(f"ProposalCriterion: weights must have keys {sorted(expected)}, "
                             f"got {sorted(weights)}")
        self.matcher = matcher
        self.weights = dict(weights)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    # ---------------------------------------------------------------- terms
    def _focal(self, logits: torch.Tensor, target: torch.Tensor, num_boxes: float) -> torch.Tensor:
        """logits, target: (B, Q) -> focal loss summed, / num_boxes."""
        return sigmoid_focal_loss(logits.float(), target.float(), alpha=self.focal_alpha,
                                  gamma=self.focal_gamma, reduction="sum") / num_boxes

    def _box_losses(self, src_boxes, tgt_boxes, num_boxes):
        """src_boxes, tgt_boxes: (M, 4) cxcywh."""
        if src_boxes.shape[0] == 0:
            zero = src_boxes.sum() * 0.0
            return zero, zero
        l1 = F.l1_loss(src_boxes.float(), tgt_boxes.float(), reduction="sum") / num_boxes
        giou = generalized_box_iou_loss(box_convert(src_boxes.float(), "cxcywh", "xyxy"),
                                        box_convert(tgt_boxes.float(), "cxcywh", "xyxy"),
                                        reduction="sum") / num_boxes
        return l1, giou

    def _mask_losses(self, mask_embed, mask_features, targets, indices, num_boxes):
        """BCE + dice of the matched queries' masks at importance-sampled points.

        mask_embed: (B, Q, C); mask_features: (B, C, h, w). Only the matched queries' masks
        are built (Eq. 8), never all Q of them, and all images at once: one bmm for the masks,
        one point sampling, one loss (the random points are drawn image by image, see
        uncertain_point_coords).
        """
        counts = [len(q) for q, _ in indices]
        if sum(counts) == 0:
            zero = mask_embed.sum() * 0.0 + mask_features.sum() * 0.0
            return zero, zero
        device = mask_embed.device
        B, Q, C = mask_embed.shape
        h, w = mask_features.shape[-2:]
        image = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(counts)])
        slot = torch.cat([torch.arange(n) for n in counts])
        query = torch.cat([q for q, _ in indices])
        image, slot, query = image.to(device), slot.to(device), query.to(device)
        # every image's matched embeddings, padded to the largest count: (B, m_max, C); rows
        # are picked by index_select on flattened dimensions, whose backward (index_add) is
        # far cheaper on a CPU than advanced indexing's (an accumulating index_put)
        m_max = max(counts)
        rows = mask_embed.flatten(0, 1).index_select(0, image * Q + query).float()  # (M, C)
        embed = rows.new_zeros(B * m_max, C).index_copy(0, image * m_max + slot, rows)
        masks = torch.bmm(embed.view(B, m_max, C), mask_features.float().flatten(2))
        masks = masks.flatten(0, 1).index_select(0, image * m_max + slot).view(-1, 1, h, w)
        with torch.no_grad():
            coords = uncertain_point_coords(masks.detach(), self.num_points, self.oversample_ratio,
                                            self.importance_sample_ratio,
                                            group_sizes=[n for n in counts if n])  # (M, P, 2)
        logits = point_sample(masks, coords, align_corners=False)[:, 0]
        labels = torch.cat([sample_binary_masks(t["masks"], g.to(t["masks"].device),
                                                c.to(t["masks"].device))
                            for t, (_, g), c in zip(targets, indices, coords.split(counts))])
        labels = labels.to(logits.device)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * labels).sum(-1) + 1) / (prob.sum(-1) + labels.sum(-1) + 1)
        return bce.sum() / num_boxes, dice.sum() / num_boxes

    def set_losses(self, outputs: Dict, targets: List[Dict], indices: Indices,
                   num_boxes: float, object_target: Optional[torch.Tensor] = None) -> Dict:
        """Unweighted losses of one prediction set under a given assignment.

        object_target: (B, Q) objectness targets; default: 1 at the matched queries.
        """
        logits = outputs["pred_logits"][..., 0]
        device = logits.device
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([q for q, _ in indices]).to(device)
        if object_target is None:
            object_target = torch.zeros_like(logits)
            object_target[batch_idx, src_idx] = 1.0
        losses = {"ce": self._focal(logits, object_target, num_boxes)}
        tgt_boxes = torch.cat([t["boxes"][g.to(t["boxes"].device)] for t, (_, g) in
                               zip(targets, indices)]).to(device)
        losses["bbox"], losses["giou"] = self._box_losses(
            outputs["pred_boxes"][batch_idx, src_idx], tgt_boxes, num_boxes)
        if outputs.get("pred_mask_embed") is not None:
            losses["mask"], losses["dice"] = self._mask_losses(
                outputs["pred_mask_embed"], outputs["mask_features"], targets, indices, num_boxes)
        return losses

    def _weighted(self, losses: Dict, suffix: str) -> Dict:
        return {f"loss_{k}{suffix}": v * self.weights[k] for k, v in losses.items()}

    # ---------------------------------------------------------------- forward
    def forward(self, outputs: Dict, targets: List[Dict],
                proposal_logits: Optional[torch.Tensor] = None, return_matches: bool = False):
        """
        Args:
            outputs: ProposalDecoder.forward's dict.
            targets: per image {"boxes": (T, 4) normalised cxcywh on the padded canvas,
                "masks": (T, H, W) bool on the padded canvas}.
            proposal_logits: (B, Q) objectness of the fused general region proposals
                (same query order as the decoder's), trained against the final layer's
                assignment.
            return_matches: also return the final layer's assignment (per image (query
                indices, gt indices)), which the unified class loss reuses.
        Returns:
            weighted losses (dict), and the assignment if return_matches.
        """
        device = outputs["layers"][-1]["pred_logits"].device
        num_boxes = num_boxes_across_processes(targets, device)
        losses = {}
        n_layers = len(outputs["layers"])
        final_indices = None
        for i, out in enumerate(outputs["layers"]):
            indices = self.matcher(out, targets)
            suffix = "" if i == n_layers - 1 else f"_{i}"
            losses.update(self._weighted(self.set_losses(out, targets, indices, num_boxes), suffix))
            if i == n_layers - 1:
                final_indices = indices
        interm = outputs["interm"]
        losses.update(self._weighted(
            self.set_losses(interm, targets, self.matcher(interm, targets), num_boxes), "_interm"))

        if proposal_logits is not None and final_indices is not None:
            target = torch.zeros_like(proposal_logits)
            for b, (q, _) in enumerate(final_indices):
                target[b, q.to(device)] = 1.0
            losses["loss_proposal_ce"] = self.weights["proposal_ce"] * self._focal(
                proposal_logits, target, num_boxes)

        dn = outputs.get("dn")
        if dn is not None:
            queries = dn["queries"]
            dn_indices = [queries.positive_query_indices(int(t["boxes"].shape[0]))
                          for t in targets]
            dn_norm = num_boxes * queries.num_groups
            for i, out in enumerate(dn["layers"]):
                suffix = "_dn" if i == n_layers - 1 else f"_dn_{i}"
                losses.update(self._weighted(self.set_losses(
                    out, targets, dn_indices, dn_norm,
                    object_target=queries.positive_mask.to(out["pred_logits"].dtype)), suffix))
        return (losses, final_indices) if return_matches else losses
