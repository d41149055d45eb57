"""Image captioning (Uni-Perceiver v2, Sec. 4.3; the <SPE>-query scheme of Uni-Perceiver v1,
App. B): the attention mask, causal f_text, routing, the loss, gradients, beam search against
greedy decoding and the cached decoder against re-running the prefix, and the evaluator."""
import json
import logging
import math

import pytest
import torch

import unip_v2  # noqa: F401  first: makes detectron2 importable

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from unip_v2.evaluation import CaptioningEvaluator
from unip_v2.evaluation import captioning as evaluation_module
from unip_v2.modeling.tasks import captioning as captioning_module
from unip_v2.modeling.tasks.captioning import (
    beam_search,
    caption_attention_mask,
    caption_loss,
    length_penalized,
)
from unip_v2.modeling.unified_decoder import unified_decoder as decoder_module

from test_uni_perceiver_v2 import cfg as base_cfg  # noqa: F401  (tiny generalist)

CAPTIONS = ["a red circle and a blue triangle", "a green square", "two red circles",
            "a blue triangle and a green square"]


@pytest.fixture(scope="module")
def cfg(base_cfg):  # noqa: F811
    c = base_cfg.clone()
    c.MODEL.TASKS = ["captioning"]
    c.MODEL.CAPTIONING.MAX_LENGTH = 9
    c.MODEL.CAPTIONING.LOSS_WEIGHT = 1.5
    c.MODEL.CAPTIONING.LABEL_SMOOTHING = 0.1
    # two layers: a token's keys in layer 2 depend on what it attended to in layer 1, so the
    # cached decoder is checked beyond the first layer
    c.MODEL.UNIFIED_DECODER.DEPTH = 2
    return c


def images(n, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
             "caption": CAPTIONS[i % len(CAPTIONS)], "image_id": 100 + i, "task": "captioning"}
            for i in range(n)]


def rows_of(out, index):
    """The ImageEncoderOutput of images ``index`` (a single image cannot be encoded alone:
    the toy encoder's GroupNorm needs more than one value per group at the coarsest map)."""
    return type(out)(**{k: (v[index] if torch.is_tensor(v) and v.dim() > 0 else v)
                        for k, v in vars(out).items()})


def build(cfg, seed=0, train=False):
    torch.manual_seed(seed)
    model = build_model(cfg)
    return model.train() if train else model.eval()


# ---------------------------------------------------------------- the sequence
def test_attention_mask_equals_a_hand_built_oracle():
    """Prefix P = 2 (<SPE>, one image token), T = 3 words w0..w2, queries q0..q2; 1 = blocked.
    Rows/columns: S I w0 w1 w2 q0 q1 q2."""
    want = torch.tensor([
        # S  I w0 w1 w2 q0 q1 q2
        [0, 0, 1, 1, 1, 1, 1, 1],   # <SPE>: prefix only
        [0, 0, 1, 1, 1, 1, 1, 1],   # image
        [0, 0, 0, 1, 1, 1, 1, 1],   # w0 sees w0
        [0, 0, 0, 0, 1, 1, 1, 1],   # w1 sees w0 w1
        [0, 0, 0, 0, 0, 1, 1, 1],   # w2 sees w0 w1 w2
        [0, 0, 1, 1, 1, 0, 1, 1],   # q0: no word, itself
        [0, 0, 0, 1, 1, 1, 0, 1],   # q1: w0, itself
        [0, 0, 0, 0, 1, 1, 1, 0],   # q2: w0 w1, itself
    ], dtype=torch.bool)
    assert torch.equal(caption_attention_mask(2, 3), want)
    with pytest.raises(ValueError, match="num_words"):
        caption_attention_mask(2, 0)


def test_causal_text_encoding_and_no_leak_into_earlier_queries(cfg):
    """Changing word k changes no f_text feature of the words before it (position k + 1 of
    [<s>, c_0, ...]) and no logit of queries 0..k; the bidirectional encoder would."""
    model = build(cfg)
    task = model.tasks["captioning"]
    ids, mask = model.text_encoder.tokenize(["a red circle and a blue triangle"])
    k = 3                                             # c_3, at position 4
    other = ids.clone()
    other[0, k + 1] = ids[0, k + 2]
    assert other[0, k + 1] != ids[0, k + 1]
    with torch.no_grad():
        f, _ = model.text_encoder(ids, mask, causal=True)
        g, _ = model.text_encoder(other, mask, causal=True)
        assert torch.equal(f[0, : k + 1], g[0, : k + 1])
        assert (f[0, k + 1] - g[0, k + 1]).abs().max() > 1e-3
        fb, _ = model.text_encoder(ids, mask)
        gb, _ = model.text_encoder(other, mask)
        assert (fb[0, :k + 1] - gb[0, :k + 1]).abs().max() > 1e-4   # the leak causal removes
        out = rows_of(model.encode_images(images(2)), slice(0, 1))
        a = task.caption_logits(model, out, ids, mask)
        b = task.caption_logits(model, out, other, mask)
    assert torch.allclose(a[0, : k + 1], b[0, : k + 1], atol=1e-5)
    assert (a[0, k + 1:] - b[0, k + 1:]).abs().max() > 1e-3


def _rows(bits):
    return tuple(float(c) for c in bits)


def test_routing_attributes_of_each_segment(cfg, monkeypatch):
    """Bits b0..b7 (attributes.py): SPE, image-global, image-regional, words, queries of a
    caption sequence, in training and in cached decoding (the same rows)."""
    seen = []
    plan = decoder_module.plan_routing

    def recording(rows, lengths, batch, device=None):
        seen.append(([tuple(r) for r in rows], list(lengths)))
        return plan(rows, lengths, batch, device=device)

    monkeypatch.setattr(decoder_module, "plan_routing", recording)
    spe, glob, reg, text = (_rows("00011100"), _rows("10011100"), _rows("01011100"),
                            _rows("00111101"))
    model = build(cfg)
    task = model.tasks["captioning"]
    ids, mask = model.text_encoder.tokenize(["a green square"])
    t = ids.shape[1] - 1
    target = ([_rows("00000110"), _rows("00100110")], [1, 3])   # vocabulary: [SPE, text]
    with torch.no_grad():
        out = rows_of(model.encode_images(images(2)), slice(0, 1))
        g, o = out.global_tokens.shape[1], out.regional_tokens.shape[1]
        task.caption_logits(model, out, ids, mask)
        assert ([spe, glob, reg, text, text], [1, g, o, t, t]) in seen
        assert target in seen
        seen.clear()
        task.generate(model, out)          # the vocabulary is cached (eval): not encoded
    assert seen[0] == ([spe, glob, reg], [1, g, o])        # the cached image prefix
    assert seen[1] == ([text], [1])                        # step 0: the query alone
    assert len(seen) > 2 and all(s == ([text, text], [1, 1]) for s in seen[2:])


# ---------------------------------------------------------------- the loss
def test_loss_equals_a_float64_oracle_and_ignores_padding():
    """(1 - eps) x NLL + eps x mean over classes of -log p, averaged over valid positions."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g) * 3
    targets = torch.tensor([[1, 4, 0], [2, 3, 3]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    eps = 0.2
    lp = torch.log_softmax(logits.double(), dim=-1)
    terms = [(1 - eps) * -lp[b, i, targets[b, i]] + eps * -lp[b, i].mean()
             for b in range(2) for i in range(3) if valid[b, i]]
    want = sum(terms) / len(terms)
    assert caption_loss(logits, targets, valid, eps).item() == pytest.approx(want.item(),
                                                                             rel=1e-6)
    # padded positions: any logits, any target id
    changed = logits.clone()
    changed[0, 2] = 100.0
    bad_targets = targets.clone()
    bad_targets[0, 2] = 77
    assert caption_loss(changed, bad_targets, valid, eps).item() == pytest.approx(
        want.item(), rel=1e-6)


def test_model_loss_gradients_reach_every_part(cfg):
    model = build(cfg, train=True)
    task = model.tasks["captioning"]
    seen = {}
    caption_logits = task.caption_logits

    def capture(*args):
        seen["logits"] = caption_logits(*args)
        return seen["logits"]

    task.caption_logits = capture
    batch = images(3)
    losses = model(batch)
    assert set(losses) == {"loss_caption"} and torch.isfinite(losses["loss_caption"])
    # the model's loss is 1.5 x the loss of its own logits and targets (float64 oracle)
    ids, mask = model.text_encoder.tokenize([x["caption"] for x in batch])
    lp = torch.log_softmax(seen["logits"].detach().double(), -1)
    tgt, valid = ids[:, 1:], mask[:, 1:].bool()
    nll = -lp.gather(-1, tgt[..., None])[..., 0]
    per = 0.9 * nll + 0.1 * -lp.mean(-1)
    assert losses["loss_caption"].item() == pytest.approx(1.5 * per[valid].mean().item(),
                                                          rel=1e-5)
    losses["loss_caption"].backward()
    params = dict(model.named_parameters())
    for name in ("image_encoder.backbone.stem.conv1.weight", "image_encoder.global_tokens.queries",
                 "text_encoder.roberta.encoder.layer.0.attention.self.query.weight",
                 "unified_decoder.spe", "unified_decoder.layers.0.ffn.fc1_weight",
                 "tasks.captioning.logit_scale.log_scale", "tasks.captioning.query_pos.weight"):
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # word embeddings of tokens in no caption of the batch: reached through the vocabulary
    emb = params["text_encoder.roberta.embeddings.word_embeddings.weight"].grad
    unused = sorted(set(range(len(model.text_encoder.tokenizer))) - set(ids.flatten().tolist()))
    assert len(unused) > 100 and (emb[unused].abs().sum(1) > 0).all()


def test_a_tiny_model_overfits_one_batch(cfg):
    c = cfg.clone()
    c.MODEL.CAPTIONING.LABEL_SMOOTHING = 0.0
    c.MODEL.UNIFIED_DECODER.DEPTH = 1           # fits the batch in fewer steps
    model = build(c, train=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = images(2, seed=4)
    first = None
    for step in range(25):
        torch.manual_seed(step)
        loss = model(batch)["loss_caption"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first, (first, loss.item())


# ---------------------------------------------------------------- decoding
def _full_log_probs(model, task, out, words):
    """Oracle: log p of the next token after ``words`` (N, t), re-running the whole prefix:
    the training sequence with one extra (arbitrary) word, whose query t sees words 0..t-1."""
    tok = model.text_encoder.tokenizer
    n = words.shape[0]
    ids = torch.cat([torch.full((n, 1), tok.bos_token_id), words,
                     torch.full((n, 1), tok.eos_token_id)], dim=1)
    logits = task.caption_logits(model, out, ids, torch.ones_like(ids))[:, -1]
    logp = logits.double().log_softmax(-1)
    logp[:, task.blocked_tokens(tok)] = -math.inf
    return logp


def test_beam_size_one_equals_greedy_decoding(cfg):
    c = cfg.clone()
    c.MODEL.CAPTIONING.BEAM_SIZE = 1
    model = build(c, seed=1)
    task = model.tasks["captioning"]
    batch = images(2, seed=1)
    eos = model.text_encoder.tokenizer.eos_token_id
    with torch.no_grad():
        out = model.encode_images(batch)
        result = task.generate(model, out)
        # independent greedy loop, one image at a time, whole prefix every step
        for i in range(2):
            one = rows_of(out, slice(i, i + 1))
            words = torch.zeros(1, 0, dtype=torch.long)
            for _ in range(c.MODEL.CAPTIONING.MAX_LENGTH):
                nxt = _full_log_probs(model, task, one, words).argmax(-1, keepdim=True)
                words = torch.cat([words, nxt], dim=1)
                if nxt.item() == eos:
                    break
            got = result.tokens[i, 0, : words.shape[1]]
            assert torch.equal(got, words[0]), (got, words)
            if words[0, -1] != eos:       # cut at MAX_LENGTH: nothing beyond it
                assert result.tokens.shape[2] == words.shape[1]


def test_cached_decoder_gives_the_log_probs_of_rerunning_the_prefix(cfg, monkeypatch):
    """Drive the cached step with fixed words for 2 beams whose rows swap parents every step
    (the cache is reordered); every step's log-probs equal the whole-prefix oracle's."""
    model = build(cfg, seed=2)
    task = model.tasks["captioning"]
    ids, _ = model.text_encoder.tokenize(["a red circle and a blue triangle",
                                          "two red circles and a green square"])
    seqs = ids[:, 1:7]                                   # 6 words each (same length here)
    recorded = []

    def driver(step, batch, beam_size, max_length, eos_id, length_penalty=0.0, device=None):
        assert (batch, beam_size) == (1, 2)
        swap = torch.tensor([1, 0])
        for t in range(seqs.shape[1] + 1):
            order = torch.tensor([t % 2, (t + 1) % 2])     # row r holds sequence order[r]
            recorded.append((order, step(seqs[order, :t], None if t == 0 else swap)))
        return None

    monkeypatch.setattr(captioning_module, "beam_search", driver)
    with torch.no_grad():
        out = rows_of(model.encode_images(images(2, seed=2)), slice(0, 1))
        task.beam_size = 2
        task.generate(model, out)
        both = rows_of(out, torch.tensor([0, 0]))
        for t, (order, logp) in enumerate(recorded):
            want = _full_log_probs(model, task, both, seqs[order, :t])
            finite = torch.isfinite(want)
            assert torch.equal(finite, torch.isfinite(logp))
            assert torch.allclose(logp[finite].double(), want[finite], atol=2e-5), t


def test_length_penalty_formula_and_its_effect_on_a_hand_case():
    # score = sum log p / (non-</s> tokens + 1) ** penalty
    assert length_penalized(torch.tensor(-2.0), torch.tensor(3), 1.0).item() == -0.5
    assert length_penalized(torch.tensor(-3.0), torch.tensor(1), 2.0).item() == -0.75
    assert length_penalized(torch.tensor(-2.0), torch.tensor(3), 0.0).item() == -2.0
    # vocabulary {0: </s>, 1: a, 2: b}; first token: </s> or a (0.5 each); after a: </s> 0.9.
    # Finished "</s>": log .5 = -0.693 (0 words). "a </s>": log .5 + log .9 = -0.799 (1 word).
    # No penalty: "</s>" wins; penalty 1: -0.693 / 1 < -0.799 / 2 = -0.400, "a </s>" wins.
    def step(tokens, parent):
        n = tokens.shape[0]
        if tokens.shape[1] == 0:
            p = torch.tensor([0.5, 0.5, 0.0])
        else:
            p = torch.tensor([0.9, 0.05, 0.05])
        return p.log().expand(n, 3)

    plain = beam_search(step, 1, 2, 4, eos_id=0, length_penalty=0.0)
    assert plain.tokens[0, 0].tolist() == [0, 0]
    assert plain.scores[0, 0].item() == pytest.approx(math.log(0.5))
    assert plain.log_probs[0, 1].item() == pytest.approx(math.log(0.5) + math.log(0.9))
    pen = beam_search(step, 1, 2, 4, eos_id=0, length_penalty=1.0)
    assert pen.tokens[0, 0].tolist() == [1, 0]
    assert pen.scores[0, 0].item() == pytest.approx((math.log(0.5) + math.log(0.9)) / 2)
    assert pen.num_words[0].tolist() == [1, 0]


def test_beam_search_over_several_inputs_equals_one_at_a_time():
    """Inputs of one batch never mix: each input's result is the one it gets alone (its
    distribution depends on the input and the beam's last token)."""
    v = 6
    table = torch.randn(3, v + 1, v, generator=torch.Generator().manual_seed(3))

    def step_for(inputs):
        def step(tokens, parent):
            n = tokens.shape[0]
            k = n // len(inputs)
            which = torch.tensor(inputs).repeat_interleave(k)
            last = tokens[:, -1] if tokens.shape[1] else torch.full((n,), v)
            return table[which, last].log_softmax(-1)
        return step

    together = beam_search(step_for([0, 1, 2]), 3, 3, 5, eos_id=0, length_penalty=0.5)
    for i in range(3):
        alone = beam_search(step_for([i]), 1, 3, 5, eos_id=0, length_penalty=0.5)
        s = alone.tokens.shape[2]
        assert torch.equal(together.tokens[i, :, :s], alone.tokens[0])
        assert torch.allclose(together.scores[i], alone.scores[0])


def test_inference_outputs_strings_and_image_ids(cfg):
    model = build(cfg)
    with torch.no_grad():
        out = model(images(2))
    assert [o["image_id"] for o in out] == [100, 101]
    assert all(isinstance(o["caption"], str) and "<" not in o["caption"] for o in out)


# ---------------------------------------------------------------- evaluation
@pytest.fixture()
def gt_dataset(tmp_path):
    gt = {"images": [{"id": i} for i in (1, 2, 3)],
          "annotations": [
              {"id": 1, "image_id": 1, "caption": "a red circle and a blue triangle"},
              {"id": 2, "image_id": 1, "caption": "a red circle with a blue triangle"},
              {"id": 3, "image_id": 2, "caption": "two green squares on a striped background"},
              {"id": 4, "image_id": 3, "caption": "a yellow star on a checkered background"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(gt))
    name = f"unip_test_captioning_gt_{tmp_path.name}"
    MetadataCatalog.get(name).set(task="captioning", caption_json=str(path))
    return name, gt


def _evaluate(name, preds):
    # METEOR's Java process loads its paraphrase tables first (about 20 s here): left out of
    # the unit tests (the toy run's evaluation computes it)
    ev = CaptioningEvaluator(name, distributed=False, meteor=False)
    ev.reset()
    ev.process([{"image_id": i} for i, _ in preds],
               [{"image_id": i, "caption": c} for i, c in preds])
    return ev.evaluate()["captioning"]


def test_evaluator_on_a_hand_case(gt_dataset):
    from pycocoevalcap.cider.cider import Cider

    name, gt = gt_dataset
    same = _evaluate(name, [(2, "two green squares on a striped background"),
                            (3, "a yellow star on a checkered background")])
    assert same["BLEU-4"] == pytest.approx(1.0) and same["BLEU-1"] == pytest.approx(1.0)
    assert same["ROUGE-L"] == pytest.approx(1.0) and "METEOR" not in same
    preds = [(1, "a red circle and a green square"), (2, "two green squares on a background"),
             (1, "a repeated image id is evaluated once")]
    got = _evaluate(name, preds)
    # pycocoevalcap's Cider itself, on the same (already lower-case, punctuation-free) text
    gts = {1: [a["caption"] for a in gt["annotations"] if a["image_id"] == 1],
           2: [a["caption"] for a in gt["annotations"] if a["image_id"] == 2]}
    want, _ = Cider().compute_score(gts, {1: [preds[0][1]], 2: [preds[1][1]]})
    assert got["CIDEr"] == pytest.approx(want, rel=1e-9)
    assert 0 < got["BLEU-4"] < 1 and set(got) >= {"BLEU-1", "BLEU-2", "BLEU-3", "ROUGE-L"}
    with pytest.raises(ValueError, match="image ids \\[9\\]"):
        _evaluate(name, [(9, "a caption")])


def test_evaluator_without_java_warns_and_still_scores(gt_dataset, monkeypatch, caplog):
    name, _ = gt_dataset
    preds = [(1, "A red circle, and a green square."), (2, "two green squares on a background")]
    monkeypatch.setattr(evaluation_module, "java_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        got = _evaluate(name, preds)
    assert "no Java found" in caplog.text
    assert "METEOR" not in got and all(math.isfinite(got[k]) for k in ("BLEU-4", "CIDEr"))
    # the simple tokenizer lower-cases and drops the punctuation, as PTB would
    plain = _evaluate(name, [(1, "a red circle and a green square"), preds[1]])
    assert got["CIDEr"] == pytest.approx(plain["CIDEr"]) and got["CIDEr"] > 0
