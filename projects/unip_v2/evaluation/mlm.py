"""Masked-token accuracy of masked language modelling, over every process's predictions."""
import logging
from collections import OrderedDict
from typing import Dict, List

import torch

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["MLMEvaluator"]

logger = logging.getLogger(__name__)


class MLMEvaluator(DatasetEvaluator):
    """Reads each output's "predicted_ids" and "target_ids" (n,) (the chosen positions of one
    text); returns {"mlm": {"accuracy", "num_tokens"}}: the percentage of all chosen positions
    of the dataset whose token was predicted right (a micro average: a long text weighs more
    than a short one, as every chosen token counts once), and how many there were. Texts the
    test loader left out (not a string, blank) are not counted."""

    def __init__(self, dataset_name: str, distributed: bool = True):
        self.dataset_name = dataset_name
        self.distributed = distributed
        self.reset()

    def reset(self):
        self._correct = 0
        self._total = 0
        self._texts = 0

    def process(self, inputs: List[Dict], outputs: List[Dict]):
        for y in outputs:
            pred = torch.as_tensor(y["predicted_ids"]).cpu()
            target = torch.as_tensor(y["target_ids"]).cpu()
            if pred.shape != target.shape or pred.dim() != 1:
                raise ValueError(f"{self.dataset_name}: predicted_ids {tuple(pred.shape)} and "
                                 f"target_ids {tuple(target.shape)} must be equal 1-d shapes")
            self._correct += int((pred == target).sum())
            self._total += target.numel()
            self._texts += 1

    def evaluate(self):
        counts = [(self._correct, self._total, self._texts)]
        if self.distributed:
            comm.synchronize()
            counts = [c for part in comm.gather(counts, dst=0) for c in part]
            if not comm.is_main_process():
                return {}
        correct, total, texts = (sum(c[i] for c in counts) for i in range(3))
        if total == 0:
            logger.warning(f"{self.dataset_name}: no masked tokens to evaluate")
            return {"mlm": {"accuracy": float("nan"), "num_tokens": 0}}
        accuracy = 100.0 * correct / total
        logger.info(f"{self.dataset_name}: {texts} texts, {total} masked tokens, masked-token "
                    f"accuracy {accuracy:.2f}%")
        return OrderedDict(mlm={"accuracy": accuracy, "num_tokens": total})
