"""Swin Transformer from timm as a detectron2 Backbone that takes images of any size.

Outputs (N batch, H x W input, C = MODEL.SWIN.EMBED_DIM):
    res2  (N, C,     ceil(H/4),  ceil(W/4))     stride 4
    res3  (N, 2*C,   ceil(H/8),  ceil(W/8))     stride 8
    res4  (N, 4*C,   ceil(H/16), ceil(W/16))    stride 16
    res5  (N, 8*C,   ceil(H/32), ceil(W/32))    stride 32
only the names in MODEL.SWIN.OUT_FEATURES, each through its own LayerNorm (``norm{i}``, as
in the official detection Swin).

Why the blocks are not run through timm's own forward: timm 1.0's SwinTransformer fixes its
geometry when it is built. With ``strict_img_size=True`` (default) any other input size is
an error; ``strict_img_size=False`` (= ``dynamic_img_size=True``) builds shift masks per call
but the patch embedding still demands H, W divisible by 4 (SwinTransformer does not pass
``dynamic_img_pad``), and without ``always_partition=True`` each block shrinks its window and
drops its shift when the *construction-time* ``img_size`` makes a stage no larger than the
window (img_size 224, window 7: stage 4 never shifts, whatever size comes in later).
``set_input_size`` re-derives all of that for one new size, so it would have to run on
every batch. Worse, where a feature map is not a multiple of the window, timm's block rolls
the map *before* padding it and then builds the shift mask on the padded size, so the rows
and columns that wrap around are not the ones the mask isolates: tokens at the top/left
edge attend to tokens at the bottom/right edge, silently. The official detection Swin pads
first and rolls after, and that is what this wrapper does.

So the wrapper keeps timm's modules and parameter names (``patch_embed``, ``layers.{i}``
with downsampling at the start of stages 1..3, ``layers.{i}.blocks.{j}.attn``...), builds
them once with ``always_partition=True`` (windows and shifts never depend on a size) and
runs each block's pieces itself: pad to a window multiple, roll, window attention with a
mask built for that padded size, un-roll, crop. Where every stage is a window multiple
(H, W multiples of 32 * window) this is exactly timm's own computation.
"""
import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock

__all__ = ["SwinBackbone", "build_swin_backbone", "SWIN_STAGE_NAMES"]

SWIN_STAGE_NAMES = ("res2", "res3", "res4", "res5")
# Swin's patch embedding is a 4x4 stride-4 conv; stage i then halves the map i times.
_PATCH_SIZE = 4
# Value timm and the official Swin add to attention logits between shifted regions.
_MASKED_LOGIT = -100.0


def _partition(x: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """(B, Hp, Wp, C) with Hp, Wp window multiples -> (B * nWh * nWw, wh * ww, C).

    Windows are batch-major, row-major: the order WindowAttention's mask broadcast assumes.
    """
    b, hp, wp, c = x.shape
    wh, ww = window
    x = x.view(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def _merge(windows: torch.Tensor, window: Tuple[int, int], b: int, hp: int, wp: int) -> torch.Tensor:
    """Inverse of `_partition`: (B * nW, wh * ww, C) -> (B, Hp, Wp, C)."""
    wh, ww = window
    c = windows.shape[-1]
    x = windows.view(b, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)


def _shift_regions(size: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(size,) region label along one axis of a padded, rolled map: 0 for the part that was
    already contiguous, 1 for the last window minus the shift, 2 for what wrapped around."""
    labels = torch.zeros(size, dtype=torch.long, device=device)
    if shift > 0:
        labels[size - window:size - shift] = 1
        labels[size - shift:] = 2
    return labels


def shifted_window_mask(
    padded_size: Tuple[int, int],
    window: Tuple[int, int],
    shift: Tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Additive attention mask of shifted windows on a map padded *before* the roll.

    Returns (nW, wh * ww, wh * ww): 0 between tokens of the same region, -100 otherwise, so
    tokens that the roll brought next to each other from opposite edges do not attend.
    """
    (hp, wp), (wh, ww), (sh, sw) = padded_size, window, shift
    rows = _shift_regions(hp, wh, sh, device)
    cols = _shift_regions(wp, ww, sw, device)
    region = (rows[:, None] * 3 + cols[None, :]).view(1, hp, wp, 1)
    region = _partition(region, window).squeeze(-1)  # (nW, wh * ww)
    differs = region[:, None, :] != region[:, :, None]
    mask = torch.zeros(differs.shape, dtype=dtype, device=device)
    return mask.masked_fill(differs, _MASKED_LOGIT)


def _run_block(block: SwinTransformerBlock, x: torch.Tensor,
               masks: Dict[tuple, torch.Tensor]) -> torch.Tensor:
    """One Swin block on (B, H, W, C) of any H, W; `masks` caches shift masks per geometry
    for the blocks of one stage (they all share it)."""
    b, h, w, c = x.shape
    window, shift = tuple(block.window_size), tuple(block.shift_size)
    hp = math.ceil(h / window[0]) * window[0]
    wp = math.ceil(w / window[1]) * window[1]
    y = block.norm1(x)
    # Zero padding after norm1, as the official detection Swin: the padded tokens are keys
    # with zero input, and they are cropped away below.
    y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h))
    mask = None
    if any(shift):
        y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        key = (hp, wp, window, shift, y.dtype, y.device)
        if key not in masks:
            masks[key] = shifted_window_mask((hp, wp), window, shift, y.dtype, y.device)
        mask = masks[key]
    y = block.attn(_partition(y, window), mask=mask)
    y = _merge(y, window, b, hp, wp)
    if any(shift):
        y = torch.roll(y, shifts=shift, dims=(1, 2))
    x = x + block.drop_path1(y[:, :h, :w, :])
    return x + block.drop_path2(block.mlp(block.norm2(x)))


class SwinBackbone(Backbone):
    """timm Swin Transformer, outputs res2..res5 (see module docstring), any input size.

    Input (N, in_chans, H, W), any H, W >= 1. Stages after the last requested output are
    not built, so every parameter gets a gradient.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.3,
        out_features: Sequence[str] = SWIN_STAGE_NAMES,
    ):
        super().__init__()
        depths, num_heads, out_features = list(depths), list(num_heads), list(out_features)
        n = len(SWIN_STAGE_NAMES)
        if len(depths) != n or len(num_heads) != n:
            raise ValueError(f"Swin needs {n} stages: got DEPTHS {depths} and NUM_HEADS {num_heads}")
        unknown = [f for f in out_features if f not in SWIN_STAGE_NAMES]
        if not out_features or unknown:
            raise ValueError(f"Swin OUT_FEATURES must be a non-empty subset of {SWIN_STAGE_NAMES}, "
                             f"got {out_features}")
        channels = [embed_dim * 2 ** i for i in range(n)]
        for i, (ch, heads) in enumerate(zip(channels, num_heads)):
            if heads < 1 or ch % heads:
                raise ValueError(f"Swin stage {i}: {heads} heads do not divide {ch} channels "
                                 f"(EMBED_DIM {embed_dim} * 2**{i})")
        if window_size < 1:
            raise ValueError(f"Swin WINDOW_SIZE must be >= 1, got {window_size}")

        swin = SwinTransformer(
            # Only metadata here (strict_img_size=False, always_partition=True): an aligned
            # size, so it describes windows that fit every stage.
            img_size=_PATCH_SIZE * 2 ** (n - 1) * window_size,
            patch_size=_PATCH_SIZE,
            in_chans=in_chans,
            num_classes=0,
            global_pool="",
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            always_partition=True,
            strict_img_size=False,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
        )
        num_stages = 1 + max(SWIN_STAGE_NAMES.index(f) for f in out_features)
        self.in_chans = in_chans
        self.window_size = window_size
        self.patch_embed = swin.patch_embed
        # Drop-path rates were spread over all 4 stages by timm before the cut, as in the
        # full model; timm's final norm and head have no use in a backbone.
        self.layers = nn.Sequential(*list(swin.layers)[:num_stages])

        self._out_features = [f for f in SWIN_STAGE_NAMES if f in out_features]
        self._out_feature_strides = {}
        self._out_feature_channels = {}
        for i, name in enumerate(SWIN_STAGE_NAMES[:num_stages]):
            if name in self._out_features:
                self._out_feature_strides[name] = _PATCH_SIZE * 2 ** i
                self._out_feature_channels[name] = channels[i]
                self.add_module(f"norm{i}", nn.LayerNorm(channels[i]))

    @property
    def size_divisibility(self) -> int:
        # Any size runs; 32 keeps every stage of a padded batch an exact halving of the
        # previous one, which multi-scale heads on top of the backbone rely on.
        return 32

    @property
    def padding_constraints(self) -> Dict[str, int]:
        """For detectron2 versions whose ImageList reads this instead of size_divisibility."""
        return {"size_divisibility": self.size_divisibility, "square_size": 0}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name],
                                stride=self._out_feature_strides[name])
                for name in self._out_features}

    def weight_decay_kinds(self):
        """For the optimiser: Swin's relative position tables and absolute position
        embedding are embeddings (timm's SwinTransformer.no_weight_decay says the same)."""
        return {name: "embed" for name, _ in self.named_parameters()
                if name.rsplit(".", 1)[-1] in ("relative_position_bias_table",
                                               "absolute_pos_embed")}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(N, in_chans, H, W) -> {name: (N, C_i, ceil(H / s_i), ceil(W / s_i))}."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SwinBackbone expects images (N, {self.in_chans}, H, W), got {shape}")
        h, w = x.shape[-2:]
        if h == 0 or w == 0 or x.shape[0] == 0:
            raise ValueError(f"SwinBackbone got an empty image batch of shape {tuple(x.shape)}")
        # Pad bottom/right to whole patches (the official PatchEmbed does the same), so the
        # stage-1 map is ceil(H/4) x ceil(W/4); PatchMerging pads odd sizes itself.
        x = F.pad(x, (0, (-w) % _PATCH_SIZE, 0, (-h) % _PATCH_SIZE))
        x = self.patch_embed(x)  # (N, H/4, W/4, C) channels-last
        outputs = {}
        for i, stage in enumerate(self.layers):
            x = stage.downsample(x)
            masks: Dict[tuple, torch.Tensor] = {}
            for block in stage.blocks:
                x = _run_block(block, x, masks)
            name = SWIN_STAGE_NAMES[i]
            if name in self._out_features:
                out = getattr(self, f"norm{i}")(x)
                outputs[name] = out.permute(0, 3, 1, 2).contiguous()
        return outputs


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg, input_shape: ShapeSpec) -> SwinBackbone:
    """MODEL.BACKBONE.NAME "build_swin_backbone": a SwinBackbone from MODEL.SWIN.*.

    MODEL.BACKBONE.PRETRAINED is not read here: whoever builds the image encoder calls
    `load_backbone_pretrained` (so MODEL.WEIGHTS can still win afterwards).
    """
    s = cfg.MODEL.SWIN
    return SwinBackbone(
        in_chans=input_shape.channels,
        embed_dim=s.EMBED_DIM,
        depths=s.DEPTHS,
        num_heads=s.NUM_HEADS,
        window_size=s.WINDOW_SIZE,
        mlp_ratio=s.MLP_RATIO,
        drop_path_rate=s.DROP_PATH_RATE,
        out_features=s.OUT_FEATURES,
    )
