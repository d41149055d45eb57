"""Image synthesis for the toy_shapes dataset: shapes, colours, backgrounds, occlusion.

Pure numpy + OpenCV, deterministic given a ``numpy.random.Generator``. The dataset writer
(``toy_shapes.py``) turns what :func:`render_toy_image` returns into COCO files.

Conventions:

* images are ``uint8`` RGB arrays of shape ``(H, W, 3)``;
* polygons are COCO-style flat lists ``[x0, y0, x1, y1, ...]`` in continuous pixel
  coordinates (pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``);
* boxes are COCO ``[x, y, w, h]`` of the *visible* mask, in the same coordinates.
"""
import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import cv2
import numpy as np

__all__ = [
    "TOY_SHAPES_CATEGORIES",
    "TOY_SHAPES_NOVEL_CATEGORIES",
    "BACKGROUND_KINDS",
    "RenderParams",
    "ToyScene",
    "render_toy_image",
]

# Saturated, mutually distant colours (RGB). Backgrounds stay inside a low-saturation,
# mid-grey band (see _base_colour), so every object colour, white and black included,
# is at least ~30 levels away from any background pixel.
_COLOURS = {
    "red": (220, 35, 35),
    "green": (40, 175, 60),
    "blue": (40, 75, 225),
    "yellow": (240, 215, 40),
    "purple": (125, 45, 175),
    "orange": (245, 135, 20),
    "cyan": (30, 210, 220),
    "magenta": (230, 45, 200),
    "white": (245, 245, 245),
    "black": (18, 18, 18),
}

# One colour and one shape per category, all distinct, so either cue identifies it.
_CATEGORY_PAIRS = [
    ("red", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("yellow", "star"),
    ("purple", "pentagon"),
    ("orange", "hexagon"),
    ("cyan", "cross"),
    ("magenta", "diamond"),
    ("white", "ellipse"),
    ("black", "arrow"),
]

# Held-out colour-shape combinations (Uni-Perceiver v2, Appendix C, detection of novel
# categories, in miniature): each colour and each shape is seen in training as part of another
# category, the pair never. They are rendered only in the "novel" split.
_NOVEL_PAIRS = [
    ("red", "square"),
    ("blue", "circle"),
    ("green", "triangle"),
    ("yellow", "hexagon"),
]


def _category(index: int, colour: str, shape: str) -> Dict:
    return {"id": index + 1, "name": f"{colour} {shape}", "color": list(_COLOURS[colour]),
            "colour_name": colour, "shape": shape, "supercategory": shape}


TOY_SHAPES_CATEGORIES: List[Dict] = [_category(i, c, s) for i, (c, s) in enumerate(_CATEGORY_PAIRS)]
# ids continue after the seen categories: 11..14
TOY_SHAPES_NOVEL_CATEGORIES: List[Dict] = [
    _category(len(_CATEGORY_PAIRS) + i, c, s) for i, (c, s) in enumerate(_NOVEL_PAIRS)]

BACKGROUND_KINDS = ("gradient", "noise", "stripes", "checkers")


class RenderParams:
    """Knobs of the synthetic scenes (defaults are the dataset's).

    Sizes are the full shape's bounding extent ``max(w, h)`` relative to the shorter image
    side, drawn log-uniformly in ``[min_size, max_size]`` (more mass at small/medium).
    """

    def __init__(self, min_side: int = 128, max_side: int = 256, min_objects: int = 1,
                 max_objects: int = 6, min_size: float = 0.08, max_size: float = 0.6,
                 min_visible_fraction: float = 0.3, min_visible_pixels: int = 20,
                 placement_tries: int = 8):
        if not (16 <= min_side <= max_side):
            raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
        if not (1 <= min_objects <= max_objects):
            raise ValueError(
                f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if not (0.0 < min_size <= max_size <= 1.0):
            raise ValueError(f"need 0 < min_size <= max_size <= 1, got {min_size}, {max_size}")
        if not (0.0 <= min_visible_fraction <= 1.0):
            raise ValueError(f"min_visible_fraction must be in [0, 1], got {min_visible_fraction}")
        if min_visible_pixels < 1 or placement_tries < 1:
            raise ValueError("min_visible_pixels and placement_tries must be >= 1")
        self.min_side, self.max_side = int(min_side), int(max_side)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.min_size, self.max_size = float(min_size), float(max_size)
        self.min_visible_fraction = float(min_visible_fraction)
        self.min_visible_pixels = int(min_visible_pixels)
        self.placement_tries = int(placement_tries)

    def as_dict(self) -> Dict:
        return dict(vars(self))


# ----------------------------------------------------------------------------- shapes
def _regular(n: int, phase: float, radii=(1.0,)) -> np.ndarray:
    """(n * len(radii), 2) vertices of a regular polygon/star, radii cycling per vertex."""
    k = np.arange(n * len(radii))
    ang = phase + 2 * math.pi * k / len(k)
    r = np.asarray(radii, dtype=np.float64)[k % len(radii)]
    return np.stack([r * np.cos(ang), -r * np.sin(ang)], axis=1)


_ARM = 0.32  # half-width of the cross' arms
_UNIT_SHAPES = {
    "circle": _regular(48, 0.0),
    "ellipse": _regular(48, 0.0),
    "square": _regular(4, math.pi / 4),
    "triangle": _regular(3, math.pi / 2),
    "pentagon": _regular(5, math.pi / 2),
    "hexagon": _regular(6, 0.0),
    "star": _regular(5, math.pi / 2, radii=(1.0, 0.45)),
    "diamond": _regular(4, 0.0),
    "cross": np.array([(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM),
                       (_ARM, _ARM), (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM),
                       (-1, -_ARM), (-_ARM, -_ARM)], dtype=np.float64),
    "arrow": np.array([(-1, -0.2), (0.15, -0.2), (0.15, -0.55), (1, 0), (0.15, 0.55),
                       (0.15, 0.2), (-1, 0.2)], dtype=np.float64),
}
# x-stretch range before rotation: mild for most shapes; the ellipse and diamond get a
# strong one, which is what tells them apart from a circle and a rotated square.
_ASPECT = {"ellipse": (0.45, 0.65), "diamond": (0.55, 0.7)}
_MILD_ASPECT = (0.85, 1.15)


def _shape_polygon(shape: str, size_px: float, rng: np.random.Generator) -> np.ndarray:
    """(N, 2) float polygon with min corner at (0, 0) and max(w, h) == size_px."""
    pts = _UNIT_SHAPES[shape].copy()
    lo, hi = _ASPECT.get(shape, _MILD_ASPECT)
    pts[:, 0] *= rng.uniform(lo, hi)
    theta = rng.uniform(0.0, 2 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    pts = pts @ np.array([[c, -s], [s, c]])
    pts -= pts.min(axis=0)
    return pts * (size_px / pts.max())


# ------------------------------------------------------------------------ backgrounds
def _base_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation mid-grey colour; with the pattern amplitude below it stays in [64, 186]."""
    return rng.uniform(95, 155) + rng.uniform(-15, 15, size=3)


def _background(h: int, w: int, rng: np.random.Generator) -> Tuple[np.ndarray, str]:
    """(H, W, 3) float32 textured background and its kind (one of BACKGROUND_KINDS)."""
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    base = _base_colour(rng).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    # Coordinate along a random direction, used by gradients and stripes.
    along = xx * math.cos(theta) + yy * math.sin(theta)
    amp = rng.uniform(8, 16)
    if kind == "gradient":
        other = _base_colour(rng).astype(np.float32)
        t = (along - along.min()) / max(float(np.ptp(along)), 1.0)
        img = base + t[..., None] * (other - base)
    elif kind == "noise":
        cells = int(rng.integers(4, 17))
        low = rng.uniform(-1, 1, size=(cells, cells, 3)).astype(np.float32)
        img = base + amp * cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    elif kind == "stripes":
        period = rng.uniform(6, 32)
        img = base + amp * np.sign(np.sin(2 * math.pi * along / period))[..., None]
    else:  # checkers, on axes rotated by theta
        cell = rng.uniform(8, 32)
        across = -xx * math.sin(theta) + yy * math.cos(theta)
        parity = (np.floor(along / cell) + np.floor(across / cell)) % 2
        img = base + amp * (2 * parity - 1)[..., None]
    return np.clip(img, 0, 255).astype(np.float32), kind


# ---------------------------------------------------------------- visible annotations
_UP = 4  # upsampling of masks before contour tracing (see _visible_annotation)
_MIN_COMPONENT_AREA = 2.5  # px; smaller visible fragments make a placement invalid


def _visible_annotation(owner: np.ndarray, idx: int, box: Tuple[int, int, int, int]
                        ) -> Optional[Dict]:
    """COCO polygons/area/bbox of instance ``idx``'s visible pixels, or None if unusable.

    ``owner`` is the (H, W) int map of which instance owns each pixel; ``box`` the
    (x0, y0, x1, y1) crop holding the instance's full mask. None means the visible region
    is empty, has a hole (COCO polygons are unions, they cannot cut holes) or a fragment
    too small to be a sensible target.
    """
    x0, y0, x1, y1 = box
    region = owner[y0:y1, x0:x1] == idx
    area = int(region.sum())
    if area == 0:
        return None
    # Tracing an upsampled mask puts contour points 1/8 px inside the pixel edges instead
    # of on boundary-pixel centres (1/2 px inside), so the polygons rasterise back to
    # nearly the same mask even for tiny objects.
    padded = np.pad(region.astype(np.uint8), 1)
    up = cv2.resize(padded, None, fx=_UP, fy=_UP, interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None or (hierarchy[0][:, 3] >= 0).any():
        return None
    polygons = []
    for contour in contours:
        if cv2.contourArea(contour) / _UP ** 2 < _MIN_COMPONENT_AREA:
            return None
        # 0.5 px tolerance removes the pixel staircase along slanted edges.
        approx = cv2.approxPolyDP(contour, 0.5 * _UP, True)
        if len(approx) < 3:
            approx = contour
        xy = (approx[:, 0, :].astype(np.float64) + 0.5) / _UP - 1.0 + (x0, y0)
        polygons.append([round(float(v), 2) for v in xy.reshape(-1)])
    cols = np.flatnonzero(region.any(axis=0))
    rows = np.flatnonzero(region.any(axis=1))
    bbox = [float(x0 + cols[0]), float(y0 + rows[0]),
            float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]
    return {"segmentation": polygons, "area": area, "bbox": bbox}


# ---------------------------------------------------------------------------- scenes
def _try_place(owner: np.ndarray, instances: List[Dict], categories: List[Dict],
               cat_index: int, size_px: float, rng: np.random.Generator, params: RenderParams
               ) -> Optional[Dict]:
    """Draw one placement of a shape of ``categories[cat_index]`` on top of ``owner``;
    commit it only if it covers no instance of its own colour and every instance (new and occluded ones) keeps a valid
    visible annotation. Returns the new instance's record, or None with ``owner`` left
    unchanged (``instances[j]["annotation"]`` is refreshed for the occluded ones on success).
    """
    h, w = owner.shape
    cat = categories[cat_index]
    poly = _shape_polygon(cat["shape"], size_px, rng)
    ext_w, ext_h = poly.max(axis=0)
    # cv2 puts integer coordinates at pixel centres, so the shape spans ext + 1 pixels.
    ox = rng.uniform(0, max(w - 1 - ext_w, 0.0))
    oy = rng.uniform(0, max(h - 1 - ext_h, 0.0))
    x0, y0 = int(ox), int(oy)
    x1, y1 = min(int(math.ceil(ox + ext_w)) + 1, w), min(int(math.ceil(oy + ext_h)) + 1, h)
    full = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    # shift=4: 1/16 px vertex precision; LINE_8 keeps the mask binary (no anti-aliasing).
    pts = np.round((poly + (ox - x0, oy - y0)) * 16).astype(np.int32)
    cv2.fillPoly(full, [pts], 1, lineType=cv2.LINE_8, shift=4)
    full = full.astype(bool)
    full_area = int(full.sum())
    if full_area < params.min_visible_pixels:
        return None

    new_idx = len(instances)
    saved = owner[y0:y1, x0:x1].copy()
    occluded = [int(j) for j in np.unique(saved[full]) if j >= 0]
    # Two flat same-colour shapes overlapping would merge into one blob with no visible
    # boundary between them: such targets cannot be learned, so that placement is refused.
    colour = cat["colour_name"]
    if any(categories[instances[j]["category_index"]]["colour_name"] == colour for j in occluded):
        return None
    owner[y0:y1, x0:x1][full] = new_idx
    updates = {}
    for j in occluded:
        inst = instances[j]
        ann = _visible_annotation(owner, j, inst["box"])
        if (ann is None or ann["area"] < params.min_visible_pixels
                or ann["area"] < params.min_visible_fraction * inst["full_area"]):
            owner[y0:y1, x0:x1] = saved
            return None
        updates[j] = ann
    ann = _visible_annotation(owner, new_idx, (x0, y0, x1, y1))
    if ann is None:
        owner[y0:y1, x0:x1] = saved
        return None
    for j, other in updates.items():
        instances[j]["annotation"] = other
    return {"category_index": cat_index, "box": (x0, y0, x1, y1), "full_area": full_area,
            "size": size_px / min(h, w), "annotation": ann}


class ToyScene(NamedTuple):
    """One rendered scene.

    image: (H, W, 3) uint8 RGB, H and W independently in ``[min_side, max_side]``.
    instances: drawing order (later ones on top), at least one; dicts with ``category_id``
        (1..K), ``segmentation`` (flat polygons of the visible part), ``area`` (visible
        pixels), ``bbox`` (visible XYWH), ``full_area`` (unoccluded pixels), ``size`` (full
        extent / shorter side) and ``occluded`` (bool).
    background: the background kind, one of BACKGROUND_KINDS.
    owner: (H, W) int16, index into ``instances`` of the object seen at each pixel, -1 for
        background; ``owner == i`` is instance i's visible mask.
    """
    image: np.ndarray
    instances: List[Dict]
    background: str
    owner: np.ndarray


def render_toy_image(rng: np.random.Generator, params: Optional[RenderParams] = None,
                     categories: Optional[List[Dict]] = None) -> ToyScene:
    """Render one scene (see :class:`ToyScene` for what comes back) with objects drawn
    uniformly from ``categories`` (default TOY_SHAPES_CATEGORIES)."""
    params = params or RenderParams()
    categories = TOY_SHAPES_CATEGORIES if categories is None else categories
    h = int(rng.integers(params.min_side, params.max_side + 1))
    w = int(rng.integers(params.min_side, params.max_side + 1))
    image, kind = _background(h, w, rng)
    owner = np.full((h, w), -1, dtype=np.int16)
    instances: List[Dict] = []
    # Retry whole object lists until one lands; the first object only fails if its
    # rasterised area is below min_visible_pixels, so this ends within a few rounds.
    while not instances:
        num = int(rng.integers(params.min_objects, params.max_objects + 1))
        for _ in range(num):
            cat_index = int(rng.integers(len(categories)))
            size_px = min(h, w) * math.exp(rng.uniform(math.log(params.min_size),
                                                       math.log(params.max_size)))
            # Keep category and size across retries (only pose/position change), so
            # crowded scenes do not skew the size distribution towards small objects.
            for _ in range(params.placement_tries):
                inst = _try_place(owner, instances, categories, cat_index, size_px, rng,
                                  params)
                if inst is not None:
                    instances.append(inst)
                    break

    for idx, inst in enumerate(instances):
        x0, y0, x1, y1 = inst["box"]
        colour = np.asarray(categories[inst["category_index"]]["color"], np.float32)
        colour = np.clip(colour + rng.uniform(-12, 12, size=3), 0, 255)
        image[y0:y1, x0:x1][owner[y0:y1, x0:x1] == idx] = colour
    # Mild sensor-like noise so neither objects nor backgrounds are perfectly flat.
    image += rng.standard_normal(image.shape, dtype=np.float32) * 3.0
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    out = []
    for inst in instances:
        ann = inst["annotation"]
        out.append({"category_id": categories[inst["category_index"]]["id"],
                    "segmentation": ann["segmentation"], "area": ann["area"],
                    "bbox": ann["bbox"], "full_area": inst["full_area"],
                    "size": inst["size"], "occluded": ann["area"] < inst["full_area"]})
    return ToyScene(image, out, kind, owner)
