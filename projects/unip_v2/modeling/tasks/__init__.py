"""Tasks in the unified formulation: each builds its sequences, compares decoded features
with decoded targets (Eq. 5-7), and turns the result into losses or predictions."""
from .detection import (
    LogitScale,
    check_class_names,
    class_logits,
    detection_topk,
    matched_class_loss,
)

__all__ = ["LogitScale", "check_class_names", "class_logits", "detection_topk", "matched_class_loss"]
