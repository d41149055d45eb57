"""Sine position encodings: of feature-map pixels (encoder) and of boxes (decoder queries,
and B(q_box) of Eq. 9).

Both follow DETR/DINO: a coordinate c in [0, 1] becomes, for i < F,
sin(2*pi*c / T^(2*floor(i/2)/F)) at even i and cos(...) at odd i, with T = 10000.
"""
import math

import torch

__all__ = ["sine_position_encoding_2d", "box_sine_embedding"]


def _sine_features(coord: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """(...,) coordinates already scaled by 2*pi -> (..., num_feats), sin/cos interleaved."""
    i = torch.arange(num_feats, dtype=torch.float32, device=coord.device)
    dim_t = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)
    pos = coord.float()[..., None] / dim_t
    # even channels take sin, odd take cos of the same frequency.
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_position_encoding_2d(padding_mask: torch.Tensor, num_feats: int = 128,
                              temperature: float = 10000.0) -> torch.Tensor:
    """Position encoding of a padded feature map.

    Args:
        padding_mask: (B, H, W) bool, True at padded pixels. Coordinates count valid pixels
            only and are normalised by each image's own valid extent, so an image encodes
            the same way whatever it was batched with.
        num_feats: F, features per axis; the output has 2F channels.
    Returns:
        (B, 2F, H, W) float32, y features first then x (the DETR / Mask DINO order).
    """
    if padding_mask.dim() != 3 or padding_mask.dtype != torch.bool:
        raise ValueError(f"sine_position_encoding_2d: padding_mask must be a bool (B, H, W) "
                         f"tensor, got {padding_mask.dtype} of shape {tuple(padding_mask.shape)}")
    valid = (~padding_mask).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps = 1e-6
    # cumulative count / last count, scaled to (0, 2*pi]
    y = y / (y[:, -1:, :] + eps) * (2 * math.pi)
    x = x / (x[:, :, -1:] + eps) * (2 * math.pi)
    pos = torch.cat((_sine_features(y, num_feats, temperature),
                     _sine_features(x, num_feats, temperature)), dim=-1)
    return pos.permute(0, 3, 1, 2).contiguous()


def box_sine_embedding(boxes: torch.Tensor, num_feats: int = 128,
                       temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of boxes or points.

    Args:
        boxes: (..., 4) as (cx, cy, w, h) or (..., 2) as (x, y), in [0, 1].
    Returns:
        (..., 4F) or (..., 2F): features of y, x, then w, h (DINO's order, which a
        converted Mask DINO checkpoint's ref_point_head expects).
    """
    if boxes.shape[-1] not in (2, 4):
        raise ValueError(f"box_sine_embedding: last dimension must be 2 or 4, got shape "
                         f"{tuple(boxes.shape)}")
    scaled = boxes * (2 * math.pi)
    parts = [scaled[..., 1], scaled[..., 0]] + ([scaled[..., 2], scaled[..., 3]]
                                                 if boxes.shape[-1] == 4 else [])
    return torch.cat([_sine_features(p, num_feats, temperature) for p in parts], dim=-1)
