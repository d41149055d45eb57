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
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from timm.layers import DropPath
from torch import nn

from .attributes import ATTRIBUTE_DIM, SegmentKind, attribute_rows
from .moe import ConditionalMoEFFN, RoutingPlan, plan_routing

__all__ = ["DecoderCache", "DecoderOutput", "Segment", "UnifiedDecoder"]


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


@dataclass
class DecoderCache:
    """The decoded tokens of a sequence so far, for incremental decoding (caption beam
    search): what later tokens attend to, so the prefix is never run through g again.

    keys, values: one (B, heads, P, head_dim) tensor per layer, the keys and values of the
    P cached tokens (<SPE> first); padding_mask: (B, P) bool, True = padding (never
    attended to). kinds, causal, is_target: the segment layout of the *whole* sequence
    (cached and later segments): the routing attributes of every token depend on it
    (e.g. the image rows of a caption sequence carry SEQ_HAS_TEXT before any word exists).
    """

    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    padding_mask: torch.Tensor
    kinds: Tuple[SegmentKind, ...]
    causal: Tuple[bool, ...]
    is_target: bool

    @property
    def length(self) -> int:
        return self.padding_mask.shape[1]

    def index_select(self, index: torch.Tensor) -> "DecoderCache":
        """The cache of rows ``index`` (B',) long: expands an image's cache to its beams, or
        reorders beams to their parents."""
        return DecoderCache([k.index_select(0, index) for k in self.keys],
                            [v.index_select(0, index) for v in self.values],
                            self.padding_mask.index_select(0, index), self.kinds, self.causal,
                            self.is_target)


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

    def forward(self, x: torch.Tensor, allowed: torch.Tensor,
                past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """x (B, L, width); allowed: bool, broadcastable to (B, heads, L, P + L), True =
        query may attend to key; past: the keys and values (B, heads, P, head_dim) of P
        earlier tokens (a DecoderCache layer), placed before x's own (P = 0 without).
        -> (B, L, width) without ``past``; with it, (out, (keys, values) of x's L tokens)."""
        b, length, width = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, width // self.heads).permute(
            2, 0, 3, 1, 4)
        keys, values = k, v
        if past is not None:
            keys, values = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(b, length, width))
        return out if past is None else (out, (k, v))


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

    def forward(self, x, allowed, plan: Optional[RoutingPlan], past=None):
        """plan: the MoE routing plan of this sequence (moe.plan_routing), shared by all
        layers of one decoder call; None for a dense FFN. past: cached (keys, values) of
        earlier tokens (SelfAttention); with it, returns (x, (keys, values) of x)."""
        attn = self.attn(self.norm1(x), allowed, past)
        attn, kv = attn if past is not None else (attn, None)
        x = x + self.drop_path(self.dropout(attn))
        ffn_out = self.ffn(self.norm2(x), plan=plan)
        x = x + self.drop_path(self.dropout(ffn_out))
        return x if past is None else (x, kv)


class UnifiedDecoder(nn.Module):
    """The shared decoder g. ``forward(segments)`` -> DecoderOutput; ``start_cache`` and
    ``extend`` decode a sequence incrementally (DecoderCache), as caption beam search does."""

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
        return self._forward_assembled(tokens, padding_mask, rows, lengths, attn_mask)

    def _forward_assembled(self, tokens, padding_mask, rows, lengths, attn_mask, cache=False):
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
        if not cache:
            for layer in self.layers:
                x = layer(x, allowed, plan)
            x = self.norm(x).masked_fill(padding_mask[..., None], 0.0)
            return DecoderOutput(x[:, 0], x, padding_mask)
        x, keys, values = self._run_cached(x, allowed, plan, self._empty_past(b, x))
        x = self.norm(x).masked_fill(padding_mask[..., None], 0.0)
        return DecoderOutput(x[:, 0], x, padding_mask), keys, values

    # ---------------------------------------------------------------- incremental decoding
    def start_cache(self, segments: Sequence[Segment], later: Sequence[Tuple[SegmentKind, bool]],
                    is_target: bool = False) -> Tuple[DecoderOutput, DecoderCache]:
        """Decode [<SPE>, segments] (every token sees every non-padded one) and cache every
        layer's keys and values, for later tokens to attend to with `extend`.

        Args:
            segments: the n prefix Segments (e.g. the image's global and regional tokens).
            later: (kind, causal) of the segments that will follow (e.g. the caption's words
                and queries): part of the sequence's routing attributes from the start.
            is_target: routing bit TARGET of the whole sequence.
        Returns:
            the prefix's DecoderOutput (as `forward` on [<SPE>, segments], with the routing of
            the whole layout) and its DecoderCache (P = 1 + sum L_i).
        """
        later = [(SegmentKind(k), bool(c)) for k, c in later]
        tokens, padding_mask, _, lengths = self._assemble(segments, is_target)
        kinds = tuple(SegmentKind(s.kind) for s in segments) + tuple(k for k, _ in later)
        causal = tuple(bool(s.causal) for s in segments) + tuple(c for _, c in later)
        rows = attribute_rows(kinds, causal, is_target)[: 1 + len(segments)]
        out, keys, values = self._forward_assembled(tokens, padding_mask, rows, lengths, None,
                                                    cache=True)
        return out, DecoderCache(keys, values, padding_mask, kinds, causal, bool(is_target))

    def extend(self, cache: DecoderCache, segments: Sequence[Segment],
               attn_mask: Optional[torch.Tensor] = None, keep: int = 0
               ) -> Tuple[torch.Tensor, DecoderCache]:
        """Decode N new tokens against a cache: each sees every non-padded cached token and
        the new tokens that ``attn_mask`` leaves open; the first ``keep`` of them join the
        cache. Equal, to float tolerance, to running the whole sequence with `forward` and
        the same mask (tests/test_captioning.py).

        Args:
            cache: B rows (DecoderCache).
            segments: Segments of the new tokens (B, L_i, width), N = sum L_i; the (kind,
                causal) of each must be one of the cache's layout (its routing attributes).
            attn_mask: optional bool (N, N), True = new token i may not see new token j.
            keep: how many leading new tokens to append to the cache (e.g. the caption's
                new word, not its query).
        Returns:
            outputs (B, N, width) (final LayerNorm applied, padded positions zeroed) and the
            new cache (this one is not modified).
        """
        if not segments:
            raise ValueError("UnifiedDecoder.extend needs at least one new segment")
        layout = set(zip(cache.kinds, cache.causal))
        for i, seg in enumerate(segments):
            if (SegmentKind(seg.kind), bool(seg.causal)) not in layout:
                raise ValueError(
                    f"extend: new segment {i} ({SegmentKind(seg.kind).name}, causal="
                    f"{bool(seg.causal)}) is not part of the cache's layout "
                    f"{[(k.name, c) for k, c in zip(cache.kinds, cache.causal)]}")
        b = cache.padding_mask.shape[0]
        tokens, padding, lengths = self._embed_segments(segments, b)
        n = tokens.shape[1]
        if not 0 <= keep <= n:
            raise ValueError(f"extend: keep={keep} must lie in [0, {n}] (the new tokens)")
        # Each new segment's routing row, from the whole layout (adding a segment of a kind
        # the layout already has leaves the sequence bits unchanged).
        rows = [attribute_rows(cache.kinds + (SegmentKind(s.kind),),
                               cache.causal + (bool(s.causal),), cache.is_target)[-1]
                for s in segments]
        allowed_new = (~padding)[:, None, None, :]                           # (B, 1, 1, N)
        if attn_mask is not None:
            if attn_mask.shape != (n, n) or attn_mask.dtype != torch.bool:
                raise ValueError(f"extend: attn_mask must be bool of shape ({n}, {n}), got "
                                 f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
            allowed_new = allowed_new & ~attn_mask
        allowed = torch.cat([(~cache.padding_mask)[:, None, None, :].expand(b, 1, n, -1),
                             allowed_new.expand(b, 1, n, n)], dim=3)          # (B, 1, N, P+N)
        plan = (plan_routing(rows, lengths, b, device=tokens.device)
                if self.layers and self.layers[0].ffn.enabled else None)
        x, keys, values = self._run_cached(tokens, allowed,
                                           plan, list(zip(cache.keys, cache.values)))
        x = self.norm(x).masked_fill(padding[..., None], 0.0)
        new_cache = DecoderCache(
            [torch.cat([old, k[:, :, :keep]], dim=2) for old, k in zip(cache.keys, keys)],
            [torch.cat([old, v[:, :, :keep]], dim=2) for old, v in zip(cache.values, values)],
            torch.cat([cache.padding_mask, padding[:, :keep]], dim=1),
            cache.kinds, cache.causal, cache.is_target)
        return x, new_cache

    def _empty_past(self, batch: int, like: torch.Tensor):
        out = []
        for layer in self.layers:
            heads = layer.attn.heads
            empty = like.new_zeros(batch, heads, 0, self.width // heads)
            out.append((empty, empty))
        return out

    def _run_cached(self, x, allowed, plan, past):
        """The layers on x with each layer's cached (keys, values) before x's own: -> x and
        the per-layer keys and values of x's tokens."""
        keys, values = [], []
        for layer, layer_past in zip(self.layers, past):
            x, (k, v) = layer(x, allowed, plan, layer_past)
            keys.append(k)
            values.append(v)
        return x, keys, values

    def _assemble(self, segments: Sequence[Segment], is_target: bool):
        """-> tokens (B, L, width), padding_mask (B, L), the 1 + n routing attribute rows
        (attributes.attribute_rows, <SPE> first) and the 1 + n segment lengths."""
        if len(segments) == 0:
            raise ValueError("UnifiedDecoder needs at least one segment")
        batch = segments[0].tokens.shape[0] if segments[0].tokens.dim() == 3 else None
        parts, pads, lengths = self._embed_segments(segments, batch, concat=False)
        device = segments[0].tokens.device
        spe = self.spe.to(parts[0].dtype).expand(batch, 1, self.width)
        tokens = torch.cat([spe] + parts, dim=1)
        padding_mask = torch.cat(
            [torch.zeros(batch, 1, dtype=torch.bool, device=device)] + pads, dim=1)
        rows = attribute_rows([s.kind for s in segments], [s.causal for s in segments],
                              is_target)
        return tokens, padding_mask, rows, [1] + lengths

    def _embed_segments(self, segments: Sequence[Segment], batch, concat: bool = True):
        """Segments -> tokens with their type embedding, padded inputs zeroed: (B, N, width)
        and padding (B, N) (or the per-segment lists, ``concat=False``), and the segment
        lengths; shapes checked."""
        parts, pads, lengths = [], [], []
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
        if not concat:
            return parts, pads, lengths
        return torch.cat(parts, dim=1), torch.cat(pads, dim=1), lengths
