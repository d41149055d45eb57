"""Detection and instance segmentation in the unified formulation ("Tasks with
Localization"): each general region proposal's decoded feature is compared with every class
embedding (Eq. 5); the class loss is cross-entropy over the category set (Eq. 7) on the
proposals matched to ground truth; a prediction's score is objectness x class probability.
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ...data.datasets.metadata import thing_classes
from ...evaluation import CheckedCOCOEvaluator
from ..image_encoder import ImageEncoderOutput, build_proposal_criterion, proposal_instances
from .base import Task, first_dataset_of, register_task

__all__ = ["DetectionTask", "LogitScale", "check_class_names", "class_logits",
           "matched_class_loss", "detection_topk"]


class LogitScale(nn.Module):
    """The learnable 1/tau of Eq. 5, one per task family: stored as a log, initialised to
    1/0.07 (CLIP's initial temperature), used clamped at 100 so training cannot blow it up."""

    def __init__(self, init: float = 1 / 0.07, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))
        self.max_scale = max_scale

    def weight_decay_kinds(self):
        """For the optimiser: never decayed (decay would pull the scale towards 1)."""
        return {"log_scale": "none"}

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)


def check_class_names(names: Sequence[str]) -> List[str]:
    """The category names of a vocabulary, stripped; a ValueError names an empty entry or
    the repeated ones (a repeated name would split one category's probability in two)."""
    names = [n.strip() if isinstance(n, str) else n for n in names]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"the vocabulary must be a non-empty list of non-empty names, "
                         f"got {names!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"the vocabulary's names repeat: {repeated}")
    return names


def class_logits(features: torch.Tensor, class_embeddings: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
    """scale * cos(features, class embeddings).

    Args:
        features: (B, O, D) decoded regional tokens; class_embeddings: (C, D).
    Returns:
        (B, O, C) logits.
    """
    if features.shape[-1] != class_embeddings.shape[-1] or class_embeddings.dim() != 2:
        raise ValueError(f"class_logits: features {tuple(features.shape)} and class embeddings "
                         f"{tuple(class_embeddings.shape)} must share the last dimension D")
    return scale * F.normalize(features, dim=-1) @ F.normalize(class_embeddings, dim=-1).T


def matched_class_loss(logits: torch.Tensor, proposal_query_index: torch.Tensor,
                       matches: List[Tuple[torch.Tensor, torch.Tensor]],
                       gt_classes: List[torch.Tensor]) -> torch.Tensor:
    """Eq. 7 on the proposals matched to ground truth.

    Args:
        logits: (B, O, C) class logits of the top-O proposals.
        proposal_query_index: (B, O) which decoder query each proposal is.
        matches: per image (query indices, gt indices), the class-agnostic Hungarian
            assignment of the decoder's final layer.
        gt_classes: per image (T,) int64 category index in [0, C).
    Returns:
        mean cross-entropy over matched proposals that made the top O (unmatched proposals
        get no class loss: their objectness already says "background"); 0 (still attached
        to the graph) when there are none.
    """
    B, O, C = logits.shape
    rows, targets = [], []
    for b, (q, g) in enumerate(matches):
        if len(q) == 0:
            continue
        q = q.to(proposal_query_index.device)
        # position of each matched query among the top-O proposals (-1 if it did not make it)
        hit = proposal_query_index[b][None, :] == q[:, None]        # (m, O)
        kept = hit.any(1)
        if not kept.any():
            continue
        pos = hit.float().argmax(1)[kept]
        rows.append(logits[b, pos])
        targets.append(gt_classes[b].to(logits.device)[g.to(logits.device)[kept]])
    if not rows:
        return logits.sum() * 0.0
    target = torch.cat(targets)
    if int(target.min()) < 0 or int(target.max()) >= C:
        raise ValueError(f"matched_class_loss: ground-truth classes must lie in [0, {C}), got "
                         f"{target.min().item()}..{target.max().item()}")
    return F.cross_entropy(torch.cat(rows).float(), target)


def detection_topk(objectness_logits: torch.Tensor, class_logits_: torch.Tensor, k: int):
    """Top k (proposal, class) pairs of one image by objectness x class probability.

    Args:
        objectness_logits: (O,); class_logits_: (O, C).
    Returns:
        scores (k',), proposal indices (k',), class indices (k',) with k' = min(k, O * C),
        sorted by score, highest first. A proposal may appear with several classes.
    """
    scores = objectness_logits.sigmoid()[:, None] * class_logits_.softmax(-1)   # (O, C)
    C = scores.shape[1]
    top = scores.flatten().topk(min(k, scores.numel()))
    return top.values, torch.div(top.indices, C, rounding_mode="floor"), top.indices % C


@register_task
class DetectionTask(Task):
    """Detection and instance segmentation through category names (COCO, toy_shapes).

    Sequences: the image is [<SPE>, global tokens, regional tokens] through g; a category
    name is [<SPE>, f_text(name)] through g (the model's TargetBank), its <SPE> output the
    class embedding. Losses: the region proposal network's (its matcher and criterion live
    here: only detection data has boxes and masks) plus the class loss of Eq. 7, weighted by
    MODEL.DETECTION.CLASS_LOSS_WEIGHT. Inference: (proposal, class) pairs scored by
    objectness x class probability as detectron2 Instances; evaluated by COCO box and mask AP.

    Category names: training takes the thing_classes of the first detection dataset of
    DATASETS.TRAIN; inference MODEL.DETECTION.TEST_CLASS_NAMES, else each evaluated dataset's
    own (`prepare_for_dataset`), else the first detection dataset of DATASETS.TEST, else the
    training names. Any list of names works at test time (open vocabulary).
    """

    name = "detection"

    @classmethod
    def task_weight(cls, cfg) -> float:
        """1 (Table 8): the task's loss terms carry their own weights (Table 7's and
        CLASS_LOSS_WEIGHT)."""
        return 1.0

    def __init__(self, cfg):
        super().__init__()
        self.criterion = build_proposal_criterion(cfg)
        self.logit_scale = LogitScale()
        self.class_loss_weight = cfg.MODEL.DETECTION.CLASS_LOSS_WEIGHT
        self.detections_per_image = cfg.TEST.DETECTIONS_PER_IMAGE
        self.fixed_test_names = bool(cfg.MODEL.DETECTION.TEST_CLASS_NAMES)
        # thing_classes() loads a dataset whose registration left the names unset.
        train_set = first_dataset_of(self.name, cfg.DATASETS.TRAIN)
        self.train_class_names = thing_classes(train_set) if train_set else []
        test_set = first_dataset_of(self.name, cfg.DATASETS.TEST)
        test_names = list(cfg.MODEL.DETECTION.TEST_CLASS_NAMES) or (
            thing_classes(test_set) if test_set else self.train_class_names)
        self.test_class_names: List[str] = []
        if test_names:
            self.set_test_class_names(test_names)

    def set_test_class_names(self, names: Sequence[str]) -> None:
        """Replace the category names of inference (open vocabulary, no retraining): the
        TargetBank encodes a new list once, at the next eval forward. pred_classes index
        into ``names``."""
        self.test_class_names = check_class_names(names)

    def prepare_for_dataset(self, dataset_name: str) -> None:
        """The dataset's own thing_classes become the test names, unless
        MODEL.DETECTION.TEST_CLASS_NAMES fixes them."""
        if not self.fixed_test_names:
            self.set_test_class_names(thing_classes(dataset_name))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_dir: str):
        # COCOEvaluator on pycocotools' COCOeval (detectron2 0.6's C++ one lives in
        # detectron2._C, absent in the wheel-less install), with checked segm ground truth.
        return CheckedCOCOEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=output_dir,
                                    max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)

    def region_features(self, model, out: ImageEncoderOutput) -> torch.Tensor:
        """(B, O, width): g's outputs at the regional tokens of [<SPE>, global, regional]."""
        tokens = model.decode_image(out).tokens
        return tokens[:, tokens.shape[1] - out.regional_tokens.shape[1]:]

    def losses(self, model, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        if not self.train_class_names:
            raise ValueError("detection: no category names to train with (no detection "
                             "dataset in DATASETS.TRAIN has thing_classes)")
        images, sizes = model.preprocessor(batched_inputs)
        targets = model.preprocessor.targets(batched_inputs, images.tensor.shape[-2:])
        out = model.image_encoder(images.tensor, sizes, [t["boxes"] for t in targets])
        losses, matches = self.criterion(out.rpn, targets, out.rpn["proposal_logits"],
                                         return_matches=True)
        logits = class_logits(self.region_features(model, out),
                              model.target_bank(self.train_class_names), self.logit_scale())
        gt_classes = [x["instances"].gt_classes for x in batched_inputs]
        losses["loss_class"] = self.class_loss_weight * matched_class_loss(
            logits, out.regional_index, matches, gt_classes)
        return losses

    def inference(self, model, batched_inputs: List[Dict]) -> List[Dict]:
        if not self.test_class_names:
            raise ValueError("detection: no category names for inference: set "
                             "MODEL.DETECTION.TEST_CLASS_NAMES or DATASETS.TEST, or call "
                             "set_test_class_names()")
        images, sizes = model.preprocessor(batched_inputs)
        canvas = images.tensor.shape[-2:]
        out = model.image_encoder(images.tensor, sizes)
        logits = class_logits(self.region_features(model, out),
                              model.target_bank(self.test_class_names), self.logit_scale())
        results = []
        for b, x in enumerate(batched_inputs):
            scores, proposals, classes = detection_topk(out.regional_objectness[b], logits[b],
                                                        self.detections_per_image)
            results.append({"instances": proposal_instances(out, b, x, canvas, proposals,
                                                            scores, classes)})
        return results
