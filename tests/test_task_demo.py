"""tools/demo.py --task classify|caption|retrieve on the user's own images: each result equals
what evaluation computes for the same image (the dataset-record path), the retrieval ranking
equals a float64 ranking by cosine similarity, bad inputs are counted, wrong arguments are
refused; and the text lines and picture rows they draw."""
import contextlib
import logging
import math
import os

import cv2
import numpy as np
import pytest
import torch

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from unip_v2 import add_unip_v2_config
from unip_v2.data.dataset_mappers import ClassificationDatasetMapper, ImageTextDatasetMapper
from unip_v2.data.datasets import toy_shapes_files
from unip_v2.engine import TaskPredictor
from unip_v2.engine.task_demo import describe_images, retrieve_images, top_classes_line
from unip_v2.utils.visualization import image_row, with_text_lines

from tools_loader import load_tool
from toy_data import make_toy_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy", "multitask_R50_tiny.yaml")
DETECTION_ONLY = os.path.join(REPO, "configs", "toy", "uni_perceiver_v2_R50_tiny.yaml")
SMALL = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
         "MODEL.CLASSIFICATION.IMAGE_SIZE", "64", "MODEL.RETRIEVAL.IMAGE_SIZE", "64",
         "MODEL.CAPTIONING.IMAGE_SIZE", "64", "MODEL.CAPTIONING.MAX_LENGTH", "4",
         # the tiny dataset's tokenizer splits captions into more tokens than the toy one
         "MODEL.TEXT_ENCODER.CONTEXT_LENGTH", "80", "MODEL.TEXT_ENCODER.MAX_POSITION_EMBEDDINGS",
         "82"]
QUERY = "a picture of a red circle"

demo = load_tool("demo")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The tiny toy_shapes, its tokenizer, and random weights of the five-task toy model saved
    once (so that the demo and the oracles below load the same model)."""
    datasets, root, tokenizer = make_toy_data(tmp_path_factory, num_train=4, num_val=6,
                                              num_novel=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DETECTRON2_DATASETS", datasets)
        opts = ["MODEL.TEXT_ENCODER.TOKENIZER", tokenizer, *SMALL]
        torch.manual_seed(0)
        model = build_model(_cfg(opts))
        weights = str(tmp_path_factory.mktemp("weights") / "model.pth")
        torch.save({"model": model.state_dict()}, weights)
        val = toy_shapes_files(root, "val")["image_root"]
        images = [os.path.join(val, f"{i:06d}.png") for i in range(6)]
        yield {"opts": [*opts, "MODEL.WEIGHTS", weights], "images": images}


def _cfg(opts, config=CONFIG):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts))
    return cfg


@contextlib.contextmanager
def _log_lines():
    """The messages logged under "unip_v2" inside the block, in a list."""
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, logger = Collect(), logging.getLogger("unip_v2")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run(toy, *argv, config=CONFIG):
    """tools/demo.py's main in-process: (exit status, log text)."""
    with _log_lines() as lines:
        status = demo.main(["--config-file", config, *map(str, argv), "--opts", *toy["opts"]])
    return status, "\n".join(lines)


# ------------------------------------------------------------------------ text and pictures
def test_top_classes_line_is_the_softmax_top_k():
    logits = torch.tensor([2.0, 0.0, 1.0, -1.0])
    z = sum(math.exp(x) for x in (2.0, 0.0, 1.0, -1.0))
    want = (f"top-3: a {math.exp(2) / z:.2f}, c {math.exp(1) / z:.2f}, "
            f"b {math.exp(0) / z:.2f}")
    assert top_classes_line(logits, ["a", "b", "c", "d"]) == want == \
        "top-3: a 0.64, c 0.24, b 0.09"
    assert top_classes_line(logits[:2], ["a", "b"]).startswith("top-2: a ")
    with pytest.raises(ValueError, match="shape"):
        top_classes_line(logits, ["a", "b"])


def test_text_lines_wrap_to_the_image_width_and_rows_align():
    image = np.zeros((50, 120, 3), dtype=np.uint8)
    one = with_text_lines(image, ["short"])
    long = with_text_lines(image, ["caption: a picture of a red circle and a blue square"])
    step = one.shape[0] - 50 - 14     # 28 px a row at scale 0.6, plus half a row
    assert (one.shape[0] - 50, step) == (42, 28)
    assert (long.shape[0] - 50 - 14) % 28 == 0 and long.shape[0] - 50 - 14 >= 3 * 28
    assert (long[:50] == image).all() and long.shape[1] == 120
    # tiles whose titles wrap to different heights still make one row
    row = image_row([image, image], ["1. x.png 0.9", "2. a rather long file name.png 0.8"],
                    "query")
    assert row.shape[1] == 2 * 192 + 8


# ------------------------------------------------------------------------ images alone
def test_mappers_take_an_image_alone_only_at_inference(toy):
    cfg = _cfg(toy["opts"])
    record = {"file_name": toy["images"][0], "image_id": 3}
    mapped = ClassificationDatasetMapper(cfg, is_train=False)(dict(record))
    assert "label" not in mapped and mapped["image"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="'label' must be an int"):
        ClassificationDatasetMapper(cfg, is_train=True)(dict(record))
    mapper = ImageTextDatasetMapper(cfg, is_train=False, image_size=64)
    mapped = mapper(dict(record))
    assert mapped["captions"] == [] and mapped["caption"] is None and mapper.num_skipped == 0
    with pytest.raises(ValueError, match="'captions' must be a list"):
        ImageTextDatasetMapper(cfg, is_train=True, image_size=64)(dict(record))
    # a record whose captions are all too long is still skipped at inference
    assert mapper({**record, "captions": ["word " * 200]}) is None and mapper.num_skipped == 1


def test_classify_and_caption_equal_the_evaluation_path(toy, tmp_path):
    cfg = _cfg(toy["opts"])
    predictor = TaskPredictor(cfg)
    files = toy["images"][:3]
    # the oracle: the dataset-record path that evaluation takes (a label, captions)
    names = predictor.model.tasks["classification"].test_class_names
    evaluated = predictor("classification", [{"file_name": f, "label": 0} for f in files])
    with _log_lines() as lines:
        summary = describe_images(predictor, "classification", files,
                                  [str(tmp_path / f"c{i}.png") for i in range(3)])
    assert summary.line() == "3 drawn, 0 unreadable skipped, 0 failed writes"
    assert len(lines) == 3
    for f, e, line in zip(files, evaluated, lines):
        assert line.startswith(f"{f}: {top_classes_line(e['class_logits'], names)} -> ")
    drawn, original = cv2.imread(str(tmp_path / "c0.png")), cv2.imread(files[0])
    h, w = original.shape[:2]     # the image as it was, a band of text under it
    assert drawn.shape[0] > h and drawn.shape[1] == w and (drawn[:h] == original).all()
    evaluated_caps = predictor("captioning", [{"file_name": f, "captions": ["x"]} for f in files])
    alone = predictor("captioning", [{"file_name": f} for f in files])
    assert [c["caption"] for c in alone] == [c["caption"] for c in evaluated_caps]
    alone = predictor("classification", [{"file_name": f} for f in files])
    for a, e in zip(alone, evaluated):
        torch.testing.assert_close(a["class_logits"], e["class_logits"], rtol=1e-5, atol=1e-5)
        assert top_classes_line(a["class_logits"], names).startswith("top-3: ")


def test_retrieval_ranks_by_cosine_similarity(toy, tmp_path):
    predictor = TaskPredictor(_cfg(toy["opts"]))
    files = toy["images"]
    unreadable = tmp_path / "broken.png"
    unreadable.write_bytes(b"not a png")
    ranking, summary = retrieve_images(predictor, [*files, str(unreadable)], QUERY,
                                       str(tmp_path / "retrieval.png"))
    assert summary.line().startswith("6 drawn, 1 unreadable skipped, 0 failed writes")
    # the oracle: evaluation's embeddings (the query as each image's one caption), ranked in
    # float64
    evaluated = predictor("retrieval", [{"file_name": f, "captions": [QUERY]} for f in files])
    scores = [float(e["image_embedding"].double() @ e["caption_embeddings"][0].double())
              for e in evaluated]
    want = sorted(zip(files, scores), key=lambda fs: -fs[1])
    assert [f for f, _ in ranking] == [f for f, _ in want]
    assert [s for _, s in ranking] == pytest.approx([s for _, s in want], rel=1e-5, abs=1e-6)
    picture = cv2.imread(str(tmp_path / "retrieval.png"))
    assert picture.shape[1] == 5 * 192 + 4 * 8      # the five best, side by side


# ------------------------------------------------------------------------ command line
def test_demo_tasks_end_to_end(toy, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, f in enumerate(toy["images"][:2]):
        cv2.imwrite(str(inputs / f"{i}.png"), cv2.imread(f))
    (inputs / "notes.txt").write_text("not an image")
    status, log = _run(toy, "--task", "caption", "--input", inputs, "--output", tmp_path / "cap")
    assert status == 1, log        # one input unreadable: the others drawn, exit status 1
    assert "2 drawn, 1 unreadable skipped, 0 failed writes" in log
    assert sorted(os.listdir(tmp_path / "cap")) == ["0.png", "1.png"]
    assert log.count("caption: ") == 2
    status, log = _run(toy, "--task", "classify", "--vocabulary", "red circle, blue square",
                       "--input", inputs / "0.png", "--output", tmp_path / "cls")
    assert status == 0, log
    assert "classes (2): red circle, blue square" in log and "top-2: " in log
    status, log = _run(toy, "--task", "retrieve", "--query", QUERY, "--input", inputs / "0.png",
                       inputs / "1.png", "--output", tmp_path / "ret")
    assert status == 0, log
    assert os.listdir(tmp_path / "ret") == ["retrieval.png"]
    assert f'query "{QUERY}": 1. ' in log and "2 drawn, 0 unreadable" in log


def test_demo_task_arguments_are_checked(toy, tmp_path):
    image = toy["images"][0]
    for argv, message in ((["--task", "retrieve"], "--task retrieve needs --query"),
                          (["--task", "caption", "--query", "x"], "--query is for --task "
                                                                  "retrieve"),
                          (["--task", "caption", "--vocabulary", "a"], "--vocabulary is for")):
        with pytest.raises(SystemExit) as e:
            demo.parse_args(["--config-file", CONFIG, "--input", image, "--output", "o", *argv])
        assert e.value.code == 2
    # refused before drawing: a model without the task, a video, a too-long query
    status, log = _run(toy, "--task", "caption", "--input", image, "--output", tmp_path / "a",
                       config=DETECTION_ONLY)
    assert status == 2 and "the model has no captioning task (its tasks: ['detection'])" in log
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 64))
    writer.write(np.zeros((64, 64, 3), dtype=np.uint8))
    writer.release()
    status, log = _run(toy, "--task", "classify", "--input", video, "--output", tmp_path / "b")
    assert status == 2 and "takes images, not videos" in log
    status, log = _run(toy, "--task", "retrieve", "--query", "word " * 100, "--input", image,
                       "--output", tmp_path / "c")
    assert status == 2 and "query texts longer than the text encoder's limit" in log
    assert not os.path.exists(tmp_path / "c" / "retrieval.png")
