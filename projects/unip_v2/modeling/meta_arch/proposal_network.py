"""`UniPerceiverV2ProposalNetwork`: the image encoder alone, trained and evaluated as a
class-agnostic instance segmenter (its region proposal network's losses in training, the
top general region proposals as detectron2 Instances at inference)."""
from typing import Dict, List

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances

from ..image_encoder import HungarianMatcher, ImageEncoder, ImageEncoderOutput, ProposalCriterion

__all__ = ["UniPerceiverV2ProposalNetwork", "build_proposal_criterion", "proposal_instances"]


def build_proposal_criterion(cfg) -> ProposalCriterion:
    """The region proposal network's matcher and losses from MODEL.IMAGE_ENCODER.{MATCHER,LOSS}."""
    m, loss = cfg.MODEL.IMAGE_ENCODER.MATCHER, cfg.MODEL.IMAGE_ENCODER.LOSS
    matcher = HungarianMatcher(m.COST_CLASS, m.COST_BOX, m.COST_GIOU, m.COST_MASK, m.COST_DICE,
                               loss.TRAIN_NUM_POINTS, loss.FOCAL_ALPHA, loss.FOCAL_GAMMA)
    weights = {"ce": loss.CLASS_WEIGHT, "bbox": loss.BOX_WEIGHT, "giou": loss.GIOU_WEIGHT,
               "mask": loss.MASK_WEIGHT, "dice": loss.DICE_WEIGHT,
               "proposal_ce": loss.PROPOSAL_CLASS_WEIGHT}
    return ProposalCriterion(matcher, weights, loss.TRAIN_NUM_POINTS, loss.OVERSAMPLE_RATIO,
                             loss.IMPORTANCE_SAMPLE_RATIO, loss.FOCAL_ALPHA, loss.FOCAL_GAMMA)


@META_ARCH_REGISTRY.register()
class UniPerceiverV2ProposalNetwork(nn.Module):
    """Inputs: detectron2's list of dicts ("image" uint8 (3, H, W) in INPUT.FORMAT,
    optional "height"/"width" of the output, "instances" with gt_boxes/gt_masks in training,
    optional "valid_size" (h, w) when the mapper padded the image itself)."""

    @configurable
    def __init__(self, *, image_encoder: ImageEncoder, criterion: ProposalCriterion,
                 pixel_mean, pixel_std, size_divisibility: int, detections_per_image: int,
                 input_format: str = "RGB"):
        super().__init__()
        self.image_encoder = image_encoder
        self.criterion = criterion
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.size_divisibility = size_divisibility
        self.detections_per_image = detections_per_image
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg):
        image_encoder = ImageEncoder(cfg)
        return {
            "image_encoder": image_encoder,
            "criterion": build_proposal_criterion(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": max(cfg.MODEL.IMAGE_ENCODER.SIZE_DIVISIBILITY,
                                     image_encoder.backbone.size_divisibility),
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "input_format": cfg.INPUT.FORMAT,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]):
        """Normalise and pad. Returns the ImageList and each image's un-padded (h, w)."""
        images = []
        for x in batched_inputs:
            img = x["image"]
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"UniPerceiverV2ProposalNetwork: 'image' must be (3, H, W), "
                                 f"got shape {tuple(img.shape)}")
            img = img.to(self.device)
            if self.input_format == "BGR":
                img = img.flip(0)
            images.append((img.float() - self.pixel_mean) / self.pixel_std)
        image_list = ImageList.from_tensors(images, self.size_divisibility)
        sizes = [tuple(x.get("valid_size", s)) for x, s in zip(batched_inputs, image_list.image_sizes)]
        return image_list, [(int(h), int(w)) for h, w in sizes]

    def prepare_targets(self, batched_inputs: List[Dict], canvas_hw) -> List[Dict]:
        """gt Instances -> {"boxes": (T, 4) cxcywh / canvas, "masks": (T, H, W) bool}."""
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

    def forward(self, batched_inputs: List[Dict]):
        images, sizes = self.preprocess_image(batched_inputs)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images.tensor.shape[-2:])
            out = self.image_encoder(images.tensor, sizes, [t["boxes"] for t in targets])
            return self.criterion(out.rpn, targets, out.rpn["proposal_logits"])
        out = self.image_encoder(images.tensor, sizes)
        return self.inference(out, batched_inputs, images.tensor.shape[-2:])

    @torch.no_grad()
    def inference(self, out: ImageEncoderOutput, batched_inputs: List[Dict], canvas_hw):
        """Top detections_per_image proposals per image, scored by the fused proposal
        objectness; boxes and masks in the output resolution ("height", "width")."""
        results = []
        k = min(self.detections_per_image, out.regional_objectness.shape[1])
        for b, x in enumerate(batched_inputs):
            scores, top = out.regional_objectness[b].sigmoid().topk(k)
            results.append({"instances": proposal_instances(
                out, b, x, canvas_hw, top, scores, torch.zeros_like(top))})
        return results


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
