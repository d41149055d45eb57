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
        pred: (..., Q, P) mask logits at P points; gt: (..., T, P) targets in [0, 1] (leading
            batch dimensions, if any, the same).
    Returns:
        (..., Q, T) BCE cost, (..., Q, T) dice cost (1 - dice with +1 smoothing).
    """
    P = pred.shape[-1]
    gt_t = gt.transpose(-1, -2)
    # BCE(x, t) = softplus(-x) t + softplus(x) (1 - t), summed over points by two matmuls.
    bce = (F.softplus(-pred) @ gt_t + F.softplus(pred) @ (1 - gt_t)) / P
    prob = pred.sigmoid()
    dice = 1 - (2 * prob @ gt_t + 1) / (prob.sum(-1)[..., :, None] + gt.sum(-1)[..., None, :] + 1)
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

    def cost_matrices(self, logits, boxes, mask_embed, mask_features, gt_boxes, gt_masks):
        """Cost matrices of several images at once, one op per cost term instead of one per
        image and term.

        Args:
            logits (B, Q, 1), boxes (B, Q, 4) cxcywh, mask_embed (B, Q, C) and mask_features
            (B, C, h, w) (or None: no mask costs); gt_boxes, gt_masks: per image (T_b, 4)
            cxcywh and (T_b, H_b, W_b) bool, T_b >= 1.
        Returns:
            per image a (Q, T_b) float32 cost matrix.
        """
        B = logits.shape[0]
        sizes = [int(t.shape[0]) for t in gt_boxes]
        logits, boxes = logits.float(), boxes.float()
        all_gt = torch.cat(gt_boxes).float()                                    # (T, 4)
        # box costs of every prediction against every image's targets; tiny next to the masks
        cost = self.cost_class * focal_cost(logits[..., 0], self.focal_alpha,
                                            self.focal_gamma)[..., None]   # (B, Q, 1)
        cost = cost + self.cost_box * torch.cdist(boxes, all_gt[None].expand(B, -1, -1), p=1)
        giou = generalized_box_iou(box_convert(boxes.flatten(0, 1), "cxcywh", "xyxy"),
                                   box_convert(all_gt, "cxcywh", "xyxy"))
        cost = cost - self.cost_giou * giou.view(B, -1, all_gt.shape[0])       # (B, Q, T)
        blocks = cost.split(sizes, dim=2)
        costs = [blocks[b][b] for b in range(B)]
        if mask_embed is None or not (self.cost_mask or self.cost_dice):
            return costs
        # one set of uniform points per image, shared by its predictions and targets, drawn
        # image by image (the random stream of one call per image)
        coords = torch.cat([torch.rand(1, self.num_points, 2, device=mask_embed.device)
                            for _ in range(B)])
        pm = mask_logits_at_points(mask_embed.float(), mask_features.float(), coords)  # (B,Q,P)
        # targets at their image's points, padded to the largest T_b: one bmm per term
        gm = pm.new_zeros(B, max(sizes), self.num_points)
        for b, masks in enumerate(gt_masks):
            gm[b, :sizes[b]] = sample_binary_masks(
                masks, torch.arange(sizes[b], device=masks.device),
                coords[b:b + 1].expand(sizes[b], -1, -1)).to(gm.device)
        bce, dice = pairwise_mask_costs(pm, gm)                                 # (B, Q, Tmax)
        mask_cost = self.cost_mask * bce + self.cost_dice * dice
        return [c + mask_cost[b, :, :sizes[b]] for b, c in enumerate(costs)]

    def cost_matrix(self, logits, boxes, mask_embed, mask_features, gt_boxes, gt_masks):
        """One image: logits (Q, 1), boxes (Q, 4) cxcywh, mask_embed (Q, C) and mask_features
        (C, h, w) (or None: no mask costs); gt_boxes (T, 4) cxcywh, gt_masks (T, H, W) bool.
        Returns (Q, T) float32."""
        return self.cost_matrices(
            logits[None], boxes[None], None if mask_embed is None else mask_embed[None],
            None if mask_features is None else mask_features[None], [gt_boxes], [gt_masks])[0]

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
        empty = torch.zeros(0, dtype=torch.int64)
        result = [(empty, empty.clone()) for _ in targets]
        images = [b for b, t in enumerate(targets) if t["boxes"].shape[0] > 0]
        if not images:
            return result
        embed = outputs.get("pred_mask_embed")
        idx = None if len(images) == len(targets) else torch.tensor(images)

        def pick(x):
            return x if idx is None or x is None else x[idx.to(x.device)]

        costs = self.cost_matrices(
            pick(outputs["pred_logits"]), pick(outputs["pred_boxes"]), pick(embed),
            None if embed is None else pick(outputs["mask_features"]),
            [targets[b]["boxes"] for b in images], [targets[b].get("masks") for b in images])
        for b, C in zip(images, costs):
            C = torch.nan_to_num(C, nan=1e8, posinf=1e8, neginf=-1e8).cpu()
            q, g = linear_sum_assignment(C.numpy())
            result[b] = (torch.as_tensor(q, dtype=torch.int64),
                         torch.as_tensor(g, dtype=torch.int64))
        return result
