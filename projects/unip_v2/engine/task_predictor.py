"""`TaskPredictor`: the generalist in eval mode on dataset records of any of its tasks.

    predictor = TaskPredictor(cfg)                      # cfg.MODEL.WEIGHTS loaded safely
    predictor.prepare_for_dataset("toy_shapes_val_classification")   # its category names
    outputs = predictor("classification", records)      # [{"class_logits": ...}, ...]

Each record (a dataset dict: "file_name", and what the task's test mapper reads, e.g.
"captions" for retrieval) goes through its task's test-time mapper, as in evaluation, then
the model, in batches. A record the mapper cannot use (an unreadable image) gives None in its
place, with the mapper's warning.
"""
import copy
from typing import Callable, Dict, List, Optional, Sequence

import torch

from detectron2.modeling import build_model

from .checkpointer import Checkpointer, check_finite_weights
from .trainer import task_mapper

__all__ = ["TaskPredictor"]


class TaskPredictor:
    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if cfg.MODEL.WEIGHTS:
            Checkpointer(self.model).load(cfg.MODEL.WEIGHTS)
            check_finite_weights(self.model, cfg.MODEL.WEIGHTS)
        self._mappers = {}

    def prepare_for_dataset(self, dataset_name: str) -> None:
        """The dataset's task takes its target set (e.g. category names) from it."""
        self.model.prepare_for_dataset(dataset_name)

    def __call__(self, task: str, records: Sequence[Dict], batch_size: int = 16,
                 forward: Optional[Callable[[torch.nn.Module, List[Dict]], Sequence]] = None
                 ) -> List[Optional[Dict]]:
        """The task's output for each record (None where the mapper could not use it).
        ``forward(model, mapped_batch)`` replaces the model's own inference, e.g. the
        retrieval task's image embeddings alone (`RetrievalTask.embed_images`)."""
        forward = forward or (lambda model, batch: model(batch))
        if task not in self._mappers:
            self._mappers[task] = task_mapper(self.cfg, task, is_train=False)
        mapper = self._mappers[task]
        outputs: List[Optional[Dict]] = []
        for start in range(0, len(records), batch_size):
            mapped = [mapper(copy.deepcopy(r)) for r in records[start:start + batch_size]]
            usable = [m for m in mapped if m is not None]
            with torch.no_grad():
                results = iter(forward(self.model, usable) if usable else [])
            outputs += [None if m is None else next(results) for m in mapped]
        return outputs
