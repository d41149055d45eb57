"""The toy_shapes task datasets: classification, captioning, retrieval and MLM views of the
files the toy generator writes (``toy_shapes.py``), registered lazily:

* ``{prefix}_{split}_classification`` from ``annotations/image_labels_{split}.json`` (the
  label of an image is the category of its largest visible object; ``class_names`` = the
  10 TOY_SHAPES_CATEGORIES names, label = index in that list = category id - 1);
* ``{prefix}_{split}_captioning`` / ``{prefix}_{split}_retrieval`` from
  ``annotations/captions_{split}.json`` (COCO captions, one per image; it is also the
  metadata's ``caption_json``);
* ``{prefix}_{split}_mlm``: that split's captions as text, a list of ``{"text": caption}``
  (map-style: the toy corpus is small).

for split in train, val. The detection registrations (``toy_shapes_{train,val,novel}``)
are :func:`~unip_v2.data.datasets.toy_shapes.register_toy_shapes`'s.
"""
import collections
import json
import os
from typing import Dict, List, Optional

from .captions import load_coco_captions_json
from .imagenet import load_image_labels_json
from .task_common import SkipCounter, register_task_dataset
from .toy_shapes import TOY_SHAPES_CATEGORIES, toy_shapes_files, toy_shapes_root

__all__ = ["TOY_TASK_SPLITS", "classification_label_baselines", "load_toy_shapes_texts",
           "register_toy_shapes_tasks"]

TOY_TASK_SPLITS = ("train", "val")


def _require(path: str) -> None:
    if not os.path.isfile(path):
        root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        raise FileNotFoundError(
            f"toy_shapes annotations not found: {path}. The toy dataset is generated locally; "
            f"create it with `python tools/make_toy_dataset.py --root {root}`.")


def load_toy_shapes_texts(caption_json: str, dataset_name: Optional[str] = None,
                          skipped: Optional[SkipCounter] = None) -> List[Dict]:
    """``[{"text": caption}]``: every caption of a toy split, in file order (captions of
    images without an entry are skipped like the captioning datasets skip them)."""
    _require(caption_json)
    dicts = load_coco_captions_json(caption_json, "", dataset_name, skipped)
    return [{"text": caption} for d in dicts for caption in d["captions"]]


def _labels(files: Dict[str, str], name: str) -> List[Dict]:
    _require(files["image_label_json"])
    return load_image_labels_json(files["image_label_json"], files["image_root"],
                                  TOY_SHAPES_CATEGORIES, name)


def _captions(files: Dict[str, str], name: str) -> List[Dict]:
    _require(files["caption_json"])
    return load_coco_captions_json(files["caption_json"], files["image_root"], name)


def register_toy_shapes_tasks(root: Optional[str] = None, prefix: str = "toy_shapes"
                              ) -> List[str]:
    """Register the task datasets of the module docstring for ``root`` (default
    ``$DETECTRON2_DATASETS/toy_shapes``). Reads and generates nothing; returns the names."""
    root = toy_shapes_root() if root is None else str(root)
    class_names = [c["name"] for c in TOY_SHAPES_CATEGORIES]
    names = []
    for split in TOY_TASK_SPLITS:
        files = toy_shapes_files(root, split)
        common = dict(dataset_root=root, image_root=files["image_root"])
        name = f"{prefix}_{split}_classification"
        names.append(register_task_dataset(
            name, lambda f=files, n=name: _labels(f, n), task="classification",
            class_names=class_names, image_label_json=files["image_label_json"], **common))
        for task in ("captioning", "retrieval"):
            name = f"{prefix}_{split}_{task}"
            names.append(register_task_dataset(
                name, lambda f=files, n=name: _captions(f, n), task=task,
                caption_json=files["caption_json"], **common))
        name = f"{prefix}_{split}_mlm"
        names.append(register_task_dataset(
            name, lambda f=files, n=name: load_toy_shapes_texts(f["caption_json"], n),
            task="mlm", caption_json=files["caption_json"], dataset_root=root))
    return names


def classification_label_baselines(root: Optional[str] = None, split: str = "val"
                                   ) -> Dict[str, float]:
    """What simple rules score on a split's image labels (the category of the largest
    visible object), in percent, from the split's instance and label files:

    * ``chance``: one category drawn uniformly from the 10;
    * ``majority``: always the split's most frequent label;
    * ``guess_among_present``: the expected top-1 of a classifier that knows which
      categories an image holds but not their sizes, drawing one of them uniformly: the level
      a model reaches by recognising objects without comparing areas;
    * ``most_pixels``: the category with the most visible pixels over all of its instances
      (the largest object's category unless several small ones of one colour add up).
    """
    root = toy_shapes_root() if root is None else str(root)
    files = toy_shapes_files(root, split)
    for path in (files["json_file"], files["image_label_json"]):
        _require(path)
    with open(files["json_file"]) as f:
        instances = json.load(f)["annotations"]
    with open(files["image_label_json"]) as f:
        labels = {a["image_id"]: a["category_id"] for a in json.load(f)["annotations"]}
    area = collections.defaultdict(collections.Counter)     # image -> category -> pixels
    for a in instances:
        area[a["image_id"]][a["category_id"]] += a["area"]
    n = len(labels)
    present = sum(1.0 / len(area[i]) for i, c in labels.items() if c in area[i])
    most = sum(area[i].most_common(1)[0][0] == c for i, c in labels.items() if area[i])
    majority = collections.Counter(labels.values()).most_common(1)[0][1]
    return {"chance": 100.0 / len(TOY_SHAPES_CATEGORIES), "majority": 100.0 * majority / n,
            "guess_among_present": 100.0 * present / n, "most_pixels": 100.0 * most / n}
