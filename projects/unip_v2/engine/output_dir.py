"""A new training run must not mix with another run's results in its OUTPUT_DIR: detectron2
would overwrite `model_final.pth` and append to `metrics.json` without a word."""
import os
import shutil
import time
from typing import List

__all__ = ["RunFolderInUseError", "previous_run_files", "prepare_output_dir"]


class RunFolderInUseError(RuntimeError):
    """OUTPUT_DIR holds another run's results and neither --resume nor --overwrite was given."""


def previous_run_files(output_dir: str) -> List[str]:
    """Names of the files in output_dir that a training run leaves: checkpoints, their
    pointer, metrics and TensorBoard events (log.txt and config.yaml do not count: detectron2
    writes them before training starts, and an evaluation writes them too)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(f for f in os.listdir(output_dir)
                  if f in ("last_checkpoint", "metrics.json") or f.endswith(".pth")
                  or f.startswith("events.out.tfevents"))


def prepare_output_dir(output_dir: str, *, resume: bool, overwrite: bool) -> None:
    """Check OUTPUT_DIR before a training run starts.

    - resume: the folder's run continues (nothing to do here);
    - overwrite: the previous run's files move into `output_dir/overwritten-<time>/` (kept,
      not deleted: a mistaken flag loses nothing);
    - neither, and the folder holds a run: RunFolderInUseError saying what to pass.
    """
    found = previous_run_files(output_dir)
    if resume or not found:
        return
    if not overwrite:
        raise RunFolderInUseError(
            f"OUTPUT_DIR {output_dir} holds another run's results ({', '.join(found[:6])}"
            f"{', ...' if len(found) > 6 else ''}). Pass --resume to continue that run, "
            f"--overwrite to start a new one there (the old files move to an "
            f"'overwritten-<time>' subfolder), or choose another OUTPUT_DIR.")
    backup = os.path.join(output_dir, time.strftime("overwritten-%Y%m%d-%H%M%S"))
    os.makedirs(backup, exist_ok=False)
    for name in found:
        shutil.move(os.path.join(output_dir, name), os.path.join(backup, name))
    print(f"[train_net] --overwrite: moved {len(found)} file(s) of the previous run to {backup}")
