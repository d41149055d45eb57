"""f_text (Uni-Perceiver v2, Sec. 4.2, Eq. 4): RoBERTa token features of a text, projected
to the unified decoder's width.

    texts --tokenize--> input_ids (B, L), attention_mask (B, L)
          --RoBERTa--> (B, L, H) --Linear or identity--> (B, L, D_out)

L <= CONTEXT_LENGTH counts <s> and </s>. A longer text is an error unless truncation is asked
for (``truncate=True``, e.g. for captions, which then keep their </s>): category names are
never cut, since two long names cut alike would share one class embedding.
"""
import logging
from typing import Sequence, Tuple

import torch
from torch import nn

from detectron2.config import configurable

from .tokenizer import build_tokenizer

__all__ = ["TextEncoder", "build_roberta"]

logger = logging.getLogger(__name__)


def build_roberta(tokenizer, pretrained: str = "", hidden_size: int = 768,
                  num_layers: int = 12, num_heads: int = 12, intermediate_size: int = 3072,
                  max_position_embeddings: int = 514) -> nn.Module:
    """A ``transformers.RobertaModel`` without pooler.

    From the local directory ``pretrained`` (``config.json`` + weights, as written by
    ``save_pretrained``; the architecture arguments are then ignored), or, when it is "",
    random-initialised with the given architecture and a vocabulary of ``len(tokenizer)``.
    """
    from transformers import RobertaConfig, RobertaModel

    if pretrained:
        # local_files_only: the path must be a directory here; no hub look-up.
        model = RobertaModel.from_pretrained(pretrained, add_pooling_layer=False,
                                             local_files_only=True)
        # transformers 5 keeps a checkpoint's stored dtype; train in fp32 like the rest of
        # the model (autocast handles mixed precision).
        model = model.to(torch.float32)
        if model.config.vocab_size < len(tokenizer):
            raise ValueError(f"RoBERTa at {pretrained!r} has vocab_size "
                             f"{model.config.vocab_size} < the tokenizer's {len(tokenizer)} "
                             "tokens: they do not belong together")
        return model
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        # RoBERTa has one segment type (roberta-base's type_vocab_size is 1).
        type_vocab_size=1,
        # Position ids start after pad_token_id, so the model must know the tokenizer's ids.
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    return RobertaModel(config, add_pooling_layer=False)


class TextEncoder(nn.Module):
    """RoBERTa text encoder with an output projection.

    ``tokenize(texts)`` -> ``(input_ids (B, L) int64, attention_mask (B, L) int64, 1 = token)``
    on the module's device; ``forward(input_ids, attention_mask, causal=False)`` ->
    ``(features (B, L, output_dim) float, padding_mask (B, L) bool, True = padding)``;
    ``encode(texts)`` does both.
    """

    @configurable
    def __init__(self, *, tokenizer, roberta: nn.Module, output_dim: int, context_length: int):
        """
        Args:
            tokenizer: a RoBERTa tokenizer (:func:`build_tokenizer`).
            roberta: a ``RobertaModel`` (:func:`build_roberta`).
            output_dim: width of the returned features; a Linear projects RoBERTa's
                hidden size to it when they differ.
            context_length: most tokens per text, <s> and </s> included (>= 3, and at
                most RoBERTa's max_position_embeddings - 2, as positions start after the
                padding id).
        """
        super().__init__()
        max_len = roberta.config.max_position_embeddings - (roberta.config.pad_token_id + 1)
        if not 3 <= context_length <= max_len:
            raise ValueError(f"context_length must be in [3, {max_len}] (RoBERTa's "
                             f"max_position_embeddings {roberta.config.max_position_embeddings}"
                             f" minus padding offset), got {context_length}")
        self.tokenizer = tokenizer
        self.roberta = roberta
        self.context_length = int(context_length)
        self.hidden_size = int(roberta.config.hidden_size)
        self.output_dim = int(output_dim)
        self.proj = (nn.Identity() if self.output_dim == self.hidden_size
                     else nn.Linear(self.hidden_size, self.output_dim))
        self.num_truncated = 0

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.TEXT_ENCODER
        # A RoBERTa release directory holds the tokenizer files too.
        tokenizer_dir = c.TOKENIZER or c.PRETRAINED
        if not tokenizer_dir:
            raise ValueError("MODEL.TEXT_ENCODER.TOKENIZER (or PRETRAINED) must name a local "
                             "directory with vocab.json + merges.txt")
        tokenizer = build_tokenizer(tokenizer_dir)
        roberta = build_roberta(
            tokenizer, pretrained=c.PRETRAINED, hidden_size=c.HIDDEN_SIZE,
            num_layers=c.NUM_LAYERS, num_heads=c.NUM_HEADS,
            intermediate_size=c.INTERMEDIATE_SIZE,
            max_position_embeddings=c.MAX_POSITION_EMBEDDINGS)
        return {"tokenizer": tokenizer, "roberta": roberta, "output_dim": c.OUTPUT_DIM,
                "context_length": c.CONTEXT_LENGTH}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: Sequence[str], truncate: bool = False, device=None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Texts -> ``(input_ids (B, L) int64, attention_mask (B, L) int64)`` on ``device``
        (default: the module's), right-padded to the longest text, L <= context_length.

        A text of more than context_length tokens (<s> and </s> included) raises a
        ValueError naming it and its token count, unless ``truncate``: then it is cut to
        context_length tokens, its </s> kept, with a warning; ``num_truncated`` counts the
        texts cut so far."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
        if len(texts) == 0 or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings, got "
                             f"{len(texts)} items of types {sorted({type(t).__name__ for t in texts})}")
        enc = self.tokenizer(list(texts), padding="longest", truncation=False,
                             return_tensors="pt")
        ids, attn = enc["input_ids"].long(), enc["attention_mask"].long()
        if not truncate:
            self._check_lengths(texts, attn.sum(1).tolist())
        elif ids.shape[1] > self.context_length:
            # Cut here rather than by the tokenizer's truncation, which cannot say which
            # texts it cut: the count and the warning are the "counted, never silent" rule.
            limit = self.context_length
            cut = attn.sum(1) > limit                                        # (B,)
            ids, attn = ids[:, :limit].clone(), attn[:, :limit].clone()
            ids[cut, limit - 1] = self.tokenizer.eos_token_id
            self.num_truncated += int(cut.sum())
            logger.warning(f"{int(cut.sum())} text(s) of this batch are longer than "
                           f"MODEL.TEXT_ENCODER.CONTEXT_LENGTH = {limit} tokens and were cut "
                           f"(their </s> kept); {self.num_truncated} so far")
        device = self.device if device is None else device
        return ids.to(device), attn.to(device)

    def check_lengths(self, texts: Sequence[str], what: str = "text") -> None:
        """Raise a ValueError naming every text of more than context_length tokens (<s> and
        </s> included), e.g. before a long run, so that it fails at once; ``what`` names
        the texts in the message ("category name", ...)."""
        lengths = [len(ids) for ids in self.tokenizer(list(texts))["input_ids"]]
        self._check_lengths(texts, lengths, what)

    def _check_lengths(self, texts: Sequence[str], lengths: Sequence[int],
                       what: str = "text") -> None:
        too_long = [f"{t!r} ({n} tokens)" for t, n in zip(texts, lengths)
                    if n > self.context_length]
        if too_long:
            raise ValueError(
                f"{what}s longer than the text encoder's limit of {self.context_length} "
                f"tokens (MODEL.TEXT_ENCODER.CONTEXT_LENGTH, <s> and </s> included): "
                f"{', '.join(too_long)}. Shorten them: they are not cut, since names cut "
                f"alike would get one embedding")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                causal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            input_ids: (B, L) integer token ids, L <= context_length.
            attention_mask: (B, L) bool or integer, nonzero/True = real token.
            causal: token i attends to tokens 0..i only (and never to padding), so its
                feature depends on no later token. Captioning needs it: RoBERTa is
                bidirectional, and a word's feature computed on the whole caption would
                carry the next words to the query that must predict them.

        Returns:
            features: (B, L, output_dim), RoBERTa's last hidden states, projected.
            padding_mask: (B, L) bool, True where the position is padding.
        """
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.is_complex():
            raise ValueError(f"input_ids must be an integer (B, L) tensor, got shape "
                             f"{tuple(input_ids.shape)} dtype {input_ids.dtype}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal "
                             f"input_ids shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0 or not 1 <= input_ids.shape[1] <= self.context_length:
            raise ValueError(f"input_ids shape {tuple(input_ids.shape)} needs B >= 1 and "
                             f"1 <= L <= context_length {self.context_length}")
        attention_mask = attention_mask.to(dtype=torch.long)
        roberta_mask = (self._causal_mask(attention_mask) if causal else attention_mask)
        hidden = self.roberta(input_ids=input_ids.long(),
                              attention_mask=roberta_mask).last_hidden_state
        return self.proj(hidden), attention_mask == 0

    def _causal_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) 1 = token -> the 4-D mask (B, 1, L, L) that RobertaModel takes as it is
        (transformers 5.x: masking_utils returns a 4-D attention_mask unchanged): query i
        may see key j iff j <= i and j is a token. Every row sees at least position 0 (<s>,
        right padding), so no row is empty. Its encoding depends on the attention kernel:
        SDPA reads a bool mask as True = attend, the eager kernel adds the mask to the
        scores (0 = attend, a large negative number = blocked)."""
        length = attention_mask.shape[1]
        pos = torch.arange(length, device=attention_mask.device)
        allowed = (pos[None, :] <= pos[:, None])[None] & attention_mask.bool()[:, None, :]
        allowed = allowed[:, None]                                           # (B, 1, L, L)
        kernel = self.roberta.config._attn_implementation
        if kernel == "sdpa":
            return allowed
        if kernel == "eager":
            dtype = self.roberta.embeddings.word_embeddings.weight.dtype
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        raise NotImplementedError(f"causal text encoding with RoBERTa's attention kernel "
                                  f"{kernel!r}: only 'sdpa' and 'eager' take a 4-D mask here")

    def encode(self, texts: Sequence[str], truncate: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``forward(*tokenize(texts, truncate))``: texts -> (features (B, L, D_out),
        padding_mask (B, L)); too long texts raise unless ``truncate`` (see tokenize)."""
        return self(*self.tokenize(texts, truncate))
