"""Optimiser construction (param groups, gradient clipping) and MT-AdamW."""
from .build import build_optimizer, optimizer_param_groups
from .mt_adamw import MTAdamW

__all__ = ["MTAdamW", "build_optimizer", "optimizer_param_groups"]
