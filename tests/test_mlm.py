"""Masked language modelling (Uni-Perceiver v2, Sec. 4.3): BERT's 80/10/10 masking of 15% of
the word positions, the chosen positions' outputs of g against the decoded vocabulary,
cross-entropy over the chosen positions, masked-token accuracy; deterministic evaluation
masks; the text mapper and the loaders on text-only records."""
import logging
import math

import numpy as np
import pytest
import torch
from scipy import stats

import unip_v2  # noqa: F401  first: makes detectron2 importable

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from unip_v2.data.build import build_train_loader
from unip_v2.data.dataset_mappers import TaskTaggedMapper, TextDatasetMapper
from unip_v2.data.datasets.task_common import register_task_dataset
from unip_v2.data.test_loader import build_test_loader
from unip_v2.evaluation import MLMEvaluator
from unip_v2.modeling.tasks.mlm import (
    MLMTask,
    evaluation_uniforms,
    mask_tokens,
    training_uniforms,
)
from unip_v2.modeling.text_encoder import build_tokenizer, train_byte_level_bpe

from test_uni_perceiver_v2 import cfg as detection_cfg  # noqa: F401  (tiny generalist)

MLM_SET = "unip_test_mlm_texts"
COLOURS = ["red", "green", "blue", "black", "white", "orange"]
SHAPES = ["circle", "square", "triangle", "arrow", "ellipse", "star"]
BACKGROUNDS = ["striped", "checkered", "plain"]


def captions(n, seed=0):
    """Templated captions like the toy ones: each shape has its own colour."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        objs = [f"a {COLOURS[i]} {SHAPES[i]}" for i in rng.choice(6, k, replace=False)]
        objs = objs[0] if k == 1 else ", ".join(objs[:-1]) + " and " + objs[-1]
        out.append(f"a picture of {objs} on a {BACKGROUNDS[int(rng.integers(3))]} background")
    return out


@pytest.fixture(scope="module")
def cfg(detection_cfg, tmp_path_factory):  # noqa: F811
    tok = str(tmp_path_factory.mktemp("mlm_tok"))
    train_byte_level_bpe(captions(200, seed=1), tok, vocab_size=350, min_frequency=1)
    c = detection_cfg.clone()
    c.MODEL.TASKS = ["mlm"]
    c.MODEL.TEXT_ENCODER.TOKENIZER = tok
    c.MODEL.TEXT_ENCODER.CONTEXT_LENGTH = 24
    c.MODEL.MLM.LOSS_WEIGHT = 0.7
    register_task_dataset(MLM_SET, lambda: [{"text": t} for t in captions(8)], task="mlm")
    c.DATASETS.TRAIN = c.DATASETS.TEST = (MLM_SET,)
    return c


def texts_batch(texts):
    return [{"text": t, "task": "mlm"} for t in texts]


# ---------------------------------------------------------------- masking statistics
SPECIAL = torch.tensor([0, 1, 2, 3, 4])            # <s>, <pad>, </s>, <unk>, <mask>
BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
V = 60                                             # ids 5..59 are words: K = 55


def synthetic_batch(b, seed):
    """(B, L) ids: <s>, 8..40 words (ids 5..59, a few <unk>s among them), </s>, padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 41, (b,), generator=g)
    length = int(lengths.max()) + 2
    ids = torch.randint(5, V, (b, length), generator=g)
    ids[torch.rand(b, length, generator=g) < 0.02] = UNK
    pos = torch.arange(length)[None]
    ids[:, 0] = BOS
    ids = torch.where(pos == lengths[:, None] + 1, EOS, ids)
    ids = torch.where(pos > lengths[:, None] + 1, PAD, ids)
    return ids, (pos <= lengths[:, None] + 1).long()


def mask(ids, attn, uniforms, ratio=0.15, mask_fraction=0.8, random_fraction=0.1):
    return mask_tokens(ids, attn, uniforms, special_ids=SPECIAL,
                       replacement_ids=torch.arange(5, V), mask_token_id=MASK,
                       mask_ratio=ratio, mask_fraction=mask_fraction,
                       random_fraction=random_fraction)


def check_split(ids, attn, out, ratio=0.15):
    """The masking statistics of one large batch against binomial tolerances (5 sigma)."""
    words = (attn == 1) & (ids > 4)
    chosen = out.chosen
    # specials (<s>, </s>, <unk>) and padding are never chosen; unchosen positions keep their id
    assert not (chosen & ~words).any()
    assert torch.equal(out.input_ids[~chosen], ids[~chosen])
    n_words, n = int(words.sum()), int(chosen.sum())
    assert n >= 20000
    # chosen share: each text's count is floor(0.15 w + u), u uniform, whose mean is 0.15 w
    # and variance at most 1/4, so the total is within 5 x sqrt(B / 4) of 0.15 x words
    assert abs(n - ratio * n_words) <= 5 * math.sqrt(len(ids) / 4), (n, ratio * n_words)
    new, old = out.input_ids[chosen], ids[chosen]
    k = V - 5
    # <mask> with p = 0.8; unchanged: 0.1 + 0.1 / K (a random draw may hit the original id);
    # a different random id: 0.1 (1 - 1/K); each a binomial share of the n chosen tokens
    for share, p in (((new == MASK).double().mean(), 0.8),
                     ((new == old).double().mean(), 0.1 + 0.1 / k),
                     (((new != MASK) & (new != old)).double().mean(), 0.1 * (1 - 1 / k))):
        assert abs(share.item() - p) <= 5 * math.sqrt(p * (1 - p) / n), (share.item(), p)
    # random replacements: words only (never a special id), in range, uniform over the K ids
    rand = out.input_ids[out.replaced_by_random]
    assert ((rand >= 5) & (rand < V)).all()
    counts = torch.bincount(rand - 5, minlength=k).numpy()
    assert stats.chisquare(counts).pvalue > 1e-4
    # the flags match the ids: <mask> exactly where replaced by <mask>, disjoint subsets
    assert torch.equal(out.replaced_by_mask, chosen & (out.input_ids == MASK))
    assert not (out.replaced_by_mask & out.replaced_by_random).any()
    assert not (out.replaced_by_random & ~chosen).any()
    return n


def test_80_10_10_split_of_15_percent_of_the_words_in_training():
    ids, attn = synthetic_batch(6000, seed=0)
    out = mask(ids, attn, training_uniforms(*ids.shape, torch.Generator().manual_seed(1)))
    check_split(ids, attn, out)
    # at least one chosen position per text, even where 15% rounds to none
    short = torch.tensor([[BOS, 7, EOS, PAD], [BOS, 9, 11, EOS]])
    for seed in range(20):
        u = training_uniforms(2, 4, torch.Generator().manual_seed(seed))
        out = mask(short, (short != PAD).long(), u)
        assert out.chosen.sum(1).tolist() == [1, 1]
        assert not out.chosen[:, 0].any() and not out.chosen[1, 3]
    # a text of special tokens only (e.g. the literal "<unk>") has nothing to choose
    none = torch.tensor([[BOS, UNK, EOS]])
    out = mask(none, torch.ones_like(none), training_uniforms(1, 3))
    assert not out.chosen.any() and torch.equal(out.input_ids, none)


def test_evaluation_masks_are_deterministic_and_do_not_depend_on_the_batch():
    ids, attn = synthetic_batch(6000, seed=2)
    first = mask(ids, attn, evaluation_uniforms(ids, attn))
    again = mask(ids.clone(), attn.clone(), evaluation_uniforms(ids, attn))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # the hash's numbers give the right statistics too
    check_split(ids, attn, first)
    # text 0 alone (cut to its own length) masks exactly as in the padded batch
    n0 = int(attn[0].sum())
    alone = mask(ids[:1, :n0], attn[:1, :n0], evaluation_uniforms(ids[:1, :n0], attn[:1, :n0]))
    assert torch.equal(alone.chosen[0], first.chosen[0, :n0])
    assert torch.equal(alone.input_ids[0], first.input_ids[0, :n0])
    # different texts of one length get different positions
    same = ids[attn.sum(1) == 20][:, :20]
    patterns = {tuple(r.tolist()) for r in mask(same, torch.ones_like(same),
                                                evaluation_uniforms(same, torch.ones_like(same))
                                                ).chosen}
    assert len(patterns) > len(same) // 2


# ---------------------------------------------------------------- the task in the model
def _record(model):
    """Record the decoder's calls (segments, is_target) and the masked batch."""
    seen = {"decoder": []}

    def pre(module, args, kwargs):
        seen["decoder"].append((args[0], kwargs.get("is_target", False), kwargs.get("attn_mask")))

    model.unified_decoder.register_forward_pre_hook(pre, with_kwargs=True)
    model.unified_decoder.register_forward_hook(
        lambda m, a, o: seen.__setitem__("last_out", o))
    task = model.tasks["mlm"]
    masked_batch = task.masked_batch

    def record(*a, **k):
        seen["masked"] = masked_batch(*a, **k)
        return seen["masked"]

    task.masked_batch = record
    vocabulary = model.target_bank.vocabulary

    def vocab():
        # called after g has decoded the input sequence, before the vocabulary's own calls
        seen["input_out"] = seen["last_out"]
        seen["vocab"] = vocabulary()
        return seen["vocab"]

    model.target_bank.vocabulary = vocab
    return seen, task


def test_loss_is_a_float64_cross_entropy_over_the_chosen_positions_only(cfg):
    """loss_mlm = w x mean over chosen positions of -log softmax(s cos(g output, vocab))[id],
    computed in float64 from the captured decoder output and vocabulary."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    seen, task = _record(model)
    texts = captions(6, seed=5)
    losses = model(texts_batch(texts))
    assert set(losses) == {"loss_mlm"} and torch.isfinite(losses["loss_mlm"])
    tok = build_tokenizer(cfg.MODEL.TEXT_ENCODER.TOKENIZER)
    enc = tok(texts, padding="longest", return_tensors="pt")
    ids, chosen = enc["input_ids"], seen["masked"][2].chosen
    assert torch.equal(seen["masked"][0], ids)                  # targets: the original ids
    assert chosen.any(1).all() and not chosen[:, 0].any()
    # what the text encoder read: the original ids except at chosen positions
    assert torch.equal(seen["masked"][2].input_ids[~chosen], ids[~chosen])
    s = task.logit_scale().item()
    out = seen["input_out"].tokens.detach().double()[:, 1:]     # text position l -> 1 + l
    e = seen["vocab"].detach().double()
    assert e.shape[0] == len(tok)
    q = out[chosen]
    logits = s * (q / q.norm(dim=-1, keepdim=True)) @ (e / e.norm(dim=-1, keepdim=True)).T
    logp = logits - torch.logsumexp(logits, -1, keepdim=True)
    want = 0.7 * -logp[torch.arange(len(q)), ids[chosen]].mean()
    assert losses["loss_mlm"].item() == pytest.approx(want.item(), rel=1e-5)
    # the loss reaches the text encoder, g and the temperature, through the input and through
    # the vocabulary (encoded with gradients in training), and not the idle image encoder
    assert seen["vocab"].requires_grad
    seen["vocab"].retain_grad()
    losses["loss_mlm"].backward()
    assert seen["vocab"].grad.abs().sum() > 0
    params = dict(model.named_parameters())
    for name in ("text_encoder.roberta.embeddings.word_embeddings.weight",
                 "unified_decoder.spe", "unified_decoder.layers.0.attn.qkv.weight",
                 "tasks.mlm.logit_scale.log_scale"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    image = [n for n, p in params.items() if n.startswith("image_encoder.")
             and p.grad is not None and p.grad.abs().sum() > 0]
    assert image == []


def test_the_input_is_a_plain_text_sequence(cfg):
    """Routing: one TEXT segment, not a target, not causal, no attention mask; so its
    attribute rows are <SPE> 00000100 and text 00100100 (b2 SEG_TEXT, b5 SEQ_HAS_TEXT)."""
    from unip_v2.modeling.unified_decoder.attributes import attribute_rows
    from unip_v2.modeling.unified_decoder import SegmentKind

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    seen, _ = _record(model)
    with torch.no_grad():
        model(texts_batch(captions(2)))
    inputs = [c for c in seen["decoder"] if not c[1]]
    assert len(inputs) == 1
    segments, is_target, attn_mask = inputs[0]
    assert [(s.kind, s.causal) for s in segments] == [(SegmentKind.TEXT, False)]
    assert attn_mask is None and not is_target
    assert attribute_rows([s.kind for s in segments], [s.causal for s in segments],
                          is_target) == [(0, 0, 0, 0, 0, 1, 0, 0), (0, 0, 1, 0, 0, 1, 0, 0)]


def test_inference_outputs_and_their_determinism(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    texts = captions(5, seed=7)
    with torch.no_grad():
        out = model(texts_batch(texts))
        again = model(texts_batch(texts[2:3]))           # alone: the same positions
    tok = build_tokenizer(cfg.MODEL.TEXT_ENCODER.TOKENIZER)
    assert len(out) == 5
    for text, o in zip(texts, out):
        ids = torch.tensor(tok(text)["input_ids"])
        p = o["masked_positions"]
        assert len(p) >= 1 and p.min() >= 1 and p.max() <= len(ids) - 2
        assert torch.equal(o["target_ids"], ids[p])
        assert o["predicted_ids"].shape == p.shape
        assert ((o["predicted_ids"] >= 0) & (o["predicted_ids"] < len(tok))).all()
    for key in ("masked_positions", "predicted_ids", "target_ids"):
        assert torch.equal(again[0][key], out[2][key])
    assert model.target_bank.num_encodings == 1         # the vocabulary is encoded once


def test_a_tiny_model_learns_one_batch_of_texts(cfg):
    """The loss on one batch of texts falls by a set factor (masks drawn afresh every step;
    the loss is measured with one fixed seed before and after)."""
    torch.manual_seed(0)
    c = cfg.clone()
    c.MODEL.MLM.LOSS_WEIGHT = 1.0
    model = build_model(c).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = texts_batch(captions(4, seed=11))

    def measured():
        torch.manual_seed(1234)
        with torch.no_grad():
            return model(batch)["loss_mlm"].item()

    first = measured()
    for step in range(80):
        torch.manual_seed(step)
        loss = model(batch)["loss_mlm"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = measured()
    assert math.isfinite(first) and last < 0.25 * first, (first, last)


def test_long_texts_are_cut_keeping_their_end_token(cfg, caplog):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    task = model.tasks["mlm"]
    long_text = " and ".join(captions(4, seed=3))
    ids, attn = task.tokenize(model, ["a red circle", long_text])
    tok = model.text_encoder.tokenizer
    full = tok(long_text)["input_ids"]
    assert len(full) > 24 and ids.shape == (2, 24)
    assert ids[1].tolist() == full[:23] + [tok.eos_token_id] and attn[1].all()
    assert ids[0].tolist()[:5] == tok("a red circle")["input_ids"] and attn[0].sum() == 5
    assert model.text_encoder.num_truncated == 1 and "were cut" in caplog.text


def test_bad_config_values_are_refused(cfg):
    for key, value, message in (("MASK_RATIO", 0.0, "MASK_RATIO"),
                                ("RANDOM_TOKEN_FRACTION", 0.3, "sum")):
        bad = cfg.clone()
        setattr(bad.MODEL.MLM, key, value)
        with pytest.raises(ValueError, match=message):
            MLMTask(bad)


# ---------------------------------------------------------------- evaluator, mapper, loaders
def test_evaluator_accuracy_on_a_hand_count():
    ev = MLMEvaluator("unip_test_mlm_eval", distributed=False)
    ev.reset()
    ev.process([{}, {}], [{"predicted_ids": torch.tensor([5, 6, 7]),     # 2 of 3 right
                           "target_ids": torch.tensor([5, 9, 7])},
                          {"predicted_ids": torch.tensor([8]),            # 0 of 1
                           "target_ids": torch.tensor([3])}])
    ev.process([{}], [{"predicted_ids": torch.tensor([1, 2, 3, 4]),      # 4 of 4
                       "target_ids": torch.tensor([1, 2, 3, 4])}])
    # (2 + 0 + 4) / (3 + 1 + 4) = 6 / 8 = 75%
    assert ev.evaluate() == {"mlm": {"accuracy": 75.0, "num_tokens": 8}}
    with pytest.raises(ValueError, match="must be equal 1-d shapes"):
        ev.process([{}], [{"predicted_ids": torch.tensor([1]), "target_ids": torch.tensor([1, 2])}])


def test_mapper_skips_and_counts_bad_texts(caplog):
    mapper = TextDatasetMapper(True)
    assert mapper({"text": "  a red circle \n", "id": 7}) == {"text": "a red circle", "id": 7}
    assert mapper({"text": "a blue star"}) == {"text": "a blue star"}
    with caplog.at_level(logging.WARNING):
        for bad in ({"text": ""}, {"text": "  \t"}, {"text": None}, {"text": 3}, {"id": 2}):
            assert mapper(bad) is None
    assert mapper.num_skipped == 5
    assert "5 text record(s) skipped" in caplog.text and "(id 2)" in caplog.text


def test_loaders_take_text_only_records(cfg, caplog):
    name = "unip_test_mlm_loader_texts"
    records = [{"text": "a red circle"}, {"text": ""}, {"text": "a blue star"}, {"text": 5}]
    register_task_dataset(name, lambda: records, task="mlm")
    try:
        c = cfg.clone()
        c.DATASETS.TRAIN = (name,)
        c.SOLVER.IMS_PER_BATCH = 4
        c.SEED = 3
        c.DATALOADER.NUM_WORKERS = 0
        loader = build_train_loader(c, TaskTaggedMapper(TextDatasetMapper(c, True), "mlm"))
        batch = next(iter(loader))
        assert len(batch) == 4 and all(x["task"] == "mlm" for x in batch)
        assert {x["text"] for x in batch} <= {"a red circle", "a blue star"}
        test = build_test_loader(name, TaskTaggedMapper(TextDatasetMapper(c, False), "mlm"))
        texts = [x["text"] for b in test for x in b]
        assert texts == ["a red circle", "a blue star"] and test.num_skipped == 2
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
