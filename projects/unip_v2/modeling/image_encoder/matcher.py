"""Hungarian matching of predictions to ground truth (objectness + box + mask costs,
Table 7's cost coefficients)."""
from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou

from .point_sampling import mask_logits_at_points, sample_binary_masks

__all__ = ["HungarianMatcher", "focal_cost", "pairwise_mask_costs"]


def focal_cost(logits: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Objectness cost of calling each prediction an object: the focal loss of label 1
    minus that of label 0. logits: (Q,) -> (Q,)."""
    p = logits.sigmoid()
    pos = alpha * (1 - p) ** gamma * F.softplus(-logits)   # -log(p)
    neg = (1 - alpha) * p ** gamma * F.softplus(logits)    # -log(1 - p)
    return pos - neg


def pairwise_mask_costs(pred: torch.Tensor, gt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean sigmoid BCE and dice cost between every prediction and every target.

    Args:
        pred: (Q, P) mask logits at P points; gt: (T, P) targets in [0, 1].
    Returns:
        (Q, T) BCE cost, (Q, T) dice cost (1 - dice with +1 smoothing).
    """
    P = pred.shape[1]
    # BCE(x, t) = softplus(-x) t + softplus(x) (1 - t), summed over points by two matmuls.
    bce = (F.softplus(-pred) @ gt.T + F.softplus(pred) @ (1 - gt).T) / P
    prob = pred.sigmoid()
    dice = 1 - (2 * prob @ gt.T + 1) / (prob.sum(-1)[:, None] + gt.sum(-1)[None, :] + 1)
    return bce, dice


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising
    w_cls * focal + w_box * L1(cxcywh) + w_giou * (-GIoU) + w_mask * BCE + w_dice * dice."""

    def __init__(self, cost_class: float, cost_box: float, cost_giou: float, cost_mask: float,
                 cost_dice: float, num_points: int, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_box, self.cost_giou = cost_class, cost_box, cost_giou
        self.cost_mask, self.cost_dice = cost_mask, cost_dice
        self.num_points = num_points
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost_matrix(self, logits, boxes, mask_embed, mask_features, gt_boxes, gt_masks):
        """One image. logits (Q, 1), boxes (Q, 4) cxcywh, mask_embed (Q, C) and mask_features
        (C, h, w) (or None: no mask costs); gt_boxes (T, 4) cxcywh, gt_masks (T, H, W) bool.
        Returns (Q, T) float32."""
        logits, boxes = logits.float(), boxes.float()
        gt_boxes = gt_boxes.float()
        C = self.cost_class * focal_cost(logits[:, 0], self.focal_alpha, self.focal_gamma)[:, None]
        C = C + self.cost_box * torch.cdist(boxes, gt_boxes, p=1)
        C = C - self.cost_giou * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                                     box_convert(gt_boxes, "cxcywh", "xyxy"))
        if mask_embed is not None and (self.cost_mask or self.cost_dice):
            # one set of uniform points per image, shared by predictions and targets
            coords = torch.rand(1, self.num_points, 2, device=mask_embed.device)
            pm = mask_logits_at_points(mask_embed.float()[None], mask_features.float()[None],
                                       coords)[0]                              # (Q, P)
            T = gt_masks.shape[0]
            gm = sample_binary_masks(gt_masks, torch.arange(T, device=gt_masks.device),
                                     coords.expand(T, -1, -1))                 # (T, P)
            bce, dice = pairwise_mask_costs(pm, gm)
            C = C + self.cost_mask * bce + self.cost_dice * dice
        return C

    @torch.no_grad()
    def forward(self, outputs: Dict, targets: List[Dict]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: {"pred_logits" (B, Q, 1), "pred_boxes" (B, Q, 4), optionally
                "pred_mask_embed" (B, Q, C) with "mask_features" (B, C, h, w)}.
            targets: per image {"boxes" (T, 4) cxcywh normalised, "masks" (T, H, W) bool}.
        Returns:
            per image (query indices, target indices), int64 on CPU, sorted by query.
        """
        result = []
        embed = outputs.get("pred_mask_embed")
        for b, t in enumerate(targets):
            T = t["boxes"].shape[0]
            if T == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                result.append((empty, empty.clone()))
                continue
            C = self.cost_matrix(outputs["pred_logits"][b], outputs["pred_boxes"][b],
                                 None if embed is None else embed[b],
                                 None if embed is None else outputs["mask_features"][b],
                                 t["boxes"], t.get("masks"))
            C = torch.nan_to_num(C, nan=1e8, posinf=1e8, neginf=-1e8).cpu()
            q, g = linear_sum_assignment(C.numpy())
            result.append((torch.as_tensor(q, dtype=torch.int64),
                           torch.as_tensor(g, dtype=torch.int64)))
        return result
