"""Training mapper for COCO-style instance annotations with large-scale jitter (LSJ).

Training pipeline (Mask DINO's "coco_instance_lsj" recipe)::

    RandomFlip (INPUT.RANDOM_FLIP)
    -> ResizeScale(MIN_SCALE, MAX_SCALE, IMAGE_SIZE, IMAGE_SIZE)   # fit inside s*IMAGE_SIZE
    -> FixedSizeCrop((IMAGE_SIZE, IMAGE_SIZE))                     # random crop, then pad
                                                                   # bottom/right to the size

Ground truth is rasterised after the geometric transforms and the boxes are taken from the
cropped masks (tight boxes), never from the annotation's ``bbox`` field: a crop cuts objects
and the stored box would no longer fit them.

At inference (``is_train=False``) the image is resized with
``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`` and annotations are dropped.
"""
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances

from ..image_io import try_read_image
from ..segmentation import check_segmentation

__all__ = ["COCOInstanceLSJDatasetMapper", "build_lsj_augmentations"]

logger = logging.getLogger(__name__)


# Pad value of the fixed-size crop, on the 0-255 scale: close to the ImageNet pixel mean, so
# the pad looks like the zero that ImageList padding gives after normalisation. The model
# should still ignore the pad through the mapper's "valid_size".
_PAD_VALUE = 128.0

_FLIP_MODES = ("none", "horizontal", "vertical")


def build_lsj_augmentations(cfg, is_train: bool) -> List[T.Augmentation]:
    """The mapper's augmentations from a config (see the module docstring).

    Raises:
        ValueError: an INPUT key is out of range (IMAGE_SIZE not a positive int, scales not
            0 < MIN_SCALE <= MAX_SCALE, unknown RANDOM_FLIP, bad test sizes).
    """
    if not is_train:
        min_size, max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        if not (isinstance(min_size, int) and min_size > 0):
            raise ValueError(f"INPUT.MIN_SIZE_TEST must be a positive int, got {min_size!r}")
        if not (isinstance(max_size, int) and max_size >= min_size):
            raise ValueError(
                f"INPUT.MAX_SIZE_TEST must be an int >= MIN_SIZE_TEST ({min_size}), "
                f"got {max_size!r}"
            )
        return [T.ResizeShortestEdge(min_size, max_size, sample_style="choice")]

    image_size = cfg.INPUT.IMAGE_SIZE
    min_scale, max_scale = float(cfg.INPUT.MIN_SCALE), float(cfg.INPUT.MAX_SCALE)
    flip = cfg.INPUT.RANDOM_FLIP
    if not (isinstance(image_size, int) and image_size > 0):
        raise ValueError(f"INPUT.IMAGE_SIZE must be a positive int, got {image_size!r}")
    if not (0.0 < min_scale <= max_scale):
        raise ValueError(
            "INPUT.MIN_SCALE and INPUT.MAX_SCALE must satisfy 0 < MIN_SCALE <= MAX_SCALE, "
            f"got MIN_SCALE={min_scale}, MAX_SCALE={max_scale}"
        )
    if flip not in _FLIP_MODES:
        raise ValueError(f"INPUT.RANDOM_FLIP must be one of {_FLIP_MODES}, got {flip!r}")

    augs: List[T.Augmentation] = []
    if flip != "none":
        augs.append(
            T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical")
        )
    augs.append(T.ResizeScale(min_scale, max_scale, image_size, image_size))
    augs.append(T.FixedSizeCrop((image_size, image_size), pad=True, pad_value=_PAD_VALUE))
    return augs


class COCOInstanceLSJDatasetMapper:
    """Dataset dict (detectron2 standard format) -> model input dict.

    Input: a dict as produced by ``load_coco_json``: ``file_name``, ``height``, ``width``,
    ``image_id`` and, for training, ``annotations`` (each with ``segmentation`` as COCO
    polygons ``[[x0, y0, x1, y1, ...], ...]`` or an RLE dict, ``category_id`` (contiguous),
    ``iscrowd``; ``bbox`` is ignored).

    Output: the input's keys except ``annotations``, plus

    * ``image``: uint8 tensor (C, H, W) in ``INPUT.FORMAT``; when training,
      H = W = ``INPUT.IMAGE_SIZE`` (pad included);
    * ``valid_size``: ``(h, w)`` of the real image content, anchored at the top-left corner;
      rows >= h and columns >= w are padding (``(H, W)`` when nothing was padded);
    * ``instances`` (training only): :class:`Instances` of image size (H, W) with
      ``gt_boxes`` (:class:`Boxes`, XYXY absolute, tight around ``gt_masks``),
      ``gt_classes`` (int64, (N,)) and ``gt_masks`` (:class:`BitMasks`, bool (N, H, W),
      zero in the padding). Crowd annotations and objects cut away by the crop are dropped;
      N may be 0.

    Returns None, logs a warning and increments :attr:`num_skipped` when the image cannot be
    used: unreadable, of an unsupported pixel mode, or of a size that matches the dict's
    height/width in neither EXIF orientation (see :func:`try_read_image`). The train loader
    then tries another index; the test loader (:func:`build_test_loader`) leaves the image
    out. An annotation whose segmentation is missing, empty or has no valid polygon / RLE
    left (:func:`check_segmentation`) is dropped with a warning and counted in
    :attr:`num_dropped_instances`; invalid polygons next to valid ones are left out and
    counted in :attr:`num_dropped_polygons`; the image is still used. Counters are per
    mapper object, i.e. per data-loader worker process.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, augmentations: Sequence, image_format: str):
        """
        Args:
            is_train: training (augment + build ``instances``) or inference (no annotations).
            augmentations: detectron2 augmentations applied in order.
            image_format: PIL mode or "BGR", passed to ``detection_utils.read_image``.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.num_skipped = 0
        self.num_dropped_polygons = 0
        self.num_dropped_instances = 0
        mode = "training" if is_train else "inference"
        logger.info(f"[COCOInstanceLSJDatasetMapper] {mode} augmentations: {self.augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        return {
            "is_train": is_train,
            "augmentations": build_lsj_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, dataset_dict: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        file_name = dataset_dict.get("file_name")
        if file_name is None:
            raise ValueError(f"dataset dict has no 'file_name' (keys: {sorted(dataset_dict)})")
        if self.is_train and "annotations" not in dataset_dict:
            raise ValueError(
                f"dataset dict of {file_name} has no 'annotations'; training needs them "
                "(use an empty list for an image without objects)"
            )

        image = self._read_image(dataset_dict)
        if image is None:
            return None
        # Fills in a missing width/height; a recorded one already matches (try_read_image).
        utils.check_image_size(dataset_dict, image)

        orig_h, orig_w = image.shape[:2]
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        out_h, out_w = image.shape[:2]
        valid_size = _valid_size(transforms, (out_h, out_w))

        output = {k: v for k, v in dataset_dict.items() if k != "annotations"}
        output["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        output["valid_size"] = valid_size
        if self.is_train:
            output["instances"] = self._build_instances(
                dataset_dict["annotations"], transforms, (orig_h, orig_w), valid_size,
                (out_h, out_w), file_name,
            )
        return output

    def _read_image(self, dataset_dict: Dict[str, Any]) -> Optional[np.ndarray]:
        """The image as an HWC uint8 array of the recorded height/width, or None (warned and
        counted) if it is unreadable, of an unsupported mode or of another size in both EXIF
        orientations (see :func:`try_read_image`)."""
        file_name = dataset_dict["file_name"]
        expected = None
        if "height" in dataset_dict and "width" in dataset_dict:
            expected = (dataset_dict["height"], dataset_dict["width"])
        image, error = try_read_image(file_name, format=self.image_format,
                                      expected_size=expected)
        if image is None:
            self.num_skipped += 1
            logger.warning(
                f"Skipping image {file_name} (image_id {dataset_dict.get('image_id')}): "
                f"{error}. {self.num_skipped} image(s) skipped so far by this mapper."
            )
        return image

    def _build_instances(
        self,
        annotations: List[Dict[str, Any]],
        transforms: T.TransformList,
        orig_size: Tuple[int, int],
        valid_size: Tuple[int, int],
        out_size: Tuple[int, int],
        file_name: str,
    ) -> Instances:
        masks, classes, problems = [], [], []
        for index, ann in enumerate(annotations):
            if ann.get("iscrowd", 0):
                continue
            if "category_id" not in ann:
                raise ValueError(f"annotation {index} of {file_name} has no 'category_id'")
            segmentation, dropped, reasons = check_segmentation(ann.get("segmentation"),
                                                                orig_size)
            self.num_dropped_polygons += dropped
            self.num_dropped_instances += segmentation is None
            if reasons:
                fate = "instance dropped" if segmentation is None else "instance kept"
                problems.append(f"annotation {index} ({fate}): {'; '.join(reasons)}")
            if segmentation is None:
                continue
            mask = _transformed_mask(segmentation, transforms, orig_size, out_size)
            # Polygons reaching outside the original image would rasterise into the pad.
            mask[valid_size[0]:, :] = 0
            mask[:, valid_size[1]:] = 0
            if not mask.any():
                continue  # cut away by the crop (or degenerate)
            masks.append(mask)
            classes.append(int(ann["category_id"]))
        if problems:
            logger.warning(
                f"Invalid segmentation in {file_name}: " + " | ".join(problems)
                + f". So far this mapper dropped {self.num_dropped_polygons} polygon(s) and "
                f"{self.num_dropped_instances} instance(s) with no valid segmentation left "
                "(an instance without a mask cannot supervise the mask-derived boxes)."
            )

        out_h, out_w = out_size
        instances = Instances((out_h, out_w))
        if masks:
            mask_tensor = torch.from_numpy(np.stack(masks)).to(torch.bool)
        else:
            mask_tensor = torch.zeros((0, out_h, out_w), dtype=torch.bool)
        bitmasks = BitMasks(mask_tensor)
        instances.gt_masks = bitmasks
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        # BitMasks.get_bounding_boxes gives a (0, 4) tensor for no masks.
        instances.gt_boxes = bitmasks.get_bounding_boxes()
        return instances


def _valid_size(transforms: T.TransformList, out_size: Tuple[int, int]) -> Tuple[int, int]:
    """(h, w) of the real content of the output image, given the applied transforms."""
    valid_h, valid_w = out_size
    for t in transforms.transforms:
        if isinstance(t, T.PadTransform):
            if t.x0 or t.y0:
                # The valid region is stored as a top-left-anchored size.
                raise ValueError(
                    f"COCOInstanceLSJDatasetMapper expects bottom/right padding only, got {t}"
                )
            valid_h -= int(t.y1)
            valid_w -= int(t.x1)
    return valid_h, valid_w


def _transformed_mask(
    segmentation: Any,
    transforms: T.TransformList,
    orig_size: Tuple[int, int],
    out_size: Tuple[int, int],
) -> np.ndarray:
    """Rasterise one annotation's segmentation in output coordinates; uint8 (H_out, W_out).

    ``segmentation`` is checked already (:func:`check_segmentation`): valid polygons or a
    compressed RLE of the original size. Polygons are transformed as points and rasterised
    at the output size (sharper and cheaper than resizing a mask; pycocotools clips points
    outside the image). RLE is decoded at the original size and the mask goes through the
    transforms (nearest-neighbour resize).
    """
    if isinstance(segmentation, list):
        polygons = [
            transforms.apply_coords(np.asarray(p, dtype=np.float64).reshape(-1, 2)).reshape(-1)
            .tolist()
            for p in segmentation
        ]
        out_h, out_w = out_size
        rle = mask_util.merge(mask_util.frPyObjects(polygons, out_h, out_w))
        return np.ascontiguousarray(mask_util.decode(rle))
    # decode() returns Fortran order; C order keeps the row slicing and stacking cheap.
    mask = np.ascontiguousarray(mask_util.decode(segmentation))
    return np.ascontiguousarray(transforms.apply_segmentation(mask))
