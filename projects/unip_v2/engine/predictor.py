"""`Predictor`: detectron2's DefaultPredictor for unip-v2 models, with an open vocabulary.

    predictor = Predictor(cfg, vocabulary=["red square", "blue circle"])
    instances = predictor(bgr_image)["instances"]   # pred_classes index predictor.class_names
"""
from typing import List, Optional, Sequence

import torch

from detectron2.engine import DefaultPredictor

from ..data.datasets import thing_classes
from ..modeling.tasks import check_class_names
from .checkpointer import Checkpointer, check_finite_weights

__all__ = ["Predictor", "parse_vocabulary"]


def parse_vocabulary(text: str) -> List[str]:
    """ "red square, blue circle" -> ["red square", "blue circle"]; a ValueError names an
    empty or repeated entry."""
    names = [n.strip() for n in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise ValueError(f"vocabulary {text!r}: expected comma-separated non-empty names, "
                         f"e.g. \"red square, blue circle\"")
    try:
        return check_class_names(names)
    except ValueError as e:
        raise ValueError(f"vocabulary {text!r}: {e}") from None


class Predictor(DefaultPredictor):
    """Builds the model from cfg, loads MODEL.WEIGHTS, and maps one BGR HWC uint8 image to
    the model's output at the image's own size (resize by INPUT.MIN/MAX_SIZE_TEST, as in
    evaluation). ``vocabulary`` replaces the category names of a UniPerceiverV2 without
    retraining: its TargetBank encodes them once, on the first image. A name longer than the
    text encoder's limit raises a ValueError here, not at the first image."""

    def __init__(self, cfg, vocabulary: Optional[Sequence[str]] = None):
        # DefaultPredictor would load MODEL.WEIGHTS with detectron2's checkpointer, which
        # unpickles .pkl files unrestricted: build without weights, then load them safely.
        no_weights = cfg.clone()
        no_weights.defrost()
        no_weights.MODEL.WEIGHTS = ""
        super().__init__(no_weights)
        self.cfg = cfg.clone()
        if cfg.MODEL.WEIGHTS:
            Checkpointer(self.model).load(cfg.MODEL.WEIGHTS)
            check_finite_weights(self.model, cfg.MODEL.WEIGHTS)
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)
        else:
            self._check_name_lengths(self.class_names)

    def __call__(self, original_image):
        """DefaultPredictor's call, the input tagged for the detection task when the model has
        several tasks (a generalist hands each batch to the task it names)."""
        with torch.no_grad():
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            image = self.aug.get_transform(original_image).apply_image(original_image)
            image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            inputs = {"image": image, "height": height, "width": width}
            if self._detection is not None:
                inputs["task"] = "detection"
            return self.model([inputs])[0]

    @property
    def _detection(self):
        """The generalist's detection task (None for a model without one, e.g. the proposal
        network, whose predictions carry no category)."""
        tasks = getattr(self.model, "tasks", None)
        return tasks["detection"] if tasks is not None and "detection" in tasks else None

    def set_vocabulary(self, names: Sequence[str]) -> None:
        if self._detection is None:
            raise ValueError(f"{type(self.model).__name__} has no vocabulary to replace (it "
                             f"predicts no named categories)")
        names = check_class_names(names)
        self._check_name_lengths(names)
        self._detection.set_test_class_names(names)

    def _check_name_lengths(self, names: Sequence[str]) -> None:
        # The text encoder would raise at the first image anyway; checking here fails
        # before any input is read.
        encoder = getattr(self.model, "text_encoder", None)
        if encoder is not None and names:
            encoder.check_lengths(names, what="category name")

    @property
    def class_names(self) -> List[str]:
        """The names pred_classes index: the model's vocabulary, else DATASETS.TEST[0]'s."""
        names = self._detection.test_class_names if self._detection is not None else None
        if names:
            return list(names)
        if not self.cfg.DATASETS.TEST:
            return []
        try:
            return thing_classes(self.cfg.DATASETS.TEST[0])
        except ValueError:   # a dataset without categories (class-agnostic proposals)
            return []
