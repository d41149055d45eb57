"""TargetBank: the encoded target set (class embeddings) of a task, cached for inference.

A target such as a category name is encoded like any input: [<SPE>, f_text(name)] through
the unified decoder g, and its <SPE> output is its embedding (Uni-Perceiver v2, Sec. 4.3).
During training the encoders change every step, so the bank encodes afresh on every call. In
eval mode the embeddings of a target set are computed once and reused, so inference never runs
the text encoder per image. The cache is dropped whenever the weights may have changed:
on `train()` / `eval()` switches and when a state dict is loaded into the model that holds
the bank (and, by hand, with `clear()`).
"""
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn

__all__ = ["TargetBank"]


class TargetBank(nn.Module):
    """
    Args:
        encode: maps a list of T target strings to their embeddings (T, D); typically a
            bound method of the model that owns the bank (so no parameters live here).
    """

    def __init__(self, encode: Callable[[Sequence[str]], torch.Tensor]):
        super().__init__()
        self._encode = encode
        self._cache: Dict[Tuple[str, ...], torch.Tensor] = {}
        self.num_encodings = 0  # how many times targets were actually encoded (for tests/logs)

    def forward(self, targets: Sequence[str]) -> torch.Tensor:
        """targets: T strings -> (T, D) embeddings (cached in eval mode)."""
        key = tuple(targets)
        if not key:
            raise ValueError("TargetBank: the target set is empty")
        if not all(isinstance(t, str) and t.strip() for t in key):
            raise ValueError(f"TargetBank: targets must be non-empty strings, got {list(key)!r}")
        if self.training:
            return self._run(key)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._run(key).detach()
            self._cache[key] = cached
        return cached

    def _run(self, key):
        self.num_encodings += 1
        out = self._encode(list(key))
        if out.dim() != 2 or out.shape[0] != len(key):
            raise ValueError(f"TargetBank: encode() must return ({len(key)}, D) for {len(key)} "
                             f"targets, got shape {tuple(out.shape)}")
        return out

    def clear(self) -> None:
        """Forget every cached target set."""
        self._cache.clear()

    def train(self, mode: bool = True):
        self.clear()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        # called for every submodule when the owning model loads a state dict
        self.clear()
        return super()._load_from_state_dict(*args, **kwargs)
