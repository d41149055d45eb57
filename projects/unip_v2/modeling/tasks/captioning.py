"""Image captioning in the unified formulation (Uni-Perceiver v2, Sec. 4.3), with the <SPE>-query
scheme of Uni-Perceiver v1 (App. B): every word of the caption is predicted by a query token
whose output is compared with the whole vocabulary (Eq. 5-7).

Training sequence of g (T = caption tokens after <s>, </s> included, c_0 .. c_{T-1}):

    [<SPE>, image global tokens, image regional tokens, w_0 .. w_{T-1}, q_0 .. q_{T-1}]

* w_i = f_text(c_i): the caption [<s>, c_0, .., c_{T-1}] is encoded by RoBERTa *causally*
  (TextEncoder(causal=True)): RoBERTa is bidirectional, and a word's feature computed on the
  whole caption would carry the words after it to the query that must predict them. The
  word segment does not hold <s> (RoBERTa reads it as the context of c_0, its output is
  dropped): with the mask below, query 0 predicts c_0 from the image alone, as in the
  official Uni-Perceiver code (words = caption + end token, no BOS).
* q_i = the decoder's <SPE> vector + a learned query position embedding (row i); q_i
  predicts c_i.
* Attention (True = blocked, `caption_attention_mask`): every row sees <SPE> and the image;
  <SPE> and image rows see no text; w_i sees w_0..w_i; q_i sees w_0..w_{i-1} and itself.
* Routing: words and queries are both TEXT segments with causal=True (routing row 00111101,
  attributes.py): the official code routes its caption queries with the text rows too, and a
  query is a text position (the word it will become) rather than a new modality; a separate
  kind would need a new attribute bit and type embedding that no other task shares. Queries
  differ from words by their content (<SPE> + position) and their attention.
* Logits: own learnable temperature x cos(query outputs, vocabulary) with the vocabulary of
  `model.target_bank.vocabulary()` (every token id encoded as [<s>, id, </s>] through f_text
  and g); loss ``loss_caption`` = MODEL.CAPTIONING.LOSS_WEIGHT x cross-entropy over the
  non-padded positions, label smoothing MODEL.CAPTIONING.LABEL_SMOOTHING.

Inference: beam search (`beam_search`, MODEL.CAPTIONING.BEAM_SIZE / MAX_LENGTH /
LENGTH_PENALTY) over images and beams at once. The image prefix goes through g once
(`UnifiedDecoder.start_cache`); each step decodes only the new word and the new query against
the cached keys and values (`UnifiedDecoder.extend`) and caches the word.
"""
import math
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ...data.dataset_mappers import ImageTextDatasetMapper
from ...evaluation import CaptioningEvaluator
from ..unified_decoder import Segment, SegmentKind
from .base import Task, register_task
from .detection import LogitScale, class_logits

__all__ = ["BeamSearchOutput", "CaptioningTask", "beam_search", "caption_attention_mask",
           "caption_loss", "length_penalized"]

# (kind, causal) of the caption's two text segments, words then queries (module docstring).
_TEXT_LAYOUT = ((SegmentKind.TEXT, True), (SegmentKind.TEXT, True))


def caption_attention_mask(prefix_length: int, num_words: int, device=None) -> torch.Tensor:
    """The attention mask of [prefix (<SPE> + image, P tokens), T words, T queries]: bool
    (L, L), L = P + 2T, True = blocked (UnifiedDecoder's ``attn_mask``).

    Every row sees the prefix; prefix rows see no text; word i sees words 0..i; query i sees
    words 0..i-1 and itself (never word i or a later one, never another query)."""
    p, t = int(prefix_length), int(num_words)
    if p < 1 or t < 1:
        raise ValueError(f"caption_attention_mask: needs a prefix (<SPE>) and a word, got "
                         f"prefix_length={p}, num_words={t}")
    i = torch.arange(t, device=device)
    # text part, rows and columns [words; queries]: allowed pairs
    word_sees_word = i[None, :] <= i[:, None]                                # (T, T)
    query_sees_word = i[None, :] < i[:, None]
    query_sees_query = i[None, :] == i[:, None]
    text_allowed = torch.cat([
        torch.cat([word_sees_word, torch.zeros_like(word_sees_word)], dim=1),
        torch.cat([query_sees_word, query_sees_query], dim=1)], dim=0)      # (2T, 2T)
    mask = torch.zeros(p + 2 * t, p + 2 * t, dtype=torch.bool, device=device)
    mask[:p, p:] = True
    mask[p:, p:] = ~text_allowed
    return mask


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the valid positions (label smoothing as PyTorch's:
    (1 - eps) NLL + eps x mean over the V classes of -log p).

    logits (B, T, V); targets (B, T) token ids; valid (B, T) bool, False at padding."""
    if logits.shape[:2] != targets.shape or valid.shape != targets.shape:
        raise ValueError(f"caption_loss: logits {tuple(logits.shape)}, targets "
                         f"{tuple(targets.shape)} and valid {tuple(valid.shape)} disagree")
    # ignore_index rather than logits[valid]: no host sync for the number of valid tokens
    targets = targets.masked_fill(~valid, -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


def length_penalized(log_prob: torch.Tensor, num_words: torch.Tensor,
                     penalty: float) -> torch.Tensor:
    """The score a beam is ranked by: sum of log p / (num_words + 1) ** penalty, num_words =
    the generated tokens other than </s> (penalty 0: the plain sum)."""
    if penalty == 0:
        return log_prob
    return log_prob / (num_words.to(log_prob.dtype) + 1.0) ** penalty


class BeamSearchOutput(NamedTuple):
    """tokens (N, K, S) int64, the K beams of each of N inputs, best first (S <= max_length;
    after its </s> a beam holds </s>); scores (N, K) the ranking scores
    (`length_penalized`); log_probs (N, K) the sums of log p; num_words (N, K)."""

    tokens: torch.Tensor
    scores: torch.Tensor
    log_probs: torch.Tensor
    num_words: torch.Tensor


def beam_search(step: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor],
                batch: int, beam_size: int, max_length: int, eos_id: int,
                length_penalty: float = 0.0, device=None) -> BeamSearchOutput:
    """Beam search for N = ``batch`` inputs with K = ``beam_size`` beams each, all rows in one
    call of ``step`` per position (no loop over inputs or beams).

    Args:
        step: ``step(tokens, parent)`` -> log-probabilities (N*K, V) of the next token of
            every beam (row n*K + k: beam k of input n); tokens (N*K, t) int64 are the
            tokens each beam holds (t = 0 at the first call); parent (N*K,) int64 gives, for
            each row, the row of the previous call it continues (None at the first call):
            the step reorders its own state (a decoder cache) by it before adding
            tokens[:, -1]. A log-probability of -inf forbids a token.
        max_length: most tokens per beam, </s> included.
        eos_id: </s>. A beam that emits it is finished: it keeps its score and extends only
            with </s> at no cost; the search stops when every beam is finished.
        length_penalty: beams are ranked, at every step and at the end, by
            `length_penalized` (sum of log p / (non-</s> tokens + 1) ** length_penalty).
    """
    k = int(beam_size)
    if k < 1 or max_length < 1 or batch < 1:
        raise ValueError(f"beam_search: beam_size {beam_size}, max_length {max_length} and "
                         f"batch {batch} must be >= 1")
    # Only beam 0 is alive at the start: the others would copy it.
    scores = torch.zeros(batch, k, device=device)
    scores[:, 1:] = -math.inf
    num_words = torch.zeros(batch, k, dtype=torch.long, device=device)
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    tokens = torch.zeros(batch * k, 0, dtype=torch.long, device=device)
    offsets = torch.arange(batch, device=device)[:, None] * k
    parent = None
    for _ in range(max_length):
        logp = step(tokens, parent).float()
        v = logp.shape[-1]
        if logp.shape[0] != batch * k:
            raise ValueError(f"beam_search: step returned {tuple(logp.shape)}, expected "
                             f"({batch * k}, V)")
        logp = logp.view(batch, k, v)
        vocab = torch.arange(v, device=logp.device)
        eos_only = torch.where(vocab == eos_id, 0.0, -math.inf)              # (V,)
        logp = torch.where(finished[..., None], eos_only, logp)
        total = scores[..., None] + logp                                     # (N, K, V)
        words = num_words[..., None] + (~finished[..., None] & (vocab != eos_id)).long()
        rank = length_penalized(total, words, length_penalty)
        _, index = rank.view(batch, k * v).topk(k, dim=1)                   # (N, K)
        beam, token = index // v, index % v
        scores = total.view(batch, k * v).gather(1, index)
        num_words = words.view(batch, k * v).gather(1, index)
        finished = finished.gather(1, beam) | (token == eos_id)
        parent = (beam + offsets).view(-1)
        tokens = torch.cat([tokens[parent], token.view(-1, 1)], dim=1)
        if bool(finished.all()):      # one host sync per step, to stop early
            break
    final = length_penalized(scores, num_words, length_penalty)
    order = final.argsort(dim=1, descending=True)
    rows = (order + offsets).view(-1)
    return BeamSearchOutput(tokens[rows].view(batch, k, -1), final.gather(1, order),
                            scores.gather(1, order), num_words.gather(1, order))


@register_task
class CaptioningTask(Task):
    """Image captioning (module docstring). Inputs: {"image", "caption"} from
    `ImageTextDatasetMapper` (training), {"image", "image_id"} (inference); outputs
    {"caption": str (without special tokens), "image_id"}; evaluator: `CaptioningEvaluator`
    (BLEU, METEOR, ROUGE-L, CIDEr against the dataset's ``caption_json``)."""

    name = "captioning"

    def __init__(self, cfg):
        super().__init__()
        c = cfg.MODEL.CAPTIONING
        self.logit_scale = LogitScale()
        self.loss_weight = float(c.LOSS_WEIGHT)
        self.label_smoothing = float(c.LABEL_SMOOTHING)
        self.beam_size = int(c.BEAM_SIZE)
        self.max_length = int(c.MAX_LENGTH)
        self.length_penalty = float(c.LENGTH_PENALTY)
        context = int(cfg.MODEL.TEXT_ENCODER.CONTEXT_LENGTH)
        if self.beam_size < 1:
            raise ValueError(f"MODEL.CAPTIONING.BEAM_SIZE must be >= 1, got {self.beam_size}")
        # the last step re-encodes [<s>, c_0 .. c_{MAX_LENGTH-2}]: MAX_LENGTH tokens
        if not 1 <= self.max_length <= context:
            raise ValueError(f"MODEL.CAPTIONING.MAX_LENGTH={self.max_length} must lie in [1, "
                             f"MODEL.TEXT_ENCODER.CONTEXT_LENGTH={context}]")
        # Query i's position: g has no position embedding of its own (words carry RoBERTa's,
        # image tokens their boxes/pools), and without one every query would be the same
        # <SPE> vector, told apart only by how many words its mask lets it see, which an
        # attention average cannot count. CONTEXT_LENGTH rows: a caption has at most
        # CONTEXT_LENGTH - 1 tokens after <s>, and decoding at most MAX_LENGTH <= CONTEXT_LENGTH.
        self.query_pos = nn.Embedding(context, cfg.MODEL.UNIFIED_DECODER.WIDTH)
        nn.init.normal_(self.query_pos.weight, std=0.02)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_dir: str):
        return CaptioningEvaluator(dataset_name, output_dir=output_dir)

    @classmethod
    def build_dataset_mapper(cls, cfg, is_train: bool):
        return ImageTextDatasetMapper(cfg, is_train=is_train,
                                      image_size=cfg.MODEL.CAPTIONING.IMAGE_SIZE)

    # ---------------------------------------------------------------- sequences
    def queries(self, model, start: int, stop: int) -> torch.Tensor:
        """(stop - start, width): query tokens start..stop-1 (<SPE> + query position)."""
        if stop > self.query_pos.num_embeddings:
            raise ValueError(f"captioning: query {stop - 1} has no position embedding (at most "
                             f"{self.query_pos.num_embeddings}, CONTEXT_LENGTH)")
        return model.unified_decoder.spe + self.query_pos.weight[start:stop]

    def caption_logits(self, model, out, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
        """The logits of every query of the training sequence (module docstring).

        Args:
            out: the images' ImageEncoderOutput (B images).
            input_ids, attention_mask: (B, 1 + T) tokenized captions, <s> first.
        Returns:
            (B, T, V): scale x cos(output of query i, vocabulary); query i predicts
            input_ids[:, 1 + i].
        """
        features, padding = model.text_encoder(input_ids, attention_mask, causal=True)
        words, word_padding = features[:, 1:], padding[:, 1:]                 # drop <s>
        b, t, _ = words.shape
        if t < 1:
            raise ValueError("captioning: captions need at least one token after <s>")
        queries = self.queries(model, 0, t).to(words.dtype).expand(b, t, -1)
        segments = model.image_segments(out) + [
            Segment(words, word_padding, *_TEXT_LAYOUT[0]),
            Segment(queries, word_padding, *_TEXT_LAYOUT[1])]
        prefix = 1 + out.global_tokens.shape[1] + out.regional_tokens.shape[1]
        mask = caption_attention_mask(prefix, t, device=words.device)
        decoded = model.unified_decoder(segments, attn_mask=mask).tokens[:, -t:]
        return class_logits(decoded, model.target_bank.vocabulary(), self.logit_scale())

    # ---------------------------------------------------------------- training
    def losses(self, model, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        captions = [x.get("caption") for x in batched_inputs]
        if not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError(f"captioning: every training input needs a non-empty 'caption' "
                             f"string (ImageTextDatasetMapper), got {captions!r}")
        input_ids, attention_mask = model.text_encoder.tokenize(captions)
        logits = self.caption_logits(model, model.encode_images(batched_inputs),
                                     input_ids, attention_mask)
        loss = caption_loss(logits, input_ids[:, 1:], attention_mask[:, 1:].bool(),
                            self.label_smoothing)
        return {"loss_caption": self.loss_weight * loss}

    # ---------------------------------------------------------------- inference
    def blocked_tokens(self, tokenizer) -> List[int]:
        """Token ids never generated: <s>, <pad> and <mask> are never targets (a caption's
        targets are its tokens after <s>, ending with </s>)."""
        return sorted({i for i in (tokenizer.bos_token_id, tokenizer.pad_token_id,
                                   tokenizer.mask_token_id) if i is not None})

    def generate(self, model, out) -> BeamSearchOutput:
        """Beam search for the images of ``out`` (ImageEncoderOutput, B images): g decodes the
        image prefix once; each step re-encodes the beam's words with f_text and decodes the
        newest word and the next query against g's cache."""
        decoder, text = model.unified_decoder, model.text_encoder
        tok = text.tokenizer
        b, k = out.global_tokens.shape[0], self.beam_size
        device = out.global_tokens.device
        _, cache = decoder.start_cache(model.image_segments(out), later=_TEXT_LAYOUT)
        cache = cache.index_select(torch.arange(b, device=device).repeat_interleave(k))
        vocabulary = F.normalize(model.target_bank.vocabulary(), dim=-1)     # (V, D)
        scale = self.logit_scale()
        blocked = torch.tensor(self.blocked_tokens(tok), dtype=torch.long, device=device)
        bos = torch.full((b * k, 1), tok.bos_token_id, dtype=torch.long, device=device)
        word_sees_query = torch.tensor([[False, True], [False, False]], device=device)
        state = {"cache": cache}

        def step(tokens: torch.Tensor, parent: Optional[torch.Tensor]) -> torch.Tensor:
            t = tokens.shape[1]
            # Beams follow their parents. This copies the whole cache, the image prefix too,
            # although the beams of one image share it: simple, and small next to a step
            # at these sequence lengths.
            c = state["cache"] if parent is None else state["cache"].index_select(parent)
            query = self.queries(model, t, t + 1).expand(b * k, 1, -1)
            if t == 0:
                new, mask, keep = [Segment(query, None, *_TEXT_LAYOUT[1])], None, 0
            else:
                # f_text re-runs on the short word prefix (at most MAX_LENGTH tokens):
                # RoBERTa's own key/value cache would need its decoder mode and a cache
                # reordered with the beams; encoded causally, the earlier words' features
                # (already in g's cache) are those of this run.
                ids = torch.cat([bos, tokens], dim=1)
                features, _ = text(ids, torch.ones_like(ids), causal=True)
                new = [Segment(features[:, -1:], None, *_TEXT_LAYOUT[0]),
                       Segment(query.to(features.dtype), None, *_TEXT_LAYOUT[1])]
                mask, keep = word_sees_query, 1
            outputs, state["cache"] = decoder.extend(c, new, attn_mask=mask, keep=keep)
            logits = scale * F.normalize(outputs[:, -1], dim=-1) @ vocabulary.T
            return logits.float().log_softmax(dim=-1).index_fill(1, blocked, -math.inf)

        return beam_search(step, b, k, self.max_length, tok.eos_token_id,
                           self.length_penalty, device=device)

    def decode_tokens(self, tokenizer, tokens: torch.Tensor) -> List[str]:
        """(N, S) token ids -> N strings, each cut at its first </s>, special tokens left out."""
        eos = tokenizer.eos_token_id
        is_eos = tokens == eos
        # tokens before the first </s> (all of them where there is none)
        keep = torch.cumsum(is_eos.long(), dim=1) == 0
        rows = [ids[m].tolist() for ids, m in zip(tokens.cpu(), keep.cpu())]
        return [s.strip() for s in tokenizer.batch_decode(rows, skip_special_tokens=True)]

    def inference(self, model, batched_inputs: List[Dict]) -> List[Dict]:
        result = self.generate(model, model.encode_images(batched_inputs))
        captions = self.decode_tokens(model.text_encoder.tokenizer, result.tokens[:, 0])
        return [{"caption": c, "image_id": x.get("image_id")}
                for c, x in zip(captions, batched_inputs)]
