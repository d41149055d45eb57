"""Exact resume and checkpoint safety, as tools/train_net.py runs them: each run is its own
process (tests/resume_runner.py), so nothing survives between runs but the files.

- 6 iterations at once vs 3, a process that dies, and --resume to 6: the raw per-iteration
  losses are identical, bit for bit;
- a process killed (SIGKILL) in the middle of writing a checkpoint, then --resume: training
  continues from the previous checkpoint, with the same losses;
- a torn (truncated) newest checkpoint or an emptied last_checkpoint: resume falls back to
  the previous checkpoint with a warning;
- a finished run is one whose newest readable checkpoint says so;
- a new run refuses a folder that holds another run unless --resume / --overwrite.
"""
import itertools
import json
import os
import subprocess
import sys

import pytest

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from toy_data import make_toy_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "tests", "resume_runner.py")
MAX_ITER = 6
RUNS = itertools.count()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    datasets, _, tokenizer = make_toy_data(tmp_path_factory, num_train=8, num_val=2)
    # One thread: with two, some of torch's CPU reductions add in an order that depends on
    # thread timing, and two identical fresh runs already differ in the 7th digit after a
    # few iterations (checked with the reference op too), resume or not.
    return {"env": dict(os.environ, DETECTRON2_DATASETS=str(datasets), OMP_NUM_THREADS="1",
                        MKL_NUM_THREADS="1"),
            "tokenizer": tokenizer}


def train(env, output_dir, *flags, period=3, die_after=None, kill_in_save=None,
          expect_rc=0, config=None, extra=()):
    """One train_net.py run in its own process; returns (losses by iteration, log)."""
    losses = os.path.join(output_dir, f"losses-{next(RUNS)}.jsonl")
    cmd = [sys.executable, RUNNER, "--losses", losses, *flags]
    if config is not None:
        cmd += ["--config", config]
    if die_after is not None:
        cmd += ["--die-after", str(die_after)]
    if kill_in_save is not None:
        cmd += ["--kill-in-save", str(kill_in_save)]
    cmd += ["--", "MODEL.TEXT_ENCODER.TOKENIZER", env["tokenizer"], "OUTPUT_DIR", output_dir,
            "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", str(period),
            "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "(4,)", "SOLVER.IMS_PER_BATCH", "2",
            "INPUT.IMAGE_SIZE", "96", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
            "DATASETS.TEST", "()", "SEED", "7", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env["env"], capture_output=True, text=True,
                          timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == expect_rc, f"exit {proc.returncode}\n{log[-4000:]}"
    records = {}
    if os.path.exists(losses):
        with open(losses) as f:
            for line in f:
                r = json.loads(line)
                records[r["iteration"]] = r["losses"]
    return records, log


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    losses, _ = train(env, out, period=2)
    assert sorted(losses) == list(range(MAX_ITER))
    return losses


def test_resume_gives_bit_identical_losses(env, uninterrupted, tmp_path):
    out = str(tmp_path)
    # dies (like a kill) right after the checkpoint of iteration 2, i.e. after 3 iterations
    first, _ = train(env, out, die_after=2, expect_rc=3)
    assert sorted(first) == [0, 1, 2]
    resumed, log = train(env, out, "--resume")
    assert "Starting training from iteration 3" in log
    assert sorted(resumed) == [3, 4, 5]
    for it in range(MAX_ITER):
        got = first[it] if it < 3 else resumed[it]
        assert got == uninterrupted[it], f"iteration {it}: {got} != {uninterrupted[it]}"
    # the learning rate at the first resumed iteration is the schedule's, not warm-up's first
    assert resumed[3]["lr"] == uninterrupted[3]["lr"] > 0


# the toy generalist with every task, tiny: 2 samples of each task a batch, small images
MULTITASK = ["MODEL.DETECTION.BATCH_SIZE", "2", "MODEL.CLASSIFICATION.BATCH_SIZE", "2",
             "MODEL.CLASSIFICATION.IMAGE_SIZE", "64", "MODEL.RETRIEVAL.BATCH_SIZE", "2",
             "MODEL.RETRIEVAL.IMAGE_SIZE", "64", "MODEL.CAPTIONING.BATCH_SIZE", "2",
             "MODEL.CAPTIONING.IMAGE_SIZE", "64", "MODEL.MLM.BATCH_SIZE", "2",
             "SOLVER.OPTIMIZER", "MT-ADAMW",
             # pinned, not the config's recipe: with these, SEED 7 switches tasks in 3-5
             "DATALOADER.SAMPLING_RATIOS", "[0.3,0.25,0.25,0.12,0.08]"]


def test_multitask_resume_gives_bit_identical_losses(env, tmp_path):
    """Unmixed sampling with MT-AdamW: 6 iterations at once vs 3 and --resume to 6 draw the
    same tasks and give the same per-iteration losses, bit for bit."""
    kwargs = dict(config="multitask_R50_tiny.yaml", extra=MULTITASK)
    whole, _ = train(env, str(tmp_path / "whole"), period=2, **kwargs)
    assert sorted(whole) == list(range(MAX_ITER))
    drawn = [whole[it]["task_drawn"] for it in range(MAX_ITER)]
    assert len(set(drawn[3:])) > 1, drawn     # the resumed half switches tasks
    out = str(tmp_path / "stopped")
    first, _ = train(env, out, die_after=2, expect_rc=3, **kwargs)
    resumed, log = train(env, out, "--resume", **kwargs)
    assert "Starting training from iteration 3" in log and sorted(resumed) == [3, 4, 5]
    for it in range(MAX_ITER):
        got = first[it] if it < 3 else resumed[it]
        assert got == whole[it], f"iteration {it}: {got} != {whole[it]}"


def test_kill_during_checkpoint_write_resumes_from_previous(env, uninterrupted, tmp_path):
    out = str(tmp_path)
    # SIGKILL halfway through writing the checkpoint of iteration 3 (period 2: checkpoints
    # at iterations 1, 3, 5)
    first, _ = train(env, out, period=2, kill_in_save=3, expect_rc=-9)
    assert sorted(first) == [0, 1, 2]   # killed before iteration 3 was recorded
    leftovers = sorted(os.listdir(out))
    assert "model_0000003.pth" not in leftovers and "model_0000001.pth" in leftovers
    assert any(f.endswith(".tmp") for f in leftovers), leftovers   # the torn temporary file
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read() == "model_0000001.pth"
    resumed, log = train(env, out, "--resume", period=2)
    assert "Starting training from iteration 2" in log
    for it in range(2, MAX_ITER):
        assert resumed[it] == uninterrupted[it], it


@pytest.mark.parametrize("damage", ["truncated", "empty_pointer"])
def test_unreadable_newest_checkpoint_falls_back(env, uninterrupted, tmp_path, damage):
    out = str(tmp_path)
    train(env, out, period=2, die_after=3, expect_rc=3)   # checkpoints 1 and 3
    newest = os.path.join(out, "model_0000003.pth")
    if damage == "truncated":
        with open(newest, "r+b") as f:   # what a crash of a non-atomic writer leaves
            f.truncate(os.path.getsize(newest) // 2)
    else:
        open(os.path.join(out, "last_checkpoint"), "w").close()
        os.remove(newest)
    resumed, log = train(env, out, "--resume", period=2)
    if damage == "truncated":
        assert "Cannot read checkpoint" in log and "model_0000003.pth" in log
    else:
        assert "last_checkpoint is empty" in log
    assert "Starting training from iteration 2" in log
    for it in range(2, MAX_ITER):
        assert resumed[it] == uninterrupted[it], it


def test_finished_run_is_recognised_by_a_checkpoint_that_loads(env, tmp_path):
    out = str(tmp_path)
    train(env, out, period=2)
    # a finished run: resume trains nothing
    again, log = train(env, out, "--resume", period=2)
    assert again == {} and f"Starting training from iteration {MAX_ITER}" in log
    # a model_final.pth that does not load does not make the run finished: resume goes back
    # to the newest readable checkpoint (iteration 5's periodic one is also the final state,
    # so remove it) and trains again from there
    os.remove(os.path.join(out, "model_0000005.pth"))
    with open(os.path.join(out, "model_final.pth"), "wb"):
        pass
    again, log = train(env, out, "--resume", period=2)
    assert "Cannot read checkpoint" in log
    assert sorted(again) == [4, 5]


def test_new_run_refuses_a_used_folder(env, tmp_path):
    out = str(tmp_path)
    train(env, out, period=100)
    _, log = train(env, out, period=100, expect_rc=2)
    assert "holds another run's results" in log and "--resume" in log and "--overwrite" in log
    with open(os.path.join(out, "metrics.json")) as f:
        before = f.read()
    _, log = train(env, out, "--overwrite", period=100)
    backups = [d for d in os.listdir(out) if d.startswith("overwritten-")]
    assert len(backups) == 1
    with open(os.path.join(out, backups[0], "metrics.json")) as f:
        assert f.read() == before   # the old run's metrics are kept, not appended to
    with open(os.path.join(out, "metrics.json")) as f:
        assert [json.loads(line)["iteration"] for line in f] == [MAX_ITER - 1]
