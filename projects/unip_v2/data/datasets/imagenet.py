"""Image classification datasets: ImageNet-1k's class-folder layout, and COCO-style image
label json files (toy_shapes' ``image_labels_{split}.json``).

Dataset dicts: ``{"file_name", "image_id", "label"}`` with ``label`` an index into the
metadata's ``class_names``. A record whose class is not in the class list is skipped with a
warning and counted (never given a wrong label). Images are not opened here: unreadable
files are the mapper's to skip (``unip_v2.data.image_io.try_read_image``).

ImageNet layout (under ``$DETECTRON2_DATASETS/imagenet``, registered lazily as
``imagenet_train`` / ``imagenet_val``)::

    LOC_synset_mapping.txt          one class a line: "n01440764 tench, Tinca tinca"
    train/n01440764/*.JPEG ...      one folder per class (torchvision's ImageFolder layout)
    val/n01440764/*.JPEG ...

Labels follow the line order of ``LOC_synset_mapping.txt`` (sorted by wnid in Kaggle's
file, so they equal ImageFolder's sorted-folder indices); the class name is the first
comma-separated name after the wnid ("tench").
"""
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.utils.file_io import PathManager

from .task_common import SkipCounter, read_class_list, register_task_dataset, set_metadata

__all__ = [
    "IMAGE_EXTENSIONS",
    "load_image_folder",
    "load_image_labels_json",
    "register_imagenet",
]

logger = logging.getLogger(__name__)

# torchvision's ImageFolder extensions (compared lower-cased: ImageNet's are ".JPEG").
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLASS_LIST_FILE = "LOC_synset_mapping.txt"


def load_image_folder(image_root: str, class_list_file: str,
                      dataset_name: Optional[str] = None,
                      skipped: Optional[SkipCounter] = None) -> List[Dict]:
    """Dicts of a class-folder tree ``image_root/<folder>/<image>``, labels from
    ``class_list_file`` (:func:`read_class_list`), sorted by (folder, file name).

    ``image_id`` is the path relative to ``image_root`` ("n01440764/x.JPEG", unique even
    where file names repeat across classes). Skipped and counted in ``skipped``:
    ``class_not_in_list`` (each image of a folder the class list lacks),
    ``file_outside_class_folder`` and ``not_an_image_file`` (by extension). Sets the
    metadata's ``class_names`` of ``dataset_name`` when given.
    """
    skipped = SkipCounter(dataset_name or image_root) if skipped is None else skipped
    classes = read_class_list(class_list_file)
    label_of = {folder: i for i, (folder, _) in enumerate(classes)}
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image folder {image_root} not found (see datasets/README.md)")
    dicts = []
    for entry in sorted(os.scandir(image_root), key=lambda e: e.name):
        if not entry.is_dir():
            skipped.skip("file_outside_class_folder", entry.path)
            continue
        files = sorted(e.name for e in os.scandir(entry.path) if e.is_file())
        label = label_of.get(entry.name)
        for name in files:
            path = os.path.join(entry.path, name)
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                skipped.skip("not_an_image_file", path)
            elif label is None:
                skipped.skip("class_not_in_list",
                             f"{path}: folder {entry.name!r} is not in {class_list_file}")
            else:
                dicts.append({"file_name": path, "image_id": f"{entry.name}/{name}",
                              "label": label})
    skipped.summary()
    if dataset_name is not None:
        set_metadata(dataset_name, class_names=[name for _, name in classes])
    return dicts


def load_image_labels_json(json_file: str, image_root: str,
                           categories: Optional[Sequence[Dict]] = None,
                           dataset_name: Optional[str] = None,
                           skipped: Optional[SkipCounter] = None) -> List[Dict]:
    """Dicts of a COCO-style image-label file: ``{"images": [{id, file_name, ...}],
    "categories": [{id, name}], "annotations": [{image_id, category_id}]}`` (one label per
    image, as toy_shapes writes ``image_labels_{split}.json``).

    The class list is ``categories`` when given (e.g. the registered names), else the
    file's own, sorted by id; ``label`` is the index of the image's category in it.
    Skipped and counted: ``label_not_in_class_list``, ``no_label``, ``several_labels``.
    Raises ValueError when the file names a category id with another name than
    ``categories`` (the file is not what the dataset was registered for).
    """
    skipped = SkipCounter(dataset_name or json_file) if skipped is None else skipped
    with PathManager.open(json_file, "r") as f:
        data = json.load(f)
    file_categories = sorted(data.get("categories", []), key=lambda c: c["id"])
    if categories is None:
        categories = file_categories
    names = {c["id"]: c["name"] for c in categories}
    for c in file_categories:
        if c["id"] in names and names[c["id"]] != c["name"]:
            raise ValueError(f"{json_file}: category {c['id']} is {c['name']!r}, but the dataset "
                             f"expects {names[c['id']]!r}")
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    by_image: Dict = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["category_id"])
    dicts = []
    for img in data["images"]:
        cats = by_image.get(img["id"], [])
        path = os.path.join(image_root, img["file_name"])
        if not cats:
            skipped.skip("no_label", path)
        elif len(cats) > 1:
            skipped.skip("several_labels", f"{path}: categories {cats}")
        elif cats[0] not in label_of:
            skipped.skip("label_not_in_class_list",
                         f"{path}: category id {cats[0]} is not one of {sorted(label_of)}")
        else:
            dicts.append({"file_name": path, "image_id": img["id"], "label": label_of[cats[0]]})
    skipped.summary()
    return dicts


def register_imagenet(root: str, prefix: str = "imagenet") -> List[str]:
    """Register ``{prefix}_train`` and ``{prefix}_val`` for the layout in the module
    docstring under ``root``. Reads nothing: ``class_names`` enter the metadata when a split
    is loaded, or earlier through :func:`unip_v2.data.datasets.class_names`, which reads
    only ``class_list_file``."""
    names = []
    class_list_file = os.path.join(root, CLASS_LIST_FILE)
    for split in ("train", "val"):
        name = f"{prefix}_{split}"
        image_root = os.path.join(root, split)
        register_task_dataset(
            name,
            lambda r=image_root, n=name: load_image_folder(r, class_list_file, n),
            task="classification", dataset_root=root, image_root=image_root,
            class_list_file=class_list_file)
        names.append(name)
    return names

