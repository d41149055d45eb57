"""RoBERTa's byte-level BPE tokenizer: load one from a local directory, or train a small one.

A directory holds ``vocab.json`` (token -> id) and ``merges.txt`` (BPE merges, GPT-2
format), the two files of every RoBERTa release. Training writes the same two files, so a
tokenizer trained here and the real ``roberta-base`` one load the same way.

transformers 5.x note: ``RobertaTokenizer(vocab_file=..., merges_file=...)`` silently
ignores those (4.x) keyword names and yields a tokenizer that knows only the five special
tokens; ``RobertaTokenizer.from_pretrained(directory)`` reads both files correctly in 4.x
and 5.x, so :func:`build_tokenizer` uses it.
"""
import hashlib
import json
import os
from typing import Dict, Iterable, List

__all__ = [
    "ROBERTA_SPECIAL_TOKENS",
    "TOKENIZER_FILES",
    "build_tokenizer",
    "train_byte_level_bpe",
]

# RoBERTa's special tokens in id order: <s>=0 (bos/cls), <pad>=1, </s>=2 (eos/sep),
# <unk>=3, <mask>=4. Trained tokenizers keep these ids so that a model built for one
# tokenizer reads the other's special ids the same way.
ROBERTA_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# Written next to the two files by train_byte_level_bpe; makes retraining idempotent.
_PARAMS_FILE = "tokenizer_params.json"
# 256 byte symbols + the special tokens: the smallest vocabulary that can encode any text.
_MIN_VOCAB = 256 + len(ROBERTA_SPECIAL_TOKENS)


def _check_files(path: str) -> None:
    if not path:
        raise ValueError("tokenizer path is empty: pass a directory holding "
                         f"{' + '.join(TOKENIZER_FILES)} (MODEL.TEXT_ENCODER.TOKENIZER)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist (it must hold "
                                f"{' + '.join(TOKENIZER_FILES)})")
    for name in TOKENIZER_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"tokenizer file {name} is missing: expected {file!r} "
                                    "(a RoBERTa byte-level BPE tokenizer needs "
                                    f"{' + '.join(TOKENIZER_FILES)}; train a toy one with "
                                    "tools/train_toy_tokenizer.py)")


def build_tokenizer(path: str):
    """Load a RoBERTa byte-level BPE tokenizer from a local directory.

    Args:
        path: directory holding ``vocab.json`` and ``merges.txt`` (a RoBERTa release or
            the output of :func:`train_byte_level_bpe`).

    Returns:
        a ``transformers.RobertaTokenizer`` (the fast, Rust-backed one) with RoBERTa's
        special tokens. Raises FileNotFoundError naming a missing file, and ValueError if
        the vocabulary lacks a special token.
    """
    _check_files(path)
    from transformers import RobertaTokenizerFast

    # local_files_only: a directory never needs the hub, and these machines have no network.
    tokenizer = RobertaTokenizerFast.from_pretrained(path, local_files_only=True)
    vocab = tokenizer.get_vocab()
    missing = [t for t in ROBERTA_SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer at {path!r} lacks RoBERTa special tokens {missing} in "
                         "vocab.json")
    if len(vocab) <= len(ROBERTA_SPECIAL_TOKENS):
        # The failure mode of a wrong loading path (see the module docstring).
        raise ValueError(f"tokenizer at {path!r} loaded only {len(vocab)} tokens; "
                         "vocab.json looks empty or unreadable")
    return tokenizer


def _corpus_digest(texts: List[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def train_byte_level_bpe(texts: Iterable[str], out_dir: str, vocab_size: int = 1000,
                         min_frequency: int = 2, force: bool = False) -> Dict:
    """Train a RoBERTa-style byte-level BPE on ``texts`` and save vocab.json + merges.txt.

    Special tokens get RoBERTa's ids 0..4 (``ROBERTA_SPECIAL_TOKENS``); the 256 byte
    symbols are always in the vocabulary, so every text encodes without <unk> and decodes
    back exactly. Deterministic for the same texts and parameters. Idempotent: if
    ``out_dir`` already holds a tokenizer trained with the same parameters on the same
    texts, nothing is rewritten (unless ``force``).

    Args:
        texts: the corpus, one string per document (captions, category names, ...).
        out_dir: created if missing.
        vocab_size: target vocabulary size (>= 261; BPE stops earlier if the corpus runs
            out of pairs to merge).
        min_frequency: a pair must occur this often to be merged.

    Returns:
        ``{"path", "vocab_size" (actual), "trained" (False when kept), "params"}``.
    """
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty iterable of strings, got "
                         f"{len(texts)} items of types {sorted({type(t).__name__ for t in texts})}")
    if int(vocab_size) < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} (256 bytes + "
                         f"{len(ROBERTA_SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    if int(min_frequency) < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    params = {"kind": "byte_level_bpe", "vocab_size": int(vocab_size),
              "min_frequency": int(min_frequency), "special_tokens": list(ROBERTA_SPECIAL_TOKENS),
              "num_texts": len(texts), "corpus_sha256": _corpus_digest(texts)}
    params_file = os.path.join(out_dir, _PARAMS_FILE)
    files_present = all(os.path.isfile(os.path.join(out_dir, f)) for f in TOKENIZER_FILES)
    if not force and files_present and os.path.isfile(params_file):
        with open(params_file, encoding="utf-8") as f:
            if json.load(f) == params:
                with open(os.path.join(out_dir, "vocab.json"), encoding="utf-8") as v:
                    size = len(json.load(v))
                return {"path": out_dir, "vocab_size": size, "trained": False, "params": params}

    from tokenizers import ByteLevelBPETokenizer

    # add_prefix_space=False is RoBERTa's setting: "red" at the start of a text and
    # " red" inside one are different tokens, exactly as in roberta-base.
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                            special_tokens=list(ROBERTA_SPECIAL_TOKENS), show_progress=False)
    vocab = bpe.get_vocab()
    wrong = {t: vocab.get(t) for i, t in enumerate(ROBERTA_SPECIAL_TOKENS) if vocab.get(t) != i}
    if wrong:  # guards against a tokenizers release that orders special tokens differently
        raise RuntimeError(f"trained special token ids {wrong} differ from RoBERTa's 0..4")
    os.makedirs(out_dir, exist_ok=True)
    # The marker is removed before and written after the two files, so an interrupted
    # save leaves no marker and the next call trains again.
    if os.path.exists(params_file):
        os.remove(params_file)
    bpe.save_model(out_dir)
    with open(params_file, "w", encoding="utf-8") as f:
        json.dump(params, f, indent=1)
    return {"path": out_dir, "vocab_size": len(vocab), "trained": True, "params": params}
