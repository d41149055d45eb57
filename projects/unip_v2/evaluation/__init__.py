"""Evaluators."""
from .checked_coco import CheckedCOCOEvaluator, segm_ground_truth
from .classification import ClassificationEvaluator
from .class_agnostic_coco import ClassAgnosticCOCOEvaluator, make_class_agnostic_coco
from .retrieval import RetrievalEvaluator, retrieval_ranks, retrieval_recalls

__all__ = [
    "CheckedCOCOEvaluator",
    "ClassAgnosticCOCOEvaluator",
    "ClassificationEvaluator",
    "RetrievalEvaluator",
    "make_class_agnostic_coco",
    "retrieval_ranks",
    "retrieval_recalls",
    "segm_ground_truth",
]
