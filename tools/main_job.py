#!/usr/bin/env python
"""The main job (`make demo`): train the toy Uni-Perceiver v2 on the CPU, evaluate each of its
tasks, draw them.

    python tools/main_job.py [--output output/main_job] [--config-file CONFIG] [--fresh]
                             [--pretrain-iters 400 --pretrain-config PRETRAIN_CONFIG]
                             [--num-pictures 6] [--num-train 2000 --num-val 200
                             --num-novel 200] [KEY VALUE ...]

1. generates the toy dataset if missing (train, val, and the novel split with held-out
   colour-shape combinations; progress bar), 2. trains its BPE tokenizer if missing,
3. trains --config-file (default configs/toy/multitask_R50_tiny.yaml: detection and instance
   segmentation, classification, retrieval, captioning and MLM together, one task per
   iteration, MT-AdamW; configs/toy/uni_perceiver_v2_R50_tiny.yaml: detection and instance
   segmentation alone) with tools/train_net.py
   --resume (detectron2's metrics and ETA every 20 iterations, each task's losses; a finished
   run is not repeated, an interrupted one continues; --fresh starts over); with
   --pretrain-iters N it first trains the same model on detection alone for N iterations
   (configs/toy/uni_perceiver_v2_R50_tiny.yaml, in OUTPUT/pretrain) and starts from its
   image encoder's weights, as the Uni-Perceiver v2 paper's ablations start from a
   detection-pretrained image encoder (Sec. 5.3), 4. evaluates every
   task of the model on its toy val set with its own
   evaluator (box and mask AP, top-1, Recall@K, BLEU-4 / CIDEr, masked-token accuracy) and
   detection on toy_shapes_novel with the held-out names added to the vocabulary (AP of seen
   and held-out categories side by side), and prints one table of every metric next to its
   target, 5. draws, per val image, the detections (and, when the model has those tasks, the
   generated caption and the top-3 classes), and one picture of a text query with the five
   val images retrieved for it (retrieval).
Writes OUTPUT/metrics.json, OUTPUT/visualizations/*.png and OUTPUT/summary.txt (also printed).
Trailing KEY VALUE pairs override the config (e.g. SOLVER.MAX_ITER 50 for a quick look).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

import cv2
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

from unip_v2 import add_unip_v2_config
from unip_v2.data.datasets import toy_shapes_root
from unip_v2.engine import (Checkpointer, TaskPredictor, Trainer, check_finite_weights,
                            save_weights_subset)
from unip_v2.engine.task_demo import caption_line, read_rgb, top_classes_line
from unip_v2.utils.visualization import draw_predictions, image_row, with_text_lines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the default: the toy generalist on every pillar task at once; with --config-file
# configs/toy/uni_perceiver_v2_R50_tiny.yaml detection and instance segmentation alone
CONFIG = "configs/toy/multitask_R50_tiny.yaml"
# --pretrain-iters: the same toy generalist on detection alone, so its weights load into CONFIG's
PRETRAIN_CONFIG = "configs/toy/uni_perceiver_v2_R50_tiny.yaml"
# what the training takes from the pre-training: the image encoder (backbone and region
# proposal network), as the paper's ablations start from a detection-pretrained image encoder;
# the text encoder and g start afresh (taking them too left every text task worse at 900
# iterations, SEED 1: README, "Where six-task training stands")
PRETRAINED_PARTS = ("image_encoder.",)
# the overrides that set the training's schedule, data and task mix: not given to the
# pre-training, which keeps the rest (the model's shape, the batch, SEED)
_NOT_PRETRAIN_KEYS = ("DATASETS.", "SOLVER.", "DATALOADER.SAMPLING_RATIOS",
                      "DATALOADER.TASK_SAMPLING", "MODEL.WEIGHTS", "MODEL.TASKS", "OUTPUT_DIR")
VAL, NOVEL = "toy_shapes_val", "toy_shapes_novel"
CLS_VAL, RET_VAL, CAP_VAL, MLM_VAL = (f"{VAL}_{t}" for t in ("classification", "retrieval",
                                                            "captioning", "mlm"))
# the learning targets of the toy generalist on the val sets: (row name, MODEL.TASKS entry,
# dataset, evaluation, metric, target)
TARGETS = [("detection", "detection", VAL, "bbox", "AP", 30.0),
           ("instance segmentation", "detection", VAL, "segm", "AP", 25.0),
           ("classification", "classification", CLS_VAL, "classification", "top1", 70.0),
           ("retrieval", "retrieval", RET_VAL, "retrieval", "mean_R1", 20.0),
           ("captioning", "captioning", CAP_VAL, "captioning", "CIDEr", 0.8),
           ("captioning", "captioning", CAP_VAL, "captioning", "BLEU-4", 0.25),
           ("masked language modelling", "mlm", MLM_VAL, "mlm", "accuracy", 50.0)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="output/main_job", help="output folder")
    parser.add_argument("--config-file", default=CONFIG,
                        help="the toy generalist's config (default: every pillar task; "
                             "configs/toy/uni_perceiver_v2_R50_tiny.yaml: detection alone)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete OUTPUT/train (and OUTPUT/pretrain) first and train from "
                             "scratch")
    parser.add_argument("--pretrain-iters", type=int, default=400,
                        help="detection pre-training: first train --pretrain-config for this "
                             "many iterations, then start the training from its image "
                             "encoder (0: none, e.g. for the detection-alone config)")
    parser.add_argument("--pretrain-config", default=PRETRAIN_CONFIG,
                        help="the pre-training's config (default: detection and instance "
                             "segmentation alone)")
    for split, n in (("train", 2000), ("val", 200), ("novel", 200)):
        parser.add_argument(f"--num-{split}", type=int, default=n,
                            help=f"toy_shapes {split} images (tools/make_toy_dataset.py)")
    parser.add_argument("--num-pictures", type=int, default=6,
                        help="val and novel images to draw (each)")
    parser.add_argument("--confidence-threshold", type=float, default=0.25,
                        help="draw predictions scoring at least this")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if len(args.opts) % 2:
        parser.error(f"config overrides come as KEY VALUE pairs, got {args.opts}")
    if args.num_pictures < 0:
        parser.error("--num-pictures must be >= 0")
    if args.pretrain_iters < 0:
        parser.error("--pretrain-iters must be >= 0")
    return args


def _step(n: int, text: str) -> None:
    print(f"\n[main job {n}/5] {text}", flush=True)


def _run(cmd) -> None:
    """Run a tool with this interpreter, its output straight to the terminal."""
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)


def _json_safe(obj):
    """NaN (a category without instances) becomes null: metrics.json stays strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _mean(values):
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def seen_and_novel_ap(task_results, names, novel_names):
    """Mean per-category AP ("AP-<name>", NaN when a category has no instances) over the
    seen and over the held-out names."""
    per_class = {n: task_results.get(f"AP-{n}", float("nan")) for n in names}
    return {"AP_seen": _mean(v for n, v in per_class.items() if n not in novel_names),
            "AP_novel": _mean(v for n, v in per_class.items() if n in novel_names),
            "AP_per_category": per_class}


def pretrain_opts(opts, iters, out_dir):
    """train_net.py overrides of the pre-training: the user's overrides except those of the
    training's schedule, data and task mix (SOLVER.IMS_PER_BATCH kept), then its own length
    (one checkpoint, at the end), its LR drop and folder."""
    pairs = [(k, v) for k, v in zip(opts[::2], opts[1::2])
             if k == "SOLVER.IMS_PER_BATCH" or not k.startswith(_NOT_PRETRAIN_KEYS)]
    # the LR drops x0.1 for the last eighth (the detection-alone run drops at 550 of 600): the
    # box regression settles there. With the same two seeds, 300 iterations without a
    # drop ended the six-task training at 23.6 box AP, 400 with the drop at 350 at 33.6
    # (README, "Where six-task training stands")
    drop = iters - iters // 8
    return [x for kv in pairs for x in kv] + [
        "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({drop},)" if drop < iters else "()",
        "SOLVER.CHECKPOINT_PERIOD", str(iters), "OUTPUT_DIR", out_dir, "DATASETS.TEST", "()"]


def evaluate(cfg, weights):
    """Every dataset of cfg.DATASETS.TEST with its task's evaluator (Trainer.test), the novel
    split's AP split into seen and held-out categories."""
    model = Trainer.build_model(cfg)
    Checkpointer(model).load(weights)
    check_finite_weights(model, weights)
    results = Trainer.test(cfg, model)
    novel_names = MetadataCatalog.get(NOVEL).novel_thing_classes
    names = MetadataCatalog.get(NOVEL).thing_classes
    for task in ("bbox", "segm"):
        results[NOVEL][task].update(seen_and_novel_ap(results[NOVEL][task], names, novel_names))
    return results


def target_rows(results, tasks):
    """(task, metric, value, target, met) for every target of the model's ``tasks``."""
    rows = []
    for task, key, dataset, evaluation, metric, target in TARGETS:
        if key not in tasks:
            continue
        value = results.get(dataset, {}).get(evaluation, {}).get(metric, float("nan"))
        rows.append((task, f"{evaluation} {metric}", value, target, value >= target))
    return rows


def draw_pictures(cfg, out_dir, count, threshold):
    """Per val image (the first `count`): the detections, the generated caption and the top-3
    classes; per novel image: the detections with the held-out names in the vocabulary; one
    picture of a val caption used as a text query and the five val images retrieved for it.
    Returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    predictor = TaskPredictor(cfg)
    tasks = predictor.model.tasks
    detection = tasks["detection"]
    written = []

    def write(name, image_rgb):
        path = os.path.join(out_dir, name)
        if cv2.imwrite(path, image_rgb[:, :, ::-1]):
            written.append(path)
        else:
            print(f"warning: could not write {path}", file=sys.stderr)

    by_file = {name: {r["file_name"]: r for r in DatasetCatalog.get(name)}
               for task, name in (("classification", CLS_VAL), ("captioning", CAP_VAL))
               if task in tasks}
    if "classification" in tasks:
        predictor.prepare_for_dataset(CLS_VAL)
        class_names = tasks["classification"].test_class_names
    for name in (VAL, NOVEL):
        predictor.prepare_for_dataset(name)
        records = DatasetCatalog.get(name)[:count]
        detections = predictor("detection", records)
        captions = classes = [None] * len(records)
        files = [r["file_name"] for r in records]
        if name == VAL and "captioning" in tasks:
            captions = predictor("captioning", [by_file[CAP_VAL][f] for f in files])
        if name == VAL and "classification" in tasks:
            classes = predictor("classification", [by_file[CLS_VAL][f] for f in files])
        for record, det, cap, cls in zip(records, detections, captions, classes):
            image = read_rgb(record["file_name"])
            if image is None or det is None:
                continue
            drawn = draw_predictions(image, det["instances"], detection.test_class_names,
                                     threshold)
            lines = []
            if cap is not None:
                lines.append(caption_line(cap))
            if cls is not None:
                lines.append(top_classes_line(cls["class_logits"], class_names))
            if lines:
                drawn = with_text_lines(drawn, lines)
            stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
            write(f"{name.replace('toy_shapes_', '')}_{stem}.png", drawn)

    # retrieval: the first val image's first caption as the query, every val image ranked
    if "retrieval" not in tasks:
        return written
    all_records = DatasetCatalog.get(RET_VAL)
    # the image embeddings alone: the records' own captions are not needed to rank images
    embeddings = predictor("retrieval", all_records, forward=tasks["retrieval"].embed_images)
    kept = [(r, e) for r, e in zip(all_records, embeddings)
            if e is not None]      # images the mapper skipped (warned) are not candidates
    if kept:
        records = [r for r, _ in kept]
        query = records[0]["captions"][0]
        images = torch.stack([e for _, e in kept])
        with torch.no_grad():
            scores = images @ tasks["retrieval"].embed_texts(predictor.model, [query])[0]
        best = scores.topk(min(5, len(records))).indices.tolist()
        tiles = [read_rgb(records[i]["file_name"]) for i in best]
        titles = [f"{k + 1}. {'(query image) ' if i == 0 else ''}{float(scores[i]):.2f}"
                  for k, i in enumerate(best)]
        if all(t is not None for t in tiles):
            write("retrieval_query.png", image_row(tiles, titles, f'query: "{query}"'))
    return written


def summary_text(metrics) -> str:
    novel = metrics["results"][NOVEL]
    lines = ["unip-v2 main job: the toy Uni-Perceiver v2, every pillar task with one set of "
             "weights, trained and evaluated on this CPU",
             f"  {'task':<27} {'metric':<26} {'value':>8} {'target':>8}"]
    for task, metric, value, target, met in metrics["targets"]:
        lines.append(f"  {task:<27} {metric:<26} {value:>8.2f} {target:>8.2f}  "
                     f"{'met' if met else 'NOT met'}")
    lines += [
        f"  toy_shapes_novel (10 seen + {len(metrics['novel_categories'])} held-out names: "
        f"{', '.join(metrics['novel_categories'])}):",
        f"    seen categories:      box AP {novel['bbox']['AP_seen']:.1f}   "
        f"mask AP {novel['segm']['AP_seen']:.1f}",
        f"    held-out categories:  box AP {novel['bbox']['AP_novel']:.1f}   "
        f"mask AP {novel['segm']['AP_novel']:.1f}",
        f"  time: {metrics['seconds']['total']:.0f} s in all, "
        + (f"detection pre-training {metrics['seconds']['pretrain']:.0f} s, "
           if "pretrain" in metrics["seconds"] else "")
        + "training " + ("kept from an earlier run" if metrics["training_kept"]
                         else f"{metrics['seconds']['train']:.0f} s"),
        f"  metrics:  {metrics['paths']['metrics']}",
        f"  pictures: {metrics['paths']['visualizations']} ({len(metrics['pictures'])} PNGs)",
        f"  model:    {metrics['paths']['weights']}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    seconds = {}
    out = os.path.abspath(args.output)
    train_dir, pretrain_dir = os.path.join(out, "train"), os.path.join(out, "pretrain")
    tokenizer = os.path.join(toy_shapes_root(), "tokenizer")
    for folder in (train_dir, pretrain_dir):
        if args.fresh and os.path.isdir(folder):
            shutil.rmtree(folder)

    _step(1, "toy dataset")
    _run(["tools/make_toy_dataset.py", "--num-train", str(args.num_train),
          "--num-val", str(args.num_val), "--num-novel", str(args.num_novel)])
    _step(2, "tokenizer")
    _run(["tools/train_toy_tokenizer.py"])
    seconds["setup"] = time.perf_counter() - start

    weights = os.path.join(train_dir, "model_final.pth")
    kept = os.path.isfile(weights)
    start_from = []
    if args.pretrain_iters and not kept:   # a kept training needs no start any more
        _step(3, f"detection pre-training: {args.pretrain_config}, {args.pretrain_iters} "
                 f"iterations (a finished run in {pretrain_dir} is kept)")
        t = time.perf_counter()
        _run(["tools/train_net.py", "--config-file", args.pretrain_config, "--resume",
              "MODEL.TEXT_ENCODER.TOKENIZER", tokenizer,
              *pretrain_opts(args.opts, args.pretrain_iters, pretrain_dir)])
        seconds["pretrain"] = time.perf_counter() - t
        image_encoder = os.path.join(pretrain_dir, "image_encoder.pth")
        save_weights_subset(os.path.join(pretrain_dir, "model_final.pth"), image_encoder,
                            PRETRAINED_PARTS)
        # before the user's overrides, so that a MODEL.WEIGHTS among them still wins
        start_from = ["MODEL.WEIGHTS", image_encoder]
    _step(3, f"training {args.config_file} (a finished run in {train_dir} is kept)")
    t = time.perf_counter()
    # DATASETS.TEST empty: evaluation happens in step 4, with a vocabulary per dataset
    _run(["tools/train_net.py", "--config-file", args.config_file, "--resume",
          "MODEL.TEXT_ENCODER.TOKENIZER", tokenizer, "OUTPUT_DIR", train_dir,
          "DATASETS.TEST", "()", *start_from, *args.opts])
    seconds["train"] = time.perf_counter() - t

    setup_logger(name="detectron2")
    setup_logger(name="unip_v2")
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, args.config_file))
    cfg.merge_from_list(["MODEL.TEXT_ENCODER.TOKENIZER", tokenizer, "OUTPUT_DIR", out,
                         *args.opts])
    cfg.DATASETS.TEST = (*cfg.DATASETS.TEST, NOVEL)
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()

    _step(4, "evaluation of every task on its val set, and of detection on toy_shapes_novel")
    t = time.perf_counter()
    results = evaluate(cfg, cfg.MODEL.WEIGHTS)
    seconds["evaluate"] = time.perf_counter() - t

    _step(5, "pictures")
    t = time.perf_counter()
    vis_dir = os.path.join(out, "visualizations")
    pictures = draw_pictures(cfg, vis_dir, args.num_pictures, args.confidence_threshold)
    seconds["pictures"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start

    metrics = {
        "config": args.config_file, "overrides": args.opts,
        "targets": target_rows(results, cfg.MODEL.TASKS),
        "novel_categories": list(MetadataCatalog.get(NOVEL).novel_thing_classes),
        "results": results, "seconds": seconds, "training_kept": kept, "pictures": pictures,
        "paths": {"metrics": os.path.join(out, "metrics.json"), "visualizations": vis_dir,
                  "weights": cfg.MODEL.WEIGHTS, "summary": os.path.join(out, "summary.txt")},
    }
    with open(metrics["paths"]["metrics"], "w") as f:
        json.dump(_json_safe(metrics), f, indent=2, allow_nan=False)
    text = summary_text(metrics)
    with open(metrics["paths"]["summary"], "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
