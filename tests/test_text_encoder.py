"""f_text (Eq. 4): tokenizer training/loading round trips, TextEncoder shapes, masks,
truncation, projection, gradients, local pretrained loading, LR multiplier."""
import os

import pytest
import torch
from torch import nn

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from detectron2.config import get_cfg

from unip_v2 import add_unip_v2_config
from unip_v2.data.datasets import TOY_SHAPES_CATEGORIES
from unip_v2.modeling.text_encoder import (
    ROBERTA_SPECIAL_TOKENS,
    TextEncoder,
    build_tokenizer,
    train_byte_level_bpe,
)

CATEGORY_NAMES = [c["name"] for c in TOY_SHAPES_CATEGORIES]
CAPTIONS = [
    "a red circle and two blue squares on a striped background",
    "an image with a green triangle, a yellow star and a white ellipse on checkers",
    "a picture of three black arrows on a smooth gradient background",
    "an orange hexagon on a mottled background",
]
# Never seen in training: byte-level BPE must still give the exact text back.
UNSEEN = ["Zebra-crossing at 5pm: ÜBER café ☕", "  leading and trailing spaces  "]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok"))
    summary = train_byte_level_bpe(CAPTIONS * 3 + CATEGORY_NAMES, out, vocab_size=400,
                                   min_frequency=2)
    assert summary["trained"]
    return out


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return build_tokenizer(tok_dir)


def tiny_cfg(tok_dir, **overrides):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    c = cfg.MODEL.TEXT_ENCODER
    c.TOKENIZER = tok_dir
    c.HIDDEN_SIZE, c.NUM_LAYERS, c.NUM_HEADS, c.INTERMEDIATE_SIZE = 32, 2, 2, 64
    c.MAX_POSITION_EMBEDDINGS, c.CONTEXT_LENGTH, c.OUTPUT_DIM = 66, 16, 48
    for k, v in overrides.items():
        setattr(c, k, v)
    return cfg


@pytest.fixture(scope="module")
def encoder(tok_dir):
    torch.manual_seed(0)
    return TextEncoder(tiny_cfg(tok_dir)).eval()


# ------------------------------------------------------------------ tokenizer
def test_round_trip_and_special_ids(tokenizer):
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in ROBERTA_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id, tokenizer.mask_token_id) == (0, 1, 2, 3, 4)
    assert len(tokenizer) > 300  # bytes + specials + merges, not only special tokens
    for text in CAPTIONS + CATEGORY_NAMES + UNSEEN:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True,
                                clean_up_tokenization_spaces=False) == text
    # BPE merges learned from the corpus: a frequent word is one token, not bytes.
    assert len(tokenizer(" background")["input_ids"]) == 3


def test_training_is_deterministic_and_idempotent(tok_dir, tmp_path):
    texts = CAPTIONS * 3 + CATEGORY_NAMES
    again = train_byte_level_bpe(texts, str(tmp_path), vocab_size=400, min_frequency=2)
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(tok_dir, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name
    mtime = os.path.getmtime(tmp_path / "vocab.json")
    kept = train_byte_level_bpe(texts, str(tmp_path), vocab_size=400, min_frequency=2)
    assert not kept["trained"] and kept["vocab_size"] == again["vocab_size"]
    assert os.path.getmtime(tmp_path / "vocab.json") == mtime
    assert train_byte_level_bpe(texts[:-1], str(tmp_path), vocab_size=400)["trained"]
    with pytest.raises(ValueError, match="vocab_size must be >= 261"):
        train_byte_level_bpe(texts, str(tmp_path / "x"), vocab_size=100)


def test_missing_tokenizer_files(tok_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_tokenizer(str(tmp_path / "nowhere"))
    with open(os.path.join(tok_dir, "vocab.json"), encoding="utf-8") as f:
        (tmp_path / "vocab.json").write_text(f.read(), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="merges.txt is missing"):
        build_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="merges.txt is missing"):
        TextEncoder(tiny_cfg(str(tmp_path)))
    with pytest.raises(ValueError, match="TOKENIZER"):
        TextEncoder(tiny_cfg(""))


# ------------------------------------------------------------------ encoder
def test_shapes_padding_mask_and_truncation(encoder, tokenizer):
    long_text = " ".join(CAPTIONS)
    texts = ["red circle", long_text]
    cut_before = encoder.num_truncated
    ids, mask = encoder.tokenize(texts, truncate=True)
    assert encoder.num_truncated == cut_before + 1       # counted: cut, never silently
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
    assert ids.shape == (2, 16)  # the long text is cut at CONTEXT_LENGTH
    assert ids[1, 0] == 0 and ids[1, -1] == 2 and mask[1].all()  # </s> kept
    n = len(tokenizer("red circle")["input_ids"])
    assert (ids[0, n:] == 1).all() and mask[0, :n].all() and not mask[0, n:].any()
    feats, pad = encoder(ids, mask)
    assert feats.shape == (2, 16, 48) and pad.dtype == torch.bool
    assert torch.equal(pad, mask == 0) and torch.isfinite(feats).all()
    assert isinstance(encoder.proj, nn.Linear)


def test_too_long_texts_raise_unless_truncation_is_asked_for(encoder, tokenizer):
    # Two names that differ only after the 16th token: cut, they would be one name.
    first = "a red circle and two blue squares on a striped background, then "
    names = [first + "a yellow star", first + "a white ellipse"]
    counts = [len(tokenizer(n)["input_ids"]) for n in names]   # the tokenizer's own count
    assert min(counts) > 16
    cut = encoder.tokenize(names, truncate=True)[0]
    assert torch.equal(cut[0], cut[1])                      # why cutting names is wrong
    for call in (encoder.tokenize, encoder.encode):
        with pytest.raises(ValueError) as error:
            call(["red circle"] + names)
        message = str(error.value)
        for name, n in zip(names, counts):
            assert f"{name!r} ({n} tokens)" in message
        assert "limit of 16 tokens" in message and "'red circle'" not in message
    with pytest.raises(ValueError, match=r"category names longer than .* limit of 16"):
        encoder.check_lengths(["red circle", names[0]], what="category name")
    encoder.check_lengths(["red circle"])
    # exactly CONTEXT_LENGTH tokens is allowed, one more is not ("~" is not in the corpus,
    # so no merge joins two of them: one token each)
    fits, over = "~" * 14, "~" * 15
    assert [len(tokenizer(t)["input_ids"]) for t in (fits, over)] == [16, 17]
    assert encoder.tokenize([fits])[0].shape == (1, 16)
    with pytest.raises(ValueError, match=r"'~{15}' \(17 tokens\)"):
        encoder.tokenize([fits, over])


def test_padding_does_not_change_other_outputs(encoder):
    alone, pad_alone = encoder.encode(["red circle"])
    batched, pad_b = encoder.encode(["red circle", CAPTIONS[1]], truncate=True)
    n = alone.shape[1]
    assert not pad_alone.any() and pad_b[0, n:].all()
    torch.testing.assert_close(batched[0, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_identity_projection(tok_dir):
    enc = TextEncoder(tiny_cfg(tok_dir, OUTPUT_DIM=32))
    assert isinstance(enc.proj, nn.Identity)
    assert enc.encode(["blue square"])[0].shape[-1] == 32


def test_gradients_reach_every_parameter(tok_dir):
    torch.manual_seed(0)
    enc = TextEncoder(tiny_cfg(tok_dir)).train()
    feats, pad = enc.encode(CATEGORY_NAMES[:3])
    (feats * (~pad)[..., None]).pow(2).mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None]
    assert not missing, missing


def test_bad_inputs(encoder, tok_dir):
    ids, mask = encoder.tokenize(["red circle"])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        encoder(ids[0, :3], mask[0, :3])
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 2\)"):
        encoder(ids, mask[:, :2])
    with pytest.raises(ValueError, match=r"context_length 16"):
        encoder(torch.zeros(1, 17, dtype=torch.long), torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="list of strings"):
        encoder.tokenize("red circle")
    with pytest.raises(ValueError, match="non-empty"):
        encoder.tokenize([])
    with pytest.raises(ValueError, match="context_length must be in"):
        TextEncoder(tiny_cfg(tok_dir, CONTEXT_LENGTH=65))


def test_local_pretrained_gives_identical_outputs(encoder, tok_dir, tmp_path):
    encoder.roberta.save_pretrained(str(tmp_path))
    # Architecture keys are ignored with PRETRAINED: the checkpoint's config.json wins.
    cfg = tiny_cfg(tok_dir, PRETRAINED=str(tmp_path), HIDDEN_SIZE=64, NUM_LAYERS=1,
                   OUTPUT_DIM=32)
    loaded = TextEncoder(cfg).eval()
    assert isinstance(loaded.proj, nn.Identity)
    texts = ["red circle", CAPTIONS[0]]
    ids, mask = encoder.tokenize(texts)
    with torch.no_grad():
        want = encoder.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        got, _ = loaded.encode(texts)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ------------------------------------------------------------------ config and solver
def test_config_defaults():
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    c = cfg.MODEL.TEXT_ENCODER
    assert (c.HIDDEN_SIZE, c.NUM_LAYERS, c.NUM_HEADS, c.INTERMEDIATE_SIZE) == (768, 12, 12, 3072)
    assert (c.MAX_POSITION_EMBEDDINGS, c.OUTPUT_DIM, c.PRETRAINED, c.TOKENIZER) == (514, 768, "", "")
    assert 3 <= c.CONTEXT_LENGTH <= c.MAX_POSITION_EMBEDDINGS - 2
    assert cfg.SOLVER.TEXT_ENCODER_MULTIPLIER == 0.1
