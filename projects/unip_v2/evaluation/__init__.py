"""Evaluators."""
from .captioning import CaptioningEvaluator
from .checked_coco import CheckedCOCOEvaluator, segm_ground_truth
from .classification import ClassificationEvaluator
from .class_agnostic_coco import ClassAgnosticCOCOEvaluator, make_class_agnostic_coco

__all__ = [
    "CaptioningEvaluator",
    "CheckedCOCOEvaluator",
    "ClassAgnosticCOCOEvaluator",
    "ClassificationEvaluator",
    "make_class_agnostic_coco",
    "segm_ground_truth",
]
