"""The demo's inputs, outputs and drawing loop; tools/demo.py is its command line.

    files, unmatched = expand_inputs(["photos/", "clips/*.mp4"])
    outputs = plan_outputs(files, "output/demo")      # ValueError: unsafe or ambiguous
    summary = draw_inputs(predictor, files, outputs, score_threshold=0.25)
    summary.line(), summary.exit_status(len(unmatched))

Every input gets its own output: its path relative to the folder all inputs share, mirrored
under the output folder (subfolders created), as ``.png`` for an image and ``.mp4`` for a
video. Nothing is drawn when two inputs would share an output or an output would be an
input file. An unreadable input is skipped with a warning; a drawing that cannot be written
is counted with a warning and the remaining inputs are still drawn.
"""
import glob
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import tqdm

from ..data.image_io import try_read_image
from ..utils.visualization import draw_predictions, instances_to_draw

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "DemoSummary",
    "OutputWriteError",
    "VIDEO_EXTENSIONS",
    "draw_image",
    "draw_inputs",
    "draw_video",
    "expand_inputs",
    "is_video",
    "plan_outputs",
    "plan_single_output",
    "write_image",
]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
# The demo's exit statuses: every input drawn and written; some input skipped or not
# written (the others drawn); refused before drawing anything (argparse's usage status).
EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
logger = logging.getLogger(__name__)


class OutputWriteError(OSError):
    """A drawing could not be written (the file named in the message)."""


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def _same_file_key(path: str) -> str:
    """One key per file however it is spelt (relative, through symlinks, case on Windows)."""
    return os.path.normcase(os.path.realpath(path))


def expand_inputs(patterns: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(files in order, patterns that matched nothing). Folders give their files sorted
    (not recursing), globs their sorted matches; a file is kept once, however it is
    spelt."""
    files, unmatched, seen = [], [], set()
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
        for f in found:
            if _same_file_key(f) not in seen:
                seen.add(_same_file_key(f))
                files.append(f)
    return files, unmatched


def plan_outputs(files: Sequence[str], output_dir: str) -> List[str]:
    """The output path of each input file: OUTPUT/<its path relative to the inputs' common
    folder>, its extension replaced by .mp4 (videos) or .png (images).

    Raises a ValueError, before anything is drawn, if an output would be one of the input
    files (resolved through symlinks), or if two inputs would be drawn to one output (e.g.
    ``x.png`` and ``x.jpg`` of one folder).
    """
    absolute = [os.path.abspath(f) for f in files]
    if not absolute:
        return []
    root = os.path.commonpath([os.path.dirname(a) for a in absolute])
    outputs = [os.path.join(output_dir, os.path.splitext(os.path.relpath(a, root))[0] +
                            (".mp4" if is_video(a) else ".png")) for a in absolute]
    inputs = {_same_file_key(f): f for f in files}
    planned, problems = {}, []
    for path, out in zip(files, outputs):
        key = _same_file_key(out)
        if key in inputs:
            problems.append(f"the drawing of {path} would overwrite the input {inputs[key]}")
        elif key in planned:
            problems.append(f"{planned[key]} and {path} would both be drawn to {out}")
        planned.setdefault(key, path)
    if problems:
        raise ValueError(f"refusing to draw into --output {output_dir}: " + "; ".join(problems) +
                         ". Choose an --output folder apart from the inputs, or rename inputs "
                         "that differ only in their extension")
    return outputs


def plan_single_output(files: Sequence[str], output_dir: str, name: str) -> str:
    """OUTPUT/name, one picture for all inputs (e.g. the retrieval ranking); a ValueError if
    it would overwrite one of the input files."""
    out = os.path.join(output_dir, name)
    clash = [f for f in files if _same_file_key(f) == _same_file_key(out)]
    if clash:
        raise ValueError(f"refusing to draw into --output {output_dir}: {out} would overwrite "
                         f"the input {clash[0]}. Choose an --output folder apart from the inputs")
    return out


def _make_parent(out: str) -> None:
    try:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    except OSError as e:
        raise OutputWriteError(f"cannot create the folder of {out}: {e}") from None


def write_image(out: str, image_bgr: np.ndarray) -> None:
    """cv2.imwrite into ``out`` (its folder created), an OutputWriteError if it fails."""
    _make_parent(out)
    try:
        ok = cv2.imwrite(out, image_bgr)
    except cv2.error as e:
        raise OutputWriteError(f"cv2.imwrite failed on {out}: {e}") from None
    # cv2.imwrite reports most failures (unwritable folder, a folder in the way) only by
    # returning False
    if not ok:
        raise OutputWriteError(f"cv2.imwrite could not write {out} (folder not writable, or "
                               f"something else in the way?)")


def draw_image(predictor, path: str, out: str, score_threshold: float) -> bool:
    """Draw one image file into ``out``. False (warned) if the image cannot be read;
    OutputWriteError if the drawing cannot be written."""
    image, error = try_read_image(path, format="BGR")
    if image is None:
        logger.warning(f"skipping {path}: not a readable image ({error})")
        return False
    instances = predictor(image)["instances"]
    drawn = draw_predictions(image[:, :, ::-1], instances, predictor.class_names,
                             score_threshold)
    write_image(out, np.ascontiguousarray(drawn[:, :, ::-1]))
    kept = len(instances_to_draw(instances, score_threshold))
    logger.info(f"{path}: {kept} of {len(instances)} predictions drawn -> {out}")
    return True


def _open_video_writer(out: str, fps: float, size_wh: Tuple[int, int]) -> cv2.VideoWriter:
    _make_parent(out)
    writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, size_wh)
    # cv2.VideoWriter never raises: an unwritable path gives a writer that drops every frame
    if not writer.isOpened():
        writer.release()
        raise OutputWriteError(f"cv2.VideoWriter could not open {out} (folder not writable, "
                               f"or something else in the way?)")
    return writer


def draw_video(predictor, path: str, out: str, score_threshold: float) -> bool:
    """Draw every frame of a video into the .mp4 ``out``. False (warned) if the video
    cannot be read; OutputWriteError if the drawing cannot be written (the remaining frames
    are then not drawn)."""
    video = cv2.VideoCapture(path)
    ok, frame = video.read()
    if not ok:
        video.release()
        logger.warning(f"skipping {path}: not a readable video")
        return False
    fps = video.get(cv2.CAP_PROP_FPS) or 10.0
    total = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    writer: Optional[cv2.VideoWriter] = None
    frames = 0
    try:
        with tqdm.tqdm(total=total, desc=os.path.basename(path), unit="frame",
                       disable=None, file=sys.stderr) as bar:
            while ok:
                instances = predictor(frame)["instances"]
                drawn = draw_predictions(frame[:, :, ::-1], instances, predictor.class_names,
                                         score_threshold)
                if writer is None:   # drawn frames may be enlarged: size the video after them
                    writer = _open_video_writer(out, fps, (drawn.shape[1], drawn.shape[0]))
                writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
                frames += 1
                bar.update(1)
                ok, frame = video.read()
    finally:
        video.release()
        if writer is not None:
            writer.release()
    # writer.write returns nothing: a file that is missing or empty at the end is the only
    # sign that the frames were lost
    if not os.path.isfile(out) or os.path.getsize(out) == 0:
        raise OutputWriteError(f"{out} is missing or empty after writing {frames} frames")
    logger.info(f"{path}: {frames} frames drawn -> {out}")
    return True


@dataclass
class DemoSummary:
    """Inputs by outcome: drawn and written, unreadable (skipped), drawing not written."""

    drawn: List[str] = field(default_factory=list)
    unreadable: List[str] = field(default_factory=list)
    failed_writes: List[str] = field(default_factory=list)

    def line(self) -> str:
        """"N drawn, M unreadable skipped, K failed writes", naming the inputs of the last
        two."""
        text = (f"{len(self.drawn)} drawn, {len(self.unreadable)} unreadable skipped, "
                f"{len(self.failed_writes)} failed writes")
        for what, paths in (("unreadable", self.unreadable),
                            ("not written", self.failed_writes)):
            if paths:
                text += f"; {what}: {', '.join(paths)}"
        return text

    def exit_status(self, num_unmatched: int = 0) -> int:
        """EXIT_OK when every input was read, drawn and written (and no --input pattern
        matched nothing), else EXIT_FAILED."""
        failed = self.unreadable or self.failed_writes or num_unmatched or not self.drawn
        return EXIT_FAILED if failed else EXIT_OK


def draw_inputs(predictor, files: Sequence[str], outputs: Sequence[str],
                score_threshold: float) -> DemoSummary:
    """Draw each file (video or image, by its extension) into its output (from
    :func:`plan_outputs`); an input that cannot be read or written is counted and warned
    about, and the others are still drawn."""
    if len(files) != len(outputs):
        raise ValueError(f"draw_inputs: {len(files)} files but {len(outputs)} outputs")
    summary = DemoSummary()
    for path, out in zip(files, outputs):
        draw = draw_video if is_video(path) else draw_image
        try:
            drawn = draw(predictor, path, out, score_threshold)
        except OutputWriteError as e:
            logger.warning(f"could not write the drawing of {path}: {e}")
            summary.failed_writes.append(path)
            continue
        (summary.drawn if drawn else summary.unreadable).append(path)
    return summary
