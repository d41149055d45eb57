"""Evaluators."""
from .captioning import CaptioningEvaluator
from .checked_coco import CheckedCOCOEvaluator, segm_ground_truth
from .classification import ClassificationEvaluator
from .class_agnostic_coco import ClassAgnosticCOCOEvaluator, make_class_agnostic_coco
from .mlm import MLMEvaluator

__all__ = [
    "CaptioningEvaluator",
    "CheckedCOCOEvaluator",
    "ClassAgnosticCOCOEvaluator",
    "ClassificationEvaluator",
    "MLMEvaluator",
    "make_class_agnostic_coco",
    "segm_ground_truth",
]
