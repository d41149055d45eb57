"""Deformable transformer layers of the region proposal network (Table 7).

Both are post-norm, ReLU FFN, as in Deformable DETR / Mask DINO. Parameter names follow
Mask DINO so that unip_v2.checkpoint.maskdino maps checkpoints by renaming prefixes only.
"""
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ...layers import MSDeformAttn

__all__ = ["DeformableEncoderLayer", "DeformableEncoder", "DeformableDecoderLayer",
           "encoder_reference_points"]


class _FFNMixin:
    """The layers' FFN: linear1 -> ReLU -> dropout -> linear2 -> dropout, residual, norm.

    linear1/linear2 sit directly on the layer (Mask DINO's parameter names)."""

    def _init_ffn(self, d_model: int, dim_feedforward: int, dropout: float) -> None:
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)

    def _ffn(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class DeformableEncoderLayer(_FFNMixin, nn.Module):
    """Deformable self-attention over all levels, then FFN.

    Parameter names: self_attn, norm1, linear1, linear2, norm2 (Mask DINO's).
    """

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_heads: int,
                 n_levels: int, n_points: int, backend: str = "auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.norm1 = nn.LayerNorm(d_model)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index,
                padding_mask):
        """src, pos: (B, S, d); reference_points: (B, S, L, 2); padding_mask: (B, S) bool."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes,
                              level_start_index, padding_mask)
        src = self.norm1(src + self.dropout(attn))
        return self._ffn(src, self.norm2)


def encoder_reference_points(spatial_shapes: torch.Tensor, batch: int, n_levels: int,
                             device, dtype=torch.float32) -> torch.Tensor:
    """Centre of every token, normalised to its level: ((x + .5) / W_l, (y + .5) / H_l).

    Coordinates are relative to the padded canvas, like every box in this encoder.
    Returns (B, S, L, 2): each token's point, repeated for the L levels it samples.
    """
    points = []
    for h, w in spatial_shapes.tolist():
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
            (torch.arange(w, device=device, dtype=dtype) + 0.5) / w, indexing="ij")
        points.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
    ref = torch.cat(points, 0)  # (S, 2)
    return ref[None, :, None, :].expand(batch, -1, n_levels, -1)


class DeformableEncoder(nn.Module):
    """A stack of DeformableEncoderLayer (parameter names layers.{i}.*)."""

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            [DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)])

    def forward(self, src, pos, spatial_shapes, level_start_index, padding_mask):
        """src, pos: (B, S, d) -> (B, S, d)."""
        if not self.layers:
            return src
        ref = encoder_reference_points(spatial_shapes, src.shape[0],
                                       self.layers[0].self_attn.n_levels, src.device, src.dtype)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoderLayer(_FFNMixin, nn.Module):
    """Self-attention among queries, deformable cross-attention into the encoder memory
    around each query's box, then FFN.

    Parameter names are Mask DINO's, whose norms are numbered by construction rather than
    by use: self_attn -> norm2, cross_attn -> norm1, FFN -> norm3.
    """

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_heads: int,
                 n_levels: int, n_points: int, backend: str = "auto"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout,
                                               batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.norm1 = nn.LayerNorm(d_model)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_boxes, memory, spatial_shapes,
                level_start_index, memory_padding_mask, self_attn_mask: Optional[torch.Tensor]):
        """
        Args:
            tgt, query_pos: (B, Q, d); reference_boxes: (B, Q, 4) (cx, cy, w, h) in [0, 1];
            memory: (B, S, d); memory_padding_mask: (B, S) bool;
            self_attn_mask: (Q, Q) bool, True = may not attend (denoising groups), or None.
        Returns:
            (B, Q, d).
        """
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(attn))
        n_levels = self.cross_attn.n_levels
        ref = reference_boxes[:, :, None, :].expand(-1, -1, n_levels, -1)
        cross = self.cross_attn(tgt + query_pos, ref, memory, spatial_shapes, level_start_index,
                                memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout(cross))
        return self._ffn(tgt, self.norm3)
