#!/usr/bin/env python
"""Draw a unip-v2 model's predictions on images or videos (detectron2's demo, on the CPU).

    python tools/demo.py --config-file configs/toy/uni_perceiver_v2_R50_tiny.yaml \
        --input datasets/toy_shapes/novel/00000*.png --output output/demo \
        --vocabulary "red circle, red square, blue circle, green triangle" \
        --opts MODEL.WEIGHTS output/toy_uni_perceiver_v2/model_final.pth

--task (default detect) picks what is drawn, with a model that has that task (e.g.
configs/toy/multitask_R50_tiny.yaml):
  detect    boxes and masks named from --vocabulary (or the dataset's categories);
  classify  each image with its top-3 classes among --vocabulary (or the classification
            dataset's names);
  caption   each image with its generated caption;
  retrieve  --query "a red circle": the input images ranked for the text; the five best
            side by side in OUTPUT/retrieval.png, the whole ranking in the log.
classify, caption and retrieve take images (not videos), resized and centre-cropped to the
task's image size as in evaluation.

--input takes files, folders (their files, sorted) and globs; a video file (.mp4, .avi,
.mov, .mkv, .webm) is drawn frame by frame into a video. Each input is drawn to its path
relative to the folder all inputs share, mirrored under --output (a/x.png and b/x.png become
OUTPUT/a/x.png and OUTPUT/b/x.png; images as .png, videos as .mp4). --vocabulary replaces
the category names without retraining (the model encodes them once; a name longer than
MODEL.TEXT_ENCODER.CONTEXT_LENGTH tokens is an error, never cut). Inputs that cannot be read
(not an image, truncated, missing) are skipped with a warning and counted; a drawing that
cannot be written is counted with a warning, and the other inputs are still drawn. The last
line reads "N drawn, M unreadable skipped, K failed writes".

Exit status: 0 when every input was read, drawn and written; 1 when any input was
unreadable, any --input matched nothing, or any drawing could not be written (the others
are still drawn); 2 when nothing was drawn because the arguments were refused: bad options,
an output that would overwrite an input file or that two inputs would share, an --output
that cannot be created, a vocabulary the model cannot encode.
"""
import argparse
import logging
import os
import sys

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger

from unip_v2 import add_unip_v2_config
from unip_v2.engine import Predictor, TaskPredictor, parse_vocabulary
from unip_v2.engine.demo import (
    EXIT_FAILED,
    EXIT_REFUSED,
    draw_inputs,
    expand_inputs,
    is_video,
    plan_outputs,
    plan_single_output,
)
from unip_v2.engine.task_demo import (DEMO_TASKS, check_model_has_task, describe_images,
                                      retrieve_images)

logger = logging.getLogger("unip_v2.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="exit status: 0 every input read, drawn and written; 1 some input unreadable, "
               "some --input matching nothing, or some drawing not written (the others are "
               "still drawn; the last line counts them); 2 refused before drawing (bad "
               "options, an output that would overwrite an input or that two inputs would "
               "share, an --output that cannot be created, a vocabulary name longer than "
               "MODEL.TEXT_ENCODER.CONTEXT_LENGTH tokens)")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config file")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image or video files, folders or globs")
    parser.add_argument("--output", required=True,
                        help="folder for the drawn pictures (created if missing; never one of "
                             "the inputs: each input is drawn to its path relative to the "
                             "inputs' common folder, mirrored here)")
    parser.add_argument("--confidence-threshold", type=float, default=0.25,
                        help="draw predictions scoring at least this (0-1; scores are "
                             "objectness x class probability, so they run low)")
    parser.add_argument("--task", choices=sorted(DEMO_TASKS), default="detect",
                        help="what to draw (default detect): detections, the top-3 classes, "
                             "a caption, or the images ranked for --query")
    parser.add_argument("--vocabulary", default=None,
                        help='category names replacing the dataset\'s, e.g. "red square, '
                             'blue circle" (detect and classify)')
    parser.add_argument("--query", default=None,
                        help='the text the images are ranked for (retrieve), e.g. "a red '
                             'circle"')
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="KEY VALUE pairs overriding the config")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = get_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.confidence_threshold <= 1.0:
        parser.error(f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}")
    if len(args.opts) % 2:
        parser.error(f"--opts needs KEY VALUE pairs, got {len(args.opts)} items: {args.opts}")
    if args.task == "retrieve" and not (args.query or "").strip():
        parser.error('--task retrieve needs --query "text"')
    if args.query is not None and args.task != "retrieve":
        parser.error(f"--query is for --task retrieve, not --task {args.task}")
    if args.vocabulary is not None and args.task not in ("detect", "classify"):
        parser.error(f"--vocabulary is for --task detect and classify, not --task {args.task}")
    if args.vocabulary is not None:
        try:
            args.vocabulary = parse_vocabulary(args.vocabulary)
        except ValueError as e:
            parser.error(str(e))
    return args


def setup_cfg(args):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def main(argv=None) -> int:
    """Run the demo; returns the exit status of the module docstring."""
    args = parse_args(argv)
    setup_logger(name="unip_v2")
    setup_logger(name="fvcore")
    files, unmatched = expand_inputs(args.input)
    for pattern in unmatched:
        logger.warning(f"--input {pattern}: no such file, folder or glob match")
    if not files:
        logger.error("nothing to draw: no input file found")
        return EXIT_FAILED
    if args.task != "detect" and any(is_video(f) for f in files):
        logger.error(f"nothing drawn: --task {args.task} takes images, not videos: "
                     + ", ".join(f for f in files if is_video(f)))
        return EXIT_REFUSED
    try:
        # before the model: refuse at once
        outputs = (plan_outputs(files, args.output) if args.task != "retrieve" else
                   [plan_single_output(files, args.output, "retrieval.png")])
        if args.task == "detect":
            # e.g. a --vocabulary name too long for the text encoder
            predictor = Predictor(setup_cfg(args), vocabulary=args.vocabulary)
        else:
            predictor = TaskPredictor(setup_cfg(args))
            check_model_has_task(predictor.model, DEMO_TASKS[args.task])
            if args.vocabulary is not None:
                predictor.model.text_encoder.check_lengths(args.vocabulary,
                                                           what="category name")
                predictor.model.tasks["classification"].set_test_class_names(args.vocabulary)
        os.makedirs(args.output, exist_ok=True)
    except (ValueError, OSError) as e:
        logger.error(f"nothing drawn: {e}")
        return EXIT_REFUSED
    if args.task == "detect":
        logger.info(f"vocabulary ({len(predictor.class_names)}): "
                    f"{', '.join(predictor.class_names)}")
        summary = draw_inputs(predictor, files, outputs, args.confidence_threshold)
    elif args.task == "retrieve":
        try:
            _, summary = retrieve_images(predictor, files, args.query, outputs[0])
        except ValueError as e:   # a query longer than the text encoder takes
            logger.error(f"nothing drawn: {e}")
            return EXIT_REFUSED
    else:
        task = DEMO_TASKS[args.task]
        if task == "classification":
            names = predictor.model.tasks[task].test_class_names
            if not names:
                logger.error("nothing drawn: no class names: give --vocabulary, or a config "
                             "with a classification dataset in DATASETS.TEST")
                return EXIT_REFUSED
            logger.info(f"classes ({len(names)}): {', '.join(names)}")
        summary = describe_images(predictor, task, files, outputs)
    logger.info(summary.line() + (f"; {len(unmatched)} --input pattern(s) matched nothing"
                                  if unmatched else "") + f"; output folder {args.output}")
    return summary.exit_status(len(unmatched))

if __name__ == "__main__":
    sys.exit(main())
