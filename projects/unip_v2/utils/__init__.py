"""Small helpers shared across unip-v2 (no model code lives here)."""
from .detectron2_compat import detectron2_has_compiled_ops, ensure_detectron2_importable

__all__ = ["detectron2_has_compiled_ops", "ensure_detectron2_importable"]
