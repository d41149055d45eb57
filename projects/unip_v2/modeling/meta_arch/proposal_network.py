"""`UniPerceiverV2ProposalNetwork`: the image encoder alone, trained and evaluated as a
class-agnostic instance segmenter (its region proposal network's losses in training, the
top general region proposals as detectron2 Instances at inference). A sibling of the
generalist `UniPerceiverV2`, which puts tasks on top of the same image encoder."""
from typing import Dict, List

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ...evaluation import ClassAgnosticCOCOEvaluator
from ..image_encoder import (
    ImageEncoder,
    ImageEncoderOutput,
    ImagePreprocessor,
    ProposalCriterion,
    build_proposal_criterion,
    proposal_instances,
)

__all__ = ["UniPerceiverV2ProposalNetwork"]


@META_ARCH_REGISTRY.register()
class UniPerceiverV2ProposalNetwork(nn.Module):
    """Inputs: detectron2's list of dicts (see `ImagePreprocessor`); "instances" with
    gt_boxes / gt_masks in training."""

    @configurable
    def __init__(self, *, image_encoder: ImageEncoder, criterion: ProposalCriterion,
                 preprocessor: ImagePreprocessor, detections_per_image: int):
        super().__init__()
        self.image_encoder = image_encoder
        self.criterion = criterion
        self.preprocessor = preprocessor
        self.detections_per_image = detections_per_image

    @classmethod
    def from_config(cls, cfg):
        image_encoder = ImageEncoder(cfg)
        return {
            "image_encoder": image_encoder,
            "criterion": build_proposal_criterion(cfg),
            "preprocessor": ImagePreprocessor(
                cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD,
                max(cfg.MODEL.IMAGE_ENCODER.SIZE_DIVISIBILITY,
                    image_encoder.backbone.size_divisibility), cfg.INPUT.FORMAT),
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_dir: str):
        """Class-agnostic COCO box and mask AP: the proposals carry no category."""
        return ClassAgnosticCOCOEvaluator(dataset_name, tasks=("bbox", "segm"),
                                          output_dir=output_dir,
                                          max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)

    @property
    def device(self):
        return self.preprocessor.device

    def lr_multiplier_modules(self, cfg):
        """(module, learning-rate multiplier) pairs for the optimiser, most specific first
        (solver/build.py): the backbone, then the rest of f_image (pixel encoder, proposal
        decoder, region proposals, global tokens)."""
        return [(self.image_encoder.backbone, cfg.SOLVER.BACKBONE_MULTIPLIER),
                (self.image_encoder, cfg.SOLVER.IMAGE_ENCODER_MULTIPLIER)]

    def preprocess_image(self, batched_inputs: List[Dict]):
        """Normalise and pad: (ImageList, each image's un-padded (h, w))."""
        return self.preprocessor(batched_inputs)

    def prepare_targets(self, batched_inputs: List[Dict], canvas_hw) -> List[Dict]:
        """gt Instances -> {"boxes": (T, 4) cxcywh / canvas, "masks": (T, H, W) bool}."""
        return self.preprocessor.targets(batched_inputs, canvas_hw)

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
