"""unip-v2: Uni-Perceiver v2 as a Detectron2 extension project.

Images become general region proposals plus global tokens, texts become RoBERTa token
features, and a shared unified decoder turns either into representations; every task is
"pick the target whose representation is most similar to the input's". The package plugs
into detectron2 the usual way:

* ``add_unip_v2_config(cfg)`` adds the project's config keys to ``get_cfg()``;
* importing ``unip_v2`` registers its components in detectron2's registries;
* ``unip_v2.layers`` holds the multi-scale deformable attention op (compiled kernels in
  ``unip_v2._C``, pure-PyTorch reference as fallback).

detectron2 may be installed without its own compiled ops (``detectron2._C``) on the
machines this project targets; importing ``unip_v2`` first makes such a detectron2
importable (see ``unip_v2.utils.detectron2_compat``). Import ``unip_v2`` before
``detectron2.layers``/``detectron2.modeling`` in entry points.
"""
# Must run before anything below imports detectron2 (its layers import detectron2._C).
from .utils.detectron2_compat import ensure_detectron2_importable

ensure_detectron2_importable()

from .config import add_unip_v2_config  # noqa: E402

# Imported for their registry side effects (and as public subpackages).
from . import layers  # noqa: E402,F401
from . import modeling  # noqa: E402,F401
from . import data  # noqa: E402,F401
from . import evaluation  # noqa: E402,F401

__all__ = ["add_unip_v2_config"]
__version__ = "0.1.0"
