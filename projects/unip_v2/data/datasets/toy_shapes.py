"""The toy_shapes dataset: generation to COCO-format files and detectron2 registration.

No dataset can be downloaded on the machines this project runs on, so a small multi-task
dataset is synthesised (scenes come from ``toy_shapes_render``). Layout under ``root``::

    train/000000.png ...                 RGB PNGs, sides in [128, 256]
    val/000000.png ...
    novel/000000.png ...                 like val, plus held-out colour-shape combinations
    annotations/instances_{split}.json   COCO instances (visible-part polygons, area, bbox)
    annotations/captions_{split}.json    COCO captions, one per image
    annotations/image_labels_{split}.json {"categories", "annotations": [{image_id, category_id}]}
    DONE                                 written last: generator version + parameters

Registered detectron2 names: ``toy_shapes_train``, ``toy_shapes_val`` and
``toy_shapes_novel`` (COCO instance dicts; metadata also carries ``caption_json`` and
``image_label_json``).

Train and val draw objects from the 10 TOY_SHAPES_CATEGORIES. The novel split draws them
from those and the 4 TOY_SHAPES_NOVEL_CATEGORIES (colour-shape pairs whose colour and shape
are both seen in training, never together), uniformly over the 14: it measures detection of
categories named only at test time (Uni-Perceiver v2, Appendix C). Its metadata lists all 14
names in ``thing_classes`` and the held-out ones in ``novel_thing_classes``.
"""
import json
import os
import re
import time
from typing import Callable, Dict, List, Optional

import cv2
import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .toy_shapes_render import (
    TOY_SHAPES_CATEGORIES,
    TOY_SHAPES_NOVEL_CATEGORIES,
    RenderParams,
    ToyScene,
    render_toy_image,
)

__all__ = [
    "TOY_SHAPES_CATEGORIES",
    "TOY_SHAPES_NOVEL_CATEGORIES",
    "GENERATOR_VERSION",
    "toy_shapes_categories",
    "toy_shapes_root",
    "toy_shapes_files",
    "toy_shapes_scene",
    "generate_toy_shapes",
    "ensure_toy_shapes",
    "load_toy_shapes_json",
    "register_toy_shapes",
]

# Bump whenever the generated content changes, so ensure_toy_shapes regenerates old copies.
GENERATOR_VERSION = 1
SPLITS = ("train", "val", "novel")
# Separate random streams per split: image i of split s comes from rng([seed, stream, i]),
# so splits never share scenes and each image is independent of the split sizes.
_SPLIT_STREAM = {"train": 0, "val": 1, "novel": 2}
_IMAGE_NAME = re.compile(r"^\d{6,}\.png$")
_GENERATE_CMD = "python tools/make_toy_dataset.py --root {root}"

_NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                 8: "eight", 9: "nine", 10: "ten"}
_BACKGROUND_PHRASES = {
    "gradient": "a smooth gradient background",
    "noise": "a mottled background",
    "stripes": "a striped background",
    "checkers": "a checkered background",
}
_CAPTION_TEMPLATES = ("{objects} on {background}", "a picture of {objects} on {background}",
                      "an image with {objects} on {background}")


def toy_shapes_root() -> str:
    """Default root: ``$DETECTRON2_DATASETS/toy_shapes`` (``./datasets`` when unset)."""
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "toy_shapes")


def toy_shapes_categories(split: str) -> List[Dict]:
    """The categories a split's objects are drawn from (and its COCO "categories")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "novel":
        return TOY_SHAPES_CATEGORIES + TOY_SHAPES_NOVEL_CATEGORIES
    return TOY_SHAPES_CATEGORIES


def toy_shapes_files(root: str, split: str) -> Dict[str, str]:
    """Paths of one split: ``image_root``, ``json_file``, ``caption_json``, ``image_label_json``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ann = os.path.join(root, "annotations")
    return {
        "image_root": os.path.join(root, split),
        "json_file": os.path.join(ann, f"instances_{split}.json"),
        "caption_json": os.path.join(ann, f"captions_{split}.json"),
        "image_label_json": os.path.join(ann, f"image_labels_{split}.json"),
    }


# --------------------------------------------------------------------------- captions
def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def _caption(category_ids: List[int], background: str, rng: np.random.Generator) -> str:
    """E.g. "two blue triangles and a red circle on a striped background"."""
    by_id = {c["id"]: c for c in TOY_SHAPES_CATEGORIES + TOY_SHAPES_NOVEL_CATEGORIES}
    counts: Dict[int, int] = {}
    for cid in category_ids:
        counts[cid] = counts.get(cid, 0) + 1
    phrases = []
    for cid, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        cat = by_id[cid]
        shape = cat["shape"] if n == 1 else _plural(cat["shape"])
        count = _NUMBER_WORDS.get(n, str(n))
        if count == "a" and cat["colour_name"][0] in "aeiou":
            count = "an"  # "an orange hexagon"
        phrases.append(f"{count} {cat['colour_name']} {shape}")
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    return template.format(objects=objects, background=_BACKGROUND_PHRASES[background])


# ------------------------------------------------------------------------- generation
def _public_categories(split: str) -> List[Dict]:
    return [{"id": c["id"], "name": c["name"], "supercategory": c["supercategory"]}
            for c in toy_shapes_categories(split)]


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _clear_previous(root: str) -> None:
    """Remove what an earlier generation wrote (only our own file names: a root shared with
    other data keeps everything else), DONE first so a crash leaves no stale marker."""
    done = os.path.join(root, "DONE")
    if os.path.exists(done):
        os.remove(done)
    for split in SPLITS:
        files = toy_shapes_files(root, split)
        for key in ("json_file", "caption_json", "image_label_json"):
            if os.path.exists(files[key]):
                os.remove(files[key])
        if os.path.isdir(files["image_root"]):
            for name in os.listdir(files["image_root"]):
                if _IMAGE_NAME.match(name):
                    os.remove(os.path.join(files["image_root"], name))


def _render_indexed(split: str, index: int, seed: int, params: RenderParams):
    """(scene, rng) of image ``index`` of ``split``; the rng continues for its caption."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
    return render_toy_image(rng, params, toy_shapes_categories(split)), rng


def toy_shapes_scene(split: str, index: int, seed: int = 0,
                     params: Optional[RenderParams] = None) -> ToyScene:
    """Re-render image ``index`` (0-based, file ``{index:06d}.png``) of a split exactly as
    the generator wrote it, including its per-pixel ``owner`` map of visible masks."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _render_indexed(split, int(index), int(seed), params or RenderParams())[0]


def _generate_split(root: str, split: str, num_images: int, seed: int, params: RenderParams,
                    progress: Optional[Callable[[str, int, int], None]] = None) -> Dict:
    """Render and write one split; returns its statistics. ``progress(split, done, total)``
    is called after every image."""
    files = toy_shapes_files(root, split)
    os.makedirs(files["image_root"], exist_ok=True)
    images, instances, captions, labels = [], [], [], []
    sizes, occluded, areas = [], 0, []
    for index in range(num_images):
        scene, rng = _render_indexed(split, index, seed, params)
        image_id = index + 1
        file_name = f"{index:06d}.png"
        h, w = scene.image.shape[:2]
        # cv2 writes BGR; the PNG on disk is a normal RGB image.
        if not cv2.imwrite(os.path.join(files["image_root"], file_name), scene.image[:, :, ::-1]):
            raise OSError(f"could not write {os.path.join(files['image_root'], file_name)}")
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for inst in scene.instances:
            instances.append({
                "id": len(instances) + 1, "image_id": image_id,
                "category_id": inst["category_id"], "segmentation": inst["segmentation"],
                "area": inst["area"], "bbox": inst["bbox"], "iscrowd": 0})
            sizes.append(inst["size"])
            areas.append(inst["area"])
            occluded += int(inst["occluded"])
        cat_ids = [inst["category_id"] for inst in scene.instances]
        captions.append({"id": image_id, "image_id": image_id,
                         "caption": _caption(cat_ids, scene.background, rng)})
        largest = max(scene.instances, key=lambda inst: inst["area"])
        labels.append({"image_id": image_id, "category_id": largest["category_id"]})
        if progress is not None:
            progress(split, index + 1, num_images)

    info = {"description": f"toy_shapes {split} (synthetic)", "version": str(GENERATOR_VERSION)}
    categories = _public_categories(split)
    _write_json(files["json_file"], {"info": info, "licenses": [], "images": images,
                                     "annotations": instances, "categories": categories})
    _write_json(files["caption_json"], {"info": info, "licenses": [], "images": images,
                                        "annotations": captions})
    _write_json(files["image_label_json"], {"info": info, "images": images,
                                            "categories": categories, "annotations": labels})
    areas = np.asarray(areas, dtype=np.float64)
    return {
        "images": num_images,
        "instances": len(instances),
        "instances_per_image": len(instances) / num_images,
        "occluded_fraction": occluded / max(len(instances), 1),
        "size_quantiles": {f"p{q}": round(float(np.quantile(sizes, q / 100)), 3)
                           for q in (10, 25, 50, 75, 90)},
        # COCO's small/medium/large area ranges, which the AP breakdown uses.
        "area_fractions": {"small": float((areas < 32 ** 2).mean()),
                           "medium": float(((areas >= 32 ** 2) & (areas < 96 ** 2)).mean()),
                           "large": float((areas >= 96 ** 2).mean())},
    }


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))


def _marker_params(num_train: int, num_val: int, num_novel: int, seed: int,
                   params: RenderParams) -> Dict:
    return {"generator_version": GENERATOR_VERSION, "num_train": num_train,
            "num_val": num_val, "num_novel": num_novel, "seed": seed, "render": params.as_dict()}


def generate_toy_shapes(root: Optional[str] = None, num_train: int = 2000, num_val: int = 200,
                        seed: int = 0, params: Optional[RenderParams] = None,
                        num_novel: int = 200,
                        progress: Optional[Callable[[str, int, int], None]] = None) -> Dict:
    """(Re)generate the dataset under ``root`` (default :func:`toy_shapes_root`).

    Deterministic in (``seed``, ``params``, generator version); each split's images do not
    depend on the other splits' sizes. ``progress(split, done, total)`` is called after
    every image. Returns a summary dict:
    ``root``, ``params`` (what DONE records), ``categories`` (K), ``seconds`` and per-split
    stats under ``splits`` (images, instances, instances_per_image, occluded_fraction,
    size_quantiles = full extent / shorter side, area_fractions by COCO size range).
    """
    root = toy_shapes_root() if root is None else str(root)
    num_train = _check_count("num_train", num_train)
    num_val = _check_count("num_val", num_val)
    num_novel = _check_count("num_novel", num_novel)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    params = params or RenderParams()
    marker = _marker_params(num_train, num_val, num_novel, seed, params)

    start = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    _clear_previous(root)
    splits = {split: _generate_split(root, split, n, seed, params, progress)
              for split, n in (("train", num_train), ("val", num_val), ("novel", num_novel))}
    summary = {"root": root, "params": marker, "categories": len(TOY_SHAPES_CATEGORIES),
               "novel_categories": len(TOY_SHAPES_NOVEL_CATEGORIES),
               "seconds": round(time.perf_counter() - start, 2), "splits": splits}
    # Written last: its presence (with matching params) is what marks the dataset complete.
    _write_json(os.path.join(root, "DONE"), summary)
    return summary


def ensure_toy_shapes(root: Optional[str] = None, num_train: int = 2000, num_val: int = 200,
                      seed: int = 0, params: Optional[RenderParams] = None,
                      force: bool = False, num_novel: int = 200,
                      progress: Optional[Callable[[str, int, int], None]] = None) -> Dict:
    """Generate the dataset unless ``root/DONE`` records exactly these parameters.

    Returns the summary (the stored one when nothing was generated) with ``generated``
    telling whether this call wrote the dataset.
    """
    root = toy_shapes_root() if root is None else str(root)
    params = params or RenderParams()
    wanted = _marker_params(int(num_train), int(num_val), int(num_novel), int(seed), params)
    done = os.path.join(root, "DONE")
    if not force and os.path.isfile(done):
        try:
            with open(done) as f:
                stored = json.load(f)
        except (OSError, ValueError):
            stored = {}  # unreadable marker: treat the dataset as incomplete
        if stored.get("params") == wanted:
            return dict(stored, generated=False)
    summary = generate_toy_shapes(root, num_train, num_val, seed, params, num_novel, progress)
    return dict(summary, generated=True)


# ----------------------------------------------------------------------- registration
def load_toy_shapes_json(json_file: str, image_root: str, dataset_name: Optional[str] = None
                         ) -> List[Dict]:
    """detectron2 dataset dicts of one split (``load_coco_json``), with a clear error that
    says how to generate the files when they are missing."""
    if not os.path.isfile(json_file):
        root = os.path.dirname(os.path.dirname(os.path.abspath(json_file)))
        raise FileNotFoundError(
            f"toy_shapes annotations not found: {json_file}. The toy dataset is generated "
            f"locally; create it with `{_GENERATE_CMD.format(root=root)}` (or set "
            f"DETECTRON2_DATASETS to the directory that holds toy_shapes/).")
    return load_coco_json(json_file, image_root, dataset_name)


def register_toy_shapes(root: Optional[str] = None, prefix: str = "toy_shapes") -> List[str]:
    """Register ``{prefix}_train`` / ``{prefix}_val`` / ``{prefix}_novel`` in detectron2's
    catalogs.

    Generates and reads nothing (loading is lazy). Metadata: thing_classes, thing_colors,
    thing_dataset_id_to_contiguous_id, novel_thing_classes, evaluator_type "coco",
    json_file, image_root, caption_json, image_label_json. Registering a name again with the same files is a
    no-op; with other files it replaces the earlier registration. Returns the names.
    """
    root = toy_shapes_root() if root is None else str(root)
    names = []
    for split in SPLITS:
        name = f"{prefix}_{split}"
        files = toy_shapes_files(root, split)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (meta.get("json_file") == files["json_file"]
                    and meta.get("image_root") == files["image_root"]):
                names.append(name)
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        # Same registration as detectron2's register_coco_instances, but through
        # load_toy_shapes_json so a missing dataset says how to generate it.
        DatasetCatalog.register(name, lambda f=files, n=name: load_toy_shapes_json(
            f["json_file"], f["image_root"], n))
        categories = toy_shapes_categories(split)
        MetadataCatalog.get(name).set(
            evaluator_type="coco",
            thing_classes=[c["name"] for c in categories],
            thing_colors=[tuple(c["color"]) for c in categories],
            thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
            novel_thing_classes=[c["name"] for c in categories
                                 if c in TOY_SHAPES_NOVEL_CATEGORIES],
            **files)
        names.append(name)
    return names
