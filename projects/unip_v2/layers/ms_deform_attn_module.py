"""`MSDeformAttn`: the multi-scale deformable attention layer (Zhu et al., Deformable DETR).

Each query predicts, per head, level and point, a sampling offset and an attention weight;
the op reads the value maps at those locations (see ms_deform_attn.py). Used by the pixel
encoder (queries = the flattened maps themselves) and the proposal decoder (queries =
object queries with box reference points).
"""
import math
from typing import Optional

import torch
from torch import nn

from .ms_deform_attn import ms_deform_attn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with learned offsets and weights.

    Args:
        d_model: query / value width C; must be divisible by n_heads.
        n_levels: L, number of feature levels.
        n_heads: M.
        n_points: P, sampling points per head and level.
        backend: op backend, "auto" | "reference" | "cpu" | "cuda" (config key
            MODEL.MS_DEFORM_ATTN.BACKEND; $UNIP_V2_MSDA_BACKEND overrides it).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4, backend: str = "auto"):
        super().__init__()
        for name, size in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads),
                           ("n_points", n_points)):
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ValueError(f"MSDeformAttn: {name} must be a positive int, got {size!r}")
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model={d_model} is not divisible by "
                             f"n_heads={n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = (
            d_model, n_levels, n_heads, n_points)
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR initialisation: at start every head looks along its own direction.

        Offsets start at zero weight; the bias puts point p of head h at (p + 1) pixels along
        the direction of angle 2*pi*h/M, scaled so the larger of |cos|, |sin| is 1 (points sit
        on the square ring of radius p + 1). Attention starts uniform (zero weight and bias).
        """
        M, L, P = self.n_heads, self.n_levels, self.n_points
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(M, dtype=torch.float64) * (2.0 * math.pi / M)
        direction = torch.stack([angles.cos(), angles.sin()], -1)  # (M, 2)
        direction = direction / direction.abs().max(-1, keepdim=True).values
        scale = torch.arange(1, P + 1, dtype=torch.float64).view(1, 1, P, 1)
        bias = direction.view(M, 1, 1, 2) * scale  # (M, 1, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.expand(M, L, P, 2).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) points (x, y) in [0, 1], or (N, Lq, L, 4) boxes
                (cx, cy, w, h) in [0, 1]: points are then spread over the box.
            input_flatten: (N, S, C), the L maps flattened and concatenated.
            spatial_shapes: (L, 2) int64 (H, W). level_start_index: (L,) int64.
            input_padding_mask: optional (N, S) bool, True at padded positions (they are
                zeroed in the value so they contribute nothing).
        Returns:
            (N, Lq, C).
        """
        if query.dim() != 3:
            raise ValueError(f"MSDeformAttn: query must be (N, Lq, C={self.d_model}), got shape "
                             f"{tuple(query.shape)}")
        N, Lq, C = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        if C != self.d_model:
            raise ValueError(f"MSDeformAttn: query has width {C}, expected d_model="
                             f"{self.d_model} (query shape {tuple(query.shape)})")
        if input_flatten.dim() != 3 or input_flatten.shape[0] != N or input_flatten.shape[2] != C:
            raise ValueError(f"MSDeformAttn: input_flatten must be (N={N}, S, C={C}), got "
                             f"shape {tuple(input_flatten.shape)}")
        if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != (N, Lq, L) or (
                reference_points.shape[3] not in (2, 4)):
            raise ValueError(f"MSDeformAttn: reference_points must be (N={N}, Lq={Lq}, L={L}, "
                             f"2 or 4), got shape {tuple(reference_points.shape)}")
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[0] != L:
            raise ValueError(f"MSDeformAttn: spatial_shapes must be (L={L}, 2), got shape "
                             f"{tuple(spatial_shapes.shape)}")
        S = input_flatten.shape[1]

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            if tuple(input_padding_mask.shape) != (N, S) or input_padding_mask.dtype != torch.bool:
                raise ValueError(f"MSDeformAttn: input_padding_mask must be a bool (N={N}, "
                                 f"S={S}) tensor, got {input_padding_mask.dtype} of shape "
                                 f"{tuple(input_padding_mask.shape)}")
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, C // M)

        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P).softmax(-1)
        weights = weights.view(N, Lq, M, L, P)
        ref = reference_points.to(offsets.dtype)
        # locations = ref + offsets * scale in one addcmul whose small operands are laid out
        # over the (L, P, 2) block of a (query, head): broadcast only over the leading
        # (N, Lq, M) dimensions, the innermost 2 * L * P elements stay one contiguous run
        # (a scale broadcast inside that block, as (L, 1, 2), runs element by element: on
        # CPU the divisions this replaces were a tenth of the pixel encoder's time).
        if ref.shape[-1] == 2:
            # offsets are in pixels of each level: times 1 / (W, H) to normalise.
            inv_wh = 1.0 / spatial_shapes.flip(-1).to(offsets.dtype)        # (L, 2) as (1/W, 1/H)
            scale = inv_wh[:, None, :].expand(L, P, 2).contiguous()
            base = ref[:, :, None, :, None, :].expand(N, Lq, 1, L, P, 2).contiguous()
        else:
            # offsets are in units of half the box, scaled by 1/P so points stay inside.
            scale = ref[:, :, None, :, None, 2:] * (0.5 / P)
            scale = scale.expand(N, Lq, 1, L, P, 2).contiguous()
            base = ref[:, :, None, :, None, :2].expand(N, Lq, 1, L, P, 2).contiguous()
        locations = torch.addcmul(base, offsets, scale)
        out = ms_deform_attn(value, spatial_shapes, level_start_index,
                             locations.to(value.dtype).contiguous(),
                             weights.to(value.dtype).contiguous(), backend=self.backend)
        return self.output_proj(out)
