"""COCOInstanceLSJDatasetMapper (large-scale jitter) and ClassAgnosticCOCOEvaluator on a
tiny synthetic COCO dataset written to a temporary directory."""
import json
import logging
import os
import uuid

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

import unip_v2  # first: makes detectron2 importable without its compiled ops

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.common import DatasetFromList
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BitMasks, Boxes, Instances

from unip_v2 import add_unip_v2_config
from unip_v2.data.dataset_mappers import COCOInstanceLSJDatasetMapper, build_dataset_mapper
from unip_v2.data.dataset_mappers.coco_instance_lsj import build_lsj_augmentations
from unip_v2.evaluation import ClassAgnosticCOCOEvaluator

# (file, width, height): a picture with objects, a taller one with an RLE object and a crowd
# region, one without annotations, and a file that is not an image.
_IMAGES = [("objects.png", 64, 48), ("tall.png", 100, 120), ("empty.png", 40, 40),
           ("corrupt.png", 32, 32)]


def _rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _ann(ann_id, image_id, cat, segm, h, w, iscrowd=0):
    rle = segm if isinstance(segm, dict) else mask_util.merge(mask_util.frPyObjects(segm, h, w))
    if isinstance(rle["counts"], list):
        rle = mask_util.frPyObjects(rle, h, w)
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": segm,
            "area": float(mask_util.area(rle)), "bbox": mask_util.toBbox(rle).tolist(),
            "iscrowd": iscrowd}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    for name, w, h in _IMAGES:
        if name == "corrupt.png":
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
            continue
        # Smooth gradient background so a flipped-then-resized image matches a
        # resized-then-flipped one closely.
        img = np.zeros((h, w, 3), np.uint8)
        img[..., 0] = np.linspace(0, 200, w, dtype=np.uint8)[None]
        img[..., 1] = np.linspace(0, 200, h, dtype=np.uint8)[:, None]
        img[..., 2] = rng.integers(0, 50)
        cv2.rectangle(img, (10, 8), (29, 27), (0, 0, 255), -1)
        cv2.imwrite(str(root / name), img)

    anns = [
        _ann(1, 1, 1, [_rect(10, 8, 30, 28)], 48, 64),
        _ann(2, 1, 2, [[40, 10, 60, 10, 50, 40]], 48, 64),  # triangle
        _ann(3, 2, 2, [_rect(5, 5, 45, 95)], 120, 100),
    ]
    rle_mask = np.zeros((120, 100), np.uint8, order="F")
    rle_mask[60:110, 55:95] = 1
    rle = mask_util.encode(rle_mask)
    rle["counts"] = rle["counts"].decode("ascii")
    anns.append(_ann(4, 2, 1, rle, 120, 100))
    crowd = np.zeros((120, 100), np.uint8, order="F")
    crowd[100:118, 5:40] = 1
    crowd_rle = mask_util.encode(crowd)
    crowd_rle["counts"] = crowd_rle["counts"].decode("ascii")
    anns.append(_ann(5, 2, 1, crowd_rle, 120, 100, iscrowd=1))

    coco = {
        "images": [{"id": i + 1, "file_name": n, "width": w, "height": h}
                   for i, (n, w, h) in enumerate(_IMAGES)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    json_file = root / "instances.json"
    json_file.write_text(json.dumps(coco))
    name = f"unip_v2_test_lsj_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(json_file), str(root))
    dicts = {os.path.basename(d["file_name"]): d for d in DatasetCatalog.get(name)}
    yield {"name": name, "json": str(json_file), "dicts": dicts}
    DatasetCatalog.remove(name)


def _cfg(image_size=64, min_scale=0.5, max_scale=2.0, flip="horizontal"):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.INPUT.IMAGE_SIZE = image_size
    cfg.INPUT.MIN_SCALE = min_scale
    cfg.INPUT.MAX_SCALE = max_scale
    cfg.INPUT.RANDOM_FLIP = flip
    return cfg


def _tight_boxes(masks):
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.asarray(boxes, np.float32).reshape(-1, 4)


# ---------------------------------------------------------------- mapper


def test_training_output_format_and_boxes_from_masks(dataset):
    mapper = COCOInstanceLSJDatasetMapper(_cfg(), is_train=True)
    for seed in range(4):
        np.random.seed(seed)
        for fname in ("objects.png", "tall.png"):
            d = dataset["dicts"][fname]
            out = mapper(d)
            assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 64, 64)
            assert (out["height"], out["width"]) == (d["height"], d["width"])
            assert out["image_id"] == d["image_id"] and "annotations" not in out
            vh, vw = out["valid_size"]
            assert 0 < vh <= 64 and 0 < vw <= 64
            inst = out["instances"]
            assert isinstance(inst, Instances) and inst.image_size == (64, 64)
            assert isinstance(inst.gt_masks, BitMasks) and isinstance(inst.gt_boxes, Boxes)
            masks = inst.gt_masks.tensor
            assert masks.dtype == torch.bool and masks.shape == (len(inst), 64, 64)
            assert inst.gt_classes.dtype == torch.int64
            assert set(inst.gt_classes.tolist()) <= {0, 1}
            assert len(inst) <= 2  # the crowd region of tall.png is never an instance
            assert masks.flatten(1).any(1).all()  # empty-after-crop objects are dropped
            assert not masks[:, vh:, :].any() and not masks[:, :, vw:].any()
            if vh < 64 or vw < 64:
                pad = torch.ones(64, 64, dtype=torch.bool)
                pad[:vh, :vw] = False
                assert (out["image"][:, pad] == 128).all()
            expected = _tight_boxes(masks.numpy())
            np.testing.assert_allclose(inst.gt_boxes.tensor.numpy(), expected, atol=1.0)


def test_boxes_follow_the_geometry_not_the_bbox_field(dataset):
    # Scale 1 of a 128 target: 48x64 -> 96x128, no crop, 32 pad rows.
    mapper = COCOInstanceLSJDatasetMapper(_cfg(128, 1.0, 1.0, "none"), is_train=True)
    out = mapper(dataset["dicts"]["objects.png"])
    assert out["valid_size"] == (96, 128)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [0, 1]
    np.testing.assert_allclose(inst.gt_boxes.tensor[0].numpy(), [20, 16, 60, 56], atol=1.0)
    # The triangle's apex is thinner than a pixel over its last rows: those stay empty.
    np.testing.assert_allclose(inst.gt_boxes.tensor[1].numpy(), [80, 20, 120, 80], atol=2.0)
    # The painted red square ends up under its mask (BGR: channel 2 is red).
    red = out["image"][2].float()
    assert red[inst.gt_masks.tensor[0]].mean() > 200


def test_resize_scale_range(dataset):
    d = dataset["dicts"]["tall.png"]  # h=120, w=100
    mapper = COCOInstanceLSJDatasetMapper(_cfg(128, 0.5, 0.5, "none"), is_train=True)
    s = min(64 / 120, 64 / 100)
    assert mapper(d)["valid_size"] == (round(120 * s), round(100 * s)) == (64, 53)

    mapper = COCOInstanceLSJDatasetMapper(_cfg(128, 0.25, 0.75, "none"), is_train=True)
    np.random.seed(3)
    long_sides = {max(mapper(d)["valid_size"]) for _ in range(8)}
    assert len(long_sides) > 1 and all(32 <= x <= 96 for x in long_sides)


def test_flip_consistency(dataset):
    d = dataset["dicts"]["objects.png"]
    ref = COCOInstanceLSJDatasetMapper(_cfg(128, 1.0, 1.0, "none"), is_train=True)(d)
    mapper = COCOInstanceLSJDatasetMapper(_cfg(128, 1.0, 1.0, "horizontal"), is_train=True)
    ref_boxes = ref["instances"].gt_boxes.tensor
    flipped_boxes = torch.stack(
        [128 - ref_boxes[:, 2], ref_boxes[:, 1], 128 - ref_boxes[:, 0], ref_boxes[:, 3]], 1)
    seen = set()
    np.random.seed(0)
    for _ in range(8):
        out = mapper(d)
        boxes, masks = out["instances"].gt_boxes.tensor, out["instances"].gt_masks.tensor
        is_flipped = not torch.allclose(boxes, ref_boxes, atol=1.0)
        seen.add(is_flipped)
        want_img, want_masks = ref["image"][:, :96], ref["instances"].gt_masks.tensor
        if is_flipped:
            torch.testing.assert_close(boxes, flipped_boxes, atol=1.0, rtol=0)
            want_img, want_masks = want_img.flip(-1), want_masks.flip(-1)
        assert (out["image"][:, :96].float() - want_img.float()).abs().mean() < 2.0
        assert (masks != want_masks).float().mean() < 0.01
    assert seen == {True, False}


def test_image_without_annotations(dataset):
    out = COCOInstanceLSJDatasetMapper(_cfg(), is_train=True)(dataset["dicts"]["empty.png"])
    inst = out["instances"]
    assert len(inst) == 0 and inst.image_size == (64, 64)
    assert inst.gt_masks.tensor.shape == (0, 64, 64)
    assert inst.gt_boxes.tensor.shape == (0, 4)
    assert inst.gt_classes.shape == (0,) and inst.gt_classes.dtype == torch.int64


def test_corrupt_image_is_skipped_counted_and_retried(dataset, caplog):
    mapper = COCOInstanceLSJDatasetMapper(_cfg(), is_train=True)
    bad = dataset["dicts"]["corrupt.png"]
    with caplog.at_level(logging.WARNING):
        assert mapper(bad) is None
    assert mapper.num_skipped == 1
    assert any("corrupt.png" in r.getMessage() for r in caplog.records)


def test_train_loader_replaces_a_corrupt_image_reproducibly(dataset):
    # The mapper returns None for the corrupt file; the train loader draws a replacement from
    # (seed, position, attempt), so the same position always gives the same replacement.
    from unip_v2.data.build import IndexStream, _StepBatches

    mapper = COCOInstanceLSJDatasetMapper(_cfg(), is_train=True)
    bad = dataset["dicts"]["corrupt.png"]
    dicts = list(dataset["dicts"].values())
    stream = IndexStream(len(dicts), seed=0)
    position = next(p for p in range(10 * len(dicts)) if stream[p] == dicts.index(bad))
    steps = _StepBatches(DatasetFromList(dicts, copy=False), mapper, stream, start=0,
                         batch_size=1, rank=0, world_size=1)
    out = steps.map_position(position)
    assert out is not None and out["image_id"] != bad["image_id"]
    assert mapper.num_skipped == 1
    again = steps.map_position(position)
    assert again["image_id"] == out["image_id"] and torch.equal(again["image"], out["image"])


def test_determinism_under_fixed_seed(dataset):
    mapper = COCOInstanceLSJDatasetMapper(_cfg(64, 0.1, 2.0), is_train=True)
    d = dataset["dicts"]["tall.png"]
    outs = []
    for seed in (7, 7, 8):
        np.random.seed(seed)
        outs.append(mapper(d))
    a, b, c = outs
    assert torch.equal(a["image"], b["image"]) and a["valid_size"] == b["valid_size"]
    assert torch.equal(a["instances"].gt_masks.tensor, b["instances"].gt_masks.tensor)
    assert not torch.equal(a["image"], c["image"])


def test_inference_mode(dataset):
    cfg = _cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 32, 1000
    out = COCOInstanceLSJDatasetMapper(cfg, is_train=False)(dataset["dicts"]["objects.png"])
    assert out["image"].shape == (3, 32, 43) and out["valid_size"] == (32, 43)
    assert "instances" not in out and "annotations" not in out


def test_registry_and_bad_input(dataset):
    cfg = _cfg()
    assert isinstance(build_dataset_mapper(cfg, is_train=True), COCOInstanceLSJDatasetMapper)
    cfg.INPUT.DATASET_MAPPER_NAME = "nope"
    with pytest.raises(ValueError, match="coco_instance_lsj"):
        build_dataset_mapper(cfg, is_train=True)
    with pytest.raises(ValueError, match="MIN_SCALE"):
        COCOInstanceLSJDatasetMapper(_cfg(min_scale=2.0, max_scale=1.0))
    with pytest.raises(ValueError, match="RANDOM_FLIP"):
        COCOInstanceLSJDatasetMapper(_cfg(flip="diagonal"))

    mapper = COCOInstanceLSJDatasetMapper(_cfg())
    d = dict(dataset["dicts"]["objects.png"])
    # No mask to derive a box from: the instance is dropped and counted, the image kept
    # (tests/test_bad_data.py covers the invalid segmentations in detail).
    d["annotations"] = [{"category_id": 0, "iscrowd": 0, "bbox": [0, 0, 5, 5]},
                        {"category_id": 0, "iscrowd": 0, "segmentation": [[1, 2, 3, 4, 5]]}]
    assert len(mapper(d)["instances"]) == 0
    assert mapper.num_dropped_instances == 2 and mapper.num_dropped_polygons == 1
    d["annotations"] = [{"iscrowd": 0, "segmentation": [_rect(1, 1, 9, 9)]}]
    with pytest.raises(ValueError, match="category_id"):
        mapper(d)
    del d["annotations"]
    with pytest.raises(ValueError, match="annotations"):
        mapper(d)


# ---------------------------------------------------------------- evaluator


def _evaluate(dataset, make_outputs):
    evaluator = ClassAgnosticCOCOEvaluator(dataset["name"], distributed=False)
    evaluator.reset()
    coco = COCO(dataset["json"])
    gen = torch.Generator().manual_seed(0)
    for img in coco.dataset["images"]:
        h, w = img["height"], img["width"]
        anns = [a for a in coco.imgToAnns[img["id"]] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])
                                 if anns else np.zeros((0, h, w), np.uint8)).bool()
        inst = Instances((h, w))
        inst.pred_boxes, inst.pred_masks = Boxes(boxes), masks
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.randint(0, 2, (len(anns),), generator=gen)
        inst = make_outputs(inst)
        evaluator.process([{"image_id": img["id"]}], [{"instances": inst}])
    return evaluator.evaluate()


def test_evaluator_perfect_predictions_with_wrong_classes(dataset):
    before = open(dataset["json"]).read()
    results = _evaluate(dataset, lambda inst: inst)
    assert open(dataset["json"]).read() == before
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == pytest.approx(100.0)
        assert results[task]["AP50"] == pytest.approx(100.0)
        assert results[task]["AR@100"] == pytest.approx(100.0)
        assert {"AP75", "APs", "APm", "APl", "AR@1", "AR@10"} <= set(results[task])


def _class_agnostic_cocoeval(json_file, detections, task):
    """pycocotools' COCOeval run here on one category: every ground-truth annotation and
    every detection relabelled to category 1. Returns its 12 summary stats x 100."""
    from pycocotools.cocoeval import COCOeval

    with open(json_file) as f:
        data = json.load(f)
    for a in data["annotations"]:
        a["category_id"] = 1
    data["categories"] = [{"id": 1, "name": "object"}]
    gt = COCO()
    gt.dataset = data
    gt.createIndex()
    dt = gt.loadRes([dict(d, category_id=1) for d in detections])
    coco_eval = COCOeval(gt, dt, task)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return 100 * coco_eval.stats


def test_evaluator_shifted_predictions_score_lower(dataset):
    """Boxes and masks shifted by 6 px: the evaluator's AP and AR@100 equal pycocotools'
    COCOeval run directly on the same detections, all relabelled to one category (the
    class-agnostic protocol), and are well below 100 (6.8 AP, 15 AR@100)."""
    detections = {"bbox": [], "segm": []}
    ids = iter(sorted(COCO(dataset["json"]).getImgIds()))

    def shift(inst):
        inst.pred_boxes = Boxes(inst.pred_boxes.tensor + 6)
        inst.pred_masks = inst.pred_masks.roll((6, 6), dims=(1, 2))
        image_id = next(ids)
        for box, mask, score in zip(inst.pred_boxes.tensor.tolist(), inst.pred_masks.numpy(),
                                    inst.scores.tolist()):
            x0, y0, x1, y1 = box
            detections["bbox"].append({"image_id": image_id, "category_id": 1, "score": score,
                                       "bbox": [x0, y0, x1 - x0, y1 - y0]})
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            detections["segm"].append({"image_id": image_id, "category_id": 1, "score": score,
                                       "segmentation": rle})
        return inst

    results = _evaluate(dataset, shift)
    for task in ("bbox", "segm"):
        stats = _class_agnostic_cocoeval(dataset["json"], detections[task], task)
        assert results[task]["AP"] == pytest.approx(stats[0], abs=1e-6)
        assert results[task]["AR@100"] == pytest.approx(stats[8], abs=1e-6)
        assert 5 < results[task]["AP"] < 90 and results[task]["AR@100"] < 90


def test_evaluator_without_detections_scores_zero(dataset):
    results = _evaluate(dataset, lambda inst: inst[torch.zeros(len(inst), dtype=torch.bool)])
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == 0 and results[task]["AR@100"] == 0


def test_evaluator_rejects_unknown_task(dataset):
    with pytest.raises(ValueError, match="tasks"):
        ClassAgnosticCOCOEvaluator(dataset["name"], tasks=("keypoints",), distributed=False)


# ------------------------------------------- mapper: objects across the image border
# A 48 x 32 picture whose objects reach outside it: A across the bottom-right corner, B across
# the top-left corner, C a triangle across the right side, D wholly below the picture (it
# would land in the crop's bottom pad). Objects are painted (where they lie in the picture) in
# their own colour, so the mapper's image can be checked under its masks.
_BORDER_W, _BORDER_H = 48, 32
_BORDER_POLYGONS = {
    0: _rect(40, 20, 60, 40),              # A: x 40-60 (picture ends at 48), y 20-40 (ends 32)
    1: _rect(-6, -4, 10, 12),              # B: starts left of and above the picture
    2: [30, 2, 70, 10, 34, 18],            # C: triangle reaching x = 70
    3: _rect(5, 34, 15, 40),               # D: below the picture (y > 32)
}
_BORDER_COLOURS = {0: (250, 0, 0), 1: (0, 250, 0), 2: (0, 0, 250), 3: (250, 250, 0)}


@pytest.fixture
def border_dict(tmp_path):
    """An in-memory dataset dict (RGB png on disk) of the picture above."""
    img = np.full((_BORDER_H, _BORDER_W, 3), 90, np.uint8)
    for cat, poly in _BORDER_POLYGONS.items():
        m = mask_util.decode(mask_util.frPyObjects([poly], _BORDER_H, _BORDER_W))[..., 0]
        img[m.astype(bool)] = _BORDER_COLOURS[cat]
    path = tmp_path / "border.png"
    cv2.imwrite(str(path), img[..., ::-1])   # cv2 writes BGR
    anns = [{"segmentation": [poly], "category_id": cat, "iscrowd": 0,
             # a stored box that fits nothing: the mapper must never read it
             "bbox": [0.0, 0.0, 1.0, 1.0]} for cat, poly in _BORDER_POLYGONS.items()]
    return {"file_name": str(path), "image_id": 7, "height": _BORDER_H, "width": _BORDER_W,
            "annotations": anns}


def _clip_polygon(points, x_max, y_max):
    """Sutherland-Hodgman clipping of an (N, 2) float64 polygon to [0, x_max] x [0, y_max]."""
    def clip(pts, inside, cross):
        out = []
        for i in range(len(pts)):
            p, q = pts[i - 1], pts[i]
            if inside(q):
                if not inside(p):
                    out.append(cross(p, q))
                out.append(q)
            elif inside(p):
                out.append(cross(p, q))
        return out

    def at_x(x):
        return lambda p, q: p + (q - p) * ((x - p[0]) / (q[0] - p[0]))

    def at_y(y):
        return lambda p, q: p + (q - p) * ((y - p[1]) / (q[1] - p[1]))

    pts = list(np.asarray(points, np.float64))
    pts = clip(pts, lambda p: p[0] >= 0, at_x(0.0))
    pts = clip(pts, lambda p: p[0] <= x_max, at_x(float(x_max)))
    pts = clip(pts, lambda p: p[1] >= 0, at_y(0.0))
    pts = clip(pts, lambda p: p[1] <= y_max, at_y(float(y_max)))
    return np.asarray(pts, np.float64).reshape(-1, 2)


def _off_edge_pixels(got, want, polygon, clip_box):
    """Pixels where two masks differ and which are not within one pixel of a sloped edge of
    ``polygon`` (pycocotools rounds points of a sloped edge that it cuts at the image border
    differently from the same edge cut by hand; edges along the clip lines must agree)."""
    vw, vh = clip_box
    pts = np.asarray(polygon, np.float64)
    seg = [(p, q) for p, q in zip(pts, np.roll(pts, -1, 0))
           if not any(np.isclose(p[k], v) and np.isclose(q[k], v)
                      for k, v in ((0, 0.0), (0, vw), (1, 0.0), (1, vh)))]
    bad = []
    for y, x in np.argwhere(got != want):
        c = np.array([x + 0.5, y + 0.5])
        dist = min(np.linalg.norm(c - (p + np.clip(np.dot(c - p, q - p) / np.dot(q - p, q - p),
                                                   0, 1) * (q - p))) for p, q in seg)
        if dist > 1.0:
            bad.append((y, x))
    return bad


def _oracle_masks(geometry, out_size):
    """{category: (bool mask (S, S), clipped polygon)} by hand: flip x -> W - x, scale by new/old size, shift by
    the crop offset, clip to the picture's content [0, vw] x [0, vh] (the pad lies right of
    and below it), rasterise the clipped polygon with pycocotools. Empty masks are left out."""
    flip, (new_h, new_w), (x0, y0) = geometry
    vh, vw = min(new_h - y0, out_size), min(new_w - x0, out_size)
    masks = {}
    for cat, poly in _BORDER_POLYGONS.items():
        pts = np.asarray(poly, np.float64).reshape(-1, 2)
        if flip:
            pts[:, 0] = _BORDER_W - pts[:, 0]
        pts = pts * [new_w / _BORDER_W, new_h / _BORDER_H] - [x0, y0]
        clipped = _clip_polygon(pts, vw, vh)
        if len(clipped) < 3:
            continue
        m = mask_util.decode(mask_util.frPyObjects([clipped.reshape(-1).tolist()],
                                                   out_size, out_size))[..., 0].astype(bool)
        if m.any():
            masks[cat] = (m, clipped)
    return masks, (vh, vw)


def _recording(mapper):
    """Makes the mapper's augmentations record the transforms they draw."""
    drawn, augmentations = [], mapper.augmentations

    def record(aug_input):
        transforms = augmentations(aug_input)
        drawn.append(transforms)
        return transforms

    mapper.augmentations = record
    return drawn


def _geometry(transforms):
    """(flipped, resized (h, w), crop offset (x0, y0)) read from the drawn transforms."""
    flip, size, offset = False, None, (0, 0)
    for t in transforms.transforms:
        if isinstance(t, T.HFlipTransform):
            flip = True
        elif isinstance(t, T.ResizeTransform):
            size = (t.new_h, t.new_w)
        elif isinstance(t, T.CropTransform):
            offset = (t.x0, t.y0)
    return flip, size, offset


def test_objects_across_the_border_are_clipped_scale_two_pad_only(border_dict):
    """Scale 1 of a 96 target: the 48 x 32 picture is resized x2 to 96 x 64 (min(96/32,
    96/48) = 2), nothing is cropped, 32 pad rows follow at the bottom. Hand-computed, with
    pycocotools' convention that a polygon edge at integer x covers columns x0 .. x1 - 1:
      A: x 40-60, y 20-40 -> x 80-120, y 40-80 -> clipped to x 80-96, y 40-64;
      B: x -6-10, y -4-12 -> x -12-20, y -8-24 -> clipped to x 0-20, y 0-24;
      C: (30,2) (70,10) (34,18) -> (60,4) (140,20) (68,36), clipped at x = 96: its box is
         x 60-96, y 4-36 (the clip line crosses its edges at y 11.2 and 29.8);
      D: y 34-40 -> y 68-80, all in the pad: no instance.
    Boxes are the clipped ones, never the polygon's nor the stored bbox."""
    cfg = _cfg(96, 1.0, 1.0, "none")
    cfg.INPUT.FORMAT = "RGB"
    mapper = COCOInstanceLSJDatasetMapper(cfg, is_train=True)
    out = mapper(border_dict)
    assert out["valid_size"] == (64, 96)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [0, 1, 2]
    masks = inst.gt_masks.tensor.numpy()
    want_a = np.zeros((96, 96), bool)
    want_a[40:64, 80:96] = True
    want_b = np.zeros((96, 96), bool)
    want_b[0:24, 0:20] = True
    assert np.array_equal(masks[0], want_a)
    assert np.array_equal(masks[1], want_b)
    assert not masks[:, 64:, :].any()                       # nothing in the pad rows
    np.testing.assert_array_equal(inst.gt_boxes.tensor[:2].numpy(),
                                  [[80, 40, 96, 64], [0, 0, 20, 24]])
    np.testing.assert_allclose(inst.gt_boxes.tensor[2].numpy(), [60, 4, 96, 36], atol=1.0)
    oracle, _ = _oracle_masks((False, (64, 96), (0, 0)), 96)
    assert sorted(oracle) == [0, 1, 2]
    assert np.array_equal(masks[2], oracle[2][0])
    # the picture is under its masks: each object's colour (bilinear x2 blends only edges)
    image = out["image"].permute(1, 2, 0).numpy().astype(int)
    for i, cat in enumerate((0, 1, 2)):
        close = (np.abs(image[masks[i]] - _BORDER_COLOURS[cat]).max(1) < 40).mean()
        assert close > 0.85, (cat, close)
    assert (image[64:] == 128).all()                        # the pad value, bottom only


@pytest.mark.parametrize("seed", range(6))
def test_objects_across_the_border_follow_the_drawn_flip_resize_and_crop(border_dict, seed):
    """Random flip, scale 1-2 of a 96 target (the picture grows to 96r x 64r, r in [1, 2]),
    random 96 x 96 crop: the masks equal the hand-transformed, hand-clipped polygons
    rasterised by pycocotools (_oracle_masks), using the flip / size / offset the mapper
    drew (up to a few pixels along sloped edges, see _off_edge_pixels); the boxes are the
    tight boxes of those clipped masks (to 1 px); nothing outside the content;
    each object's own colour lies under its mask (image and masks share the geometry)."""
    cfg = _cfg(96, 1.0, 2.0, "horizontal")
    cfg.INPUT.FORMAT = "RGB"
    mapper = COCOInstanceLSJDatasetMapper(cfg, is_train=True)
    drawn = _recording(mapper)
    np.random.seed(seed)
    out = mapper(border_dict)
    geometry = _geometry(drawn[-1])
    oracle, (vh, vw) = _oracle_masks(geometry, 96)
    assert out["valid_size"] == (vh, vw)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == sorted(oracle)
    masks = inst.gt_masks.tensor.numpy()
    for i, cat in enumerate(sorted(oracle)):
        want, polygon = oracle[cat]
        assert (masks[i] != want).sum() <= 6, (cat, geometry)
        assert _off_edge_pixels(masks[i], want, polygon, (vw, vh)) == [], (cat, geometry)
    np.testing.assert_allclose(inst.gt_boxes.tensor.numpy(),
                               _tight_boxes([oracle[c][0] for c in sorted(oracle)]), atol=1.0)
    assert not masks[:, vh:, :].any() and not masks[:, :, vw:].any()
    image = out["image"].permute(1, 2, 0).numpy().astype(int)
    for i, cat in enumerate(sorted(oracle)):
        close = (np.abs(image[masks[i]] - _BORDER_COLOURS[cat]).max(1) < 40).mean()
        assert close > 0.8, (cat, close, geometry)


def test_border_cases_cover_flip_crop_and_pad():
    """The seeds above draw flipped and unflipped pictures, crops in x and in y, and pads."""
    cfg = _cfg(96, 1.0, 2.0, "horizontal")
    seen = set()
    augs = T.AugmentationList(build_lsj_augmentations(cfg, is_train=True))
    for seed in range(6):
        np.random.seed(seed)
        aug_input = T.AugInput(np.zeros((_BORDER_H, _BORDER_W, 3), np.uint8))
        flip, (new_h, new_w), (x0, y0) = _geometry(augs(aug_input))
        seen |= {("flip", flip), ("crop y", y0 > 0), ("pad", new_h < 96)}
    assert seen >= {("flip", True), ("flip", False), ("crop y", True), ("pad", True)}
