"""Bad data at training and evaluation: EXIF orientation vs the json's size, empty or invalid
segmentations, missing/truncated images at test time, invalid ground-truth polygons,
datasets registered without thing_classes, and 16-bit / unusual pixel modes. Every dataset
is a few tiny synthetic files written to tmp_path and registered with detectron2's
``register_coco_instances``."""
import json
import logging
import math
import os
import uuid

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

import unip_v2  # noqa: F401  (first: makes detectron2 importable without its compiled ops)

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, Instances

from unip_v2 import add_unip_v2_config
from unip_v2.data.build import build_train_loader
from unip_v2.data.dataset_mappers import COCOInstanceLSJDatasetMapper
from unip_v2.data.image_io import try_read_image
from unip_v2.engine import Trainer
from unip_v2.evaluation import ClassAgnosticCOCOEvaluator
from unip_v2.modeling.text_encoder.tokenizer import train_byte_level_bpe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CONFIG = os.path.join(REPO, "configs", "toy", "uni_perceiver_v2_R50_tiny.yaml")
ORIENTATION = 0x0112
H, W = 32, 64  # raw pixel grid of the test images
RECT = (8, 4, 24, 12)  # x0, y0, x1, y1 of the red object in raw pixels
RED, GREY = (220, 30, 30), (100, 100, 100)


# --------------------------------------------------------------------------- helpers
def _picture(h=H, w=W, rect=RECT):
    """(h, w, 3) uint8 RGB: grey with a red rectangle [y0:y1, x0:x1]."""
    img = np.full((h, w, 3), GREY, np.uint8)
    x0, y0, x1, y1 = rect
    img[y0:y1, x0:x1] = RED
    return img


def _rect_polygon(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _save_png(path, rgb, orientation=None):
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    Image.fromarray(rgb).save(path, exif=exif.tobytes())


def _ann(ann_id, image_id, segmentation, bbox, category_id=1):
    x, y, w, h = bbox
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
            "segmentation": segmentation, "bbox": [x, y, w, h], "area": float(w * h)}


@pytest.fixture
def register(tmp_path):
    """register(images, annotations, categories) -> a new dataset name registered with
    detectron2's register_coco_instances(name, {}, json, tmp_path); removed afterwards."""
    names = []

    def _register(images, annotations, categories=({"id": 1, "name": "red box"},)):
        name = f"bad_data_{uuid.uuid4().hex[:8]}"
        json_file = tmp_path / f"{name}.json"
        json_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                         "categories": list(categories)}))
        register_coco_instances(name, {}, str(json_file), str(tmp_path))
        names.append(name)
        return name

    yield _register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _cfg(*opts):
    """Mapper config: no flip, scale 1: an image with max side 64 keeps its pixels."""
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_list(["INPUT.IMAGE_SIZE", 64, "INPUT.MIN_SCALE", 1.0, "INPUT.MAX_SCALE", 1.0,
                         "INPUT.RANDOM_FLIP", "none", "INPUT.FORMAT", "RGB",
                         "INPUT.MIN_SIZE_TEST", 32, "INPUT.MAX_SIZE_TEST", 64,
                         "DATALOADER.NUM_WORKERS", 0, *opts])
    return cfg


def _dicts(name):
    return {os.path.basename(d["file_name"]): d for d in DatasetCatalog.get(name)}


def _messages(caplog):
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ------------------------------------------------------------ 1. EXIF orientation
def test_exif_rotated_image_is_used_when_the_json_has_the_rotated_size(tmp_path, register):
    raw = _picture()
    _save_png(tmp_path / "rot.png", raw, orientation=6)  # 6: turn 90 degrees clockwise
    name = register([{"id": 1, "file_name": "rot.png", "width": H, "height": W}], [])
    out = COCOInstanceLSJDatasetMapper(_cfg(), is_train=True)(_dicts(name)["rot.png"])
    # W x H = 32 x 64 fits 64 x 64 at scale 1: only right padding.
    assert out["valid_size"] == (W, H)
    assert np.array_equal(out["image"][:, :, :H].permute(1, 2, 0).numpy(), np.rot90(raw, -1))


def test_exif_rotation_ignored_when_the_json_has_the_raw_size(tmp_path, register):
    """detectron2's read_image rotates and check_image_size raised SizeMismatchError."""
    raw = _picture()
    _save_png(tmp_path / "raw.png", raw, orientation=6)
    x0, y0, x1, y1 = RECT
    name = register([{"id": 1, "file_name": "raw.png", "width": W, "height": H}],
                    [_ann(1, 1, [_rect_polygon(*RECT)], [x0, y0, x1 - x0, y1 - y0])])
    mapper = COCOInstanceLSJDatasetMapper(_cfg(), is_train=True)
    out = mapper(_dicts(name)["raw.png"])
    assert out["valid_size"] == (H, W) and mapper.num_skipped == 0
    image = out["image"][:, :H].permute(1, 2, 0).numpy()
    assert np.array_equal(image, raw)
    # The annotation (made on the raw pixels) covers exactly the red pixels.
    mask = out["instances"].gt_masks.tensor[0, :H].numpy()
    assert np.array_equal(mask, (image == RED).all(-1))


def test_exif_image_matching_neither_size_is_skipped_and_counted(tmp_path, register, caplog):
    _save_png(tmp_path / "odd.png", _picture(), orientation=6)
    _save_png(tmp_path / "good.png", _picture())
    x0, y0, x1, y1 = RECT
    name = register([{"id": 1, "file_name": "odd.png", "width": 50, "height": 50},
                     {"id": 2, "file_name": "good.png", "width": W, "height": H}],
                    [_ann(i, i, [_rect_polygon(*RECT)], [x0, y0, x1 - x0, y1 - y0])
                     for i in (1, 2)])
    dicts = _dicts(name)
    for is_train in (True, False):
        mapper = COCOInstanceLSJDatasetMapper(_cfg(), is_train=is_train)
        with caplog.at_level(logging.WARNING):
            assert mapper(dicts["odd.png"]) is None
        assert mapper.num_skipped == 1
        assert "odd.png" in _messages(caplog) and "50x50" in _messages(caplog)
        caplog.clear()

    # The train loader path: the bad image is replaced by another one. Replacements are drawn
    # from (seed, position, attempt) among all images, the bad one included, so it may be
    # drawn (and skipped) more than once; with a fixed SEED the count is reproducible.
    cfg = _cfg("DATASETS.TRAIN", (name,), "SOLVER.IMS_PER_BATCH", 2, "SEED", 3)
    skipped = []
    for _ in range(2):
        mapper = COCOInstanceLSJDatasetMapper(cfg, is_train=True)
        batch = next(iter(build_train_loader(cfg, mapper)))
        assert [x["image_id"] for x in batch] == [2, 2]
        skipped.append(mapper.num_skipped)
    assert skipped[0] == skipped[1] >= 1


# ------------------------------------------------------- 2. invalid segmentations
def test_empty_segmentation_drops_the_instance_not_the_image(tmp_path, register, caplog):
    """load_coco_json keeps `segmentation: []` as an annotation without the key; the mapper
    raised ValueError on it."""
    _save_png(tmp_path / "a.png", _picture())
    x0, y0, x1, y1 = RECT
    name = register(
        [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
        [_ann(1, 1, [_rect_polygon(*RECT)], [x0, y0, x1 - x0, y1 - y0], category_id=2),
         _ann(2, 1, [], [30, 5, 10, 10], category_id=1)],
        categories=[{"id": 1, "name": "one"}, {"id": 2, "name": "two"}])
    mapper = COCOInstanceLSJDatasetMapper(_cfg(), is_train=True)
    with caplog.at_level(logging.WARNING):
        out = mapper(_dicts(name)["a.png"])
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [1]  # category id 2 -> contiguous 1
    assert inst.gt_boxes.tensor.tolist() == [[x0, y0, x1, y1]]
    assert mapper.num_dropped_instances == 1 and mapper.num_skipped == 0
    assert "annotation 1 (instance dropped)" in _messages(caplog)


def test_invalid_polygons_are_dropped_and_valid_ones_kept(tmp_path, register, caplog):
    _save_png(tmp_path / "a.png", _picture())
    name = register([{"id": 1, "file_name": "a.png", "width": W, "height": H}], [])
    d = dict(_dicts(name)["a.png"])
    triangle = [40, 4, 60, 4, 50, 28]
    # pycocotools would read a list starting with a 4-number polygon as boxes.
    d["annotations"] = [{"category_id": 0, "iscrowd": 0,
                         "segmentation": [[1, 2, 3, 4], _rect_polygon(*RECT), [1, 2, 3, 4, 5],
                                          triangle, []]}]
    mapper = COCOInstanceLSJDatasetMapper(_cfg(), is_train=True)
    with caplog.at_level(logging.WARNING):
        out = mapper(d)
    expected = mask_util.decode(mask_util.merge(
        mask_util.frPyObjects([_rect_polygon(*RECT), triangle], 64, 64)))
    assert np.array_equal(out["instances"].gt_masks.tensor[0].numpy(), expected.astype(bool))
    assert mapper.num_dropped_polygons == 3 and mapper.num_dropped_instances == 0
    assert "polygon 0 dropped" in _messages(caplog) and "odd length 5" in _messages(caplog)


def test_invalid_rle_drops_the_instance(tmp_path, register, caplog):
    _save_png(tmp_path / "a.png", _picture())
    name = register([{"id": 1, "file_name": "a.png", "width": W, "height": H}], [])
    d = dict(_dicts(name)["a.png"])
    good = np.zeros((H, W), np.uint8, order="F")
    good[4:12, 8:24] = 1
    rle = mask_util.encode(good)
    rle["counts"] = rle["counts"].decode("ascii")
    wrong_size = mask_util.encode(np.asfortranarray(np.ones((H + 1, W), np.uint8)))
    d["annotations"] = [
        {"category_id": 0, "iscrowd": 0, "segmentation": rle},
        {"category_id": 0, "iscrowd": 0, "segmentation": {"counts": rle["counts"]}},
        {"category_id": 0, "iscrowd": 0, "segmentation": wrong_size},
        {"category_id": 0, "iscrowd": 0,
         "segmentation": mask_util.encode(np.zeros((H, W), np.uint8, order="F"))},
    ]
    mapper = COCOInstanceLSJDatasetMapper(_cfg(), is_train=True)
    with caplog.at_level(logging.WARNING):
        out = mapper(d)
    assert out["instances"].gt_boxes.tensor.tolist() == [[8, 4, 24, 12]]
    assert mapper.num_dropped_instances == 3
    log = _messages(caplog)
    assert "without 'size'" in log and "!= image size" in log and "empty" in log


# -------------------------------------- 3. unreadable images at evaluation (loader)
def _eval_dataset(tmp_path, register):
    """good.png (two objects) + missing.png (one) + truncated.png (one), all 64 x 32."""
    _save_png(tmp_path / "good.png", _picture())
    full = tmp_path / "full.png"
    _save_png(full, (np.random.default_rng(0).integers(0, 255, (H, W, 3))).astype(np.uint8))
    data = full.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    images = [{"id": i + 1, "file_name": f, "width": W, "height": H}
              for i, f in enumerate(("good.png", "missing.png", "truncated.png"))]
    box = [8, 4, 16, 8]
    anns = [_ann(1, 1, [_rect_polygon(8, 4, 24, 12)], box),
            _ann(2, 1, [_rect_polygon(40, 4, 60, 28)], [40, 4, 20, 24]),
            _ann(3, 2, [_rect_polygon(8, 4, 24, 12)], box),
            _ann(4, 3, [_rect_polygon(8, 4, 24, 12)], box)]
    return register(images, anns)


def test_test_loader_skips_unreadable_images(tmp_path, register, caplog):
    name = _eval_dataset(tmp_path, register)
    loader = Trainer.build_test_loader(_cfg(), name)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert [[x["image_id"] for x in b] for b in batches] == [[1]]
    assert loader.num_skipped == 2 and len(loader) == 3
    log = _messages(caplog)
    assert "missing.png" in log and "truncated.png" in log and "2 image(s) skipped" in log


def _perfect(h, w, polygons, category=0):
    """Instances predicting exactly these polygons (score 1, the given class)."""
    masks = np.stack([mask_util.decode(mask_util.merge(mask_util.frPyObjects([p], h, w)))
                      for p in polygons]).astype(bool)
    inst = Instances((h, w))
    inst.pred_masks = torch.from_numpy(masks)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.ones(len(polygons))
    inst.pred_classes = torch.full((len(polygons),), category, dtype=torch.int64)
    return inst


def _ap(recall):
    """COCO AP (percent) of perfect detections reaching ``recall`` with precision 1:
    precision 1 at the 101 recall thresholds 0, 0.01, ... up to ``recall``, 0 above."""
    return 100.0 * (math.floor(recall * 100 + 1e-9) + 1) / 101


def test_evaluator_counts_a_skipped_image_as_no_detections(tmp_path, register, caplog):
    name = _eval_dataset(tmp_path, register)
    for agnostic in (False, True):
        cfg = _cfg("MODEL.META_ARCHITECTURE",
                   "UniPerceiverV2ProposalNetwork" if agnostic else "UniPerceiverV2",
                   "OUTPUT_DIR", str(tmp_path / "out"))
        evaluator = Trainer.build_evaluator(cfg, name)
        evaluator.reset()
        inst = _perfect(H, W, [_rect_polygon(8, 4, 24, 12), _rect_polygon(40, 4, 60, 28)])
        evaluator.process([{"image_id": 1}], [{"instances": inst}])
        with caplog.at_level(logging.WARNING):
            results = evaluator.evaluate()
        # 2 of the 4 objects are found (image 1), images 2 and 3 are misses.
        for task in ("bbox", "segm"):
            assert results[task]["AP"] == pytest.approx(_ap(0.5))
            if agnostic:
                assert results[task]["AR@100"] == pytest.approx(50.0)
        assert evaluator.num_images_without_predictions == 2
        assert "2 of 3 image(s)" in _messages(caplog)
        caplog.clear()


# --------------------------------------------- 4. invalid ground-truth polygons
@pytest.mark.parametrize("bad", [[[]], [], "missing"])
def test_evaluator_sanitises_invalid_gt_polygons(tmp_path, register, caplog, bad):
    """pycocotools crashed on [[]], [] or no segmentation, and read [[x0, y0, x1, y1],
    polygon] as boxes."""
    rect_b = _rect_polygon(40, 4, 60, 28)
    images = [{"id": 1, "file_name": "a.png", "width": W, "height": H}]
    anns = [_ann(1, 1, [_rect_polygon(8, 4, 24, 12)], [8, 4, 16, 8]),
            _ann(2, 1, bad, [30, 14, 6, 6]),             # no valid polygon: bbox only
            _ann(3, 1, [[1, 2, 3, 4], rect_b], [40, 4, 20, 24])]
    if bad == "missing":
        del anns[1]["segmentation"]
    name = register(images, anns)
    for agnostic in (False, True):
        cfg = _cfg("MODEL.META_ARCHITECTURE",
                   "UniPerceiverV2ProposalNetwork" if agnostic else "UniPerceiverV2",
                   "OUTPUT_DIR", str(tmp_path / "out"))
        with caplog.at_level(logging.WARNING):
            evaluator = Trainer.build_evaluator(cfg, name)
            evaluator.reset()
            inst = _perfect(H, W, [_rect_polygon(8, 4, 24, 12), rect_b])
            evaluator.process([{"image_id": 1}], [{"instances": inst}])
            results = evaluator.evaluate()
        assert evaluator.num_segm_polygons_dropped == (2 if bad == [[]] else 1)
        assert evaluator.num_segm_annotations_excluded == 1
        assert "excluded from segm" in _messages(caplog)
        # bbox: annotation 2 stays a (missed) object; segm: it is excluded.
        assert results["bbox"]["AP"] == pytest.approx(_ap(2 / 3))
        assert results["segm"]["AP"] == pytest.approx(100.0)
        if agnostic:
            assert results["bbox"]["AR@100"] == pytest.approx(200 / 3)
            assert results["segm"]["AR@100"] == pytest.approx(100.0)
        caplog.clear()


# ------------------------------- 5. + 3. end to end with the toy model (random weights)
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    return train_byte_level_bpe(["an apple", "a zebra", "a red box"] * 3, str(out),
                                vocab_size=270, min_frequency=1)["path"]


def _toy_cfg(tokenizer, name, tmp_path):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(TOY_CONFIG)
    cfg.merge_from_list(["MODEL.TEXT_ENCODER.TOKENIZER", tokenizer, "MODEL.DEVICE", "cpu",
                         "DATASETS.TRAIN", (name,), "DATASETS.TEST", (name,),
                         "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 128,
                         "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path / "out")])
    return cfg


def test_model_reads_class_names_of_a_plain_register_coco_instances(tmp_path, register,
                                                                     tokenizer):
    """thing_classes is only set by load_coco_json: building the model raised
    AttributeError before the dataset was loaded."""
    _save_png(tmp_path / "a.png", _picture())
    # Listed out of id order: contiguous ids follow the category ids (3 -> 0, 7 -> 1).
    name = register([{"id": 1, "file_name": "a.png", "width": W, "height": H}], [],
                    categories=[{"id": 7, "name": "zebra"}, {"id": 3, "name": "apple"}])
    assert not hasattr(MetadataCatalog.get(name), "thing_classes")
    model = Trainer.build_model(_toy_cfg(tokenizer, name, tmp_path))
    assert model.tasks["detection"].train_class_names == ["apple", "zebra"]
    assert model.tasks["detection"].test_class_names == ["apple", "zebra"]


def test_trainer_test_finishes_and_counts_skipped_images(tmp_path, register, tokenizer,
                                                        caplog):
    name = _eval_dataset(tmp_path, register)
    cfg = _toy_cfg(tokenizer, name, tmp_path)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    with caplog.at_level(logging.WARNING):
        results = Trainer.test(cfg, model)
    # the random model's AP is whatever it is; it cannot pass the recall cap that the two
    # skipped images set (2 of the 4 objects can be found: see the perfect model below)
    for task in ("bbox", "segm"):
        assert 0.0 <= results[task]["AP"] <= _ap(0.5) + 1e-9
    log = _messages(caplog)
    assert "missing.png" in log and "truncated.png" in log
    assert "2 image(s) skipped" in log and "2 of 3 image(s)" in log


class _PerfectModel(torch.nn.Module):
    """Stands in for the model in Trainer.test: predicts exactly the ground truth of the
    readable image (good.png: its two rectangles), in the input's original resolution."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, batched_inputs):
        outputs = []
        for x in batched_inputs:
            self.seen.append(x["image_id"])
            assert (x["height"], x["width"]) == (H, W)
            outputs.append({"instances": _perfect(
                H, W, [_rect_polygon(8, 4, 24, 12), _rect_polygon(40, 4, 60, 28)])})
        return outputs


def test_trainer_test_scores_skipped_images_as_misses(tmp_path, register, tokenizer, caplog):
    """Trainer.test end to end (test loader that skips, evaluator) with perfect predictions
    for the one readable image: 2 of the 4 objects found, all at precision 1, so COCO AP is
    the hand-computed _ap(0.5) = 100 * 51 / 101 for boxes and masks (100 if the skipped
    images' objects were left out of the ground truth)."""
    name = _eval_dataset(tmp_path, register)
    cfg = _toy_cfg(tokenizer, name, tmp_path)
    model = _PerfectModel()
    with caplog.at_level(logging.WARNING):
        results = Trainer.test(cfg, model)
    assert model.seen == [1]
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == pytest.approx(100.0 * 51 / 101)
        assert results[task]["AP50"] == pytest.approx(100.0 * 51 / 101)
    assert "2 of 3 image(s)" in _messages(caplog)


# ------------------------------------------------------- 6. pixel modes, bit depth
def _grey16():
    """(H, W) uint16 with a bright rectangle on a dark gradient; high bytes vary."""
    arr = np.tile(np.linspace(1000, 20000, W).astype(np.uint16), (H, 1))
    x0, y0, x1, y1 = RECT
    arr[y0:y1, x0:x1] = 60000
    return arr


def test_16bit_grey_png_keeps_its_high_byte(tmp_path):
    """PIL opened it as mode "I" and convert("RGB") clipped everything >255 to 255."""
    arr = _grey16()
    Image.fromarray(arr).save(tmp_path / "g16.png")
    for fmt, channels in (("RGB", 3), ("L", 1)):
        image, error = try_read_image(str(tmp_path / "g16.png"), format=fmt)
        assert error == ""
        assert np.array_equal(image, np.repeat((arr >> 8).astype(np.uint8)[..., None],
                                               channels, axis=-1))
    Image.fromarray(arr).save(tmp_path / "g16.tif")  # PIL keeps "I;16" for TIFF
    image, _ = try_read_image(str(tmp_path / "g16.tif"), format="BGR")
    assert np.array_equal(image[..., 0], (arr >> 8).astype(np.uint8))


def test_16bit_rgb_png_is_reduced_like_pil_does(tmp_path):
    rgb16 = np.stack([_grey16(), 65535 - _grey16(), np.full((H, W), 300, np.uint16)], -1)
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])  # OpenCV writes BGR
    image, error = try_read_image(str(tmp_path / "c16.png"), format="RGB")
    assert error == "" and np.array_equal(image, (rgb16 >> 8).astype(np.uint8))


def test_16bit_objects_survive_the_training_mapper(tmp_path, register):
    Image.fromarray(_grey16()).save(tmp_path / "g16.png")
    x0, y0, x1, y1 = RECT
    name = register([{"id": 1, "file_name": "g16.png", "width": W, "height": H}],
                    [_ann(1, 1, [_rect_polygon(*RECT)], [x0, y0, x1 - x0, y1 - y0])])
    out = COCOInstanceLSJDatasetMapper(_cfg(), is_train=True)(_dicts(name)["g16.png"])
    image = out["image"][0, :H].numpy()
    mask = out["instances"].gt_masks.tensor[0, :H].numpy()
    assert (image[mask] == 60000 >> 8).all()
    assert image[~mask].max() <= 20000 >> 8


def test_unknown_range_modes_are_skipped(tmp_path, register, caplog):
    Image.fromarray(np.random.default_rng(0).random((H, W), np.float32)).save(
        tmp_path / "f.tif")
    Image.fromarray((np.arange(H * W, dtype=np.int32).reshape(H, W) * 1000)).save(
        tmp_path / "i32.tif")
    Image.fromarray(np.full((H, W), 200, np.uint16)).save(tmp_path / "dim16.png")
    low = np.tile(np.arange(W, dtype=np.uint16), (H, 1))  # 8-bit values in a 16-bit file
    Image.fromarray(low).save(tmp_path / "low16.png")
    expected = {"f.tif": "unsupported image mode 'F'", "i32.tif": "unsupported image mode 'I'",
                "low16.png": "no contrast"}
    for file, message in expected.items():
        image, error = try_read_image(str(tmp_path / file), format="RGB")
        assert image is None and message in error, (file, error)
    # A constant 16-bit image stays constant (it had no contrast to lose).
    image, _ = try_read_image(str(tmp_path / "dim16.png"), format="RGB")
    assert image is not None and (image == 0).all()

    name = register([{"id": 1, "file_name": "f.tif", "width": W, "height": H}], [])
    mapper = COCOInstanceLSJDatasetMapper(_cfg(), is_train=False)
    with caplog.at_level(logging.WARNING):
        assert mapper(_dicts(name)["f.tif"]) is None
    assert mapper.num_skipped == 1 and "unsupported image mode 'F'" in _messages(caplog)


def test_palette_and_alpha_modes(tmp_path):
    rgb = _picture()
    palette = np.array([GREY, RED], np.uint8)
    index = (rgb == RED).all(-1).astype(np.uint8)
    p = Image.fromarray(index, mode="L").convert("P")
    p.putpalette(palette.reshape(-1).tolist())
    p.save(tmp_path / "p.png")
    rgba = np.concatenate([rgb, np.full((H, W, 1), 7, np.uint8)], -1)  # nearly transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    la = np.stack([rgb[..., 0], np.full((H, W), 0, np.uint8)], -1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    for file, expected in (("p.png", rgb), ("rgba.png", rgb),
                           ("la.png", np.repeat(rgb[..., :1], 3, -1))):
        image, error = try_read_image(str(tmp_path / file), format="RGB")
        assert error == "" and np.array_equal(image, expected), file
