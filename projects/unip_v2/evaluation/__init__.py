"""Evaluators."""
from .class_agnostic_coco import ClassAgnosticCOCOEvaluator, make_class_agnostic_coco

__all__ = ["ClassAgnosticCOCOEvaluator", "make_class_agnostic_coco"]
