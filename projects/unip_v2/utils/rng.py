"""The process's random number generators as data: saved into checkpoints, restored on resume,
and forked around work that must not move them (data mapping, evaluation).

Three generators drive training: Python's `random`, NumPy's global `np.random` (detectron2's
augmentations draw from it) and torch's default CPU generator (denoising noise, point
sampling, MoE noise), plus one torch generator per CUDA device when CUDA is initialised.
Their states are stored as tensors, ints and tuples only, so a checkpoint holding them still
loads with `torch.load(..., weights_only=True)`.
"""
import contextlib
import random
from typing import Any, Dict, Iterator

import numpy as np
import torch

__all__ = ["get_rng_state", "set_rng_state", "fork_rng", "derived_seed"]


def get_rng_state() -> Dict[str, Any]:
    """The state of every generator named in the module docstring."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what get_rng_state returned (CUDA states only where CUDA is initialised here
    with the same number of devices; otherwise they are left as they are)."""
    version, internal, gauss = state["python"]
    # a checkpoint may turn the tuples into lists
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.is_initialized() \
            and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def fork_rng(seed=None) -> Iterator[None]:
    """Run a block with its own random numbers and leave the generators as they were.

    With `seed` (an int), Python's, NumPy's and torch's CPU generators are seeded with it for
    the block, so the block's draws depend on the seed alone; without, the block continues
    from the current states. Either way the states after the block equal those before it.
    CUDA generators are not forked: the blocks this serves (mapping a sample on the CPU,
    evaluating a model in eval mode) draw no CUDA random numbers. It runs once per training
    sample, so the states stay as the generators return them (get_rng_state converts them
    for a checkpoint).
    """
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed)
            torch.random.default_generator.manual_seed(seed)
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def derived_seed(*parts: int) -> int:
    """A 31-bit seed that is a fixed function of the integers `parts` (e.g. a run's seed and
    a sample's position), well spread even for neighbouring inputs (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)
