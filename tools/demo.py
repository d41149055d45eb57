#!/usr/bin/env python
"""Draw a unip-v2 model's predictions on images or videos (detectron2's demo, on the CPU).

    python tools/demo.py --config-file configs/toy/uni_perceiver_v2_R50_tiny.yaml \
        --input datasets/toy_shapes/novel/00000*.png --output output/demo \
        --vocabulary "red circle, red square, blue circle, green triangle" \
        --opts MODEL.WEIGHTS output/toy_uni_perceiver_v2/model_final.pth

--input takes files, folders (their files, sorted) and globs; a video file (.mp4, .avi,
.mov, .mkv, .webm) is drawn frame by frame into a video. --vocabulary replaces the category
names without retraining (the model encodes them once). Inputs that cannot be read (not an
image, truncated, missing) are skipped with a warning and counted; the exit status is 0 when
at least one input was drawn, 1 when none was.
"""
import argparse
import glob
import logging
import os
import sys
from typing import List, Tuple

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

import cv2
import tqdm

from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger

from unip_v2 import add_unip_v2_config
from unip_v2.data.image_io import try_read_image
from unip_v2.engine import Predictor, parse_vocabulary
from unip_v2.utils.visualization import draw_predictions, instances_to_draw

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
logger = logging.getLogger("unip_v2.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config file")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image or video files, folders or globs")
    parser.add_argument("--output", required=True,
                        help="folder for the drawn pictures (created if missing)")
    parser.add_argument("--confidence-threshold", type=float, default=0.25,
                        help="draw predictions scoring at least this (0-1; scores are "
                             "objectness x class probability, so they run low)")
    parser.add_argument("--vocabulary", default=None,
                        help='category names replacing the dataset\'s, e.g. "red square, '
                             'blue circle"')
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
    if args.vocabulary is not None:
        try:
            args.vocabulary = parse_vocabulary(args.vocabulary)
        except ValueError as e:
            parser.error(str(e))
    return args


def expand_inputs(patterns: List[str]) -> Tuple[List[str], List[str]]:
    """(files in order, patterns that matched nothing). Folders give their files sorted
    (not recursing), globs their sorted matches; a path is kept once."""
    files, unmatched = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                           if os.path.isfile(os.path.join(pattern, f)))
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
        if not found:
            unmatched.append(pattern)
        files += [f for f in found if f not in files]
    return files, unmatched


def setup_cfg(args):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def _output_path(output_dir: str, path: str, ext: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(output_dir, stem + ext)


def draw_image(predictor: Predictor, path: str, output_dir: str, threshold: float):
    """Draw one image file; returns the written path, or None (warned) if unreadable."""
    image, error = try_read_image(path, format="BGR")
    if image is None:
        logger.warning(f"skipping {path}: not a readable image ({error})")
        return None
    instances = predictor(image)["instances"]
    drawn = draw_predictions(image[:, :, ::-1], instances, predictor.class_names, threshold)
    out = _output_path(output_dir, path, ".png")
    if not cv2.imwrite(out, drawn[:, :, ::-1]):
        raise OSError(f"could not write {out}")
    kept = len(instances_to_draw(instances, threshold))
    logger.info(f"{path}: {kept} of {len(instances)} predictions drawn -> {out}")
    return out


def draw_video(predictor: Predictor, path: str, output_dir: str, threshold: float):
    """Draw every frame of a video into OUTPUT/<name>.mp4; None (warned) if unreadable."""
    video = cv2.VideoCapture(path)
    ok, frame = video.read()
    if not ok:
        video.release()
        logger.warning(f"skipping {path}: not a readable video")
        return None
    fps = video.get(cv2.CAP_PROP_FPS) or 10.0
    total = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    out = _output_path(output_dir, path, ".mp4")
    writer, frames = None, 0
    with tqdm.tqdm(total=total, desc=os.path.basename(path), unit="frame",
                   disable=None, file=sys.stderr) as bar:
        while ok:
            instances = predictor(frame)["instances"]
            drawn = draw_predictions(frame[:, :, ::-1], instances, predictor.class_names,
                                     threshold)
            if writer is None:   # drawn frames may be enlarged: size the video after them
                writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                         (drawn.shape[1], drawn.shape[0]))
            writer.write(drawn[:, :, ::-1])
            frames += 1
            bar.update(1)
            ok, frame = video.read()
    video.release()
    writer.release()
    logger.info(f"{path}: {frames} frames drawn -> {out}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="unip_v2")
    setup_logger(name="fvcore")
    files, unmatched = expand_inputs(args.input)
    for pattern in unmatched:
        logger.warning(f"--input {pattern}: no such file, folder or glob match")
    if not files:
        logger.error("nothing to draw: no input file found")
        return 1
    cfg = setup_cfg(args)
    predictor = Predictor(cfg, vocabulary=args.vocabulary)
    logger.info(f"vocabulary ({len(predictor.class_names)}): {', '.join(predictor.class_names)}")
    os.makedirs(args.output, exist_ok=True)
    written, skipped = [], []
    for path in files:
        draw = draw_video if path.lower().endswith(VIDEO_EXTENSIONS) else draw_image
        out = draw(predictor, path, args.output, args.confidence_threshold)
        (written if out else skipped).append(out or path)
    logger.info(f"wrote {len(written)} file(s) to {args.output}; skipped {len(skipped)} "
                f"unreadable input(s)" + (f": {', '.join(skipped)}" if skipped else "") +
                (f"; {len(unmatched)} pattern(s) matched nothing" if unmatched else ""))
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
