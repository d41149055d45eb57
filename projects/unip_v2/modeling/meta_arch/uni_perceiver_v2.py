"""`UniPerceiverV2`: detection and instance segmentation in the unified formulation.

The image becomes [<SPE>, global tokens, regional tokens] through the unified decoder g;
each category name becomes [<SPE>, f_text(name)] through the same g, and its <SPE> output
is the class embedding (cached by a TargetBank in eval mode). Each regional token's output
is compared with every class embedding (Eq. 5); training adds the cross-entropy over the
category set on the proposals matched to ground truth (Eq. 7) to the region proposal
network's losses; inference scores (proposal, class) pairs by objectness x class
probability, boxes and masks coming from the proposals.
"""
from typing import Dict, List

import torch

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ...data.datasets.metadata import thing_classes
from ..target_bank import TargetBank
from ..tasks import (
    LogitScale,
    check_class_names,
    class_logits,
    detection_topk,
    matched_class_loss,
)
from ..text_encoder import TextEncoder
from ..unified_decoder import Segment, SegmentKind, UnifiedDecoder
from .proposal_network import UniPerceiverV2ProposalNetwork, proposal_instances

__all__ = ["UniPerceiverV2"]


@META_ARCH_REGISTRY.register()
class UniPerceiverV2(UniPerceiverV2ProposalNetwork):
    @configurable
    def __init__(self, *, text_encoder: TextEncoder, unified_decoder: UnifiedDecoder,
                 train_class_names: List[str], test_class_names: List[str],
                 class_loss_weight: float, **kwargs):
        super().__init__(**kwargs)
        self.text_encoder = text_encoder
        self.unified_decoder = unified_decoder
        self.logit_scale = LogitScale()
        self.target_bank = TargetBank(self.encode_targets)
        self.train_class_names = list(train_class_names)
        self.test_class_names: List[str] = []
        if test_class_names:
            self.set_test_class_names(test_class_names)
        self.class_loss_weight = class_loss_weight

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        width = cfg.MODEL.UNIFIED_DECODER.WIDTH
        for key, value in (("MODEL.IMAGE_ENCODER.OUTPUT_DIM", cfg.MODEL.IMAGE_ENCODER.OUTPUT_DIM),
                           ("MODEL.TEXT_ENCODER.OUTPUT_DIM", cfg.MODEL.TEXT_ENCODER.OUTPUT_DIM)):
            if value != width:
                raise ValueError(f"{key}={value} must equal MODEL.UNIFIED_DECODER.WIDTH={width}: "
                                 "image and text tokens enter the same decoder")
        # thing_classes() loads a dataset whose registration left the names unset.
        train_names = thing_classes(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else []
        test_names = list(cfg.MODEL.DETECTION.TEST_CLASS_NAMES) or (
            thing_classes(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else train_names)
        args.update(text_encoder=TextEncoder(cfg), unified_decoder=UnifiedDecoder(cfg),
                    train_class_names=train_names, test_class_names=test_names,
                    class_loss_weight=cfg.MODEL.DETECTION.CLASS_LOSS_WEIGHT)
        return args

    def set_test_class_names(self, names: List[str]) -> None:
        """Replace the category names of inference (open vocabulary, no retraining): the
        TargetBank encodes a new list once, at the next eval forward. pred_classes index
        into ``names``."""
        names = check_class_names(names)
        self.test_class_names = names

    def encode_targets(self, names: List[str]) -> torch.Tensor:
        """T category names -> (T, width) class embeddings: <SPE> outputs of g on
        [<SPE>, f_text(name)], the sequence marked as a target."""
        features, padding = self.text_encoder.encode(names)
        return self.unified_decoder([Segment(features, padding, SegmentKind.TEXT)],
                                    is_target=True).spe

    def region_features(self, out) -> torch.Tensor:
        """(B, O, width): g's outputs at the regional tokens of [<SPE>, global, regional]."""
        dec = self.unified_decoder([
            Segment(out.global_tokens, out.global_padding_mask, SegmentKind.IMAGE_GLOBAL),
            Segment(out.regional_tokens, None, SegmentKind.IMAGE_REGION)])
        return dec.tokens[:, dec.tokens.shape[1] - out.regional_tokens.shape[1]:]

    def forward(self, batched_inputs: List[Dict]):
        images, sizes = self.preprocess_image(batched_inputs)
        canvas = images.tensor.shape[-2:]
        if self.training:
            if not self.train_class_names:
                raise ValueError("UniPerceiverV2: no category names to train with "
                                 "(DATASETS.TRAIN's metadata has no thing_classes)")
            targets = self.prepare_targets(batched_inputs, canvas)
            out = self.image_encoder(images.tensor, sizes, [t["boxes"] for t in targets])
            losses, matches = self.criterion(out.rpn, targets, out.rpn["proposal_logits"],
                                             return_matches=True)
            logits = class_logits(self.region_features(out),
                                  self.target_bank(self.train_class_names), self.logit_scale())
            gt_classes = [x["instances"].gt_classes for x in batched_inputs]
            losses["loss_class"] = self.class_loss_weight * matched_class_loss(
                logits, out.regional_index, matches, gt_classes)
            return losses
        if not self.test_class_names:
            raise ValueError("UniPerceiverV2: no category names for inference: set "
                             "MODEL.DETECTION.TEST_CLASS_NAMES or DATASETS.TEST, or call "
                             "set_test_class_names()")
        out = self.image_encoder(images.tensor, sizes)
        logits = class_logits(self.region_features(out), self.target_bank(self.test_class_names),
                              self.logit_scale())
        results = []
        for b, x in enumerate(batched_inputs):
            scores, proposals, classes = detection_topk(out.regional_objectness[b], logits[b],
                                                        self.detections_per_image)
            results.append({"instances": proposal_instances(out, b, x, canvas, proposals,
                                                            scores, classes)})
        return results
