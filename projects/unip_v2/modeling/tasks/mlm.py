"""Masked language modelling in the unified formulation (Uni-Perceiver v2, Sec. 4.3; the
Books&Wiki MLM of Uni-Perceiver v1, Sec. 4 and App. B): a text with some of its words
hidden is [<SPE>, f_text(tokens)] through g, and the output of g at each chosen position is
compared with every token of the vocabulary, each encoded as the target [<SPE>, f_text([<s>,
id, </s>])] (Eq. 5); the loss is cross-entropy over the chosen positions (Eq. 7); the metric
is masked-token accuracy.

Masking (BERT's recipe, as Uni-Perceiver v1 uses it; MODEL.MLM):
- the *word positions* of a text are its tokens other than <s>, </s>, padding (and any other
  special token the text may contain); MASK_RATIO of them are chosen, at least one per text:
  n = floor(ratio x words + u) with u uniform in [0, 1) (stochastic rounding, so the expected
  share is exactly MASK_RATIO whatever the text lengths), then the n positions of smallest
  uniform score;
- of the chosen positions MASK_TOKEN_FRACTION become <mask>, RANDOM_TOKEN_FRACTION a token
  drawn uniformly from the vocabulary *without its special tokens* (Uni-Perceiver v1 drew
  from the whole vocabulary; a random <s>, </s> or <pad> in the middle of a text would teach
  nothing but noise, and a random <mask> would blur the 80% share), the rest stay unchanged;
- token-level masking: every sub-word token is a candidate on its own (Uni-Perceiver v1
  masked whole words; on the toy captions almost every word is one token, so the two differ
  little there);
- training draws from torch's default CPU generator (the trainer saves its state in every
  checkpoint, so a resumed run masks exactly as an uninterrupted one); evaluation draws from
  a counter-based hash of (the text's token ids, position), so a text gets the same masked
  positions in every evaluation, alone or in any batch, and the val metric is reproducible.

Texts longer than MODEL.TEXT_ENCODER.CONTEXT_LENGTH tokens (<s> and </s> included) are cut to
it, keeping </s>, with a warning and a count (the text encoder's ``num_truncated``): for MLM
the start of a long text is still a valid sample (BERT cuts corpus text into fixed-length
pieces), whereas dropping long texts would bias the corpus towards short ones.
"""
import logging
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
from torch.nn import functional as F

from ...data.dataset_mappers import TextDatasetMapper
from ...evaluation import MLMEvaluator
from ..unified_decoder import Segment, SegmentKind
from .base import Task, register_task
from .detection import LogitScale, class_logits

__all__ = ["MLMTask", "MaskedTokens", "MaskingUniforms", "evaluation_uniforms", "mask_tokens",
           "training_uniforms"]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- random numbers
# The evaluation masks come from a counter-based hash: integer arithmetic modulo the prime
# P = 2^31 - 1, so every product of two residues (< 2^62) fits in int64 and nothing
# overflows. Each round xor-shifts (spreads high bits down) and applies an affine map mod P.
_P = 2_147_483_647
_ROUNDS = ((1_103_515_245, 12_345), (48_271, 1_013_904_223), (69_621, 2_654_435_761 % _P))


def _mix(x: torch.Tensor) -> torch.Tensor:
    """int64 residues in [0, P) -> pseudo-random residues in [0, P), elementwise."""
    for a, c in _ROUNDS:
        x = x ^ (x >> 13)
        x = (x * a + c) % _P
    return x


class MaskingUniforms(NamedTuple):
    """The random numbers of one masking, uniform in [0, 1), float64: ``choose`` (B, L) ranks
    the word positions, ``kind`` (B, L) picks <mask> / random / unchanged, ``token`` (B, L)
    picks the random token, ``rounding`` (B,) rounds each text's share of chosen words."""

    choose: torch.Tensor
    kind: torch.Tensor
    token: torch.Tensor
    rounding: torch.Tensor


def training_uniforms(batch: int, length: int, generator: torch.Generator = None
                      ) -> MaskingUniforms:
    """Fresh uniforms from ``generator`` (default: torch's default CPU generator, saved in
    the trainer's checkpoints)."""
    u = torch.rand(3 * batch * length + batch, generator=generator, dtype=torch.float64)
    grid = u[: 3 * batch * length].view(3, batch, length)
    return MaskingUniforms(grid[0], grid[1], grid[2], u[3 * batch * length:])


def evaluation_uniforms(input_ids: torch.Tensor, attention_mask: torch.Tensor
                        ) -> MaskingUniforms:
    """Uniforms that are a pure function of each text's tokens and the position: text b's
    key is a hash of its (id, position) pairs over its real tokens (padding is left out, so
    the key does not depend on the batch), and u(b, l, stream) = hash(key_b, l, stream).

    Args:
        input_ids: (B, L) int64; attention_mask: (B, L), nonzero = real token.
    """
    ids = input_ids.detach().long().cpu()
    real = attention_mask.detach().cpu() != 0
    b, length = ids.shape
    pos = torch.arange(length, dtype=torch.long)
    position_weight = _mix(pos + 1)                                          # (L,)
    # (id + 1) x weight(position), each term reduced mod P before the sum: no overflow
    terms = ((ids % _P + 1) * position_weight) % _P
    key = _mix((terms * real).sum(1) % _P)                                   # (B,)

    def stream(s: int, positions: torch.Tensor) -> torch.Tensor:
        salt = _mix((positions * 4 + s) % _P)                                # (L,)
        x = _mix(((key[:, None] * 40_503) % _P + salt[None, :]) % _P)
        return x.double() / _P

    return MaskingUniforms(stream(0, pos), stream(1, pos), stream(2, pos),
                           stream(3, pos[:1])[:, 0])


# ---------------------------------------------------------------- masking
class MaskedTokens(NamedTuple):
    """input_ids: (B, L) int64, the ids the model reads (chosen positions replaced);
    chosen: (B, L) bool, the positions to predict (their targets: the original ids);
    replaced_by_mask / replaced_by_random: (B, L) bool, subsets of ``chosen``."""

    input_ids: torch.Tensor
    chosen: torch.Tensor
    replaced_by_mask: torch.Tensor
    replaced_by_random: torch.Tensor


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                uniforms: MaskingUniforms, *, special_ids: torch.Tensor,
                replacement_ids: torch.Tensor, mask_token_id: int, mask_ratio: float,
                mask_fraction: float, random_fraction: float) -> MaskedTokens:
    """BERT masking of a batch (see the module docstring), all texts at once.

    Args:
        input_ids: (B, L) int64 original ids; attention_mask: (B, L), nonzero = real token.
        uniforms: `training_uniforms` or `evaluation_uniforms` of the same (B, L).
        special_ids: (S,) ids never chosen (<s>, </s>, <pad>, <unk>, <mask>).
        replacement_ids: (K,) ids a random replacement is drawn from, uniformly.
        mask_token_id: the id of <mask>.
        mask_ratio: share of the word positions chosen (at least one per text that has one).
        mask_fraction / random_fraction: of the chosen, the share replaced by <mask> / by a
            random id; the rest stay unchanged.
    """
    ids = input_ids.long()
    b, length = ids.shape
    for name, u, shape in (("choose", uniforms.choose, (b, length)),
                           ("kind", uniforms.kind, (b, length)),
                           ("token", uniforms.token, (b, length)),
                           ("rounding", uniforms.rounding, (b,))):
        if tuple(u.shape) != shape:
            raise ValueError(f"mask_tokens: uniforms.{name} has shape {tuple(u.shape)}, "
                             f"expected {shape}")
    if replacement_ids.numel() == 0:
        raise ValueError("mask_tokens: no token to draw random replacements from")
    device = ids.device
    words = (attention_mask != 0) & ~torch.isin(ids, special_ids.to(device))
    num_words = words.sum(1)                                                 # (B,)
    wanted = torch.floor(mask_ratio * num_words.double() + uniforms.rounding.to(device))
    num_chosen = torch.minimum(wanted.long().clamp(min=1), num_words)        # (B,)
    # The num_chosen word positions of smallest score: non-words score 2 > any uniform, so
    # they rank after every word and are never reached.
    score = torch.where(words, uniforms.choose.to(device), torch.full_like(uniforms.choose, 2.0,
                                                                           device=device))
    rank = score.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    chosen = rank < num_chosen[:, None]
    kind = uniforms.kind.to(device)
    by_mask = chosen & (kind < mask_fraction)
    by_random = chosen & ~by_mask & (kind < mask_fraction + random_fraction)
    k = replacement_ids.numel()
    pick = (uniforms.token.to(device) * k).long().clamp_(max=k - 1)
    random_ids = replacement_ids.to(device)[pick]
    out = torch.where(by_mask, torch.full_like(ids, mask_token_id),
                      torch.where(by_random, random_ids, ids))
    return MaskedTokens(out, chosen, by_mask, by_random)


# ---------------------------------------------------------------- the task
@register_task
class MLMTask(Task):
    """Inputs: {"text"} from `TextDatasetMapper`. Targets: the vocabulary,
    ``model.target_bank.vocabulary()`` (V, D), encoded with gradients in training and cached
    at inference. Temperature: its own learnable scale. Loss ``loss_mlm`` =
    MODEL.MLM.LOSS_WEIGHT x cross-entropy over the chosen positions of the batch (no label
    smoothing, as Uni-Perceiver). Outputs per text: {"masked_positions" (n,) (indices into
    the text's tokens, <s> = 0), "predicted_ids" (n,), "target_ids" (n,)}, int64 on the CPU.
    """

    name = "mlm"

    def __init__(self, cfg):
        super().__init__()
        c = cfg.MODEL.MLM
        if not 0.0 < c.MASK_RATIO <= 1.0:
            raise ValueError(f"MODEL.MLM.MASK_RATIO must be in (0, 1], got {c.MASK_RATIO}")
        fractions = (c.MASK_TOKEN_FRACTION, c.RANDOM_TOKEN_FRACTION)
        if min(fractions) < 0 or sum(fractions) > 1.0 + 1e-9:
            raise ValueError(f"MODEL.MLM.MASK_TOKEN_FRACTION ({fractions[0]}) and "
                             f"RANDOM_TOKEN_FRACTION ({fractions[1]}) must be >= 0 with a sum "
                             f"<= 1 (the rest of the chosen tokens stay unchanged)")
        self.logit_scale = LogitScale()
        self.loss_weight = c.LOSS_WEIGHT
        self.mask_ratio = float(c.MASK_RATIO)
        self.mask_fraction = float(c.MASK_TOKEN_FRACTION)
        self.random_fraction = float(c.RANDOM_TOKEN_FRACTION)
        # (tokenizer id, vocabulary size) -> special / replacement ids, built on first use
        self._vocabulary_ids = None

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_dir: str):
        return MLMEvaluator(dataset_name)

    @classmethod
    def build_dataset_mapper(cls, cfg, is_train: bool):
        return TextDatasetMapper(cfg, is_train=is_train)

    # ------------------------------------------------------------ inputs
    def tokenize(self, model, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (input_ids (B, L), attention_mask (B, L)) int64 on the CPU, right-padded,
        L <= context_length; longer texts are cut keeping </s> (warned, counted in the text
        encoder's ``num_truncated``)."""
        bad = [(i, t) for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"mlm: every input needs a non-empty 'text' string; got "
                             f"{', '.join(f'#{i}: {t!r:.60}' for i, t in bad)}")
        return model.text_encoder.tokenize(list(texts), truncate=True, device="cpu")

    def special_and_replacement_ids(self, model) -> Tuple[torch.Tensor, torch.Tensor]:
        """(special ids (S,), the other ids of the vocabulary (V - S,)), on the CPU; built
        once per tokenizer and vocabulary size (a real vocabulary has ~50k ids: not every
        batch)."""
        tok = model.text_encoder.tokenizer
        key = (id(tok), model.target_bank.vocabulary_size)
        if self._vocabulary_ids is None or self._vocabulary_ids[0] != key:
            special = torch.as_tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
            vocab = torch.arange(model.target_bank.vocabulary_size)
            self._vocabulary_ids = (key, special, vocab[~torch.isin(vocab, special)])
        return self._vocabulary_ids[1], self._vocabulary_ids[2]

    def masked_batch(self, model, batched_inputs: List[Dict]
                     ) -> Tuple[torch.Tensor, torch.Tensor, MaskedTokens]:
        """-> original ids (B, L), attention mask (B, L), MaskedTokens; on the CPU. Random in
        training, a pure function of each text at inference."""
        texts = [x.get("text") for x in batched_inputs]
        ids, attn = self.tokenize(model, texts)
        uniforms = (training_uniforms(*ids.shape) if self.training
                    else evaluation_uniforms(ids, attn))
        special, replacement = self.special_and_replacement_ids(model)
        masked = mask_tokens(
            ids, attn, uniforms, special_ids=special, replacement_ids=replacement,
            mask_token_id=model.text_encoder.tokenizer.mask_token_id,
            mask_ratio=self.mask_ratio, mask_fraction=self.mask_fraction,
            random_fraction=self.random_fraction)
        return ids, attn, masked

    # ------------------------------------------------------------ model
    def chosen_logits(self, model, masked_ids: torch.Tensor, attention_mask: torch.Tensor,
                      chosen: torch.Tensor) -> torch.Tensor:
        """(N, V): scale * cos(g's output at each of the N chosen positions, in row-major
        order, vocabulary embeddings) for the text sequence [<SPE>, f_text(masked_ids)]."""
        device = model.text_encoder.device
        features, padding = model.text_encoder(masked_ids.to(device), attention_mask.to(device))
        out = model.unified_decoder([Segment(features, padding, SegmentKind.TEXT)])
        # tokens[:, 0] is <SPE>; text position l is tokens[:, 1 + l]
        queries = out.tokens[:, 1:][chosen.to(device)]                       # (N, D)
        return class_logits(queries[None], model.target_bank.vocabulary(),
                            self.logit_scale())[0]

    def losses(self, model, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        ids, attn, masked = self.masked_batch(model, batched_inputs)
        logits = self.chosen_logits(model, masked.input_ids, attn, masked.chosen).float()
        if logits.shape[0] == 0:
            # only texts without a word (e.g. a lone special token): nothing to predict; a
            # zero that still touches the graph, so every process runs the same backward
            logger.warning("mlm: no maskable token in this batch; its loss is 0")
            return {"loss_mlm": logits.sum() * 0.0}
        targets = ids[masked.chosen].to(logits.device)
        return {"loss_mlm": self.loss_weight * F.cross_entropy(logits, targets)}

    def inference(self, model, batched_inputs: List[Dict]) -> List[Dict]:
        ids, attn, masked = self.masked_batch(model, batched_inputs)
        logits = self.chosen_logits(model, masked.input_ids, attn, masked.chosen)
        predicted = logits.argmax(dim=-1).cpu()
        per_text = masked.chosen.sum(1).tolist()
        positions = masked.chosen.nonzero()[:, 1]                            # row-major
        return [{"masked_positions": p, "predicted_ids": y, "target_ids": t}
                for p, y, t in zip(positions.split(per_text), predicted.split(per_text),
                                   ids[masked.chosen].split(per_text))]
