"""tools/demo.py (arguments, inputs good and bad, video, vocabulary), the Predictor and
draw_predictions, and the main job (tools/main_job.py) on a tiny dataset."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances

from unip_v2 import add_unip_v2_config
from unip_v2.data.datasets import ensure_toy_shapes, toy_shapes_files
from unip_v2.data.datasets.toy_tokenizer import ensure_toy_tokenizer
from unip_v2.engine import Predictor, parse_vocabulary
from unip_v2.utils.visualization import draw_predictions, instances_to_draw

from tools_loader import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy", "uni_perceiver_v2_R50_tiny.yaml")
SMALL = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"]


demo = load_tool("demo")
main_job = load_tool("main_job")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny toy_shapes (4 train, 2 val, 2 novel images) and its tokenizer."""
    datasets = tmp_path_factory.mktemp("datasets")
    root = os.path.join(datasets, "toy_shapes")
    ensure_toy_shapes(root, num_train=4, num_val=2, num_novel=2, seed=0)
    tokenizer = ensure_toy_tokenizer(root, vocab_size=300)["path"]
    return str(datasets), root, tokenizer


def _cfg(tokenizer, *opts):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(["MODEL.TEXT_ENCODER.TOKENIZER", tokenizer, *SMALL, *opts])
    return cfg


# ------------------------------------------------------------------------------ arguments
def test_vocabulary_parsing():
    assert parse_vocabulary(" red square,blue circle , cat ") == ["red square", "blue circle",
                                                                   "cat"]
    for bad in ("", " , ", "a,,b", "a, b,"):
        with pytest.raises(ValueError, match="comma-separated non-empty names"):
            parse_vocabulary(bad)
    with pytest.raises(ValueError, match=r"names repeat: \['a'\]"):
        parse_vocabulary("a, b, a")


def test_demo_arguments(capsys):
    args = demo.parse_args(["--config-file", "c.yaml", "--input", "a.png", "dir", "--output",
                            "out", "--vocabulary", "red square, blue circle",
                            "--confidence-threshold", "0.3", "--opts", "MODEL.WEIGHTS", "w.pth"])
    assert args.input == ["a.png", "dir"] and args.vocabulary == ["red square", "blue circle"]
    assert args.confidence_threshold == 0.3 and args.opts == ["MODEL.WEIGHTS", "w.pth"]
    assert demo.parse_args(["--config-file", "c", "--input", "a", "--output", "o"]).vocabulary is None
    for argv, message in (
            (["--vocabulary", "a,,b"], "comma-separated non-empty names"),
            (["--confidence-threshold", "1.5"], "must be in [0, 1]"),
            (["--opts", "MODEL.WEIGHTS"], "KEY VALUE pairs")):
        with pytest.raises(SystemExit):
            demo.parse_args(["--config-file", "c", "--input", "a", "--output", "o", *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):   # --output is required
        demo.parse_args(["--config-file", "c", "--input", "a"])


def test_input_expansion(tmp_path):
    for name in ("b.png", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    files, unmatched = demo.expand_inputs([str(tmp_path), str(tmp_path / "*.png"),
                                           str(tmp_path / "missing*.jpg")])
    assert files == [str(tmp_path / n) for n in ("a.png", "b.png", "notes.txt")]  # once each
    assert unmatched == [str(tmp_path / "missing*.jpg")]


# ------------------------------------------------------------------- predictor and drawing
def test_predictor_vocabulary_replaces_the_names(toy):
    _, root, tokenizer = toy
    predictor = Predictor(_cfg(tokenizer), vocabulary=["red square", "blue circle"])
    assert predictor.class_names == ["red square", "blue circle"]
    image = cv2.imread(os.path.join(toy_shapes_files(root, "novel")["image_root"], "000000.png"))
    instances = predictor(image)["instances"]
    assert instances.image_size == image.shape[:2]
    assert ((instances.pred_classes >= 0) & (instances.pred_classes < 2)).all()
    with pytest.raises(ValueError, match="names repeat"):
        predictor.set_vocabulary(["a", "a"])
    proposals = get_cfg()
    add_unip_v2_config(proposals)
    proposals.merge_from_file(os.path.join(REPO, "configs", "toy",
                                           "proposal_network_R50_tiny.yaml"))
    with pytest.raises(ValueError, match="has no vocabulary to replace"):
        Predictor(proposals, vocabulary=["a"])


def _instances():
    inst = Instances((200, 300))
    inst.pred_boxes = Boxes(torch.tensor([[5.0, 5, 60, 60], [200, 140, 290, 190],
                                          [6.0, 6, 61, 58]]))
    inst.scores = torch.tensor([0.9, 0.1, 0.8])
    inst.pred_classes = torch.tensor([1, 0, 0])
    inst.pred_masks = torch.zeros(3, 200, 300, dtype=torch.bool)
    inst.pred_masks[0, 10:50, 10:50] = True
    inst.pred_masks[1, 150:180, 210:280] = True
    inst.pred_masks[2, 10:50, 10:50] = True
    return inst


def test_instances_to_draw_thresholds_and_suppresses_duplicates():
    kept = instances_to_draw(_instances(), score_threshold=0.5, nms_iou=0.5)
    assert kept.scores.tolist() == pytest.approx([0.9])          # the 0.8 duplicate is gone
    kept = instances_to_draw(_instances(), score_threshold=0.05, nms_iou=None)
    assert len(kept) == 3
    assert len(instances_to_draw(_instances(), score_threshold=0.95)) == 0


def test_draw_predictions_keeps_confident_instances_and_checks_sizes():
    image = np.full((200, 300, 3), 90, np.uint8)
    drawn = draw_predictions(image, _instances(), ["cat", "dog"], score_threshold=0.5,
                             min_side=0)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    # matplotlib's rendering moves pixel values a little everywhere: look for real strokes
    changed = np.abs(drawn.astype(int) - image).max(-1) > 30
    assert changed[5:61, 5:61].any() and not changed[130:, 190:].any()   # the first only
    none = draw_predictions(image, _instances(), ["cat", "dog"], score_threshold=0.95,
                            min_side=0)
    assert np.abs(none.astype(int) - image).max() <= 30
    # small images are enlarged so that names stay readable
    assert draw_predictions(image, _instances(), ["cat", "dog"]).shape == (512, 768, 3)
    with pytest.raises(ValueError, match=r"instances are for an image of \(200, 300\)"):
        draw_predictions(image[:20], _instances(), ["cat", "dog"])


# -------------------------------------------------------------------- the demo end to end
def test_demo_draws_good_inputs_and_skips_bad_ones(toy, tmp_path):
    datasets, root, tokenizer = toy
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    val = toy_shapes_files(root, "val")["image_root"]
    image = cv2.imread(os.path.join(val, "000000.png"))
    cv2.imwrite(str(inputs / "good.png"), image)
    cv2.imwrite(str(inputs / "good2.jpg"), cv2.imread(os.path.join(val, "000001.png")))
    (inputs / "readme.txt").write_text("not an image\n")
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    (inputs / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5,
                             (image.shape[1], image.shape[0]))
    for _ in range(3):
        writer.write(image)
    writer.release()
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--config-file", CONFIG,
           "--input", str(inputs), video, str(tmp_path / "nothing*.png"), "--output", str(out),
           "--confidence-threshold", "0.0", "--vocabulary", "red square, blue circle",
           "--opts", "MODEL.TEXT_ENCODER.TOKENIZER", tokenizer, *SMALL]
    env = dict(os.environ, DETECTRON2_DATASETS=datasets)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert sorted(os.listdir(out)) == ["clip.mp4", "good.png", "good2.png"]
    drawn = cv2.imread(str(out / "good.png"))
    assert min(drawn.shape[:2]) == 512 and drawn.shape[2] == 3     # enlarged for reading
    frames = cv2.VideoCapture(str(out / "clip.mp4"))
    assert int(frames.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    assert f"skipping {inputs / 'readme.txt'}: not a readable image" in log
    assert f"skipping {inputs / 'truncated.jpg'}: not a readable image" in log
    assert "wrote 3 file(s)" in log and "skipped 2 unreadable input(s)" in log
    assert "1 pattern(s) matched nothing" in log
    assert "vocabulary (2): red square, blue circle" in log

    # nothing readable at all: exit status 1
    cmd_bad = cmd[:cmd.index("--input") + 1] + [str(inputs / "readme.txt")] + \
        cmd[cmd.index("--output"):]
    proc = subprocess.run(cmd_bad, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "wrote 0 file(s)" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- main job
def test_seen_and_novel_ap_and_json_safety():
    task = {"AP": 40.0, "AP-a": 50.0, "AP-b": 30.0, "AP-c": float("nan"), "AP-d": 10.0}
    got = main_job.seen_and_novel_ap(task, ["a", "b", "c", "d"], ["c", "d"])
    assert got["AP_seen"] == 40.0 and got["AP_novel"] == 10.0   # NaN (no instances) skipped
    assert json.loads(json.dumps(main_job._json_safe(got)))["AP_per_category"]["c"] is None


def test_main_job_end_to_end_on_a_tiny_dataset(tmp_path):
    datasets, out = tmp_path / "datasets", tmp_path / "job"
    cmd = [sys.executable, os.path.join(REPO, "tools", "main_job.py"), "--output", str(out),
           "--num-train", "4", "--num-val", "2", "--num-novel", "2", "--num-pictures", "1",
           "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "()",
           "INPUT.IMAGE_SIZE", "128", "DATALOADER.NUM_WORKERS", "0", *SMALL]
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    val, novel = metrics["results"]["toy_shapes_val"], metrics["results"]["toy_shapes_novel"]
    for task in ("bbox", "segm"):
        assert 0 <= val[task]["AP"] <= 100
        per_category = novel[task]["AP_per_category"]
        assert len(per_category) == 14 and set(metrics["novel_categories"]) <= set(per_category)
    assert sorted(os.listdir(out / "visualizations")) == ["novel_000000.png", "val_000000.png"]
    summary = (out / "summary.txt").read_text()
    assert "box AP" in summary and "held-out categories" in summary and summary in proc.stdout
    assert "Starting training from iteration 0" in log
    # a second run keeps the finished training
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Starting training from iteration 2" in proc.stdout + proc.stderr
    assert "training kept from an earlier run" in proc.stdout
