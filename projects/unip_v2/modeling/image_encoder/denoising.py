"""Contrastive denoising queries (DINO's CDN, as Mask DINO trains its decoder).

Every ground-truth box enters the decoder as G noised copies of a *positive* query (small
noise: should reconstruct the box and mask) and G of a *negative* query (large noise:
should be called background). Layout of the P = G * 2 * max_gt denoising queries, which
are prepended to the Q matching queries:

    group 0: [pos gt0 .. pos gt(max_gt-1) | neg gt0 .. neg gt(max_gt-1)], group 1: ...

Images with fewer than max_gt objects leave their slots unused (zero content, box logit 0,
never supervised except as background). The self-attention mask keeps matching queries
from seeing any denoising query (they would read the answers) and each group from seeing
the others; denoising queries may see the matching queries.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
from torchvision.ops import box_convert

from ...utils.box_ops import inverse_sigmoid

__all__ = ["DenoisingQueries", "build_contrastive_denoising_queries"]


@dataclass
class DenoisingQueries:
    """content: (B, P, d); anchor_logits: (B, P, 4) inverse-sigmoid (cx, cy, w, h);
    attn_mask: (P + Q, P + Q) bool, True = blocked; num_groups G; max_gt; positive_mask:
    (B, P) bool, used slots holding positives; negative_mask: (B, P) bool."""
    content: torch.Tensor
    anchor_logits: torch.Tensor
    attn_mask: torch.Tensor
    num_groups: int
    max_gt: int
    positive_mask: torch.Tensor
    negative_mask: torch.Tensor

    @property
    def pad_size(self) -> int:
        return self.content.shape[1]

    def positive_query_indices(self, num_gt: int, device=None):
        """Indices (query, gt) of the fixed positive assignment of an image with num_gt
        objects: query g * 2 * max_gt + j <-> gt j, for every group g. Each (G * num_gt,)."""
        g = torch.arange(self.num_groups, device=device)[:, None]
        j = torch.arange(num_gt, device=device)[None, :]
        return (g * 2 * self.max_gt + j).reshape(-1), j.expand(self.num_groups, -1).reshape(-1)


def build_contrastive_denoising_queries(
    gt_boxes: List[torch.Tensor], label_embedding: torch.Tensor, num_matching_queries: int,
    budget: int, box_noise_scale: float, generator: Optional[torch.Generator] = None,
) -> Optional[DenoisingQueries]:
    """
    Args:
        gt_boxes: per image (n_b, 4) (cx, cy, w, h) normalised to the padded canvas.
        label_embedding: (d,) content vector of a denoising query (the embedding of the one
            objectness class; with one class, label noise has nothing to flip to).
        num_matching_queries: Q.
        budget: groups = budget // max_gt (at least 1).
        box_noise_scale: lambda.
    Returns:
        DenoisingQueries, or None when no image has an object (nothing to denoise).
    """
    max_gt = max((int(b.shape[0]) for b in gt_boxes), default=0)
    if max_gt == 0:
        return None
    B, device = len(gt_boxes), label_embedding.device
    G = max(budget // max_gt, 1)
    boxes = torch.zeros(B, max_gt, 4, device=device)
    valid = torch.zeros(B, max_gt, dtype=torch.bool, device=device)
    for b, bx in enumerate(gt_boxes):
        boxes[b, :bx.shape[0]] = bx.to(device=device, dtype=torch.float32)
        valid[b, :bx.shape[0]] = True

    # (B, G, 2, max_gt, 4): positives at [:, :, 0], negatives at [:, :, 1]
    boxes = boxes[:, None, None].expand(B, G, 2, max_gt, 4)
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    half = torch.cat((boxes[..., 2:], boxes[..., 2:]), -1) / 2
    sign = torch.randint(0, 2, xyxy.shape, device=device, generator=generator) * 2.0 - 1.0
    r = torch.rand(xyxy.shape, device=device, generator=generator)
    r[:, :, 1] += 1.0  # negatives move by [1, 2) x half a side: away from the object
    noised = (xyxy + sign * r * half * box_noise_scale).clamp(0.0, 1.0)
    # clamping and sign flips can invert a corner pair: keep x0 <= x1, y0 <= y1.
    lo = torch.minimum(noised[..., :2], noised[..., 2:])
    hi = torch.maximum(noised[..., :2], noised[..., 2:])
    noised = box_convert(torch.cat((lo, hi), -1), "xyxy", "cxcywh")

    slot_valid = valid[:, None, None].expand(B, G, 2, max_gt).reshape(B, -1)
    anchor_logits = torch.where(slot_valid[..., None], inverse_sigmoid(noised.reshape(B, -1, 4)),
                                torch.zeros(()))
    content = slot_valid[..., None].to(label_embedding.dtype) * label_embedding
    is_pos = torch.zeros(B, G, 2, max_gt, dtype=torch.bool, device=device)
    is_pos[:, :, 0] = True
    is_pos = is_pos.reshape(B, -1)

    P = G * 2 * max_gt
    total = P + num_matching_queries
    attn_mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    attn_mask[P:, :P] = True
    group = torch.arange(P, device=device) // (2 * max_gt)
    attn_mask[:P, :P] = group[:, None] != group[None, :]
    return DenoisingQueries(content=content, anchor_logits=anchor_logits, attn_mask=attn_mask,
                            num_groups=G, max_gt=max_gt, positive_mask=slot_valid & is_pos,
                            negative_mask=slot_valid & ~is_pos)
