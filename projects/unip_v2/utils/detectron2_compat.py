"""Make detectron2 importable when it was installed without its compiled ops.

On the machines this project targets, detectron2 0.6 comes from a source distribution
that lacks ``detectron2/layers/csrc``, so it is installed with an empty extension list
and ``detectron2._C`` does not exist. A few detectron2 modules import ``_C`` at module
import time (``layers/rotated_boxes.py``, ``layers/deform_conv.py``,
``layers/roi_align_rotated.py``), which would break ``import detectron2.layers`` and,
through it, nearly everything else. The ops behind ``_C`` (rotated boxes, deformable
convolution, the C++ fast COCO evaluation) are not used by unip-v2.

:func:`ensure_detectron2_importable` registers a placeholder ``detectron2._C`` that
imports fine and raises :class:`Detectron2OpsUnavailableError` naming the op as soon as
anything actually uses one. With a full detectron2 build (compiled ``_C`` present) it does
nothing, so a user's own detectron2 is used unchanged.

Notes for code that uses detectron2 on this stack:

* ``COCOEvaluator`` must be created with ``use_fast_impl=False``: the fast
  implementation is C++ code in ``_C``; the pure pycocotools path needs nothing compiled.
* detectron2 0.6 still uses ``np.bool`` / ``np.int`` / ``np.float`` in a few places that
  run at call time, not import time (empty polygons in ``structures/masks.py``, the
  semantic-segmentation and Pascal VOC evaluators). NumPy 1.24 removed those aliases.
  NumPy is deliberately not monkeypatched here: keep inputs off those paths (for
  instance, drop empty polygons before they reach detectron2) and test them.
"""
import importlib.machinery
import importlib.util
import sys
import types

__all__ = [
    "Detectron2OpsUnavailableError",
    "detectron2_has_compiled_ops",
    "ensure_detectron2_importable",
]

_MODULE = "detectron2._C"


class Detectron2OpsUnavailableError(NotImplementedError):
    """Raised when code uses an op of a detectron2 installed without ``detectron2._C``."""

    def __init__(self, op: str):
        self.op = op
        super().__init__(
            f"{_MODULE}.{op} is unavailable: this detectron2 was installed without its "
            "compiled ops (rotated boxes, deformable conv, fast COCO eval). unip-v2 does not "
            "need them; build detectron2 from source to use them."
        )


class _PlaceholderOps(types.ModuleType):
    """Stands in for ``detectron2._C``; every op lookup raises a clear error."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            # Keep Python's own protocol probes (copy, pickle, inspect, ...) working.
            raise AttributeError(name)
        raise Detectron2OpsUnavailableError(name)

    def __repr__(self) -> str:
        return f"<placeholder module '{_MODULE}' (detectron2 installed without compiled ops)>"


def _not_compiled() -> str:
    return "not compiled (detectron2 installed without detectron2._C)"


def _make_placeholder() -> types.ModuleType:
    module = _PlaceholderOps(_MODULE, "Placeholder for detectron2's missing compiled ops.")
    module.__spec__ = importlib.machinery.ModuleSpec(_MODULE, loader=None, origin="unip-v2 placeholder")
    module.__package__ = "detectron2"
    module.__unip_v2_placeholder__ = True
    # Informational functions, not ops: detectron2.utils.collect_env (which
    # engine.default_setup logs at every start) calls them when `_C` imports.
    module.get_compiler_version = _not_compiled
    module.get_cuda_version = _not_compiled
    module.has_cuda = lambda: False
    return module


def detectron2_has_compiled_ops() -> bool:
    """Whether the ``detectron2._C`` in use is a real compiled module (not the placeholder)."""
    ensure_detectron2_importable()
    return not getattr(sys.modules.get(_MODULE), "__unip_v2_placeholder__", False)


def ensure_detectron2_importable() -> None:
    """Register a placeholder ``detectron2._C`` if detectron2 has no compiled ops.

    Call this before anything imports ``detectron2.layers`` (``import unip_v2`` does).
    Does nothing when ``detectron2._C`` is already imported or a compiled one is installed.

    Raises:
        ImportError: detectron2 is not installed at all.
    """
    if _MODULE in sys.modules:
        return
    try:
        # Imports the `detectron2` package itself, whose __init__ does not touch `_C`.
        spec = importlib.util.find_spec(_MODULE)
    except ImportError as e:
        raise ImportError(
            "unip-v2 needs detectron2, which is not installed (or fails to import) here "
            f"({e}). Run `make install` (tools/install.sh) from the unip-v2 checkout, or "
            "install detectron2 from source."
        ) from e
    if spec is not None:
        return  # a real build: leave it alone
    placeholder = _make_placeholder()
    sys.modules[_MODULE] = placeholder
    setattr(sys.modules["detectron2"], "_C", placeholder)
