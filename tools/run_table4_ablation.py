#!/usr/bin/env python
"""Table 4 of Uni-Perceiver v2 on the toy data: task sampling, gathered features and MT-AdamW.

    python tools/run_table4_ablation.py [--output output/table4] [--iters 1200]
                                        [--rows mixed,unmixed,gather,mt-adamw]
                                        [--num-train 2000 --num-val 200] [KEY VALUE ...]

Trains configs/toy/multitask_R50_tiny.yaml (every pillar task) four times with the same budget
and evaluates each on every toy val set, then prints one table (also OUTPUT/table4.md):

| row | sampling | gather feature | optimiser | processes |
|---|---|---|---|---|
| mixed | mixed: every iteration a batch of every task, batch_k x s_k samples each | - | AdamW | 1 |
| unmixed | unmixed: one task per iteration, drawn with s_k | - | AdamW | 2 (gloo) |
| gather | unmixed | retrieval negatives from both processes | AdamW | 2 (gloo) |
| mt-adamw | unmixed | yes | MT-AdamW | 2 (gloo) |

Two processes (torchrun, gloo, one thread each) share this machine's cores; each takes half
of every task's batch, so a step sees the same global batch as one process would. The
"unmixed" row turns MODEL.RETRIEVAL.GATHER_FEATURES off, so each process's retrieval loss sees
only its own half of the batch (the paper's "vanilla unmixed"). "mixed" runs on one process
with the same expected samples of each task per iteration. A finished run in OUTPUT/<row> is
kept (its evaluation is redone); trailing KEY VALUE pairs override every run's config.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from detectron2.config import get_cfg

from unip_v2 import add_unip_v2_config
from unip_v2.data.datasets import toy_shapes_root
from unip_v2.engine import Checkpointer, Trainer, check_finite_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/toy/multitask_R50_tiny.yaml"
TASK_KEYS = ("DETECTION", "CLASSIFICATION", "RETRIEVAL", "CAPTIONING", "MLM")
ROWS = {  # row -> (sampling, gather features, optimiser, processes)
    "mixed": ("mixed", False, "ADAMW", 1),
    "unmixed": ("unmixed", False, "ADAMW", 2),
    "gather": ("unmixed", True, "ADAMW", 2),
    "mt-adamw": ("unmixed", True, "MT-ADAMW", 2),
}
# (dataset, evaluation, metric, column)
COLUMNS = [("toy_shapes_val", "bbox", "AP", "box AP"), ("toy_shapes_val", "segm", "AP", "mask AP"),
           ("toy_shapes_val_classification", "classification", "top1", "top-1"),
           ("toy_shapes_val_retrieval", "retrieval", "i2t_R1", "R@1 i2t"),
           ("toy_shapes_val_retrieval", "retrieval", "t2i_R1", "R@1 t2i"),
           ("toy_shapes_val_captioning", "captioning", "CIDEr", "CIDEr"),
           ("toy_shapes_val_mlm", "mlm", "accuracy", "MLM acc.")]


def load_cfg(opts):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, CONFIG))
    cfg.merge_from_list(list(opts))
    return cfg


def run_overrides(base, row, iters):
    """The KEY VALUE overrides of one row (see the module docstring)."""
    sampling, gather, optimiser, procs = ROWS[row]
    opts = ["DATALOADER.TASK_SAMPLING", sampling, "MODEL.RETRIEVAL.GATHER_FEATURES", str(gather),
            "SOLVER.OPTIMIZER", optimiser, "SOLVER.MAX_ITER", str(iters),
            "SOLVER.STEPS", f"({int(iters * 0.9)},)", "SOLVER.CHECKPOINT_PERIOD", str(iters),
            "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]
    ratios = list(base.DATALOADER.SAMPLING_RATIOS) or [1.0] * len(base.DATASETS.TRAIN)
    total = sum(ratios)
    for key, ratio in zip(TASK_KEYS, ratios):
        batch = getattr(base.MODEL, key).BATCH_SIZE
        if sampling == "mixed":
            batch = max(1, round(batch * ratio / total))
        elif batch % procs:
            raise ValueError(f"MODEL.{key}.BATCH_SIZE {batch} is not divisible by {procs}")
        else:
            batch //= procs
        opts += [f"MODEL.{key}.BATCH_SIZE", str(batch)]
    return opts


def train(row, out_dir, opts, tokenizer):
    procs = ROWS[row][3]
    args = ["tools/train_net.py", "--config-file", CONFIG, "--resume", "OUTPUT_DIR", out_dir,
            "MODEL.TEXT_ENCODER.TOKENIZER", tokenizer, "MODEL.DEVICE", "cpu", *opts]
    if procs == 1:
        cmd = [sys.executable, *args]
        env = os.environ
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(procs), *args]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // procs)))
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def evaluate(weights, opts, tokenizer):
    cfg = load_cfg(["MODEL.TEXT_ENCODER.TOKENIZER", tokenizer, "MODEL.DEVICE", "cpu", *opts])
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    model = Trainer.build_model(cfg)
    Checkpointer(model).load(weights)
    check_finite_weights(model, weights)
    results = Trainer.test(cfg, model)
    return {name: {ev: dict(m) for ev, m in r.items()} for name, r in results.items()}


def table(results, seconds):
    head = ("| sampling | gather feature | MT-AdamW | " + " | ".join(c[3] for c in COLUMNS)
            + " | training min |")
    lines = [head, "|" + "---|" * (4 + len(COLUMNS))]
    for row, res in results.items():
        sampling, gather, optimiser, _ = ROWS[row]
        cells = [res.get(d, {}).get(e, {}).get(m, float("nan")) for d, e, m, _ in COLUMNS]
        lines.append(f"| {sampling} | {'yes' if gather else ''} | "
                     f"{'yes' if optimiser == 'MT-ADAMW' else ''} | "
                     + " | ".join(f"{c:.2f}" for c in cells) + f" | {seconds[row] / 60:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="output/table4")
    parser.add_argument("--iters", type=int, default=1200, help="iterations of every run")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"some of {list(ROWS)}")
    for split, n in (("train", 2000), ("val", 200), ("novel", 200)):
        parser.add_argument(f"--num-{split}", type=int, default=n,
                            help=f"toy_shapes {split} images (tools/make_toy_dataset.py)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    tokenizer = os.path.join(toy_shapes_root(), "tokenizer")
    sizes = ["--num-train", str(args.num_train), "--num-val", str(args.num_val),
             "--num-novel", str(args.num_novel)]
    for tool in (["tools/make_toy_dataset.py", *sizes], ["tools/train_toy_tokenizer.py"]):
        subprocess.run([sys.executable, *tool], cwd=REPO, check=True)
    base = load_cfg(args.opts)
    results, seconds = {}, {}
    for row in rows:
        out_dir = os.path.abspath(os.path.join(args.output, row))
        opts = [*args.opts, *run_overrides(base, row, args.iters)]
        start = time.perf_counter()
        train(row, out_dir, opts, tokenizer)
        seconds[row] = time.perf_counter() - start
        eval_opts = [*args.opts, "DATASETS.TEST", str(tuple(base.DATASETS.TEST))]
        results[row] = evaluate(os.path.join(out_dir, "model_final.pth"), eval_opts, tokenizer)
    text = table(results, seconds)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "table4.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output, "table4.json"), "w") as f:
        json.dump({"iters": args.iters, "overrides": args.opts, "results": results,
                   "train_seconds": seconds}, f, indent=2, default=float)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
