"""Image-caption mapper of the retrieval and captioning tasks (Uni-Perceiver v2, Sec. 4.3 and
5.2: "resize and crop" at the task's image size; Uni-Perceiver v1's caption pipelines).

Image: the shorter side resized to IMAGE_SIZE, then an IMAGE_SIZE x IMAGE_SIZE crop, random in
training and central at inference (no flip: captions say "left" and "right"). Captions: every
caption of the image that fits the text encoder (MODEL.TEXT_ENCODER.CONTEXT_LENGTH tokens,
<s> and </s> included) is kept in "captions"; in training one of them, drawn at random, is
"caption". A longer caption is dropped with a warning and counted (``num_long_captions``),
never cut silently; an image left without a caption, or an unreadable image, gives None
(warned and counted in ``num_skipped``): the train loader draws another sample, the test
loader leaves it out. At inference a record without "captions" (an image alone, as
tools/demo.py --task caption|retrieve gives) maps to "captions": [] and "caption": None.
"""
import logging
from typing import Dict, List, Optional

import numpy as np
import torch
from torchvision.transforms import v2

from detectron2.config import configurable

from ..image_io import try_read_image

__all__ = ["ImageTextDatasetMapper"]

logger = logging.getLogger(__name__)


class ImageTextDatasetMapper:
    """{"file_name", "image_id", "captions": [str, ...]} -> {"image": uint8 (3, S, S) in
    image_format, "captions": [str, ...] (those that fit), "caption": str (training: one of
    them at random; inference: the first), "image_id", "file_name", "height": S, "width": S}.

    Args:
        image_size: S.
        tokenizer: counts a caption's tokens (None: captions are not checked).
        max_tokens: most tokens per caption, <s> and </s> included.
    """

    @configurable
    def __init__(self, is_train: bool, *, image_size: int, tokenizer=None,
                 max_tokens: int = 0, image_format: str = "RGB"):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.is_train = is_train
        self.image_size = int(image_size)
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens)
        self.image_format = image_format
        crop = v2.RandomCrop(image_size) if is_train else v2.CenterCrop(image_size)
        self.transform = v2.Compose([v2.Resize(image_size, antialias=True), crop])
        self.num_skipped = 0
        self.num_long_captions = 0

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, image_size: int = 0):
        """``image_size``: the task's (MODEL.<TASK>.IMAGE_SIZE), given by the task."""
        from ...modeling.text_encoder.tokenizer import build_tokenizer

        t = cfg.MODEL.TEXT_ENCODER
        return {"is_train": is_train, "image_size": image_size,
                "tokenizer": build_tokenizer(t.TOKENIZER or t.PRETRAINED),
                "max_tokens": t.CONTEXT_LENGTH, "image_format": cfg.INPUT.FORMAT}

    def fitting_captions(self, dataset_dict: Dict) -> List[str]:
        """The captions of a record that the text encoder takes whole."""
        captions = dataset_dict.get("captions")
        if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str)
                                                               for c in captions):
            raise ValueError(f"image-text record {dataset_dict.get('file_name')!r}: "
                             f"'captions' must be a list of strings, got {captions!r}")
        if self.tokenizer is None or not captions:
            return list(captions)
        lengths = [len(ids) for ids in self.tokenizer(list(captions))["input_ids"]]
        kept = []
        for caption, n in zip(captions, lengths):
            if n > self.max_tokens:
                self.num_long_captions += 1
                logger.warning(f"Dropping a caption of {dataset_dict.get('file_name')} "
                               f"({n} tokens > MODEL.TEXT_ENCODER.CONTEXT_LENGTH "
                               f"{self.max_tokens}): {caption!r}. {self.num_long_captions} "
                               f"caption(s) dropped so far by this mapper.")
            else:
                kept.append(caption)
        return kept

    def _skip(self, dataset_dict: Dict, why: str) -> None:
        self.num_skipped += 1
        logger.warning(f"Skipping image {dataset_dict.get('file_name')} (image_id "
                       f"{dataset_dict.get('image_id')}): {why}. {self.num_skipped} "
                       f"image(s) skipped so far by this mapper.")

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        image_alone = not self.is_train and "captions" not in dataset_dict
        captions = [] if image_alone else self.fitting_captions(dataset_dict)
        if not captions and not image_alone:
            self._skip(dataset_dict, "no caption fits the text encoder")
            return None
        image, error = try_read_image(dataset_dict["file_name"], format=self.image_format)
        if image is None:
            self._skip(dataset_dict, error)
            return None
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        tensor = self.transform(tensor).contiguous()
        # torch's generator: the train loader seeds it per sample (data/build.py)
        pick = int(torch.randint(len(captions), ())) if self.is_train else 0
        return {"image": tensor, "captions": captions,
                "caption": captions[pick] if captions else None,
                "image_id": dataset_dict.get("image_id"),
                "file_name": dataset_dict["file_name"],
                "height": self.image_size, "width": self.image_size}
