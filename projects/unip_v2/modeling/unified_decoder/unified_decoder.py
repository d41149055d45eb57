"""g: the modality-agnostic unified decoder (Uni-Perceiver v2, Eq. 5-7, Sec. 4.3, Appendix B).

A sequence is [<SPE>, segment_0, segment_1, ...]: a learned <SPE> vector, then token
segments (image-global, image-regional, text) with a learned segment-type embedding
added. Six pre-LN Transformer layers (BERT-base width, no layer-scale, uniform
drop-path), conditional MoE in every FFN, a final LayerNorm. The <SPE> output is the
sequence representation compared by cosine similarity in Eq. 5.

Segment-type embedding table (rows of ``type_embed``, see attributes.SegmentKind):
    0 IMAGE_GLOBAL, 1 IMAGE_REGION, 2 TEXT.   <SPE> gets none.
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from timm.layers import DropPath
from torch import nn

from .attributes import ATTRIBUTE_DIM, SegmentKind, attribute_rows
from .moe import ConditionalMoEFFN, RoutingPlan, plan_routing

__all__ = ["DecoderOutput", "Segment", "UnifiedDecoder"]


@dataclass
class Segment:
    """One token segment of a decoder sequence.

    tokens: (B, L_i, width); padding_mask: (B, L_i) bool, True = padding (or None: no
    padding); kind: SegmentKind; causal: causal (caption) text, a routing attribute only.
    """

    tokens: torch.Tensor
    padding_mask: Optional[torch.Tensor]
    kind: SegmentKind
    causal: bool = False


class DecoderOutput(NamedTuple):
    """spe: (B, width) <SPE> output; tokens: (B, 1 + sum L_i, width) all outputs, <SPE>
    first, padded positions zeroed; padding_mask: (B, 1 + sum L_i) bool, True = pad."""

    spe: torch.Tensor
    tokens: torch.Tensor
    padding_mask: torch.Tensor


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (as Uni-Perceiver)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        for layer in (self.qkv, self.proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, L, width); allowed: bool, broadcastable to (B, heads, L, L), True =
        query may attend to key -> (B, L, width)."""
        b, length, width = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, width // self.heads).permute(
            2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, length, width))


class DecoderLayer(nn.Module):
    """Pre-LN layer: x + DropPath(attn(LN(x))), then x + DropPath(FFN(LN(x)))."""

    def __init__(self, width, heads, ffn_dim, drop_path, dropout, moe_enabled, num_experts,
                 top_k):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = ConditionalMoEFFN(width, ffn_dim, num_experts, top_k, ATTRIBUTE_DIM,
                                     enabled=moe_enabled)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, allowed, plan: Optional[RoutingPlan]):
        """plan: the MoE routing plan of this sequence (moe.plan_routing), shared by all
        layers of one decoder call; None for a dense FFN."""
        x = x + self.drop_path(self.dropout(self.attn(self.norm1(x), allowed)))
        ffn_out = self.ffn(self.norm2(x), plan=plan)
        return x + self.drop_path(self.dropout(ffn_out))


class UnifiedDecoder(nn.Module):
    """The shared decoder g. ``forward(segments)`` -> DecoderOutput."""

    @configurable
    def __init__(
        self,
        *,
        width: int = 768,
        depth: int = 6,
        heads: int = 12,
        ffn_dim: int = 3072,
        drop_path: float = 0.1,
        dropout: float = 0.0,
        moe_enabled: bool = True,
        num_experts: int = 8,
        top_k: int = 2,
    ):
        super().__init__()
        self.width = width
        self.spe = nn.Parameter(torch.zeros(1, width))
        self.type_embed = nn.Embedding(len(SegmentKind), width)
        nn.init.normal_(self.spe, std=0.02)
        nn.init.normal_(self.type_embed.weight, std=0.02)
        self.layers = nn.ModuleList(
            DecoderLayer(width, heads, ffn_dim, drop_path, dropout, moe_enabled, num_experts,
                         top_k)
            for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.UNIFIED_DECODER
        return {
            "width": c.WIDTH, "depth": c.DEPTH, "heads": c.NUM_HEADS, "ffn_dim": c.FFN_DIM,
            "drop_path": c.DROP_PATH, "dropout": c.DROPOUT, "moe_enabled": c.MOE.ENABLED,
            "num_experts": c.MOE.NUM_EXPERTS, "top_k": c.MOE.TOP_K,
        }

    def weight_decay_kinds(self):
        """For the optimiser: the <SPE> token is an embedding."""
        return {"spe": "embed"}

    def forward(
        self,
        segments: Sequence[Segment],
        is_target: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> DecoderOutput:
        """
        Args:
            segments: n >= 1 Segments sharing the batch size B.
            is_target: the sequence encodes targets (routing attribute bit TARGET).
            attn_mask: optional bool (L, L) with L = 1 + sum L_i, True = blocked (e.g. the
                captioning mask); combined with the key padding mask.
        Returns:
            DecoderOutput(spe (B, width), tokens (B, L, width), padding_mask (B, L)).
        """
        tokens, padding_mask, rows, lengths = self._assemble(segments, is_target)
        b, length, _ = tokens.shape
        # Padded keys are never attended to; <SPE> is never padded, so no row is empty.
        allowed = (~padding_mask)[:, None, None, :]
        if attn_mask is not None:
            if attn_mask.shape != (length, length) or attn_mask.dtype != torch.bool:
                raise ValueError(
                    f"attn_mask must be bool of shape (L, L) = ({length}, {length}), got "
                    f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
            allowed = allowed & ~attn_mask
        # Tokens grouped by routing attributes once for all layers (each layer gates the
        # distinct rows with its own parameters), from host values: no device sync.
        plan = (plan_routing(rows, lengths, b, device=tokens.device)
                if self.layers and self.layers[0].ffn.enabled else None)
        x = tokens
        for layer in self.layers:
            x = layer(x, allowed, plan)
        x = self.norm(x).masked_fill(padding_mask[..., None], 0.0)
        return DecoderOutput(x[:, 0], x, padding_mask)

    def _assemble(self, segments: Sequence[Segment], is_target: bool):
        """-> tokens (B, L, width), padding_mask (B, L), the 1 + n routing attribute rows
        (attributes.attribute_rows, <SPE> first) and the 1 + n segment lengths."""
        if len(segments) == 0:
            raise ValueError("UnifiedDecoder needs at least one segment")
        batch = segments[0].tokens.shape[0] if segments[0].tokens.dim() == 3 else None
        parts, pads, lengths = [], [], [1]
        for i, seg in enumerate(segments):
            tok = seg.tokens
            if tok.dim() != 3 or tok.shape[0] != batch or tok.shape[2] != self.width:
                raise ValueError(
                    f"segment {i} tokens must have shape (B={batch}, L_i, {self.width}), "
                    f"got {tuple(tok.shape)}")
            pad = seg.padding_mask
            if pad is None:
                pad = torch.zeros(tok.shape[:2], dtype=torch.bool, device=tok.device)
            elif pad.shape != tok.shape[:2] or pad.dtype != torch.bool:
                raise ValueError(
                    f"segment {i} padding_mask must be bool of shape {tuple(tok.shape[:2])}, "
                    f"got {pad.dtype} {tuple(pad.shape)}")
            kind = SegmentKind(seg.kind)
            # Zero padded inputs: attention weights of padded keys are exactly 0, but
            # 0 * inf/nan is nan, so garbage there must not reach the weighted sum.
            tok = tok.masked_fill(pad[..., None], 0.0) + self.type_embed.weight[kind]
            parts.append(tok)
            pads.append(pad)
            lengths.append(tok.shape[1])
        device = segments[0].tokens.device
        spe = self.spe.to(parts[0].dtype).expand(batch, 1, self.width)
        tokens = torch.cat([spe] + parts, dim=1)
        padding_mask = torch.cat(
            [torch.zeros(batch, 1, dtype=torch.bool, device=device)] + pads, dim=1)
        rows = attribute_rows([s.kind for s in segments], [s.causal for s in segments],
                              is_target)
        return tokens, padding_mask, rows, lengths
