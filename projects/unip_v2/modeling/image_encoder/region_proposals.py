"""General region proposals (Eq. 2 / 9) and global tokens (Eq. 3).

q_proposal = q_sem + B(q_box) + M(q_mask): B is the sine encoding of the box followed by a
linear layer, M average-pools the mask (as probabilities: bounded, unlike logits, whose
scale grows during training) to 28 x 28 and applies a linear layer; box and mask are
detached first (the fusion must not move the proposal network's localisation). A LayerNorm
on the sum keeps the three parts on one scale for the objectness head and the tokens.
An objectness head on q_proposal picks the top O proposals handed to the unified decoder.
Global tokens: M' attention pools over F3, each with its own learned query, followed by
every position of F3 itself.
"""
import math
from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .position_encoding import box_sine_embedding, sine_position_encoding_2d

__all__ = ["GeneralRegionProposals", "GlobalTokens"]


class GeneralRegionProposals(nn.Module):
    """
    Args:
        hidden_dim: d of q_sem. output_dim: width of the tokens for the unified decoder.
        mask_pool_size: side of M's pooled mask (28). topk: O.
    """

    def __init__(self, hidden_dim: int, output_dim: int, mask_pool_size: int, topk: int):
        super().__init__()
        self.hidden_dim, self.mask_pool_size, self.topk = hidden_dim, mask_pool_size, topk
        self.box_proj = nn.Linear(2 * hidden_dim, hidden_dim)              # B
        self.mask_proj = nn.Linear(mask_pool_size * mask_pool_size, hidden_dim)  # M
        self.norm = nn.LayerNorm(hidden_dim)
        self.objectness = nn.Linear(hidden_dim, 1)
        self.output_proj = nn.Linear(hidden_dim, output_dim)
        nn.init.constant_(self.objectness.bias, -math.log((1 - 0.01) / 0.01))

    def fuse(self, q_sem: torch.Tensor, boxes: torch.Tensor, mask_logits: torch.Tensor,
             valid_hw: torch.Tensor) -> torch.Tensor:
        """Eq. 9.

        Args:
            q_sem: (B, Q, d). boxes: (B, Q, 4) cxcywh on the image's valid region.
            mask_logits: (B, Q, h, w) on the padded canvas.
            valid_hw: (B, 2) int, the un-padded extent of each image on the mask map.
        Returns:
            (B, Q, d) q_proposal (after the LayerNorm).
        """
        B, Q = q_sem.shape[:2]
        s = self.mask_pool_size
        masks = mask_logits.detach().sigmoid()
        # pool each image's valid region only, so padding never changes a proposal.
        pooled = torch.stack([F.adaptive_avg_pool2d(masks[b, :, :int(h), :int(w)], (s, s))
                              for b, (h, w) in enumerate(valid_hw.tolist())])
        box_pe = box_sine_embedding(boxes.detach(), self.hidden_dim // 2).to(q_sem.dtype)
        return self.norm(q_sem + self.box_proj(box_pe)
                         + self.mask_proj(pooled.reshape(B, Q, s * s).to(q_sem.dtype)))

    def forward(self, q_sem, boxes, mask_logits, valid_hw) -> Tuple[torch.Tensor, ...]:
        """Returns (B = batch, O = min(topk, Q)):
            tokens (B, O, output_dim), index (B, O) into the Q queries (sorted by
            objectness, highest first), all_logits (B, Q) objectness of every fused proposal.
        """
        fused = self.fuse(q_sem, boxes, mask_logits, valid_hw)
        logits = self.objectness(fused)[..., 0]
        O = min(self.topk, logits.shape[1])
        index = logits.topk(O, dim=1).indices
        chosen = fused.gather(1, index[..., None].expand(-1, -1, fused.shape[-1]))
        return self.output_proj(chosen), index, logits


class GlobalTokens(nn.Module):
    """M' attention pools plus the flattened map (Eq. 3).

    Each pool is one learned query attending (multi-head, CLIP's AttentionPool2d style) over
    the positions of F3 with a sine position encoding added to the keys; the flattened
    positions follow, projected to the same width.

    Args:
        in_channels: channels of F3. output_dim: token width. num_pools: M'.
        num_heads: attention heads (output_dim must be divisible by it).
    """

    def __init__(self, in_channels: int, output_dim: int, num_pools: int, num_heads: int):
        super().__init__()
        if output_dim % num_heads != 0:
            raise ValueError(f"GlobalTokens: output_dim={output_dim} is not divisible by "
                             f"num_heads={num_heads}")
        self.input_proj = nn.Linear(in_channels, output_dim)
        self.queries = nn.Parameter(torch.randn(num_pools, output_dim) * output_dim ** -0.5)
        self.attn = nn.MultiheadAttention(output_dim, num_heads, batch_first=True)
        self.output_dim = output_dim

    def weight_decay_kinds(self):
        """For the optimiser: the pools' learned queries are embeddings."""
        return {"queries": "embed"}

    def forward(self, f3: torch.Tensor, padding_mask: torch.Tensor):
        """
        Args:
            f3: (B, C, h, w) the last backbone map; padding_mask: (B, h, w) bool.
        Returns:
            tokens (B, M' + h*w, output_dim), token_padding_mask (B, M' + h*w) bool.
        """
        B = f3.shape[0]
        x = self.input_proj(f3.flatten(2).transpose(1, 2))  # (B, hw, D)
        pos = sine_position_encoding_2d(padding_mask, self.output_dim // 2)
        keys = x + pos.flatten(2).transpose(1, 2).to(x.dtype)
        flat_mask = padding_mask.flatten(1)
        q = self.queries[None].expand(B, -1, -1)
        pooled = self.attn(q, keys, x, key_padding_mask=flat_mask, need_weights=False)[0]
        tokens = torch.cat((pooled, x), 1)
        mask = torch.cat((flat_mask.new_zeros(B, pooled.shape[1]), flat_mask), 1)
        return tokens, mask
