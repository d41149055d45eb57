"""Optimiser of unip-v2: AdamW (or SGD) with per-parameter learning rate and weight decay,
and optional gradient clipping over the whole model.

- Parameters of the image encoder's backbone train at SOLVER.BACKBONE_MULTIPLIER x the
  base learning rate, those of the text encoder (names starting with "text_encoder.") at
  SOLVER.TEXT_ENCODER_MULTIPLIER x (pretrained encoders move slowly, Sec. 5.2).
- Normalisation parameters take SOLVER.WEIGHT_DECAY_NORM; embeddings (level / query /
  position embeddings, Swin's relative position tables) take SOLVER.WEIGHT_DECAY_EMBED.
- SOLVER.CLIP_GRADIENTS with CLIP_TYPE "full_model" clips the global norm over all
  parameters (Mask DINO / Mask2Former); "value" and "norm" are detectron2's per-parameter
  clipping.
"""
import itertools
from typing import Any, Dict, List

import torch
from torch import nn

from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = ["build_optimizer", "optimizer_param_groups"]

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm,
               nn.LocalResponseNorm)
# parameter names (last component) that are embeddings rather than weights
_EMBED_NAMES = ("level_embed", "relative_position_bias_table", "absolute_pos_embed",
                "pos_embed", "queries")
_BACKBONE_PREFIX = "image_encoder.backbone."
_TEXT_ENCODER_PREFIX = "text_encoder."


def optimizer_param_groups(cfg, model: nn.Module) -> List[Dict[str, Any]]:
    """One group per trainable parameter with its lr and weight_decay (each parameter once,
    even if shared between modules)."""
    base_lr, wd = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            lr = base_lr
            if full.startswith(_BACKBONE_PREFIX):
                lr = base_lr * cfg.SOLVER.BACKBONE_MULTIPLIER
            elif full.startswith(_TEXT_ENCODER_PREFIX):
                lr = base_lr * cfg.SOLVER.TEXT_ENCODER_MULTIPLIER
            decay = wd
            if isinstance(module, _NORM_TYPES) or "norm" in module_name.rsplit(".", 1)[-1]:
                decay = cfg.SOLVER.WEIGHT_DECAY_NORM
            elif isinstance(module, nn.Embedding) or name in _EMBED_NAMES:
                decay = cfg.SOLVER.WEIGHT_DECAY_EMBED
            groups.append({"params": [p], "lr": lr, "weight_decay": decay})
    return groups


def _full_model_clipping(optim_cls, clip_value: float):
    class FullModelGradientClipping(optim_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, clip_value)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = optim_cls.__name__ + "WithFullModelGradientClipping"
    return FullModelGradientClipping


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER "ADAMW" | "SGD" over optimizer_param_groups, with clipping."""
    groups = optimizer_param_groups(cfg, model)
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {"betas": (0.9, 0.999)}
    elif name == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM,
                                               "nesterov": cfg.SOLVER.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got {cfg.SOLVER.OPTIMIZER!r}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = _full_model_clipping(optim_cls, clip.CLIP_VALUE)
    elif clip.ENABLED:
        optim_cls = maybe_add_gradient_clipping(cfg, optim_cls)
    return optim_cls(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)
