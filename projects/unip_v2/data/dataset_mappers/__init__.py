"""Dataset mappers (dataset dict -> model input), selectable by ``INPUT.DATASET_MAPPER_NAME``.

Usage::

    from unip_v2.data.dataset_mappers import build_dataset_mapper
    mapper = build_dataset_mapper(cfg, is_train=True)
    loader = build_detection_train_loader(cfg, mapper=mapper)
"""
from typing import Any, Callable, Dict, Optional

from .classification import ClassificationDatasetMapper
from .coco_instance_lsj import COCOInstanceLSJDatasetMapper, build_lsj_augmentations
from .image_text import ImageTextDatasetMapper
from .text import TextDatasetMapper

__all__ = [
    "DATASET_MAPPERS",
    "ClassificationDatasetMapper",
    "COCOInstanceLSJDatasetMapper",
    "ImageTextDatasetMapper",
    "TaskTaggedMapper",
    "TextDatasetMapper",
    "build_dataset_mapper",
    "build_lsj_augmentations",
    "register_dataset_mapper",
]

# Name -> mapper class (a detectron2 @configurable class taking (cfg, is_train)). A plain dict
# rather than a detectron2 Registry: Registry keys by class name, the config uses short names.
DATASET_MAPPERS: Dict[str, Callable] = {}


def register_dataset_mapper(name: str, mapper_cls: Callable) -> None:
    """Make ``mapper_cls`` selectable as ``INPUT.DATASET_MAPPER_NAME = name``.

    Raises:
        ValueError: ``name`` is already taken by another class.
    """
    if name in DATASET_MAPPERS and DATASET_MAPPERS[name] is not mapper_cls:
        raise ValueError(
            f"dataset mapper name {name!r} is already registered to {DATASET_MAPPERS[name]}"
        )
    DATASET_MAPPERS[name] = mapper_cls


class TaskTaggedMapper:
    """``mapper(d)`` with ``"task"`` added to every output it does not drop (None), so the
    generalist hands the batch to that task. A class, not a closure: loader workers pickle
    it."""

    def __init__(self, mapper: Callable, task: str):
        self.mapper, self.task = mapper, task

    def __call__(self, dataset_dict: Dict) -> Optional[Dict[str, Any]]:
        out = self.mapper(dataset_dict)
        if out is not None:
            out["task"] = self.task
        return out


def build_dataset_mapper(cfg, is_train: bool = True):
    """The mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``, built from ``cfg``.

    Raises:
        ValueError: the name is not registered (the message lists the known names).
    """
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in DATASET_MAPPERS:
        raise ValueError(
            f"Unknown INPUT.DATASET_MAPPER_NAME {name!r}; known: {sorted(DATASET_MAPPERS)}"
        )
    return DATASET_MAPPERS[name](cfg, is_train=is_train)


register_dataset_mapper("coco_instance_lsj", COCOInstanceLSJDatasetMapper)
register_dataset_mapper("classification", ClassificationDatasetMapper)
