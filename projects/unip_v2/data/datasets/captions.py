"""Image-caption datasets for captioning and image-text retrieval: Karpathy's split files
(COCO Captions, Flickr30k) and COCO-format caption files (toy_shapes' ``captions_{split}.json``).

Dataset dicts, one per image: ``{"file_name", "image_id", "captions": [str, ...]}``.
Captions are stripped; an empty or whitespace-only caption is dropped and an image left
without captions is skipped, each with a warning and counted. Images are not opened here
(the mapper skips unreadable files, ``unip_v2.data.image_io.try_read_image``).

Captioning evaluation (pycocoevalcap's COCOEvalCap) reads a COCO-format ground-truth file,
named by the metadata's ``caption_json``: the source file itself for COCO-format sources;
for Karpathy's files it is written when the dataset is loaded (see
:func:`write_caption_json`, :func:`caption_ground_truth`), into a cache directory:
``$UNIP_V2_CACHE_DIR`` or ``~/.cache/unip_v2``, file ``captions/<name>-<hash>.json``.

Karpathy's file (``dataset_coco.json`` / ``dataset_flickr30k.json`` from his
``caption_datasets.zip``)::

    {"images": [{"filepath": "val2014",          # COCO only; Flickr30k has none
                 "filename": "COCO_val2014_000000391895.jpg",
                 "cocoid": 391895,                 # COCO only
                 "split": "train" | "restval" | "val" | "test",
                 "sentences": [{"raw": "A man riding ...", "tokens": [...]}, ...]}, ...]}

``image_id`` is ``cocoid`` when present, else the file name's stem as an int when it is
a number (Flickr30k's "1000092795.jpg" -> 1000092795), else the stem.
"""
import hashlib
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

from .task_common import SkipCounter, register_task_dataset

__all__ = [
    "KARPATHY_SPLITS",
    "caption_cache_dir",
    "caption_ground_truth",
    "load_coco_captions_json",
    "load_karpathy_json",
    "register_coco_karpathy",
    "register_flickr30k",
    "write_caption_json",
]

logger = logging.getLogger(__name__)

# Registered split -> Karpathy "split" values it takes (train includes restval, as in
# most captioning and retrieval work since Karpathy & Fei-Fei).
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def _clean_captions(captions: Sequence, path: str, skipped: SkipCounter) -> List[str]:
    kept = []
    for caption in captions:
        if not isinstance(caption, str) or not caption.strip():
            skipped.skip("empty_caption", f"a caption of {path}: {caption!r}")
        else:
            kept.append(caption.strip())
    return kept


def _karpathy_image_id(img: Dict):
    if "cocoid" in img:
        return img["cocoid"]
    stem = os.path.splitext(img["filename"])[0]
    return int(stem) if stem.isdigit() else stem


def load_karpathy_json(json_file: str, image_root: str, splits: Sequence[str],
                       dataset_name: Optional[str] = None,
                       skipped: Optional[SkipCounter] = None) -> List[Dict]:
    """Dicts of the images of Karpathy's ``json_file`` whose "split" is in ``splits``, in
    file order; ``file_name`` = ``image_root/filepath/filename`` (no filepath: Flickr30k).
    Captions from each sentence's "raw" (its "tokens" joined by spaces when "raw" is
    absent). Skipped and counted: ``empty_caption``, ``image_without_captions``."""
    skipped = SkipCounter(dataset_name or json_file) if skipped is None else skipped
    with PathManager.open(json_file, "r") as f:
        images = json.load(f)["images"]
    wanted = set(splits)
    dicts = []
    for img in images:
        if img.get("split") not in wanted:
            continue
        path = os.path.join(image_root, img.get("filepath", ""), img["filename"])
        raw = [s["raw"] if "raw" in s else " ".join(s.get("tokens", []))
               for s in img.get("sentences", [])]
        captions = _clean_captions(raw, path, skipped)
        if not captions:
            skipped.skip("image_without_captions", path)
            continue
        dicts.append({"file_name": path, "image_id": _karpathy_image_id(img),
                      "captions": captions})
    skipped.summary()
    return dicts


def load_coco_captions_json(json_file: str, image_root: str,
                            dataset_name: Optional[str] = None,
                            skipped: Optional[SkipCounter] = None) -> List[Dict]:
    """Dicts of a COCO-format caption file (``{"images": [{id, file_name}], "annotations":
    [{image_id, caption}]}``: COCO's ``captions_*.json``, toy_shapes' ``captions_*.json``),
    images in file order, each image's captions in annotation order. Skipped and counted:
    ``empty_caption``, ``image_without_captions``, ``caption_of_unknown_image``."""
    skipped = SkipCounter(dataset_name or json_file) if skipped is None else skipped
    with PathManager.open(json_file, "r") as f:
        data = json.load(f)
    by_image: Dict = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in by_image:
            skipped.skip("caption_of_unknown_image",
                         f"caption {ann.get('id')} of image id {ann['image_id']}")
        else:
            by_image[ann["image_id"]].append(ann.get("caption"))
    dicts = []
    for img in data["images"]:
        path = os.path.join(image_root, img["file_name"])
        captions = _clean_captions(by_image[img["id"]], path, skipped)
        if not captions:
            skipped.skip("image_without_captions", path)
            continue
        dicts.append({"file_name": path, "image_id": img["id"], "captions": captions})
    skipped.summary()
    return dicts


def write_caption_json(dicts: Sequence[Dict], path: str, description: str = "") -> str:
    """Write the captions of ``dicts`` as a COCO-format caption ground truth (what
    pycocotools' ``COCO`` and pycocoevalcap's ``COCOEvalCap`` read): ``images`` =
    [{id, file_name}], ``annotations`` = [{id (1, 2, ... in order), image_id, caption}].
    Atomic (a concurrent reader sees the old or the new file), and not rewritten when the
    file already holds exactly this content. Returns ``path``."""
    images, annotations = [], []
    for d in dicts:
        images.append({"id": d["image_id"], "file_name": os.path.basename(d["file_name"])})
        for caption in d["captions"]:
            annotations.append({"id": len(annotations) + 1, "image_id": d["image_id"],
                                "caption": caption})
    content = json.dumps({"info": {"description": description}, "licenses": [],
                          "type": "captions", "images": images,
                          "annotations": annotations}, separators=(",", ":"))
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == content:
                return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(content)
    os.replace(tmp, path)
    return path


def caption_cache_dir() -> str:
    """``$UNIP_V2_CACHE_DIR``, else ``~/.cache/unip_v2``."""
    return os.getenv("UNIP_V2_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache",
                                                      "unip_v2"))


def _cached_caption_json(cache_dir: Optional[str], name: str, source: str) -> str:
    # The source's path (not its content: registration reads nothing) tells apart the
    # ground truths of one name registered over different dataset roots.
    digest = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:10]
    return os.path.join(cache_dir or caption_cache_dir(), "captions", f"{name}-{digest}.json")


def caption_ground_truth(dataset_name: str) -> str:
    """The metadata's ``caption_json``, loading the dataset first (which writes it) when
    the file does not exist yet."""
    path = MetadataCatalog.get(dataset_name).caption_json
    if not os.path.isfile(path):
        DatasetCatalog.get(dataset_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dataset_name}: caption ground truth {path} not found")
    return path


def _register_karpathy(name: str, json_file: str, image_root: str, split: str, task: str,
                       cache_dir: Optional[str], dataset_root: str) -> str:
    caption_json = _cached_caption_json(cache_dir, name, json_file)

    def load():
        dicts = load_karpathy_json(json_file, image_root, KARPATHY_SPLITS[split], name)
        write_caption_json(dicts, caption_json, f"{name} (from {json_file})")
        return dicts

    return register_task_dataset(
        name, load, task=task, dataset_root=dataset_root, image_root=image_root,
        karpathy_json=json_file, split=split, caption_json=caption_json)


def register_coco_karpathy(root: str, json_file: Optional[str] = None,
                           cache_dir: Optional[str] = None,
                           prefix: str = "coco_karpathy") -> List[str]:
    """Register ``{prefix}_{train,val,test}_{captioning,retrieval}`` for COCO under
    ``root`` (images in ``root/train2014``, ``root/val2014``; Karpathy's file at
    ``json_file``, default ``root/annotations/dataset_coco.json``). Reads nothing."""
    json_file = json_file or os.path.join(root, "annotations", "dataset_coco.json")
    return [_register_karpathy(f"{prefix}_{split}_{task}", json_file, root, split, task,
                               cache_dir, root)
            for split in KARPATHY_SPLITS for task in ("captioning", "retrieval")]


def register_flickr30k(root: str, json_file: Optional[str] = None,
                       cache_dir: Optional[str] = None, prefix: str = "flickr30k") -> List[str]:
    """Register ``{prefix}_val_retrieval`` and ``{prefix}_test_retrieval`` (evaluation)
    for Flickr30k under ``root`` (images in ``root/flickr30k-images``; Karpathy's file at
    ``json_file``, default ``root/annotations/dataset_flickr30k.json``). Reads nothing."""
    json_file = json_file or os.path.join(root, "annotations", "dataset_flickr30k.json")
    image_root = os.path.join(root, "flickr30k-images")
    return [_register_karpathy(f"{prefix}_{split}_retrieval", json_file, image_root, split,
                               "retrieval", cache_dir, root)
            for split in ("val", "test")]
