"""Evaluators."""
from .captioning import CaptioningEvaluator
from .checked_coco import CheckedCOCOEvaluator, segm_ground_truth
from .classification import ClassificationEvaluator
from .class_agnostic_coco import ClassAgnosticCOCOEvaluator, make_class_agnostic_coco
from .mlm import MLMEvaluator
from .retrieval import RetrievalEvaluator, retrieval_ranks, retrieval_recalls

__all__ = [
    "CaptioningEvaluator",
    "CheckedCOCOEvaluator",
    "ClassAgnosticCOCOEvaluator",
    "ClassificationEvaluator",
    "MLMEvaluator",
    "RetrievalEvaluator",
    "make_class_agnostic_coco",
    "retrieval_ranks",
    "retrieval_recalls",
    "segm_ground_truth",
]
