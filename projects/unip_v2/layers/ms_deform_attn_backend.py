"""Which implementation of multi-scale deformable attention runs.

Backends:
    "reference"  pure PyTorch (grid_sample per level); any device, always available.
    "cpu"        the compiled C++ kernel in `unip_v2._C` (CPU tensors).
    "cuda"       the compiled CUDA kernel in `unip_v2._C` (CUDA tensors, if built with CUDA).
    "auto"       the compiled kernel for the tensors' device when it exists, else the
                 reference with a one-time warning that says why.

The choice comes from, first to last: the environment variable UNIP_V2_MSDA_BACKEND (a
process-wide override, handy for benchmarks and debugging), then the caller's `backend`
argument (the config key MODEL.MS_DEFORM_ATTN.BACKEND reaches layers this way), then "auto".
Asking for a compiled backend that cannot serve the tensors is an error, never a silent
fallback.
"""
import logging
import os
from typing import Optional

import torch

__all__ = ["BACKENDS", "ENV_VAR", "compiled_ops", "resolve_backend"]

BACKENDS = ("auto", "reference", "cpu", "cuda")
ENV_VAR = "UNIP_V2_MSDA_BACKEND"

logger = logging.getLogger(__name__)

try:
    from unip_v2 import _C as _compiled
    _compiled_error: Optional[BaseException] = None
except ImportError as e:  # not built, or built against another torch
    _compiled = None
    _compiled_error = e

_warned = set()


def compiled_ops():
    """The `unip_v2._C` extension module, or None when it could not be imported."""
    return _compiled


def _has_compiled(device_type: str) -> bool:
    if _compiled is None:
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(_compiled.with_cuda())
    return False


def _missing_reason(device_type: str) -> str:
    if _compiled is None:
        return (f"unip_v2._C failed to import ({_compiled_error}); rebuild it with "
                "`make install` (or `pip install --no-build-isolation --use-pep517 -e .`)")
    if device_type == "cuda":
        return ("unip_v2._C was built without CUDA kernels; rebuild on a machine with nvcc "
                "(or with FORCE_CUDA=1)")
    return f"there is no compiled kernel for device type '{device_type}'"


def _warn_once(device_type: str) -> None:
    if device_type in _warned:
        return
    _warned.add(device_type)
    logger.warning(
        "ms_deform_attn: no compiled backend for %s tensors, using the pure-PyTorch reference "
        "(slow, memory-heavy): %s.", device_type, _missing_reason(device_type))


def resolve_backend(requested: Optional[str], device: torch.device) -> str:
    """Return the backend ("reference", "cpu" or "cuda") that will run on `device`.

    Args:
        requested: one of BACKENDS or None (= "auto"); overridden by $UNIP_V2_MSDA_BACKEND.
        device: device of the op's tensors.
    """
    env = os.environ.get(ENV_VAR, "").strip().lower()
    name = env or (requested or "auto").lower()
    source = f"${ENV_VAR}" if env else "backend argument"
    if name not in BACKENDS:
        raise ValueError(f"ms_deform_attn: unknown backend {name!r} from {source}; "
                         f"choose one of {BACKENDS}")
    device_type = device.type
    if name == "auto":
        if _has_compiled(device_type):
            return device_type
        _warn_once(device_type)
        return "reference"
    if name == "reference":
        return name
    if name != device_type:
        raise ValueError(f"ms_deform_attn: backend {name!r} (from {source}) cannot run on "
                         f"{device_type} tensors; use 'auto' or 'reference'")
    if not _has_compiled(device_type):
        raise RuntimeError(f"ms_deform_attn: backend {name!r} requested by {source} is not "
                           f"available: {_missing_reason(device_type)}")
    return name
