"""Map-style task datasets of Uni-Perceiver v2 (Sec. 4.1 / Appendix A): ImageNet-1k image
classification, COCO Captions and Flickr30k (Karpathy's splits) for captioning and
image-text retrieval, and the toy_shapes views of these tasks plus masked language modelling.

Every source is written here in its real format (class-folder tree + Kaggle's
LOC_synset_mapping.txt, Karpathy's dataset_*.json, toy_shapes' generated json files); the
oracles are the values written (hand-listed below), pycocotools' own COCO reader for the
caption ground truth, and hand-counted skips.
"""
import builtins
import collections
import glob
import io
import json
import logging
import os
import pickle
import uuid

import numpy as np
import pytest
from PIL import Image

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools.coco import COCO

from unip_v2.data.datasets import (
    TASKS,
    TOY_SHAPES_CATEGORIES,
    SkipCounter,
    caption_ground_truth,
    class_names,
    ensure_toy_shapes,
    load_coco_captions_json,
    load_image_folder,
    load_image_labels_json,
    load_karpathy_json,
    read_class_list,
    register_all_task_datasets,
    register_coco_karpathy,
    register_flickr30k,
    register_imagenet,
    register_toy_shapes_tasks,
    toy_shapes_files,
)


def _unique(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _remove(names):
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _jpeg(path, colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(buf, "JPEG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _warnings(caplog):
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ------------------------------------------------------------------------- ImageNet
# Kaggle's LOC_synset_mapping.txt format, deliberately NOT in sorted wnid order: labels
# follow the file's lines, not the folders' sorted order.
SYNSETS = "n01443537 goldfish, Carassius auratus\nn01440764 tench, Tinca tinca\n\n"


@pytest.fixture
def imagenet_root(tmp_path):
    root = tmp_path / "imagenet"
    (root).mkdir()
    (root / "LOC_synset_mapping.txt").write_text(SYNSETS)
    for rel in ("train/n01440764/n01440764_10026.JPEG", "train/n01440764/n01440764_9.JPEG",
                "train/n01443537/n01443537_1.JPEG",
                "train/n99999999/n99999999_1.JPEG",         # folder not in the class list
                "val/n01443537/ILSVRC2012_val_00000001.JPEG"):
        _jpeg(str(root / rel))
    (root / "train" / "README.txt").write_text("a file outside any class folder")
    (root / "train" / "n01440764" / "notes.txt").write_text("not an image")
    return str(root)


def test_read_class_list_kaggle_format(tmp_path):
    """"<wnid> <name>, <synonyms>": the class name is the first comma-separated name; a
    line with only a wnid names the class after it; a repeated wnid is an error."""
    path = tmp_path / "classes.txt"
    path.write_text(SYNSETS + "n02000000\n")
    assert read_class_list(str(path)) == [("n01443537", "goldfish"), ("n01440764", "tench"),
                                          ("n02000000", "n02000000")]
    path.write_text("n1 a\nn1 b\n")
    with pytest.raises(ValueError, match="more than once"):
        read_class_list(str(path))


def test_image_folder_labels_follow_the_class_list(imagenet_root, caplog):
    """Hand-listed dicts: tench (line 2) -> label 1, goldfish (line 1) -> label 0, files
    sorted within a folder; the unknown folder's image, the stray file and the non-image
    file are skipped, each counted and named in a warning."""
    skipped = SkipCounter("imagenet")
    with caplog.at_level(logging.WARNING):
        dicts = load_image_folder(os.path.join(imagenet_root, "train"),
                                  os.path.join(imagenet_root, "LOC_synset_mapping.txt"),
                                  skipped=skipped)
    train = os.path.join(imagenet_root, "train")
    assert dicts == [
        {"file_name": os.path.join(train, "n01440764", "n01440764_10026.JPEG"),
         "image_id": "n01440764/n01440764_10026.JPEG", "label": 1},
        {"file_name": os.path.join(train, "n01440764", "n01440764_9.JPEG"),
         "image_id": "n01440764/n01440764_9.JPEG", "label": 1},
        {"file_name": os.path.join(train, "n01443537", "n01443537_1.JPEG"),
         "image_id": "n01443537/n01443537_1.JPEG", "label": 0},
    ]
    assert skipped == collections.Counter(class_not_in_list=1, file_outside_class_folder=1,
                                          not_an_image_file=1)
    text = _warnings(caplog)
    assert "n99999999_1.JPEG" in text and "README.txt" in text and "notes.txt" in text


def test_imagenet_registration_is_lazy_and_names_classes(imagenet_root, tmp_path):
    """Registering a root that does not exist reads nothing and fails only on load; the
    class names are available from the class list alone (before loading the tree), under
    both class_names and detectron2's thing_classes, and the loaded dicts carry labels."""
    prefix = _unique("imagenet")
    missing = register_imagenet(str(tmp_path / "nowhere"), prefix=prefix + "_missing")
    names = register_imagenet(imagenet_root, prefix=prefix)
    try:
        assert names == [f"{prefix}_train", f"{prefix}_val"]
        meta = MetadataCatalog.get(names[1])
        assert (meta.task, meta.evaluator_type) == ("classification", "classification")
        assert meta.image_root == os.path.join(imagenet_root, "val")
        assert class_names(names[1]) == ["goldfish", "tench"]
        assert meta.class_names == meta.thing_classes == ["goldfish", "tench"]
        assert DatasetCatalog.get(names[1]) == [{
            "file_name": os.path.join(imagenet_root, "val", "n01443537",
                                      "ILSVRC2012_val_00000001.JPEG"),
            "image_id": "n01443537/ILSVRC2012_val_00000001.JPEG", "label": 0}]
        assert [d["label"] for d in DatasetCatalog.get(names[0])] == [1, 1, 0]
        assert MetadataCatalog.get(names[0]).class_names == ["goldfish", "tench"]
        with pytest.raises(FileNotFoundError):
            DatasetCatalog.get(missing[0])
    finally:
        _remove(names + missing)


# ----------------------------------------------------------- image-label json files
def test_image_labels_json_out_of_list_label_skipped_and_counted(tmp_path, caplog):
    """toy_shapes' image_labels format with the 10 toy categories (ids 1..10, label =
    id - 1): category 11 (not in the list), an image without a label and one with two are
    skipped and counted; the others get id - 1: 3 -> 2 and 10 -> 9."""
    data = {"images": [{"id": i, "file_name": f"{i:06d}.png"} for i in (1, 2, 3, 4, 5)],
            "categories": [{"id": c["id"], "name": c["name"]} for c in TOY_SHAPES_CATEGORIES],
            "annotations": [{"image_id": 1, "category_id": 3},
                            {"image_id": 2, "category_id": 11},
                            {"image_id": 4, "category_id": 10},
                            {"image_id": 5, "category_id": 1},
                            {"image_id": 5, "category_id": 2}]}
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(data))
    skipped = SkipCounter("labels")
    with caplog.at_level(logging.WARNING):
        dicts = load_image_labels_json(str(path), "img", TOY_SHAPES_CATEGORIES,
                                       skipped=skipped)
    assert dicts == [{"file_name": "img/000001.png", "image_id": 1, "label": 2},
                     {"file_name": "img/000004.png", "image_id": 4, "label": 9}]
    assert skipped == collections.Counter(label_not_in_class_list=1, no_label=1,
                                          several_labels=1)
    assert "category id 11" in _warnings(caplog)
    # A file whose category 3 has another name is not the registered dataset: an error.
    data["categories"][2]["name"] = "green circle"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="green circle"):
        load_image_labels_json(str(path), "img", TOY_SHAPES_CATEGORIES)


# ------------------------------------------------------------ Karpathy COCO / Flickr
def _sent(raw):
    return {"tokens": raw.lower().split(), "raw": raw, "imgid": 0, "sentid": 0}


KARPATHY_COCO = {"images": [
    {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "cocoid": 9,
     "split": "train", "sentences": [_sent("A plate of food."), _sent("  Food on a plate. ")]},
    {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "cocoid": 42,
     "split": "restval", "sentences": [_sent("A dog."), _sent("   "), _sent("")]},
    {"filepath": "val2014", "filename": "COCO_val2014_000000000073.jpg", "cocoid": 73,
     "split": "val", "sentences": [_sent("A motorcycle.")]},
    {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "cocoid": 391895,
     "split": "test", "sentences": [_sent("A man riding a bike."), _sent("A cyclist.")]},
    {"filepath": "val2014", "filename": "COCO_val2014_000000000074.jpg", "cocoid": 74,
     "split": "test", "sentences": [_sent(" "), {"tokens": [], "raw": "\n"}]},
], "dataset": "coco"}


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "dataset_coco.json").write_text(json.dumps(KARPATHY_COCO))
    return str(root)


def test_karpathy_splits_captions_and_skips(coco_root, caplog):
    """train = train + restval (images 9 and 42); the two blank captions of 42 are dropped
    (counted), image 74 (test) has only blank captions and is skipped (counted)."""
    json_file = os.path.join(coco_root, "annotations", "dataset_coco.json")
    skipped = SkipCounter("karpathy")
    with caplog.at_level(logging.WARNING):
        train = load_karpathy_json(json_file, coco_root, ("train", "restval"), skipped=skipped)
    assert train == [
        {"file_name": os.path.join(coco_root, "train2014", "COCO_train2014_000000000009.jpg"),
         "image_id": 9, "captions": ["A plate of food.", "Food on a plate."]},
        {"file_name": os.path.join(coco_root, "val2014", "COCO_val2014_000000000042.jpg"),
         "image_id": 42, "captions": ["A dog."]},
    ]
    assert skipped == collections.Counter(empty_caption=2)
    skipped = SkipCounter("karpathy")
    test = load_karpathy_json(json_file, coco_root, ("test",), skipped=skipped)
    assert [(d["image_id"], d["captions"]) for d in test] == [
        (391895, ["A man riding a bike.", "A cyclist."])]
    assert skipped == collections.Counter(empty_caption=2, image_without_captions=1)
    assert "COCO_val2014_000000000074.jpg" in _warnings(caplog)


def test_coco_karpathy_registration_and_caption_ground_truth(coco_root, tmp_path):
    """Names {prefix}_{train,val,test}_{captioning,retrieval}; registration reads nothing
    (the caption_json does not exist before a load); loading writes a COCO-format ground
    truth that pycocotools' COCO reads back with exactly the kept captions, and that
    accepts a result file the way pycocoevalcap's COCOEvalCap uses it (loadRes)."""
    prefix = _unique("karpathy")
    cache = str(tmp_path / "cache")
    names = register_coco_karpathy(coco_root, cache_dir=cache, prefix=prefix)
    try:
        assert names == [f"{prefix}_{s}_{t}" for s in ("train", "val", "test")
                         for t in ("captioning", "retrieval")]
        meta = MetadataCatalog.get(f"{prefix}_test_captioning")
        assert (meta.task, meta.evaluator_type) == ("captioning", "captioning")
        assert MetadataCatalog.get(f"{prefix}_test_retrieval").task == "retrieval"
        assert meta.caption_json.startswith(cache) and not os.path.exists(meta.caption_json)
        assert caption_ground_truth(f"{prefix}_test_captioning") == meta.caption_json
        gt = COCO(meta.caption_json)
        assert sorted(gt.getImgIds()) == [391895]
        assert [a["caption"] for a in gt.loadAnns(gt.getAnnIds(imgIds=[391895]))] == [
            "A man riding a bike.", "A cyclist."]
        res = gt.loadRes([{"image_id": 391895, "caption": "a person on a bicycle"}])
        assert res.getImgIds() == [391895]
        train = COCO(caption_ground_truth(f"{prefix}_train_retrieval"))
        assert {i: [a["caption"] for a in train.imgToAnns[i]] for i in train.getImgIds()} == {
            9: ["A plate of food.", "Food on a plate."], 42: ["A dog."]}
        assert [d["image_id"] for d in DatasetCatalog.get(f"{prefix}_val_captioning")] == [73]
    finally:
        _remove(names)


def test_flickr30k_image_ids_and_registration(tmp_path):
    """Flickr30k's Karpathy file has no filepath/cocoid: images sit in flickr30k-images/
    and the image id is the numeric file stem (1000092795.jpg -> 1000092795)."""
    root = tmp_path / "flickr30k"
    (root / "annotations").mkdir(parents=True)
    data = {"images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "test",
         "sentences": [_sent("Two young guys."), _sent("Two men outside.")]},
        {"filename": "10002456.jpg", "imgid": 1, "split": "val",
         "sentences": [_sent("Workers look down.")]},
        {"filename": "1000268201.jpg", "imgid": 2, "split": "train",
         "sentences": [_sent("A child.")]}], "dataset": "flickr30k"}
    (root / "annotations" / "dataset_flickr30k.json").write_text(json.dumps(data))
    prefix = _unique("flickr")
    names = register_flickr30k(str(root), cache_dir=str(tmp_path / "cache"), prefix=prefix)
    try:
        assert names == [f"{prefix}_val_retrieval", f"{prefix}_test_retrieval"]
        assert DatasetCatalog.get(names[1]) == [{
            "file_name": os.path.join(str(root), "flickr30k-images", "1000092795.jpg"),
            "image_id": 1000092795, "captions": ["Two young guys.", "Two men outside."]}]
        assert [d["image_id"] for d in DatasetCatalog.get(names[0])] == [10002456]
        assert MetadataCatalog.get(names[0]).evaluator_type == "retrieval"
    finally:
        _remove(names)


def test_coco_captions_json_skips_and_counts(tmp_path):
    """COCO-format captions: an image's captions in annotation order, blank ones dropped,
    an image left without captions skipped, a caption of an unknown image counted."""
    data = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"},
                       {"id": 3, "file_name": "c.png"}],
            "annotations": [{"id": 1, "image_id": 2, "caption": "second"},
                            {"id": 2, "image_id": 1, "caption": "first "},
                            {"id": 3, "image_id": 2, "caption": "again"},
                            {"id": 4, "image_id": 3, "caption": " "},
                            {"id": 5, "image_id": 9, "caption": "orphan"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    skipped = SkipCounter("captions")
    assert load_coco_captions_json(str(path), "r", skipped=skipped) == [
        {"file_name": "r/a.png", "image_id": 1, "captions": ["first"]},
        {"file_name": "r/b.png", "image_id": 2, "captions": ["second", "again"]}]
    assert skipped == collections.Counter(empty_caption=1, image_without_captions=1,
                                          caption_of_unknown_image=1)


def test_skip_counter_counts_past_the_logged_warnings(caplog):
    """7 skips of one reason: all 7 counted, 5 logged one by one, then one summary."""
    skipped = SkipCounter("src")
    with caplog.at_level(logging.WARNING):
        for i in range(7):
            skipped.skip("empty_caption", f"caption {i}")
        skipped.skip("no_label", "image 9")
        skipped.summary()
    assert skipped == collections.Counter(empty_caption=7, no_label=1)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [m for m in messages if "caption" in m and "skipped (" in m] == [
        f"src: skipped (empty_caption) caption {i}" for i in range(4)] + [
        "src: skipped (empty_caption) caption 4 (further ones are only counted)"]
    assert messages[-1] == "src: skipped 8 record(s) (empty_caption: 7, no_label: 1)"
    # A DataLoader worker started by "spawn" gets a pickled copy of a stream and its counts.
    copy = pickle.loads(pickle.dumps(skipped))
    assert (copy, copy.source) == (skipped, "src")


# ------------------------------------------------------------------- toy_shapes tasks
@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    """A tiny generated toy_shapes (the generator of tests/toy_data.py's make_toy_data,
    without the tokenizer these tests do not need)."""
    root = str(tmp_path_factory.mktemp("datasets") / "toy_shapes")
    ensure_toy_shapes(root, num_train=6, num_val=4, num_novel=1, seed=0)
    return root


def _load(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("split", ["train", "val"])
def test_toy_shapes_task_datasets_match_the_json_files(toy_root, split):
    """Each task view against the generated json read directly: label = category_id - 1
    (ids 1..10 in TOY_SHAPES_CATEGORIES order) and its class name is the json category's;
    captions = the image's caption; MLM texts = the captions in file order."""
    prefix = _unique("toy")
    names = register_toy_shapes_tasks(toy_root, prefix=prefix)
    try:
        assert names == [f"{prefix}_{s}_{t}" for s in ("train", "val")
                         for t in ("classification", "captioning", "retrieval", "mlm")]
        files = toy_shapes_files(toy_root, split)
        labels = _load(files["image_label_json"])
        captions = _load(files["caption_json"])
        image_file = {img["id"]: os.path.join(toy_root, split, img["file_name"])
                      for img in labels["images"]}
        cat_name = {c["id"]: c["name"] for c in labels["categories"]}

        cls = MetadataCatalog.get(f"{prefix}_{split}_classification")
        assert (cls.task, cls.evaluator_type) == ("classification", "classification")
        assert cls.class_names == [c["name"] for c in TOY_SHAPES_CATEGORIES]
        # Stored as "class_names" itself, not only through detectron2's renaming alias.
        assert cls.as_dict()["class_names"] == cls.as_dict()["thing_classes"] == cls.class_names
        assert len(cls.class_names) == 10
        dicts = DatasetCatalog.get(f"{prefix}_{split}_classification")
        assert dicts == [{"file_name": image_file[a["image_id"]], "image_id": a["image_id"],
                          "label": a["category_id"] - 1} for a in labels["annotations"]]
        for d, a in zip(dicts, labels["annotations"]):
            assert cls.class_names[d["label"]] == cat_name[a["category_id"]]

        expected = [{"file_name": image_file[a["image_id"]], "image_id": a["image_id"],
                     "captions": [a["caption"]]} for a in captions["annotations"]]
        for task in ("captioning", "retrieval"):
            meta = MetadataCatalog.get(f"{prefix}_{split}_{task}")
            assert (meta.task, meta.evaluator_type) == (task, task)
            assert meta.caption_json == files["caption_json"]
            assert DatasetCatalog.get(f"{prefix}_{split}_{task}") == expected

        mlm = MetadataCatalog.get(f"{prefix}_{split}_mlm")
        assert (mlm.task, mlm.evaluator_type) == ("mlm", "mlm")
        assert DatasetCatalog.get(f"{prefix}_{split}_mlm") == [
            {"text": a["caption"]} for a in captions["annotations"]]
    finally:
        _remove(names)


def test_toy_task_registration_missing_files_names_the_generator(tmp_path):
    prefix = _unique("toy")
    names = register_toy_shapes_tasks(str(tmp_path / "toy_shapes"), prefix=prefix)
    try:
        with pytest.raises(FileNotFoundError, match="make_toy_dataset.py"):
            DatasetCatalog.get(f"{prefix}_train_classification")
        with pytest.raises(FileNotFoundError, match="make_toy_dataset.py"):
            DatasetCatalog.get(f"{prefix}_val_mlm")
    finally:
        _remove(names)


# ------------------------------------------------------------------- registrations
DEFAULT_NAMES = (
    ["toy_shapes_train", "toy_shapes_val", "toy_shapes_novel"]
    + [f"toy_shapes_{s}_{t}" for s in ("train", "val")
       for t in ("classification", "captioning", "retrieval", "mlm")]
    + ["imagenet_train", "imagenet_val"]
    + [f"coco_karpathy_{s}_{t}" for s in ("train", "val", "test")
       for t in ("captioning", "retrieval")]
    + ["flickr30k_val_retrieval", "flickr30k_test_retrieval", "bookswiki_train_mlm"]
    + [f"{c}_train_{t}" for c in ("cc3m", "cc12m", "sbu", "yfcc", "vg")
       for t in ("retrieval", "captioning")])


def test_default_names_registered_with_task_metadata():
    """Every default task dataset is registered with task == evaluator_type in TASKS;
    the detection registrations keep evaluator_type "coco"."""
    assert set(DEFAULT_NAMES) <= set(DatasetCatalog.list())
    for name in DEFAULT_NAMES[3:]:
        meta = MetadataCatalog.get(name)
        assert meta.task in TASKS and meta.evaluator_type == meta.task, name
        assert meta.task == name.rsplit("_", 1)[1] or name.startswith("imagenet"), name
    for name in DEFAULT_NAMES[:3]:
        assert MetadataCatalog.get(name).evaluator_type == "coco"
    assert MetadataCatalog.get("imagenet_val").task == "classification"
    assert MetadataCatalog.get("cc3m_train_captioning").streamed is True
    assert MetadataCatalog.get("bookswiki_train_mlm").streamed is True


def test_registration_reads_nothing(tmp_path, monkeypatch):
    """Registering every real dataset opens, lists and stats no file."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"registration touched the disk: {args}")

    for module, attr in ((builtins, "open"), (io, "open"), (os, "stat"), (os, "listdir"),
                         (os, "scandir"), (glob, "glob"), (os, "lstat")):
        monkeypatch.setattr(module, attr, refuse)
    root = str(tmp_path / "elsewhere")
    try:
        names = register_all_task_datasets(root)
    finally:
        monkeypatch.undo()  # before pytest formats a failure (it reads source files)
    try:
        assert MetadataCatalog.get("imagenet_val").image_root == os.path.join(root, "imagenet",
                                                                             "val")
        assert MetadataCatalog.get("cc3m_train_retrieval").shards == os.path.join(
            root, "cc3m", "*.tar")
    finally:
        # Put the default registrations back (the names are shared with the import's).
        register_all_task_datasets()
    assert MetadataCatalog.get("imagenet_val").image_root == os.path.join(
        os.getenv("DETECTRON2_DATASETS", "datasets"), "imagenet", "val")
    assert len(names) == len(DEFAULT_NAMES) - 11


def test_toy_classification_label_baselines_hand_counted(tmp_path):
    from unip_v2.data.datasets.toy_shapes_tasks import classification_label_baselines
    ann = tmp_path / "annotations"
    ann.mkdir()
    # image 1: two red circles (30 + 30 px) and one larger green square (50 px): label green
    # (largest object), most pixels red; image 2: one blue triangle; image 3: green + blue.
    instances = [(1, 1, 30), (1, 1, 30), (1, 2, 50), (2, 3, 40), (3, 2, 10), (3, 3, 20)]
    (ann / "instances_val.json").write_text(json.dumps({"annotations": [
        {"image_id": i, "category_id": c, "area": a} for i, c, a in instances]}))
    (ann / "image_labels_val.json").write_text(json.dumps({"annotations": [
        {"image_id": 1, "category_id": 2}, {"image_id": 2, "category_id": 3},
        {"image_id": 3, "category_id": 3}]}))
    got = classification_label_baselines(str(tmp_path), "val")
    assert got["chance"] == pytest.approx(10.0)
    assert got["majority"] == pytest.approx(200 / 3)                  # label 3 twice of 3
    assert got["guess_among_present"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)
    assert got["most_pixels"] == pytest.approx(200 / 3)               # image 1 says red
