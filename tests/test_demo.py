"""tools/demo.py (arguments, inputs good and bad, video, vocabulary, output names, failed
writes, exit status), the Predictor and draw_predictions, and the main job
(tools/main_job.py) on a tiny dataset."""
import json
import logging
import math
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
from unip_v2.data.datasets import toy_shapes_files
from unip_v2.engine import Predictor, parse_vocabulary
from unip_v2.engine.demo import expand_inputs, plan_outputs
from unip_v2.modeling.text_encoder import build_tokenizer
from unip_v2.utils.visualization import draw_predictions, instances_to_draw

from tools_loader import load_tool
from toy_data import make_toy_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy", "uni_perceiver_v2_R50_tiny.yaml")
SMALL = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"]


demo = load_tool("demo")
main_job = load_tool("main_job")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny toy_shapes (4 train, 2 val, 2 novel images) and its tokenizer."""
    return make_toy_data(tmp_path_factory, num_train=4, num_val=2, num_novel=2)


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
    files, unmatched = expand_inputs([str(tmp_path), str(tmp_path / "*.png"),
                                      str(tmp_path / "." / "a.png"),
                                      str(tmp_path / "missing*.jpg")])
    assert files == [str(tmp_path / n) for n in ("a.png", "b.png", "notes.txt")]  # once each
    assert unmatched == [str(tmp_path / "missing*.jpg")]


def test_output_names_mirror_the_inputs_under_their_common_folder(tmp_path):
    src, out = tmp_path / "src", str(tmp_path / "out")
    files = [str(src / "a" / "x.png"), str(src / "b" / "x.png"), str(src / "b" / "c" / "v.avi")]
    assert plan_outputs(files, out) == [os.path.join(out, "a", "x.png"),
                                        os.path.join(out, "b", "x.png"),
                                        os.path.join(out, "b", "c", "v.mp4")]
    # one folder: flat, as before; relative spellings resolve like absolute ones
    assert plan_outputs([str(src / "x.jpg"), str(src / "y.png")], out) == [
        os.path.join(out, "x.png"), os.path.join(out, "y.png")]
    assert plan_outputs([os.path.relpath(files[0])], out) == [os.path.join(out, "x.png")]
    # x.png and x.jpg of one folder would both become x.png: refused
    with pytest.raises(ValueError, match=r"src/x.png and .*src/x.jpg would both be drawn to "
                                         r".*out/x.png"):
        plan_outputs([str(src / "x.png"), str(src / "x.jpg")], out)


def test_outputs_never_overwrite_inputs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.png").write_bytes(b"x")
    (tmp_path / "link").symlink_to(images, target_is_directory=True)
    for out in (images, tmp_path / "link", tmp_path / "." / "images"):
        with pytest.raises(ValueError, match=r"the drawing of .*images/x.png would overwrite "
                                             r"the input .*images/x.png"):
            plan_outputs([str(images / "x.png")], str(out))
    # x.jpg is drawn to x.png: writing next to it overwrites nothing
    assert plan_outputs([str(images / "x.jpg")], str(images)) == [str(images / "x.png")]


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
def _write_video(path, image, frames=3):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5,
                             (image.shape[1], image.shape[0]))
    for _ in range(frames):
        writer.write(image)
    writer.release()


@pytest.fixture
def val_images(toy):
    """The two toy val images, BGR."""
    val = toy_shapes_files(toy[1], "val")["image_root"]
    return [cv2.imread(os.path.join(val, f"00000{i}.png")) for i in range(2)]


@pytest.fixture
def run_demo(toy, monkeypatch):
    """run_demo(inputs, output, *more_argv) -> (exit status, log text): tools/demo.py's main
    in-process, on the untrained toy model at 128 pixels, drawing no predictions (to be
    quick; the drawing itself is tested above)."""
    datasets, _, tokenizer = toy
    monkeypatch.setenv("DETECTRON2_DATASETS", datasets)

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    def run(inputs, output, *more):
        handler = Collect()
        logging.getLogger("unip_v2").addHandler(handler)
        try:
            status = demo.main(["--config-file", CONFIG, "--input", *map(str, inputs),
                                "--output", str(output), "--confidence-threshold", "1.0",
                                *more, "--opts", "MODEL.TEXT_ENCODER.TOKENIZER", tokenizer,
                                *SMALL])
        finally:
            logging.getLogger("unip_v2").removeHandler(handler)
        return status, "\n".join(handler.lines)
    return run


def _tree(folder):
    """{relative path: bytes} of every file under folder."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


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
    _write_video(video, image)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--config-file", CONFIG,
           "--input", str(inputs), video, str(tmp_path / "nothing*.png"), "--output", str(out),
           "--confidence-threshold", "0.0", "--vocabulary", "red square, blue circle",
           "--opts", "MODEL.TEXT_ENCODER.TOKENIZER", tokenizer, *SMALL]
    env = dict(os.environ, DETECTRON2_DATASETS=datasets)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    # drawn what could be, but not everything: exit status 1
    assert proc.returncode == 1, log[-3000:]
    # named after their paths under tmp_path, the inputs' common folder
    assert sorted(_tree(out)) == ["clip.mp4", os.path.join("inputs", "good.png"),
                                  os.path.join("inputs", "good2.png")]
    drawn = cv2.imread(str(out / "inputs" / "good.png"))
    assert min(drawn.shape[:2]) == 512 and drawn.shape[2] == 3     # enlarged for reading
    frames = cv2.VideoCapture(str(out / "clip.mp4"))
    assert int(frames.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    assert f"skipping {inputs / 'readme.txt'}: not a readable image" in log
    assert f"skipping {inputs / 'truncated.jpg'}: not a readable image" in log
    assert "3 drawn, 2 unreadable skipped, 0 failed writes" in log
    assert "1 --input pattern(s) matched nothing" in log
    assert "vocabulary (2): red square, blue circle" in log

    # nothing readable at all: exit status 1
    cmd_bad = cmd[:cmd.index("--input") + 1] + [str(inputs / "readme.txt")] + \
        cmd[cmd.index("--output"):]
    proc = subprocess.run(cmd_bad, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert "0 drawn, 1 unreadable skipped, 0 failed writes" in proc.stdout + proc.stderr


def test_demo_exit_status_is_documented(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 every input read, drawn and written; 1 some input unreadable" \
        in help_text and "2 refused before drawing" in help_text
    assert "Exit status: 0 when every input was read, drawn and written" in demo.__doc__


def test_demo_draws_same_named_inputs_to_separate_outputs(run_demo, val_images, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for folder, image in zip("ab", val_images):
        (src / folder).mkdir(parents=True)
        cv2.imwrite(str(src / folder / "x.png"), image)
    status, log = run_demo([src / "a" / "x.png", src / "b"], out)
    assert status == 0, log
    assert sorted(_tree(out)) == [os.path.join("a", "x.png"), os.path.join("b", "x.png")]
    # two different pictures, so two different drawings
    assert _tree(out)[os.path.join("a", "x.png")] != _tree(out)[os.path.join("b", "x.png")]
    assert "2 drawn, 0 unreadable skipped, 0 failed writes" in log


def test_demo_never_writes_over_its_inputs(run_demo, val_images, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(val_images):
        cv2.imwrite(str(images / f"{i}.png"), image)
    _write_video(images / "clip.mp4", val_images[0], frames=2)
    before = _tree(images)
    (tmp_path / "link").symlink_to(images, target_is_directory=True)
    for out in (images, tmp_path / "link"):
        status, log = run_demo([images], out)
        assert status == 2
        assert f"the drawing of {images / '0.png'} would overwrite the input" in log
        assert f"the drawing of {images / 'clip.mp4'} would overwrite the input" in log
        assert _tree(images) == before                       # nothing written, nothing lost
    # two inputs that would share an output: refused, nothing written
    other = tmp_path / "other"
    other.mkdir()
    cv2.imwrite(str(other / "0.png"), val_images[0])
    cv2.imwrite(str(other / "0.jpg"), val_images[1])
    status, log = run_demo([other], tmp_path / "out")
    assert status == 2
    assert f"{other / '0.jpg'} and {other / '0.png'} would both be drawn to" in log
    assert not (tmp_path / "out").exists()


def test_demo_counts_a_video_it_cannot_write(run_demo, val_images, tmp_path):
    _write_video(tmp_path / "clip.mp4", val_images[0], frames=2)
    out = tmp_path / "out"
    # a folder where the video should go: no writer can open it, not even root's
    (out / "clip.mp4").mkdir(parents=True)
    status, log = run_demo([tmp_path / "clip.mp4"], out)
    assert status == 1, log
    assert f"could not write the drawing of {tmp_path / 'clip.mp4'}" in log
    assert "cv2.VideoWriter could not open" in log
    assert "0 drawn, 0 unreadable skipped, 1 failed writes" in log
    assert os.listdir(out / "clip.mp4") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway; "
                    "test_demo_counts_a_video_it_cannot_write fails the write another way")
def test_demo_counts_writes_into_a_read_only_folder(run_demo, val_images, tmp_path):
    _write_video(tmp_path / "clip.mp4", val_images[0], frames=2)
    cv2.imwrite(str(tmp_path / "x.png"), val_images[1])
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        status, log = run_demo([tmp_path / "clip.mp4", tmp_path / "x.png"], out)
    finally:
        out.chmod(0o755)
    assert status == 1, log
    assert "0 drawn, 0 unreadable skipped, 2 failed writes" in log
    assert os.listdir(out) == []


def test_demo_goes_on_after_a_failed_write(run_demo, val_images, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    cv2.imwrite(str(src / "x.png"), val_images[0])
    cv2.imwrite(str(src / "y.png"), val_images[1])
    _write_video(src / "sub" / "clip.mp4", val_images[1], frames=1)
    # what is in the way fails even for root: a folder where x.png should go (cv2.imwrite
    # returns False), a regular file where the folder of sub/clip.mp4 should go
    (out / "x.png").mkdir(parents=True)
    (out / "sub").write_text("in the way\n")
    status, log = run_demo([src / "x.png", src / "sub" / "clip.mp4", src / "y.png"], out)
    assert status == 1, log
    assert f"could not write the drawing of {src / 'x.png'}: cv2.imwrite could not write" in log
    assert f"could not write the drawing of {src / 'sub' / 'clip.mp4'}: cannot create the " \
        f"folder of {out / 'sub' / 'clip.mp4'}" in log
    assert sorted(_tree(out)) == ["sub", "y.png"]
    assert min(cv2.imread(str(out / "y.png")).shape[:2]) == 512    # a drawing, enlarged
    assert (f"1 drawn, 0 unreadable skipped, 2 failed writes; not written: {src / 'x.png'}, "
            f"{src / 'sub' / 'clip.mp4'}") in log


def test_demo_refuses_category_names_too_long_to_encode(run_demo, toy, val_images, tmp_path):
    tokenizer = build_tokenizer(toy[2])
    long_name = "red square with a thin blue border and a small green dot in its middle"
    tokens = len(tokenizer(long_name)["input_ids"])       # the tokenizer's own count
    assert tokens > 40                                     # CONTEXT_LENGTH of the toy config
    cv2.imwrite(str(tmp_path / "x.png"), val_images[0])
    out = tmp_path / "out"
    status, log = run_demo([tmp_path / "x.png"], out, "--vocabulary",
                           f"red square, {long_name}")
    assert status == 2, log
    assert "category names longer than the text encoder's limit of 40 tokens" in log
    assert f"{long_name!r} ({tokens} tokens)" in log and "'red square' (" not in log
    assert not out.exists()
    with pytest.raises(ValueError, match=r"\(%d tokens\)" % tokens):
        Predictor(_cfg(toy[2]), vocabulary=["red square", long_name])
    with pytest.raises(ValueError, match=r"\(%d tokens\)" % tokens):
        Predictor(_cfg(toy[2], "MODEL.DETECTION.TEST_CLASS_NAMES", ["red square", long_name]))


# ----------------------------------------------------------------------------- main job
def test_seen_and_novel_ap_and_json_safety():
    task = {"AP": 40.0, "AP-a": 50.0, "AP-b": 30.0, "AP-c": float("nan"), "AP-d": 10.0}
    got = main_job.seen_and_novel_ap(task, ["a", "b", "c", "d"], ["c", "d"])
    assert got["AP_seen"] == 40.0 and got["AP_novel"] == 10.0   # NaN (no instances) skipped
    assert json.loads(json.dumps(main_job._json_safe(got)))["AP_per_category"]["c"] is None
    got = main_job.seen_and_novel_ap({"AP-a": 50.0, "AP-b": 20.0, "AP-d": 6.0},
                                     ["a", "b", "d"], ["b", "d"])
    assert got["AP_seen"] == 50.0 and got["AP_novel"] == 13.0     # (20 + 6) / 2


def test_main_job_pretraining_keeps_the_models_overrides_not_the_schedule():
    opts = ["SEED", "3", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2",
            "MODEL.TEXT_ENCODER.CONTEXT_LENGTH", "80", "DATASETS.TRAIN", "('a', 'b')",
            "DATALOADER.SAMPLING_RATIOS", "[0.5, 0.5]", "MODEL.WEIGHTS", "w.pth",
            "MODEL.TASKS", "['detection', 'mlm']", "INPUT.IMAGE_SIZE", "128",
            "OUTPUT_DIR", "elsewhere"]
    assert main_job.pretrain_opts(opts, 7, "out/pretrain") == [
        "SEED", "3", "SOLVER.IMS_PER_BATCH", "2", "MODEL.TEXT_ENCODER.CONTEXT_LENGTH", "80",
        "INPUT.IMAGE_SIZE", "128", "SOLVER.MAX_ITER", "7", "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", "7", "OUTPUT_DIR", "out/pretrain", "DATASETS.TEST", "()"]
    # the LR drops for the last eighth of the pre-training (400 -> 350; too short to drop: none)
    assert main_job.pretrain_opts([], 400, "p")[:4] == [
        "SOLVER.MAX_ITER", "400", "SOLVER.STEPS", "(350,)"]


def test_main_job_targets_follow_the_models_tasks():
    results = {"toy_shapes_val": {"bbox": {"AP": 31.0}, "segm": {"AP": 20.0}}}
    assert main_job.target_rows(results, ["detection"]) == [
        ("detection", "bbox AP", 31.0, 30.0, True),
        ("instance segmentation", "segm AP", 20.0, 25.0, False)]
    rows = main_job.target_rows(results, ["detection", "mlm"])
    assert [r[0] for r in rows] == ["detection", "instance segmentation",
                                    "masked language modelling"]
    assert math.isnan(rows[2][2]) and rows[2][3] == 50.0 and not rows[2][4]


def _mean_of_present(values):
    """Mean of the values that are not None (JSON null) / NaN; None if there are none."""
    values = [v for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else None


def test_main_job_end_to_end_on_a_tiny_dataset(tmp_path):
    datasets, out = tmp_path / "datasets", tmp_path / "job"
    cmd = [sys.executable, os.path.join(REPO, "tools", "main_job.py"), "--output", str(out),
           "--config-file", "configs/toy/multitask_R50_tiny.yaml", "--num-train", "4", "--num-val", "2", "--num-novel", "2", "--num-pictures", "1",
           "--pretrain-iters", "1", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "()",
           "INPUT.IMAGE_SIZE", "128", "DATALOADER.NUM_WORKERS", "0", *SMALL,
           *[x for t in ("DETECTION", "CLASSIFICATION", "RETRIEVAL", "CAPTIONING", "MLM")
             for x in (f"MODEL.{t}.BATCH_SIZE", "2")],
           "MODEL.CLASSIFICATION.IMAGE_SIZE", "64", "MODEL.RETRIEVAL.IMAGE_SIZE", "64",
           "MODEL.CAPTIONING.IMAGE_SIZE", "64", "MODEL.CAPTIONING.MAX_LENGTH", "4",
           # the tiny dataset's tokenizer splits captions into more tokens than the toy one
           "MODEL.TEXT_ENCODER.CONTEXT_LENGTH", "80",
           "MODEL.TEXT_ENCODER.MAX_POSITION_EMBEDDINGS", "82"]
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    val, novel = metrics["results"]["toy_shapes_val"], metrics["results"]["toy_shapes_novel"]
    novel_names = metrics["novel_categories"]
    for task in ("bbox", "segm"):
        # COCO AP is the mean of the per-category APs over the categories with ground truth
        # (null in metrics.json: no instance); the job's seen / held-out APs are that mean
        # over its two sets of names
        per_val = {k[3:]: v for k, v in val[task].items() if k.startswith("AP-")}
        assert len(per_val) == 10
        assert val[task]["AP"] == pytest.approx(_mean_of_present(per_val.values()), abs=1e-6)
        per_category = novel[task]["AP_per_category"]
        assert len(per_category) == 14 and set(novel_names) <= set(per_category)
        assert per_category == {k[3:]: v for k, v in novel[task].items() if k.startswith("AP-")}
        assert novel[task]["AP"] == pytest.approx(
            _mean_of_present(per_category.values()), abs=1e-6)
        for key, held_out in (("AP_seen", False), ("AP_novel", True)):
            want = _mean_of_present(v for n, v in per_category.items()
                                    if (n in novel_names) == held_out)
            assert novel[task][key] == (None if want is None else pytest.approx(want, abs=1e-9))
    assert sorted(os.listdir(out / "visualizations")) == ["novel_000000.png",
                                                          "retrieval_query.png", "val_000000.png"]
    # every task is evaluated on its own val set, and the table puts each metric by its target
    results = metrics["results"]
    assert "top1" in results["toy_shapes_val_classification"]["classification"]
    assert "mean_R1" in results["toy_shapes_val_retrieval"]["retrieval"]
    assert "CIDEr" in results["toy_shapes_val_captioning"]["captioning"]
    assert "accuracy" in results["toy_shapes_val_mlm"]["mlm"]
    rows = {(task, metric): (value, target) for task, metric, value, target, _ in
            metrics["targets"]}
    assert rows[("detection", "bbox AP")] == (val["bbox"]["AP"], 30.0)
    assert rows[("classification", "classification top1")][1] == 70.0
    assert len(rows) == 7
    summary = (out / "summary.txt").read_text()
    assert "held-out categories" in summary and summary in proc.stdout
    for task in ("detection", "instance segmentation", "classification", "retrieval",
                 "captioning", "masked language modelling"):
        assert task in summary
    assert f"{val['bbox']['AP']:>8.2f}" in summary
    assert "Starting training from iteration 0" in log
    # the detection pre-training ran first, on the same model shape (nothing skipped when its
    # weights load), and the training started from its image encoder
    pretrained = str(out / "pretrain" / "image_encoder.pth")
    assert os.path.isfile(pretrained) and metrics["seconds"]["pretrain"] > 0
    assert f"Loading from {pretrained}" in log, log[-4000:]
    assert "incompatible shape" not in log
    # a second run keeps the finished training
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Starting training from iteration 2" in proc.stdout + proc.stderr
    assert "training kept from an earlier run" in proc.stdout
