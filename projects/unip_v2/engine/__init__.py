"""Training / evaluation loop (detectron2's DefaultTrainer with unip-v2's builders) and the
predictor of the demo."""
from .predictor import Predictor, parse_vocabulary
from .trainer import Trainer

__all__ = ["Predictor", "Trainer", "parse_vocabulary"]
