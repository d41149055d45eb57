"""Layers shared by the image encoder and the decoders."""
from .ms_deform_attn import check_ms_deform_attn_inputs, ms_deform_attn, ms_deform_attn_reference
from .ms_deform_attn_backend import BACKENDS, resolve_backend
from .ms_deform_attn_module import MSDeformAttn
from .mlp import MLP

__all__ = [
    "BACKENDS",
    "MLP",
    "MSDeformAttn",
    "check_ms_deform_attn_inputs",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "resolve_backend",
]
