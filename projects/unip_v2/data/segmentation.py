"""Checking a COCO ``segmentation`` field before it is rasterised (training mapper) or handed
to pycocotools (evaluation ground truth).

detectron2's ``load_coco_json`` drops polygons that are odd-length or shorter than 3 points
and drops an annotation left without any (with a warning), but it keeps an annotation whose
segmentation is ``[]`` (as one without a "segmentation" key), and datasets registered some
other way are not checked at all. pycocotools then fails on ``[[]]`` and reads a list whose
first polygon has 4 numbers as boxes. :func:`check_segmentation` applies detectron2's polygon
rule to any segmentation, treats a missing or empty one as invalid, and checks RLE dicts.
"""
from typing import Any, List, NamedTuple, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util

__all__ = ["SegmentationCheck", "check_segmentation"]


class SegmentationCheck(NamedTuple):
    """Result of :func:`check_segmentation`.

    segmentation: the usable part: a list of valid polygons (a sub-list of the input), or a
        compressed RLE dict; None when nothing usable is left (the instance has no mask).
    dropped_polygons: how many polygons of a polygon list were invalid and left out.
    reasons: one human-readable line per problem found (empty when the input is fine).
    """
    segmentation: Optional[Any]
    dropped_polygons: int
    reasons: List[str]


def check_segmentation(segmentation: Any, image_size: Sequence[int]) -> SegmentationCheck:
    """Check one annotation's COCO segmentation for an image of (height, width) image_size.

    Polygons must be flat, finite, of even length and have at least 3 points (detectron2's
    ``load_coco_json`` rule). RLE dicts need "size" == [height, width] and "counts" (a list:
    uncompressed, or str/bytes: compressed) and a non-empty mask.
    """
    if segmentation is None or (isinstance(segmentation, (list, dict)) and not segmentation):
        return SegmentationCheck(None, 0, [
            "no segmentation (missing or empty; detectron2's load_coco_json turns [] into a "
            "missing key)"])
    if isinstance(segmentation, list):
        return _check_polygons(segmentation)
    if isinstance(segmentation, dict):
        return _check_rle(segmentation, image_size)
    return SegmentationCheck(None, 0, [
        f"segmentation is a {type(segmentation).__name__}, not a list of polygons or an RLE dict"])


def _check_polygons(polygons: list) -> SegmentationCheck:
    kept, reasons = [], []
    for i, poly in enumerate(polygons):
        problem = _polygon_problem(poly)
        if problem:
            reasons.append(f"polygon {i} dropped: {problem}")
        else:
            kept.append(poly)
    if not kept:
        reasons.append("no valid polygon left")
    return SegmentationCheck(kept or None, len(polygons) - len(kept), reasons)


def _polygon_problem(poly: Any) -> str:
    """Why ``poly`` is not a usable polygon, or "" if it is."""
    try:
        coords = np.asarray(poly, dtype=np.float64)
    except (TypeError, ValueError):
        return "not a list of numbers"
    if coords.ndim != 1:
        return f"not a flat list [x0, y0, x1, y1, ...] (shape {coords.shape})"
    if coords.size % 2:
        return f"odd length {coords.size}"
    if coords.size < 6:
        return f"{coords.size // 2} point(s), fewer than 3"
    if not np.isfinite(coords).all():
        return "non-finite coordinates"
    return ""


def _check_rle(rle: dict, image_size: Sequence[int]) -> SegmentationCheck:
    height, width = (int(v) for v in image_size)
    if "size" not in rle or "counts" not in rle:
        return SegmentationCheck(None, 0, ["RLE dict without 'size' and 'counts'"])
    if list(rle["size"]) != [height, width]:
        return SegmentationCheck(None, 0, [
            f"RLE size {list(rle['size'])} != image size [{height}, {width}]"])
    counts = rle["counts"]
    if isinstance(counts, list):
        # Uncompressed RLE (COCO crowd style) -> compressed, which area() and decode() need.
        rle = mask_util.frPyObjects(rle, height, width)
    elif not isinstance(counts, (str, bytes)):
        return SegmentationCheck(None, 0, [f"RLE counts is a {type(counts).__name__}"])
    if int(mask_util.area(rle)) == 0:
        return SegmentationCheck(None, 0, ["RLE mask is empty"])
    return SegmentationCheck(rle, 0, [])
