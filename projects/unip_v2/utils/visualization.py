"""Drawing predictions with detectron2's Visualizer (masks, boxes, names and scores)."""
from typing import Sequence

import numpy as np

from detectron2.data.catalog import Metadata
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["draw_predictions"]


def draw_predictions(image_rgb: np.ndarray, instances: Instances, class_names: Sequence[str],
                     score_threshold: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 RGB image with the instances scoring >= score_threshold drawn on it
    (pred_classes index class_names). Returns a new (H, W, 3) uint8 RGB array."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"draw_predictions: image must be (H, W, 3), got {image_rgb.shape}")
    if tuple(instances.image_size) != tuple(image_rgb.shape[:2]):
        raise ValueError(f"draw_predictions: instances are for an image of "
                         f"{tuple(instances.image_size)}, the image is {image_rgb.shape[:2]}")
    kept = instances[instances.scores >= score_threshold].to("cpu")
    metadata = Metadata(name="unip_v2_visualization")
    metadata.thing_classes = list(class_names)
    visualizer = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(kept).get_image()
