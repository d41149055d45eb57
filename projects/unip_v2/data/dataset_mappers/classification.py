"""Image classification mapper (Uni-Perceiver v2, Sec. 4.3; ImageNet-style augmentation).

Training: a random resized crop (area fraction in MODEL.CLASSIFICATION.CROP_SCALE, aspect
ratio in [3/4, 4/3]) to IMAGE_SIZE x IMAGE_SIZE and a horizontal flip with probability 0.5.
Inference: the shorter side resized to IMAGE_SIZE / TEST_CROP_RATIO, then the centre
IMAGE_SIZE x IMAGE_SIZE crop. torchvision's transforms do the geometry; their random numbers
come from torch's generator, which the train loader seeds per sample (data/build.py).
"""
import logging
from typing import Dict, Optional

import numpy as np
import torch
from torchvision.transforms import v2

from detectron2.config import configurable

from ..image_io import try_read_image

__all__ = ["ClassificationDatasetMapper"]

logger = logging.getLogger(__name__)


class ClassificationDatasetMapper:
    """{"file_name", "image_id", "label"} -> {"image": uint8 (3, S, S) in image_format,
    "label": int, "image_id", "height": S, "width": S}. An unreadable image gives None
    (warned, counted in ``num_skipped``): the train loader draws another sample, the test
    loader leaves it out. A training dict without an int "label", or any dict whose "label"
    is not an int, is a ValueError naming it; at inference a dict without "label" (an image
    alone, as tools/demo.py --task classify gives) maps to one without it."""

    @configurable
    def __init__(self, is_train: bool, *, image_size: int, crop_scale=(0.08, 1.0),
                 test_crop_ratio: float = 0.875, image_format: str = "RGB"):
        if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        if not 0 < test_crop_ratio <= 1:
            raise ValueError(f"test_crop_ratio must lie in (0, 1], got {test_crop_ratio}")
        self.is_train = is_train
        self.image_size = image_size
        self.image_format = image_format
        if is_train:
            self.transform = v2.Compose([
                v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True),
                v2.RandomHorizontalFlip()])
        else:
            self.transform = v2.Compose([
                v2.Resize(int(round(image_size / test_crop_ratio)), antialias=True),
                v2.CenterCrop(image_size)])
        self.num_skipped = 0

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        c = cfg.MODEL.CLASSIFICATION
        return {"is_train": is_train, "image_size": c.IMAGE_SIZE,
                "crop_scale": tuple(c.CROP_SCALE), "test_crop_ratio": c.TEST_CROP_RATIO,
                "image_format": cfg.INPUT.FORMAT}

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        label = dataset_dict.get("label")
        unlabelled = label is None and not self.is_train
        if not unlabelled and (isinstance(label, bool)
                               or not isinstance(label, (int, np.integer))):
            raise ValueError(f"classification record {dataset_dict.get('file_name')!r}: "
                             f"'label' must be an int class index, got {label!r}")
        image, error = try_read_image(dataset_dict["file_name"], format=self.image_format)
        if image is None:
            self.num_skipped += 1
            logger.warning(f"Skipping image {dataset_dict['file_name']} (image_id "
                           f"{dataset_dict.get('image_id')}): {error}. {self.num_skipped} "
                           f"image(s) skipped so far by this mapper.")
            return None
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        tensor = self.transform(tensor).contiguous()
        out = {"image": tensor, "image_id": dataset_dict.get("image_id"),
               "file_name": dataset_dict["file_name"],
               "height": self.image_size, "width": self.image_size}
        if not unlabelled:
            out["label"] = int(label)
        return out
