"""Optimiser construction (param groups, gradient clipping)."""
from .build import build_optimizer, optimizer_param_groups

__all__ = ["build_optimizer", "optimizer_param_groups"]
