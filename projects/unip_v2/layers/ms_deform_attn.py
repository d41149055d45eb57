"""Multi-scale deformable attention: the functional op, its input checks and its reference.

Shapes (N batch, S value positions over all levels, M heads, D channels per head, L levels,
Lq queries, P points per head and level):
    value               (N, S, M, D)
    spatial_shapes      (L, 2) int64, (H_l, W_l) per level, finest first
    level_start_index   (L,) int64, offset of level l in S (exclusive cumsum of H_l * W_l)
    sampling_locations  (N, Lq, M, L, P, 2), (x, y) normalised to [0, 1] on each level
    attention_weights   (N, Lq, M, L, P)
    output              (N, Lq, M * D)

output[n, q, m*D:(m+1)*D] = sum_{l,p} attention_weights[n,q,m,l,p] *
    bilinear(value_l[n, :, m, :], sampling_locations[n,q,m,l,p]),
where bilinear reads pixel (x * W_l - 0.5, y * H_l - 0.5) with zeros outside the map, exactly
`F.grid_sample(align_corners=False, padding_mode="zeros")` at `2 * loc - 1`. Locations that
fall wholly outside a map, and NaN or infinite locations, sample zeros and get zero gradient.
A level with H or W = 0 holds no positions: every location on it samples zero. Each term is
weight * sample in IEEE arithmetic, on every backend: an infinite weight gives +-inf on a
non-zero sample and NaN on a zero one (outside the map), a NaN weight gives NaN.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .ms_deform_attn_backend import compiled_ops, resolve_backend

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "check_ms_deform_attn_inputs"]


def _shape(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}"


def check_ms_deform_attn_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> List[Tuple[int, int]]:
    """Validate the op's inputs; raise ValueError / TypeError naming the tensor and its shape.

    Returns:
        the level sizes [(H_l, W_l), ...] as Python ints (read once, one host sync on GPU).
    """
    named = (("value", value, 4), ("spatial_shapes", spatial_shapes, 2),
             ("level_start_index", level_start_index, 1),
             ("sampling_locations", sampling_locations, 6),
             ("attention_weights", attention_weights, 5))
    for name, t, dim in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t)}")
        if t.dim() != dim:
            raise ValueError(f"ms_deform_attn: {name} must have {dim} dimensions, got {_shape(t)}")
    for name, t, _ in named:
        if t.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} ({_shape(t)}) is on {t.device} but value "
                             f"is on {value.device}")
        if not t.is_contiguous():
            raise ValueError(f"ms_deform_attn: {name} with {_shape(t)} and strides {t.stride()} "
                             "is not contiguous; call .contiguous() first")
    if not value.dtype.is_floating_point:
        raise TypeError(f"ms_deform_attn: value ({_shape(value)}) must be floating point, "
                        f"got {value.dtype}")
    for name, t in (("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if t.dtype != value.dtype:
            raise TypeError(f"ms_deform_attn: {name} ({_shape(t)}) is {t.dtype} but value is "
                            f"{value.dtype}; all three must share one floating dtype")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: {name} ({_shape(t)}) must be int64, got {t.dtype}")

    N, S, M, D = value.shape
    L = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be (L, 2), got "
                         f"{_shape(spatial_shapes)}")
    if level_start_index.shape[0] != L:
        raise ValueError(f"ms_deform_attn: level_start_index ({_shape(level_start_index)}) must "
                         f"have one entry per level of spatial_shapes ({_shape(spatial_shapes)})")
    n, Lq, m, l, P, two = sampling_locations.shape
    if (n, m, l, two) != (N, M, L, 2):
        raise ValueError(f"ms_deform_attn: sampling_locations must be (N={N}, Lq, M={M}, L={L}, "
                         f"P, 2) to match value ({_shape(value)}) and spatial_shapes, got "
                         f"{_shape(sampling_locations)}")
    if tuple(attention_weights.shape) != (N, Lq, M, L, P):
        raise ValueError(f"ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = "
                         f"{(N, Lq, M, L, P)}, got {_shape(attention_weights)}")

    shapes = [tuple(hw) for hw in spatial_shapes.tolist()]
    starts = level_start_index.tolist()
    total = 0
    for i, ((h, w), start) in enumerate(zip(shapes, starts)):
        if h < 0 or w < 0:
            raise ValueError(f"ms_deform_attn: spatial_shapes[{i}] = {(h, w)} is negative")
        if start != total:
            raise ValueError(f"ms_deform_attn: level_start_index = {starts} does not match "
                             f"spatial_shapes = {shapes}: level {i} should start at {total}")
        total += h * w
    if total != S:
        raise ValueError(f"ms_deform_attn: spatial_shapes = {shapes} hold {total} positions but "
                         f"value ({_shape(value)}) has S = {S}")
    return shapes


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    level_sizes: Optional[List[Tuple[int, int]]] = None,
) -> torch.Tensor:
    """Pure-PyTorch multi-scale deformable attention (the definition the kernels must match).

    One grid_sample per level, accumulated level by level. Shapes as in the module docstring;
    `level_sizes` lets a caller that already read spatial_shapes skip a host sync.
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    if level_sizes is None:
        level_sizes = [tuple(hw) for hw in spatial_shapes.tolist()]
    # (N, S, M, D) -> per level (N*M, D, H, W), the layout grid_sample reads.
    values = value.split([h * w for h, w in level_sizes], dim=1)
    # grid_sample coordinates; NaN goes far outside (zero sample, zero gradient) and the clamp
    # keeps infinities finite without changing anything: |g| > 2 is outside every map.
    grids = (2 * sampling_locations - 1).nan_to_num(nan=-3.0).clamp(-3.0, 3.0)
    grids = grids.transpose(1, 2).flatten(0, 1)  # (N*M, Lq, L, P, 2)
    weights = attention_weights.transpose(1, 2).flatten(0, 1)  # (N*M, Lq, L, P)
    out = value.new_zeros(N * M, D, Lq)
    for lvl, (h, w) in enumerate(level_sizes):
        if h * w == 0 or N * M * D * Lq * P == 0:
            # A level without positions: every location is outside it and samples zero, as
            # the compiled kernels do (grid_sample rejects an empty map). Still weight * 0, so
            # that an inf / NaN weight gives NaN like any other zero sample.
            sampled = value.new_zeros(N * M, D, Lq, P)
        else:
            v = values[lvl].permute(0, 2, 3, 1).reshape(N * M, D, h, w)
            sampled = F.grid_sample(v, grids[:, :, lvl], mode="bilinear", padding_mode="zeros",
                                    align_corners=False)  # (N*M, D, Lq, P)
        out = out + torch.einsum("bdqp,bqp->bdq", sampled, weights[:, :, lvl])
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


class _CompiledMSDeformAttn(torch.autograd.Function):
    """Autograd wrapper of the compiled kernels (forward and analytic backward)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights):
        ops = compiled_ops()
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights)
        return ops.ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                          sampling_locations, attention_weights)

    @staticmethod
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors)
        grad_value, grad_locations, grad_weights = _CompiledMSDeformAttnBackward.apply(
            grad_output.contiguous(), value, spatial_shapes, level_start_index,
            sampling_locations, attention_weights)
        return grad_value, None, None, grad_locations, grad_weights


class _CompiledMSDeformAttnBackward(torch.autograd.Function):
    """The compiled backward as a graph node of its own, whose backward raises.

    The kernels have no second derivative. `once_differentiable` is not enough: it hangs its
    error node on detached copies of the gradients, so a double backward that asks for the
    gradient of a first-order gradient with respect to value, locations or weights finds no
    path to them and gets "not used in the graph", or, with allow_unused / another path to the
    same input, a silent zero for this op's share. This node keeps value, locations, weights
    and grad_output as its inputs, so any such path reaches it and raises.
    """

    @staticmethod
    def forward(ctx, grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights):
        return tuple(compiled_ops().ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output))

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "ms_deform_attn: the compiled backends ('cpu', 'cuda') are differentiable once; "
            "double backward (a gradient of a gradient through this op) needs "
            "backend='reference' (MODEL.MS_DEFORM_ATTN.BACKEND or $UNIP_V2_MSDA_BACKEND)")


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Multi-scale deformable attention; differentiable in value, locations and weights.

    Args:
        value: (N, S, M, D). spatial_shapes: (L, 2) int64 (H, W). level_start_index: (L,)
            int64. sampling_locations: (N, Lq, M, L, P, 2), x first, in [0, 1].
            attention_weights: (N, Lq, M, L, P). All on one device, contiguous; value,
            locations and weights of one floating dtype.
        backend: "auto" (default), "reference", "cpu" or "cuda"; see ms_deform_attn_backend.
    Returns:
        (N, Lq, M * D) tensor of value's dtype.
    """
    level_sizes = check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index,
                                              sampling_locations, attention_weights)
    if resolve_backend(backend, value.device) == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index,
                                        sampling_locations, attention_weights, level_sizes)
    return _CompiledMSDeformAttn.apply(value, spatial_shapes, level_start_index,
                                       sampling_locations, attention_weights)
