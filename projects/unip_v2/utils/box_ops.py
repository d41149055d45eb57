"""Box helpers not in torchvision.ops (which provides box_convert, generalized_box_iou and
generalized_box_iou_loss, used directly elsewhere)."""
import torch

__all__ = ["MASK_BOX_CONVENTIONS", "inverse_sigmoid", "masks_to_boxes_normalized"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x floored at eps (Deformable
    DETR's), so boxes at the border map to finite logits."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


MASK_BOX_CONVENTIONS = ("unit_square", "pixel_index")


def masks_to_boxes_normalized(masks: torch.Tensor, convention: str = "unit_square"):
    """Tight boxes of binary masks, vectorised over all masks.

    Args:
        masks: (..., H, W) bool.
        convention: what a mask pixel is.
            "unit_square": pixel x covers [x, x + 1), so a one-pixel mask at column x spans
                [x, x + 1) / W: the geometry of the image (detectron2's
                ``BitMasks.get_bounding_boxes``);
            "pixel_index": the box runs from the first to the last pixel index, [x0, x1] / W
                (DETR's ``masks_to_boxes``, which Mask DINO's "mask2box" initialisation
                uses): centre half a pixel up-left and one pixel smaller than "unit_square",
                a one-pixel mask has zero size.
    Returns:
        boxes: (..., 4) (cx, cy, w, h) normalised by (W, H);
        nonempty: (...,) bool; boxes of empty masks are zeros.
    """
    if convention not in MASK_BOX_CONVENTIONS:
        raise ValueError(f"masks_to_boxes_normalized: convention must be one of "
                         f"{MASK_BOX_CONVENTIONS}, got {convention!r}")
    H, W = masks.shape[-2:]
    cols = masks.any(-2)  # (..., W)
    rows = masks.any(-1)  # (..., H)
    nonempty = cols.any(-1)
    xs = torch.arange(W, device=masks.device, dtype=torch.float32)
    ys = torch.arange(H, device=masks.device, dtype=torch.float32)
    big = float(max(H, W) + 1)
    end = 1.0 if convention == "unit_square" else 0.0
    x0 = torch.where(cols, xs, big).amin(-1)
    x1 = torch.where(cols, xs, -1.0).amax(-1) + end
    y0 = torch.where(rows, ys, big).amin(-1)
    y1 = torch.where(rows, ys, -1.0).amax(-1) + end
    boxes = torch.stack(((x0 + x1) / (2 * W), (y0 + y1) / (2 * H), (x1 - x0) / W, (y1 - y0) / H), -1)
    return torch.where(nonempty[..., None], boxes, torch.zeros_like(boxes)), nonempty
