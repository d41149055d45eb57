"""What goes into the image encoder and what comes back out as detectron2 structures:
normalising and padding detectron2's batched inputs, ground-truth instances as the region
proposal network's targets, and chosen proposals as `Instances`. Shared by the proposal
network and by every task of the generalist that reads images."""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert

from detectron2.structures import Boxes, ImageList, Instances

from .image_encoder import ImageEncoderOutput

__all__ = ["ImagePreprocessor", "proposal_instances"]


class ImagePreprocessor(nn.Module):
    """detectron2's list of dicts -> a normalised, padded batch.

    Inputs: "image" uint8 (3, H, W) in ``input_format``; optional "valid_size" (h, w) when the
    mapper padded the image itself; in training "instances" with gt_boxes / gt_masks.
    The mean and std are non-persistent buffers: they come from the config, not checkpoints.
    """

    def __init__(self, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 size_divisibility: int, input_format: str = "RGB"):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.size_divisibility = size_divisibility
        self.input_format = input_format

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]) -> Tuple[ImageList, List[Tuple[int, int]]]:
        """Returns the ImageList (B, 3, H, W) and each image's un-padded (h, w)."""
        images = []
        for x in batched_inputs:
            img = x["image"]
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"'image' must be (3, H, W), got shape {tuple(img.shape)}")
            img = img.to(self.device)
            if self.input_format == "BGR":
                img = img.flip(0)
            images.append((img.float() - self.pixel_mean) / self.pixel_std)
        image_list = ImageList.from_tensors(images, self.size_divisibility)
        sizes = [tuple(x.get("valid_size", s))
                 for x, s in zip(batched_inputs, image_list.image_sizes)]
        return image_list, [(int(h), int(w)) for h, w in sizes]

    def targets(self, batched_inputs: List[Dict], canvas_hw) -> List[Dict]:
        """gt Instances -> per image {"boxes": (T, 4) cxcywh / canvas, "masks": (T, H, W)
        bool on the padded canvas}."""
        H, W = canvas_hw
        scale = torch.tensor([W, H, W, H], dtype=torch.float32, device=self.device)
        targets = []
        for x in batched_inputs:
            inst = x["instances"].to(self.device)
            boxes = box_convert(inst.gt_boxes.tensor.float(), "xyxy", "cxcywh") / scale
            masks = inst.gt_masks
            masks = masks.tensor if hasattr(masks, "tensor") else masks
            padded = torch.zeros((masks.shape[0], H, W), dtype=torch.bool, device=self.device)
            padded[:, :masks.shape[1], :masks.shape[2]] = masks.bool()
            targets.append({"boxes": boxes, "masks": padded})
        return targets


def proposal_instances(out: ImageEncoderOutput, b: int, x: Dict, canvas_hw, proposals,
                       scores, classes) -> Instances:
    """Instances of image b from chosen regional proposals.

    Args:
        out: the image encoder's output; x: the image's input dict ("height"/"width" give
            the output resolution, default the input size); canvas_hw: padded (H, W).
        proposals: (k,) indices among the O proposals (may repeat); scores: (k,);
        classes: (k,) int64.
    Returns:
        Instances with pred_boxes (XYXY, output pixels, clipped), scores, pred_classes and
        pred_masks (k, height, width) bool.
    """
    H, W = canvas_hw
    h, w = out.image_sizes[b]
    out_h, out_w = int(x.get("height", h)), int(x.get("width", w))
    boxes = box_convert(out.regional_boxes[b, proposals].float(), "cxcywh", "xyxy")
    boxes = boxes * torch.tensor([out_w, out_h, out_w, out_h], device=boxes.device)
    masks = F.interpolate(out.regional_mask_logits[b, proposals][None].float(), size=(H, W),
                          mode="bilinear", align_corners=False)[:, :, :h, :w]
    masks = F.interpolate(masks, size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
    inst = Instances((out_h, out_w))
    inst.pred_boxes = Boxes(boxes)
    inst.pred_boxes.clip((out_h, out_w))
    inst.scores = scores.float()  # float32 even under autocast, as evaluators expect
    inst.pred_classes = classes.to(torch.int64)
    inst.pred_masks = masks > 0
    return inst
