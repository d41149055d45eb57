"""Top-1 / top-5 accuracy of image classification, over every process's predictions."""
import itertools
import logging
from collections import OrderedDict
from typing import Dict, List

import torch

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["ClassificationEvaluator"]

logger = logging.getLogger(__name__)


class ClassificationEvaluator(DatasetEvaluator):
    """Reads each input's "label" and each output's "class_logits" (C,); returns
    {"classification": {"top1", "top5"}} in percent of the evaluated images: the true class
    is among the k best scored (a tie with the true class counts for it). Images the test
    loader left out (unreadable) are not counted."""

    def __init__(self, dataset_name: str, distributed: bool = True):
        self.dataset_name = dataset_name
        self.distributed = distributed
        self.reset()

    def reset(self):
        self._ranks: List[torch.Tensor] = []

    def process(self, inputs: List[Dict], outputs: List[Dict]):
        for x, y in zip(inputs, outputs):
            logits = y["class_logits"].float().cpu()
            label = int(x["label"])
            if not 0 <= label < logits.numel():
                raise ValueError(f"{self.dataset_name}: label {label} outside the "
                                 f"{logits.numel()} classes the model scored")
            # rank of the true class: how many classes score strictly higher
            self._ranks.append((logits > logits[label]).sum().view(1))

    def evaluate(self):
        ranks = self._ranks
        if self.distributed:
            comm.synchronize()
            ranks = list(itertools.chain(*comm.gather(ranks, dst=0)))
            if not comm.is_main_process():
                return {}
        if not ranks:
            logger.warning(f"{self.dataset_name}: no predictions to evaluate")
            return {"classification": {"top1": float("nan"), "top5": float("nan")}}
        ranks = torch.cat(ranks)
        result = {"top1": 100.0 * (ranks < 1).float().mean().item(),
                  "top5": 100.0 * (ranks < 5).float().mean().item()}
        logger.info(f"{self.dataset_name}: {len(ranks)} images, top-1 {result['top1']:.2f}%, "
                    f"top-5 {result['top5']:.2f}%")
        return OrderedDict(classification=result)
