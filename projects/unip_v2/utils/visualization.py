"""Drawing predictions with detectron2's Visualizer (masks, boxes, names and scores)."""
from typing import Optional, Sequence

import numpy as np
from torchvision.ops import nms

from detectron2.data.catalog import Metadata
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["draw_predictions", "instances_to_draw"]


def instances_to_draw(instances: Instances, score_threshold: float = 0.25,
                      nms_iou: Optional[float] = 0.5) -> Instances:
    """The instances worth drawing: score >= score_threshold, then class-agnostic box NMS at
    nms_iou (None: off), highest score first. The model returns its top (proposal, class)
    pairs without NMS, as COCO evaluation wants, so one object can carry several labels; a
    picture shows one. Scores are objectness x class probability, so they run lower than a
    softmax detector's."""
    kept = instances[instances.scores >= score_threshold]
    if nms_iou is not None and len(kept):
        kept = kept[nms(kept.pred_boxes.tensor.float(), kept.scores.float(), nms_iou)]
    return kept


def draw_predictions(image_rgb: np.ndarray, instances: Instances, class_names: Sequence[str],
                     score_threshold: float = 0.25, nms_iou: Optional[float] = 0.5,
                     min_side: int = 512) -> np.ndarray:
    """Draw :func:`instances_to_draw` on a (H, W, 3) uint8 RGB image (pred_classes index
    class_names). Small images are enlarged so the shorter side is at least ``min_side``
    (0: never), which keeps the names readable. Returns a new uint8 RGB array."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"draw_predictions: image must be (H, W, 3), got {image_rgb.shape}")
    if tuple(instances.image_size) != tuple(image_rgb.shape[:2]):
        raise ValueError(f"draw_predictions: instances are for an image of "
                         f"{tuple(instances.image_size)}, the image is {image_rgb.shape[:2]}")
    kept = instances_to_draw(instances, score_threshold, nms_iou).to("cpu")
    metadata = Metadata(name="unip_v2_visualization")
    metadata.thing_classes = list(class_names)
    scale = max(1.0, min_side / min(image_rgb.shape[:2])) if min_side else 1.0
    # IMAGE_BW: the background turns grey and masks get a light tint, so each object keeps
    # its own colour next to its name
    visualizer = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE_BW)
    return visualizer.draw_instance_predictions(kept).get_image()
