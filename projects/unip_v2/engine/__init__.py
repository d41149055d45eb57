"""Training / evaluation loop (detectron2's DefaultTrainer with unip-v2's builders)."""
from .trainer import Trainer

__all__ = ["Trainer"]
