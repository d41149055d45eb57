"""Pixel encoder: backbone maps -> multi-scale encoded maps + the per-pixel mask map (Eq. 8).

F1..F3 (strides 8, 16, 32) pass through 1x1 conv + GN input projections, an extra 3x3
stride-2 conv + GN on the raw F3 adds stride 64 (the paper's "4-scale setting"), level
embeddings and sine position encodings are added to the attention queries, and a
deformable transformer encoder mixes all levels. Levels are ordered fine to coarse
everywhere. The mask map is R(G(F0) + H(F1_enc)): G = 1x1 conv + GN on F0, H = bilinear
upsampling of the encoded stride-8 map (its 1x1 conv + GN is that level's input
projection), R = 3x3 conv + GN + ReLU, then 1x1 conv.
"""
from dataclasses import dataclass
from typing import Dict, List

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import Conv2d, ShapeSpec, get_norm

from .deformable_transformer import DeformableEncoder
from .position_encoding import sine_position_encoding_2d

__all__ = ["PixelEncoder", "PixelEncoderOutput", "downsample_padding_mask"]


@dataclass
class PixelEncoderOutput:
    """What the proposal decoder reads (L levels, S = sum of H_l * W_l tokens).

    memory: (B, S, d) encoded tokens, levels concatenated fine to coarse.
    memory_padding_mask: (B, S) bool, True at tokens that cover only padding.
    spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,) int64.
    maps: L tensors (B, d, H_l, W_l), the memory as maps.
    mask_features: (B, mask_dim, H/4, W/4), the per-pixel map of Eq. 8.
    mask_padding_mask: (B, H/4, W/4) bool, True at padding.
    """
    memory: torch.Tensor
    memory_padding_mask: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    maps: List[torch.Tensor]
    mask_features: torch.Tensor
    mask_padding_mask: torch.Tensor


def downsample_padding_mask(padding_mask: torch.Tensor, size) -> torch.Tensor:
    """(B, H, W) bool padding mask -> (B, h, w): nearest sampling at the map's resolution."""
    return F.interpolate(padding_mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0] > 0.5


class PixelEncoder(nn.Module):
    """
    Args:
        input_shape: backbone output shapes by name.
        in_features: [F0, F1, F2, F3] names (strides 4, 8, 16, 32).
        hidden_dim: d. num_levels: encoder levels (len(in_features) - 1 + extra levels).
        enc_layers, nheads, dim_feedforward, dropout, enc_n_points: Table 7.
        mask_dim: channels of the mask map. norm: "GN" etc. for the input projections and
            the mask branch (MODEL.IMAGE_ENCODER.NORM).
    """

    def __init__(self, input_shape: Dict[str, ShapeSpec], in_features: List[str],
                 hidden_dim: int, num_levels: int, enc_layers: int, nheads: int,
                 dim_feedforward: int, dropout: float, enc_n_points: int, mask_dim: int,
                 norm: str = "GN", backend: str = "auto"):
        super().__init__()
        missing = [f for f in in_features if f not in input_shape]
        if missing or len(in_features) < 2:
            raise ValueError(f"PixelEncoder: in_features {in_features} must name >= 2 backbone "
                             f"outputs; the backbone has {sorted(input_shape)}")
        self.mask_feature_name = in_features[0]
        self.level_features = list(in_features[1:])
        num_extra = num_levels - len(self.level_features)
        if num_extra < 0:
            raise ValueError(f"PixelEncoder: NUM_FEATURE_LEVELS={num_levels} is smaller than the "
                             f"{len(self.level_features)} backbone levels {self.level_features}")
        self.num_levels = num_levels
        self.hidden_dim = hidden_dim

        proj = [nn.Sequential(nn.Conv2d(input_shape[f].channels, hidden_dim, 1),
                              get_norm(norm, hidden_dim)) for f in self.level_features]
        in_ch = input_shape[self.level_features[-1]].channels
        for _ in range(num_extra):
            proj.append(nn.Sequential(nn.Conv2d(in_ch, hidden_dim, 3, stride=2, padding=1),
                                      get_norm(norm, hidden_dim)))
            in_ch = hidden_dim
        self.input_proj = nn.ModuleList(proj)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.zeros_(p[0].bias)

        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
        nn.init.normal_(self.level_embed)
        self.encoder = DeformableEncoder(
            enc_layers, d_model=hidden_dim, dim_feedforward=dim_feedforward, dropout=dropout,
            n_heads=nheads, n_levels=num_levels, n_points=enc_n_points, backend=backend)
        for layer in self.encoder.layers:
            for name, p in layer.named_parameters():
                if p.dim() > 1 and not name.startswith("self_attn."):
                    nn.init.xavier_uniform_(p)

        # Eq. 8: G, R (layer_1 + mask_features); names as Mask DINO's.
        use_bias = norm == ""
        self.adapter_1 = Conv2d(input_shape[self.mask_feature_name].channels, hidden_dim, 1,
                                bias=use_bias, norm=get_norm(norm, hidden_dim))
        self.layer_1 = Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=use_bias,
                              norm=get_norm(norm, hidden_dim), activation=F.relu)
        self.mask_features = Conv2d(hidden_dim, mask_dim, 1)
        for conv in (self.adapter_1, self.layer_1, self.mask_features):
            weight_init.c2_xavier_fill(conv)

    def weight_decay_kinds(self):
        """For the optimiser: the level embedding is an embedding."""
        return {"level_embed": "embed"}

    def forward(self, features: Dict[str, torch.Tensor],
                padding_mask: torch.Tensor) -> PixelEncoderOutput:
        """features: backbone maps (B, C, H/s, W/s); padding_mask: (B, H, W) bool, True at
        the zero padding added when batching (H, W = padded input size)."""
        srcs = []
        for i, name in enumerate(self.level_features):
            srcs.append(self.input_proj[i](features[name]))
        x = features[self.level_features[-1]]
        for proj in self.input_proj[len(self.level_features):]:
            x = proj(x)
            srcs.append(x)

        flat_src, flat_pos, flat_mask, shapes = [], [], [], []
        for lvl, src in enumerate(srcs):
            h, w = src.shape[-2:]
            mask = downsample_padding_mask(padding_mask, (h, w))
            pos = sine_position_encoding_2d(mask, self.hidden_dim // 2).to(src.dtype)
            flat_src.append(src.flatten(2).transpose(1, 2))
            flat_pos.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl])
            flat_mask.append(mask.flatten(1))
            shapes.append((h, w))
        device = srcs[0].device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        sizes = spatial_shapes.prod(1)
        level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
        memory_padding_mask = torch.cat(flat_mask, 1)
        memory = self.encoder(torch.cat(flat_src, 1), torch.cat(flat_pos, 1), spatial_shapes,
                              level_start_index, memory_padding_mask)

        maps = [m.transpose(1, 2).reshape(m.shape[0], -1, h, w) for m, (h, w) in
                zip(memory.split(sizes.tolist(), dim=1), shapes)]
        f0 = features[self.mask_feature_name]
        y = self.adapter_1(f0) + F.interpolate(maps[0], size=f0.shape[-2:], mode="bilinear",
                                               align_corners=False)
        mask_features = self.mask_features(self.layer_1(y))
        return PixelEncoderOutput(
            memory=memory, memory_padding_mask=memory_padding_mask,
            spatial_shapes=spatial_shapes, level_start_index=level_start_index, maps=maps,
            mask_features=mask_features,
            mask_padding_mask=downsample_padding_mask(padding_mask, f0.shape[-2:]))
