"""`Checkpointer`: detectron2's DetectionCheckpointer with writes that cannot be torn, resume
that survives a damaged checkpoint, and weights that load without running code.

- **Atomic writes.** A checkpoint is written to a temporary file in the same folder, flushed
  to disk and renamed over its final name (a rename within one file system is atomic), and
  only then named in `last_checkpoint` (itself written the same way). A process killed
  mid-write leaves at most a `*.tmp` file, which resume ignores, and never a short `.pth`.
- **Verified resume.** `--resume` tries the checkpoint named in `last_checkpoint`, then the
  other `.pth` files of the folder from the newest iteration down; one that does not load
  (torn by a crash of an older version, truncated by a full disk, emptied) is skipped with a
  warning and the previous one is used. A run is finished when a checkpoint that loads says
  so (its iteration), not because a file called `model_final.pth` exists.
- **Safe loading.** `.pth` files load with `torch.load(weights_only=True)`; `.pkl` files
  (detectron2 / Caffe2 model zoo) through a restricted unpickler that accepts only tensors,
  arrays and containers (`unip_v2.utils.safe_pickle`).
"""
import logging
import os
import pickle
import re
import tempfile
import zipfile
from typing import Any, Dict, List, Optional, Sequence

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..utils.safe_pickle import load_pickle

__all__ = ["Checkpointer", "CheckpointLoadError", "check_finite_weights", "save_weights_subset"]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
_ITERATION_IN_NAME = re.compile(r"_(\d+)\.pth$")
# what a damaged or foreign checkpoint file raises while it is read
_READ_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError,
                pickle.UnpicklingError, zipfile.BadZipFile)


class CheckpointLoadError(RuntimeError):
    """No checkpoint of a folder could be read."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()   # what open() would give a new file


def _atomic_write(path: str, write) -> None:
    """Call write(file object) on a temporary file next to `path`, flush it to disk, rename it
    to `path`; the temporary file is removed if anything fails."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, _FILE_MODE)   # mkstemp makes 0600 files
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class Checkpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves, resume that falls back past unreadable
    checkpoints, and weights-only loading (see the module docstring)."""

    # ------------------------------------------------------------------------- saving
    def save(self, name: str, **kwargs: Any) -> None:
        """Write `<save_dir>/<name>.pth` atomically (model, checkpointables, kwargs), then
        name it in last_checkpoint."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        _atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        _atomic_write(os.path.join(self.save_dir, LAST_CHECKPOINT),
                      lambda f: f.write(last_filename_basename.encode()))

    # ------------------------------------------------------------------------ loading
    def _load_file(self, filename: str) -> Dict[str, Any]:
        """A checkpoint as a dict with "model", read without executing code: `.pkl` through
        the restricted unpickler (detectron2's model-zoo and Caffe2 layouts, as detectron2
        reads them), anything else with torch.load(weights_only=True)."""
        if filename.endswith(".pkl"):
            data = load_pickle(filename)
            if not isinstance(data, dict):
                raise ValueError(f"{filename} holds a {type(data).__name__}, not a dict")
            if "model" in data and "__author__" in data:
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            if "blobs" in data:  # Caffe2 detection models keep their weights under "blobs"
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):
            raise NotImplementedError(f"{filename}: pycls .pyth files are not supported; "
                                      f"save the model's state dict as a .pth file")
        try:
            loaded = torch.load(filename, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(
                f"{filename} holds Python objects besides tensors and containers, and is not "
                f"loaded (weights_only): re-save its state dict with torch.save. ({e})") from e
        if not isinstance(loaded, dict):
            raise ValueError(f"{filename} holds a {type(loaded).__name__}, not a dict")
        return loaded if "model" in loaded else {"model": loaded}

    def checkpoint_candidates(self) -> List[str]:
        """The folder's checkpoints, most recent first: the one last_checkpoint names, then
        the other .pth files by the iteration in their names (model_final first, as it is
        written last), then by modification time. Temporary files are not candidates."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        files = [f for f in os.listdir(self.save_dir)
                 if f.endswith(".pth") and os.path.isfile(os.path.join(self.save_dir, f))]

        def recency(name):
            m = _ITERATION_IN_NAME.search(name)
            final = name.endswith("_final.pth")
            return (final, int(m.group(1)) if m else -1,
                    os.path.getmtime(os.path.join(self.save_dir, name)))

        files.sort(key=recency, reverse=True)
        named = self._named_last_checkpoint()
        if named in files:
            files.remove(named)
            files.insert(0, named)
        return [os.path.join(self.save_dir, f) for f in files]

    def _named_last_checkpoint(self) -> Optional[str]:
        try:
            with open(os.path.join(self.save_dir, LAST_CHECKPOINT)) as f:
                name = f.read().strip()
        except OSError:
            return None
        if not name:
            self.logger.warning(f"{os.path.join(self.save_dir, LAST_CHECKPOINT)} is empty")
            return None
        return name

    def has_checkpoint(self) -> bool:
        return bool(self.checkpoint_candidates())

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """With resume and checkpoints in save_dir: load the newest that reads (model and
        every checkpointable), warning about each one skipped; CheckpointLoadError if none
        reads. Otherwise: load the model from `path` (MODEL.WEIGHTS) only."""
        candidates = self.checkpoint_candidates() if resume else []
        if not candidates:
            return self.load(path, checkpointables=[])
        failures = []
        for candidate in candidates:
            try:
                checkpoint = self._load_file(candidate)
            except _READ_ERRORS as e:
                failures.append(f"{candidate}: {type(e).__name__}: {e}")
                self.logger.warning(f"Cannot read checkpoint {candidate} "
                                    f"({type(e).__name__}: {e}); trying the previous one")
                continue
            if failures:
                self.logger.warning(f"Resuming from {candidate} after skipping "
                                    f"{len(failures)} unreadable checkpoint(s)")
            return self._apply(candidate, checkpoint)
        raise CheckpointLoadError(
            f"--resume: none of the {len(candidates)} checkpoint(s) in {self.save_dir} can be "
            f"read:\n  " + "\n  ".join(failures) + "\nMove them away to start over.")

    def _apply(self, path: str, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
        """fvcore's load() from an already-read checkpoint: model, then checkpointables."""
        self.logger.info(f"[Checkpointer] Loading from {path} ...")
        incompatible = self._load_model(checkpoint)
        if incompatible is not None:
            self._log_incompatible_keys(incompatible)
        for key, obj in self.checkpointables.items():
            if key in checkpoint:
                self.logger.info(f"Loading {key} from {path} ...")
                obj.load_state_dict(checkpoint.pop(key))
        return checkpoint


def save_weights_subset(src: str, dst: str, prefixes: Sequence[str]) -> int:
    """Write to `dst` (atomically, as {"model": ...}) the weights of checkpoint `src` whose
    names start with one of `prefixes`, e.g. ("image_encoder.",) to start another model from
    a trained image encoder only. Returns how many were written; a ValueError when none
    match (a wrong prefix would otherwise start the model from scratch without a word)."""
    weights = Checkpointer(torch.nn.Module())._load_file(src)["model"]
    kept = {k: v for k, v in weights.items() if k.startswith(tuple(prefixes))}
    if not kept:
        raise ValueError(f"no weight of {src} starts with {list(prefixes)} (its names start "
                         f"with {sorted({k.split('.')[0] for k in weights})})")
    _atomic_write(dst, lambda f: torch.save({"model": kept}, f))
    return len(kept)


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    """Raise ValueError naming the parameters and buffers of `model` that hold NaN or inf
    (loaded from `source`): such a model predicts nothing meaningful, and detectron2 would
    fail later with a message about boxes."""
    bad = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{len(bad)} parameter(s)/buffer(s) loaded from {source} hold NaN or "
                         f"inf values, e.g. {', '.join(bad[:5])}: the checkpoint is damaged "
                         f"or comes from a diverged run")
