"""Training / evaluation loop (detectron2's DefaultTrainer with unip-v2's builders) and the
predictor of the demo."""
from .checkpointer import (Checkpointer, CheckpointLoadError, check_finite_weights,
                           save_weights_subset)
from .predictor import Predictor, parse_vocabulary
from .task_predictor import TaskPredictor
from .trainer import Trainer

__all__ = ["CheckpointLoadError", "Checkpointer", "Predictor", "TaskPredictor", "Trainer",
           "check_finite_weights", "parse_vocabulary", "save_weights_subset"]
