"""Drawing predictions with detectron2's Visualizer (masks, boxes, names and scores)."""
from typing import List, Optional, Sequence

import cv2

import numpy as np
from torchvision.ops import nms

from detectron2.data.catalog import Metadata
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["draw_predictions", "image_row", "instances_to_draw", "with_text_lines"]


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


def _wrapped(text: str, fits) -> List[str]:
    """``text`` in rows that ``fits`` (word by word; a word too long alone is cut with an
    ellipsis)."""
    rows: List[str] = []
    for word in text.split():
        if rows and fits(rows[-1] + " " + word):
            rows[-1] += " " + word
            continue
        while len(word) > 3 and not fits(word):
            word = word.rstrip(".")[:-1] + "..."
        rows.append(word)
    return rows or [""]


def with_text_lines(image_rgb: np.ndarray, lines: Sequence[str], scale: float = 0.6) -> np.ndarray:
    """The image above a white band holding ``lines`` of black text (a caption, the top
    classes), each wrapped onto as many rows as the image's width needs."""
    height, width = image_rgb.shape[:2]
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, 1

    def fits(text):
        return cv2.getTextSize(text, font, scale, thickness)[0][0] <= width - 10

    rows = [r for line in lines for r in _wrapped(line, fits)]
    step = int(round(28 * scale / 0.6))
    band = np.full((step * len(rows) + step // 2, width, 3), 255, dtype=np.uint8)
    for i, text in enumerate(rows):
        cv2.putText(band, text, (5, step * (i + 1)), font, scale, (0, 0, 0), thickness,
                    cv2.LINE_AA)
    return np.concatenate([image_rgb, band], axis=0)


def image_row(images: Sequence[np.ndarray], titles: Sequence[str], header: str,
              side: int = 192) -> np.ndarray:
    """Images resized to ``side`` x ``side``, side by side, each over its title, under a header
    line (e.g. a text query and the images retrieved for it)."""
    tiles = [with_text_lines(cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA), [t],
                             scale=0.5) for im, t in zip(images, titles)]
    # titles wrapped onto more rows make taller tiles: pad the others with white below
    tall = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, tall - t.shape[0]), (0, 0), (0, 0)), constant_values=255)
             for t in tiles]
    gap = np.full((tall, 8, 3), 255, dtype=np.uint8)
    row = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
    top = with_text_lines(np.zeros((0, row.shape[1], 3), dtype=np.uint8), [header], scale=0.7)
    return np.concatenate([top, row], axis=0)
