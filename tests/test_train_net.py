"""tools/train_net.py end to end, as a user runs it: train the toy generalist for a couple of
iterations, reload its checkpoint with --eval-only and get identical predictions, continue
it with --resume."""
import json
import os
import subprocess
import sys

import pytest
import torch

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from toy_data import make_toy_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy", "uni_perceiver_v2_R50_tiny.yaml")
PREDICTIONS = os.path.join("inference", "toy_shapes_val", "instances_predictions.pth")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A function running train_net.py on a tiny toy_shapes (6 train, 3 val images) at 128
    pixels; returns the completed process."""
    datasets, _, tokenizer = make_toy_data(tmp_path_factory, num_train=6, num_val=3)
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets), OMP_NUM_THREADS="2")

    def _run(*args, **opts):
        opts = {"MODEL.TEXT_ENCODER.TOKENIZER": tokenizer, "SOLVER.IMS_PER_BATCH": 2,
                "SOLVER.MAX_ITER": 2, "SOLVER.STEPS": "()", "SOLVER.CHECKPOINT_PERIOD": 1000,
                "INPUT.IMAGE_SIZE": 128, "INPUT.MIN_SIZE_TEST": 128, "INPUT.MAX_SIZE_TEST": 128,
                "DATALOADER.NUM_WORKERS": 0, "TEST.EVAL_PERIOD": 0, **opts}
        cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"),
               "--config-file", CONFIG, *args]
        for k, v in opts.items():
            cmd += [k, str(v)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    return _run


def _predictions(output_dir):
    return torch.load(os.path.join(output_dir, PREDICTIONS), weights_only=False)


def test_checkpoint_reloads_to_identical_predictions_and_resumes(run, tmp_path):
    train_dir, eval_dir = str(tmp_path / "train"), str(tmp_path / "eval")
    run(OUTPUT_DIR=train_dir)
    # training ends with an evaluation of the final model (detectron2's EvalHook)
    assert os.path.isfile(os.path.join(train_dir, "model_final.pth"))
    trained = _predictions(train_dir)

    run("--eval-only", OUTPUT_DIR=eval_dir,
        **{"MODEL.WEIGHTS": os.path.join(train_dir, "model_final.pth")})
    reloaded = _predictions(eval_dir)
    assert len(trained) == len(reloaded) == 3
    for a, b in zip(trained, reloaded):
        assert a["image_id"] == b["image_id"]
        assert len(a["instances"]) == len(b["instances"]) > 0
        assert a["instances"] == b["instances"]   # boxes, scores, classes, RLE masks: equal

    # --resume continues from the last checkpoint instead of starting over
    proc = run("--resume", OUTPUT_DIR=train_dir, **{"SOLVER.MAX_ITER": 3})
    log = proc.stdout + proc.stderr
    assert "Starting training from iteration 2" in log
    with open(os.path.join(train_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    # training metrics (not evaluation results): iteration 1 of the first run, then 2
    assert [r["iteration"] for r in records if "total_loss" in r] == [1, 2]
