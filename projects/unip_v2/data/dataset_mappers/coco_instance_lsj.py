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

    Returns None, logs a warning and increments :attr:`num_skipped` when the image file
    cannot be read; detectron2's ``MapDataset`` then tries another index. The counter is per
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
        # A wrong width/height in the json is a dataset error, not a corrupt file: raise.
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
        """The image as an HWC uint8 array, or None (warned and counted) if unreadable."""
        file_name = dataset_dict["file_name"]
        image, error = try_read_image(file_name, format=self.image_format)
        if image is None:
            self.num_skipped += 1
            logger.warning(
                f"Skipping unreadable image {file_name} (image_id "
                f"{dataset_dict.get('image_id')}): {error}. "
                f"{self.num_skipped} image(s) skipped so far by this mapper."
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
        masks, classes = [], []
        for index, ann in enumerate(annotations):
            if ann.get("iscrowd", 0):
                continue
            where = f"annotation {index} of {file_name}"
            if "category_id" not in ann:
                raise ValueError(f"{where} has no 'category_id'")
            if "segmentation" not in ann:
                raise ValueError(
                    f"{where} has no 'segmentation'; this mapper derives boxes from masks"
                )
            mask = _transformed_mask(ann["segmentation"], transforms, orig_size, out_size, where)
            # Polygons reaching outside the original image would rasterise into the pad.
            mask[valid_size[0]:, :] = 0
            mask[:, valid_size[1]:] = 0
            if not mask.any():
                continue  # cut away by the crop (or degenerate)
            masks.append(mask)
            classes.append(int(ann["category_id"]))

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
    where: str,
) -> np.ndarray:
    """Rasterise one annotation's segmentation in output coordinates; uint8 (H_out, W_out).

    Polygons are transformed as points and rasterised at the output size (sharper and
    cheaper than resizing a mask; pycocotools clips points outside the image). RLE is decoded
    at the original size and the mask goes through the transforms (nearest-neighbour resize).
    """
    orig_h, orig_w = orig_size
    if isinstance(segmentation, list):
        polygons = []
        for poly in segmentation:
            coords = np.asarray(poly, dtype=np.float64)
            if coords.ndim != 1 or coords.size % 2:
                raise ValueError(
                    f"{where}: a polygon must be a flat list [x0, y0, x1, y1, ...] of even "
                    f"length, got shape {coords.shape}"
                )
            if coords.size < 6:
                continue  # fewer than 3 points: no area (and pycocotools reads 4 as a box)
            points = transforms.apply_coords(coords.reshape(-1, 2).copy())
            polygons.append(points.reshape(-1).tolist())
        out_h, out_w = out_size
        if not polygons:
            return np.zeros((out_h, out_w), dtype=np.uint8)
        rle = mask_util.merge(mask_util.frPyObjects(polygons, out_h, out_w))
        return np.ascontiguousarray(mask_util.decode(rle))

    if isinstance(segmentation, dict):
        if "size" not in segmentation or "counts" not in segmentation:
            raise ValueError(f"{where}: an RLE segmentation needs 'size' and 'counts'")
        if list(segmentation["size"]) != [orig_h, orig_w]:
            raise ValueError(
                f"{where}: RLE size {list(segmentation['size'])} != image size "
                f"[{orig_h}, {orig_w}]"
            )
        rle = segmentation
        if isinstance(rle["counts"], list):
            # Uncompressed RLE (COCO crowd style) -> compressed, which decode() needs.
            rle = mask_util.frPyObjects(rle, orig_h, orig_w)
        # decode() returns Fortran order; C order keeps the row slicing and stacking cheap.
        mask = np.ascontiguousarray(mask_util.decode(rle))
        return np.ascontiguousarray(transforms.apply_segmentation(mask))

    raise ValueError(
        f"{where}: 'segmentation' must be a list of polygons or an RLE dict, "
        f"got {type(segmentation).__name__}"
    )
