"""Image classification in the unified formulation (Uni-Perceiver v2, Sec. 4.3): the image
is [<SPE>, global tokens, regional tokens] through g and its <SPE> output is compared with
the category names, each [<SPE>, f_text(name)] through g (Eq. 5); the loss is cross-entropy
with label smoothing over the category set (Eq. 7); metrics are top-1 and top-5 accuracy.
"""
from typing import Dict, List

import torch
from torch.nn import functional as F

from ...data.dataset_mappers import ClassificationDatasetMapper
from ...data.datasets import class_names as dataset_class_names
from ...evaluation import ClassificationEvaluator
from .base import Task, first_dataset_of, register_task
from .detection import LogitScale, check_class_names, class_logits

__all__ = ["ClassificationTask"]


@register_task
class ClassificationTask(Task):
    """Targets: the category names of the first classification dataset of DATASETS.TRAIN in
    training and of each evaluated dataset at test time (its metadata's ``class_names``),
    encoded through the model's TargetBank. Temperature: its own learnable scale. Loss
    ``loss_cls`` = MODEL.CLASSIFICATION.LOSS_WEIGHT x cross-entropy with
    MODEL.CLASSIFICATION.LABEL_SMOOTHING. Inputs: {"image", "label"} from
    `ClassificationDatasetMapper`; outputs {"class_logits": (C,)}."""

    name = "classification"

    def __init__(self, cfg):
        super().__init__()
        c = cfg.MODEL.CLASSIFICATION
        self.logit_scale = LogitScale()
        self.loss_weight = c.LOSS_WEIGHT
        self.label_smoothing = c.LABEL_SMOOTHING
        train_set = first_dataset_of(self.name, cfg.DATASETS.TRAIN)
        self.train_class_names = (check_class_names(dataset_class_names(train_set))
                                  if train_set else [])
        test_set = first_dataset_of(self.name, cfg.DATASETS.TEST)
        self.test_class_names = (check_class_names(dataset_class_names(test_set))
                                 if test_set else self.train_class_names)

    def prepare_for_dataset(self, dataset_name: str) -> None:
        self.test_class_names = check_class_names(dataset_class_names(dataset_name))

    def set_test_class_names(self, names: List[str]) -> None:
        """Classify among ``names`` at inference (an open vocabulary: tools/demo.py
        --task classify --vocabulary), without retraining."""
        self.test_class_names = check_class_names(names)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_dir: str):
        return ClassificationEvaluator(dataset_name)

    @classmethod
    def build_dataset_mapper(cls, cfg, is_train: bool):
        return ClassificationDatasetMapper(cfg, is_train=is_train)

    def image_logits(self, model, batched_inputs: List[Dict], names: List[str]) -> torch.Tensor:
        """(B, C): scale * cos(<SPE> output of the image, class embeddings)."""
        return class_logits(model.image_spe(batched_inputs)[:, None], model.target_bank(names),
                            self.logit_scale())[:, 0]

    def losses(self, model, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        if not self.train_class_names:
            raise ValueError("classification: no category names to train with (no "
                             "classification dataset in DATASETS.TRAIN)")
        logits = self.image_logits(model, batched_inputs, self.train_class_names)
        labels = torch.as_tensor([int(x["label"]) for x in batched_inputs],
                                 device=logits.device)
        C = logits.shape[1]
        if int(labels.min()) < 0 or int(labels.max()) >= C:
            raise ValueError(f"classification: labels must lie in [0, {C}), got "
                             f"{labels.tolist()}")
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return {"loss_cls": self.loss_weight * loss}

    def inference(self, model, batched_inputs: List[Dict]) -> List[Dict]:
        if not self.test_class_names:
            raise ValueError("classification: no category names for inference (no "
                             "classification dataset in DATASETS.TEST or DATASETS.TRAIN)")
        logits = self.image_logits(model, batched_inputs, self.test_class_names).float()
        return [{"class_logits": row} for row in logits]
