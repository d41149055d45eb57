"""Dataset metadata that detectron2 only fills in when a dataset is loaded."""
import logging
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["dataset_task", "thing_classes"]

logger = logging.getLogger(__name__)


def thing_classes(dataset_name: str) -> List[str]:
    """The category names of a registered dataset, in contiguous-id order.

    detectron2's ``register_coco_instances(name, {}, json_file, image_root)`` leaves
    ``thing_classes`` unset until the dataset is loaded (``load_coco_json`` sets it, with the
    json's categories sorted by id), but models and evaluation need the names before that.
    When the metadata lacks them the dataset is loaded here (once: detectron2 loads it again
    for the data loader), so the names come from detectron2's own loader.

    Raises:
        KeyError: ``dataset_name`` is not registered (detectron2's message lists the names).
        ValueError: the dataset has no thing_classes even after loading.
    """
    metadata = MetadataCatalog.get(dataset_name)
    if not hasattr(metadata, "thing_classes"):
        logger.info(f"Loading dataset {dataset_name!r} to read its thing_classes")
        DatasetCatalog.get(dataset_name)
    names = metadata.get("thing_classes")
    if names is None:
        raise ValueError(
            f"dataset {dataset_name!r} has no thing_classes in its metadata, even after "
            "loading it: register it with them (MetadataCatalog.get(name).set(thing_classes=...))"
        )
    return list(names)


# detectron2's evaluator types of detection datasets registered without a "task" (COCO and
# LVIS through detectron2's builtin registrations, register_coco_instances)
_DETECTION_EVALUATOR_TYPES = ("coco", "lvis")


def dataset_task(dataset_name: str) -> str:
    """The task a registered dataset is for: its metadata's ``task``; a detectron2 detection
    dataset (evaluator_type "coco" or "lvis", or thing_classes in its metadata) without one
    is for "detection".

    Raises:
        ValueError: the metadata names no task and is not a detection dataset.
    """
    metadata = MetadataCatalog.get(dataset_name)
    task = metadata.get("task")
    if task is None and (metadata.get("evaluator_type") in _DETECTION_EVALUATOR_TYPES
                         or metadata.get("thing_classes") is not None):
        task = "detection"
    if task is None:
        raise ValueError(f"dataset {dataset_name!r} names no task: set its metadata's 'task' "
                         f"(MetadataCatalog.get(name).set(task=...)); evaluator_type is "
                         f"{metadata.get('evaluator_type')!r}")
    return task
