"""TargetBank: the encoded target sets of the tasks (class names, the vocabulary), cached for
inference.

A target such as a category name is encoded like any input: [<SPE>, f_text(name)] through
the unified decoder g, and its <SPE> output is its embedding (Uni-Perceiver v2, Sec. 4.3).
During training the encoders change every step, so the bank encodes afresh on every call. In
eval mode the embeddings of a target set are computed once and reused, so inference never runs
the text encoder per image. The cache is dropped whenever the weights may have changed:
on `train()` / `eval()` switches and when a state dict is loaded into the model that holds
the bank (and, by hand, with `clear()`).

The vocabulary (captioning and MLM compare each predicted word with every token of the
tokenizer, Uni-Perceiver v2, Sec. 4.3) is a target set too: token v is encoded as the text
[<s>, v, </s>]. In training it is encoded afresh on every call, with gradients; when several
processes train, each encodes a contiguous slice of about V / world_size tokens and the
slices are all-gathered with autograd (torch.distributed.nn), so every process holds all V
embeddings and the gradients of its slice flow back through every process's loss (the
slicing of the official Uni-Perceiver code's shared targets). At inference it is cached
like any target set.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.utils import comm

__all__ = ["TargetBank"]


class TargetBank(nn.Module):
    """
    Args:
        encode: maps a list of T target strings to their embeddings (T, D); typically a
            bound method of the model that owns the bank (so no parameters live here).
        encode_tokens: maps token ids (T,) int64 to the embeddings (T, D) of the texts
            [<s>, id, </s>]; with ``vocabulary_size``, what `vocabulary` needs.
        vocabulary_size: V, the number of token ids of the tokenizer.
    """

    def __init__(self, encode: Callable[[Sequence[str]], torch.Tensor],
                 encode_tokens: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 vocabulary_size: int = 0):
        super().__init__()
        self._encode = encode
        self._encode_tokens = encode_tokens
        self.vocabulary_size = int(vocabulary_size)
        self._cache: Dict[Tuple[str, ...], torch.Tensor] = {}
        self._vocabulary: Optional[torch.Tensor] = None
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

    def vocabulary(self) -> torch.Tensor:
        """(V, D): the embedding of every token id 0..V-1 (see the module docstring);
        encoded with gradients in training, sliced over processes; cached in eval mode."""
        if self._encode_tokens is None or self.vocabulary_size <= 0:
            raise ValueError("TargetBank: no vocabulary (built without encode_tokens and "
                             "vocabulary_size)")
        if not self.training:
            if self._vocabulary is None:
                self._vocabulary = self._run_tokens(0, self.vocabulary_size).detach()
            return self._vocabulary
        world = comm.get_world_size()
        if world == 1:
            return self._run_tokens(0, self.vocabulary_size)
        from torch.distributed.nn.functional import all_gather

        # Equal slices (all_gather needs equal shapes): the last ones may run past V and
        # encode copies of the last token, trimmed after the gather.
        per_rank = -(-self.vocabulary_size // world)
        start = comm.get_rank() * per_rank
        mine = self._run_tokens(start, start + per_rank)
        return torch.cat(all_gather(mine), dim=0)[: self.vocabulary_size]

    def _run_tokens(self, start: int, stop: int) -> torch.Tensor:
        self.num_encodings += 1
        ids = torch.arange(start, stop).clamp_(max=self.vocabulary_size - 1)
        out = self._encode_tokens(ids)
        if out.dim() != 2 or out.shape[0] != stop - start:
            raise ValueError(f"TargetBank: encode_tokens() must return ({stop - start}, D) for "
                             f"{stop - start} token ids, got shape {tuple(out.shape)}")
        return out

    def clear(self) -> None:
        """Forget every cached target set."""
        self._cache.clear()
        self._vocabulary = None

    def train(self, mode: bool = True):
        self.clear()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        # called for every submodule when the owning model loads a state dict
        self.clear()
        return super()._load_from_state_dict(*args, **kwargs)
