"""Tasks in the unified formulation (Uni-Perceiver v2, Sec. 4.3): each builds its sequences,
compares decoded features with decoded targets (Eq. 5-7), and turns the result into losses
or predictions. One module per task, registered in TASK_REGISTRY (see base.py)."""
from .base import (
    TASK_REGISTRY,
    Task,
    build_tasks,
    evaluator_for_dataset,
    register_task,
    task_of_batch,
)
from .captioning import CaptioningTask
from .classification import ClassificationTask
from .detection import (
    DetectionTask,
    LogitScale,
    check_class_names,
    class_logits,
    detection_topk,
    matched_class_loss,
)
from .mlm import MLMTask
from .retrieval import RetrievalTask, contrastive_losses

__all__ = ["CaptioningTask", "ClassificationTask", "DetectionTask", "LogitScale", "MLMTask",
           "RetrievalTask", "TASK_REGISTRY", "Task", "build_tasks", "check_class_names",
           "class_logits", "contrastive_losses", "detection_topk", "evaluator_for_dataset",
           "matched_class_loss", "register_task", "task_of_batch"]
