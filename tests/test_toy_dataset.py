"""The toy_shapes dataset: generator floors, COCO validity, determinism, registration."""
import json
import os
import re

import cv2
import numpy as np
import pytest

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools.coco import COCO

from unip_v2.data.datasets import (
    TOY_SHAPES_CATEGORIES,
    TOY_SHAPES_NOVEL_CATEGORIES,
    RenderParams,
    ensure_toy_shapes,
    generate_toy_shapes,
    load_toy_shapes_json,
    register_toy_shapes,
    toy_shapes_categories,
    toy_shapes_files,
    toy_shapes_root,
    toy_shapes_scene,
)

from tools_loader import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_VAL, NUM_NOVEL, SEED = 40, 10, 16, 3
SPLIT_SIZES = {"train": NUM_TRAIN, "val": NUM_VAL, "novel": NUM_NOVEL}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toy") / "toy_shapes")
    summary = generate_toy_shapes(root, NUM_TRAIN, NUM_VAL, seed=SEED, num_novel=NUM_NOVEL)
    return root, summary


def _load(path):
    with open(path) as f:
        return json.load(f)


def _read_rgb(path):
    return cv2.imread(path, cv2.IMREAD_COLOR)[:, :, ::-1]


def test_layout_and_summary(toy_root):
    root, summary = toy_root
    assert os.path.isfile(os.path.join(root, "DONE"))
    for split, n in SPLIT_SIZES.items():
        files = toy_shapes_files(root, split)
        for key in ("json_file", "caption_json", "image_label_json"):
            assert os.path.isfile(files[key]), key
        assert sorted(os.listdir(files["image_root"])) == [f"{i:06d}.png" for i in range(n)]
        assert summary["splits"][split]["images"] == n
    assert summary["categories"] == len(TOY_SHAPES_CATEGORIES)
    assert summary["novel_categories"] == len(TOY_SHAPES_NOVEL_CATEGORIES)


def test_categories():
    assert len(TOY_SHAPES_CATEGORIES) >= 8
    k = len(TOY_SHAPES_CATEGORIES)
    assert [c["id"] for c in TOY_SHAPES_CATEGORIES] == list(range(1, k + 1))
    names = [c["name"] for c in TOY_SHAPES_CATEGORIES]
    assert len(set(names)) == len(names)
    for c in TOY_SHAPES_CATEGORIES:
        colour, shape = c["name"].split(" ")
        assert (colour, shape) == (c["colour_name"], c["shape"])
    # Colours and shapes are each distinct, so either cue identifies the category.
    assert len({c["shape"] for c in TOY_SHAPES_CATEGORIES}) == len(names)
    assert len({tuple(c["color"]) for c in TOY_SHAPES_CATEGORIES}) == len(names)


@pytest.mark.parametrize("split", ["train", "val", "novel"])
def test_instances_json_floors(toy_root, split):
    root, _ = toy_root
    files = toy_shapes_files(root, split)
    data = _load(files["json_file"])
    categories = toy_shapes_categories(split)
    assert [c["name"] for c in data["categories"]] == [c["name"] for c in categories]
    per_image = {img["id"]: 0 for img in data["images"]}
    sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    for img in data["images"]:
        assert 128 <= img["height"] <= 256 and 128 <= img["width"] <= 256
        pixels = _read_rgb(os.path.join(files["image_root"], img["file_name"]))
        assert pixels.shape == (img["height"], img["width"], 3)
    ids = [a["id"] for a in data["annotations"]]
    assert len(set(ids)) == len(ids)
    for ann in data["annotations"]:
        per_image[ann["image_id"]] += 1
        h, w = sizes[ann["image_id"]]
        assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= len(categories)
        x, y, bw, bh = ann["bbox"]
        assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
        assert ann["area"] >= 20
        assert ann["segmentation"] and all(len(p) >= 6 and len(p) % 2 == 0
                                           for p in ann["segmentation"])
        xy = np.concatenate([np.reshape(p, (-1, 2)) for p in ann["segmentation"]])
        # Polygons lie inside the visible-mask box (contours run just inside pixel edges).
        assert (xy[:, 0] >= x).all() and (xy[:, 0] <= x + bw).all()
        assert (xy[:, 1] >= y).all() and (xy[:, 1] <= y + bh).all()
    assert all(1 <= n <= 6 for n in per_image.values())
    assert len(set(per_image.values())) > 2  # object counts vary


@pytest.mark.parametrize("split", ["val", "novel"])
def test_polygons_match_rendered_visible_masks(toy_root, split):
    root, _ = toy_root
    files = toy_shapes_files(root, split)
    coco = COCO(files["json_file"])
    ious, saw_occlusion = [], False
    for index in range(SPLIT_SIZES[split]):
        image_id = index + 1
        scene = toy_shapes_scene(split, index, seed=SEED)
        # The re-rendered scene is the written one (PNG is lossless).
        assert np.array_equal(scene.image,
                              _read_rgb(os.path.join(files["image_root"], f"{index:06d}.png")))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(anns) == len(scene.instances)
        for k, (ann, inst) in enumerate(zip(anns, scene.instances)):
            visible = scene.owner == k
            saw_occlusion |= bool(inst["occluded"])
            # area and bbox come from the visible mask, not from the full shape.
            assert ann["area"] == int(visible.sum())
            ys, xs = np.nonzero(visible)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                   ys.max() - ys.min() + 1]
            assert ann["area"] >= 0.3 * inst["full_area"]
            decoded = coco.annToMask(ann).astype(bool)
            ious.append((decoded & visible).sum() / (decoded | visible).sum())
    assert np.mean(ious) > 0.95 and min(ious) > 0.8
    assert saw_occlusion


def test_novel_split_holds_out_colour_shape_pairs(toy_root):
    root, _ = toy_root
    seen = {(c["colour_name"], c["shape"]) for c in TOY_SHAPES_CATEGORIES}
    held_out = {(c["colour_name"], c["shape"]) for c in TOY_SHAPES_NOVEL_CATEGORIES}
    # each held-out pair recombines a colour and a shape that training shows, never together
    assert not seen & held_out and len(held_out) == len(TOY_SHAPES_NOVEL_CATEGORIES) >= 2
    assert {c for c, _ in held_out} <= {c for c, _ in seen}
    assert {s for _, s in held_out} <= {s for _, s in seen}
    novel_ids = {c["id"] for c in TOY_SHAPES_NOVEL_CATEGORIES}
    assert novel_ids == set(range(len(TOY_SHAPES_CATEGORIES) + 1,
                                  len(TOY_SHAPES_CATEGORIES) + len(novel_ids) + 1))
    for split in ("train", "val"):      # never rendered in training (nor in val)
        data = _load(toy_shapes_files(root, split)["json_file"])
        assert not {a["category_id"] for a in data["annotations"]} & novel_ids
        assert not {c["id"] for c in data["categories"]} & novel_ids
    novel = _load(toy_shapes_files(root, "novel")["json_file"])
    counts = {}
    for a in novel["annotations"]:
        counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    assert novel_ids <= set(counts)                 # every held-out pair shows up ...
    assert set(counts) - novel_ids                  # ... next to seen categories
    # the rendered pixels have the held-out category's colour
    by_id = {c["id"]: c for c in toy_shapes_categories("novel")}
    for index in range(4):
        scene = toy_shapes_scene("novel", index, seed=SEED)
        for k, inst in enumerate(scene.instances):
            mean = scene.image[scene.owner == k].astype(float).mean(0)
            assert np.abs(mean - by_id[inst["category_id"]]["color"]).max() < 20


def test_backgrounds_are_textured_and_objects_stand_out():
    for index in range(5):
        scene = toy_shapes_scene("train", index, seed=SEED)
        background = scene.image[scene.owner < 0].astype(np.float64)
        assert background.std(axis=0).max() > 2.0  # not a constant colour
        # Backgrounds stay in a mid-grey band that no object colour reaches.
        for k, inst in enumerate(scene.instances):
            colour = scene.image[scene.owner == k].astype(np.float64).mean(axis=0)
            gap = np.abs(background - colour).max(axis=1)
            assert np.median(gap) > 30, (index, inst["category_id"])


def test_determinism(toy_root, tmp_path):
    root, _ = toy_root
    other = str(tmp_path / "again")
    generate_toy_shapes(other, NUM_TRAIN, NUM_VAL, seed=SEED, num_novel=NUM_NOVEL)
    for split, n in SPLIT_SIZES.items():
        a, b = toy_shapes_files(root, split), toy_shapes_files(other, split)
        for key in ("json_file", "caption_json", "image_label_json"):
            assert _load(a[key])["annotations"] == _load(b[key])["annotations"]
        for i in range(n):
            name = f"{i:06d}.png"
            assert np.array_equal(_read_rgb(os.path.join(a["image_root"], name)),
                                  _read_rgb(os.path.join(b["image_root"], name)))
    # Train and val come from different streams; another seed gives other scenes.
    assert not np.array_equal(toy_shapes_scene("train", 0, seed=SEED).image,
                              toy_shapes_scene("val", 0, seed=SEED).image)
    assert not np.array_equal(toy_shapes_scene("train", 0, seed=SEED).image,
                              toy_shapes_scene("train", 0, seed=SEED + 1).image)


@pytest.mark.parametrize("split", ["train", "val", "novel"])
def test_captions_and_image_labels(toy_root, split):
    root, _ = toy_root
    files = toy_shapes_files(root, split)
    instances = _load(files["json_file"])
    captions = _load(files["caption_json"])
    labels = _load(files["image_label_json"])
    image_ids = [img["id"] for img in instances["images"]]
    assert [img["id"] for img in captions["images"]] == image_ids
    assert sorted(c["image_id"] for c in captions["annotations"]) == image_ids
    assert sorted(lab["image_id"] for lab in labels["annotations"]) == image_ids
    assert labels["categories"] == instances["categories"]
    by_image = {}
    for ann in instances["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    names = {c["id"]: c for c in toy_shapes_categories(split)}
    for cap in captions["annotations"]:
        text = cap["caption"]
        assert text.endswith("background") and isinstance(cap["id"], int)
        assert not re.search(r"\ba [aeiou]", text), text  # "an orange ...", not "a orange"
        for ann in by_image[cap["image_id"]]:
            assert names[ann["category_id"]]["colour_name"] in text
    for lab in labels["annotations"]:
        largest = max(by_image[lab["image_id"]], key=lambda a: a["area"])
        assert lab["category_id"] == largest["category_id"]
    # COCO's caption API reads the captions file as well.
    assert len(COCO(files["caption_json"]).getAnnIds()) == len(image_ids)


def test_detectron2_registration_and_load(toy_root):
    root, _ = toy_root
    names = register_toy_shapes(root, prefix="toy_shapes_unittest")
    assert names == ["toy_shapes_unittest_train", "toy_shapes_unittest_val",
                     "toy_shapes_unittest_novel"]
    # Registering the same files again is a no-op.
    assert register_toy_shapes(root, prefix="toy_shapes_unittest") == names
    try:
        dicts = DatasetCatalog.get("toy_shapes_unittest_val")
        assert len(dicts) == NUM_VAL
        rec = dicts[0]
        assert os.path.isfile(rec["file_name"]) and rec["annotations"]
        assert all(0 <= a["category_id"] < len(TOY_SHAPES_CATEGORIES) for a in rec["annotations"])
        meta = MetadataCatalog.get("toy_shapes_unittest_val")
        assert meta.evaluator_type == "coco"
        assert meta.thing_classes == [c["name"] for c in TOY_SHAPES_CATEGORIES]
        assert os.path.isfile(meta.caption_json) and os.path.isfile(meta.image_label_json)
        assert meta.json_file == toy_shapes_files(root, "val")["json_file"]
        assert meta.novel_thing_classes == []
        novel = MetadataCatalog.get("toy_shapes_unittest_novel")
        held_out = [c["name"] for c in TOY_SHAPES_NOVEL_CATEGORIES]
        assert novel.thing_classes == meta.thing_classes + held_out
        assert novel.novel_thing_classes == held_out
        assert len(DatasetCatalog.get("toy_shapes_unittest_novel")) == NUM_NOVEL
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_default_registration_is_lazy():
    assert {"toy_shapes_train", "toy_shapes_val", "toy_shapes_novel"} <= set(DatasetCatalog.list())
    meta = MetadataCatalog.get("toy_shapes_val")
    assert meta.image_root == os.path.join(toy_shapes_root(), "val")


def test_missing_dataset_gives_generation_hint(tmp_path):
    files = toy_shapes_files(str(tmp_path / "nowhere"), "train")
    with pytest.raises(FileNotFoundError, match="make_toy_dataset.py"):
        load_toy_shapes_json(files["json_file"], files["image_root"])


def test_ensure_regenerates_only_when_needed(tmp_path):
    root = str(tmp_path / "toy")
    first = ensure_toy_shapes(root, num_train=3, num_val=2, seed=1, num_novel=1)
    assert first["generated"]
    done = os.path.join(root, "DONE")
    stamp = os.stat(done).st_mtime_ns
    again = ensure_toy_shapes(root, num_train=3, num_val=2, seed=1, num_novel=1)
    assert not again["generated"] and os.stat(done).st_mtime_ns == stamp
    assert again["splits"] == json.loads(json.dumps(first["splits"]))
    # Other parameters, a missing marker or force all regenerate.
    small_args = dict(num_val=2, seed=1, num_novel=1)
    assert ensure_toy_shapes(root, num_train=4, **small_args)["generated"]
    assert len(os.listdir(os.path.join(root, "train"))) == 4
    assert ensure_toy_shapes(root, num_train=2, **small_args)["generated"]
    assert len(os.listdir(os.path.join(root, "train"))) == 2  # stale images removed
    assert ensure_toy_shapes(root, num_train=2, num_val=2, seed=1, num_novel=2)["generated"]
    assert len(os.listdir(os.path.join(root, "novel"))) == 2
    os.remove(done)
    assert ensure_toy_shapes(root, num_train=2, **small_args)["generated"]
    assert ensure_toy_shapes(root, num_train=2, force=True, **small_args)["generated"]
    small = RenderParams(max_objects=2)
    assert ensure_toy_shapes(root, num_train=2, params=small, **small_args)["generated"]


@pytest.mark.parametrize("kwargs", [dict(num_train=0), dict(num_val=-1), dict(seed=-2),
                                    dict(num_train=2.5), dict(num_novel=0)])
def test_bad_arguments_raise(tmp_path, kwargs):
    args = dict(num_train=2, num_val=2, seed=0, num_novel=1)
    args.update(kwargs)
    with pytest.raises(ValueError):
        generate_toy_shapes(str(tmp_path / "bad"), **args)


def test_bad_render_params_raise():
    with pytest.raises(ValueError, match="min_side"):
        RenderParams(min_side=300, max_side=256)
    with pytest.raises(ValueError, match="min_size"):
        RenderParams(min_size=0.0)


def test_cli(tmp_path, capsys):
    cli = load_tool("make_toy_dataset")
    argv = ["--root", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1",
            "--num-novel", "1", "--seed", "5"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "generated" in out and "train: 2 images" in out and "categories: 10" in out
    assert cli.main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli.main(argv[:-2] + ["--seed", "-1"]) == 2
    assert "seed" in capsys.readouterr().err
