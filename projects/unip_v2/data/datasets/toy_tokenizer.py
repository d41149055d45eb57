"""The toy job's tokenizer: a small RoBERTa-style byte-level BPE trained on the toy_shapes
training captions plus the category names (no RoBERTa vocabulary can be downloaded here).

Saved as ``vocab.json`` + ``merges.txt`` under ``$DETECTRON2_DATASETS/toy_shapes/tokenizer``
by default, the directory MODEL.TEXT_ENCODER.TOKENIZER of the toy configs points at.
"""
import json
import os
from typing import Dict, List, Optional

from ...modeling.text_encoder.tokenizer import train_byte_level_bpe
from .toy_shapes import TOY_SHAPES_CATEGORIES, toy_shapes_files, toy_shapes_root

__all__ = ["toy_tokenizer_corpus", "ensure_toy_tokenizer"]


def toy_tokenizer_corpus(root: Optional[str] = None) -> List[str]:
    """The training captions of toy_shapes at ``root`` (in annotation-id order, so the corpus
    and hence the tokenizer are deterministic) followed by the category names."""
    root = root or toy_shapes_root()
    caption_json = toy_shapes_files(root, "train")["caption_json"]
    if not os.path.isfile(caption_json):
        raise FileNotFoundError(f"toy_shapes captions {caption_json!r} not found: run "
                                f"python tools/make_toy_dataset.py --root {root}")
    with open(caption_json, encoding="utf-8") as f:
        anns = json.load(f)["annotations"]
    captions = [a["caption"] for a in sorted(anns, key=lambda a: a["id"])]
    return captions + [c["name"] for c in TOY_SHAPES_CATEGORIES]


def ensure_toy_tokenizer(root: Optional[str] = None, out_dir: Optional[str] = None,
                         vocab_size: int = 1000, min_frequency: int = 2,
                         force: bool = False) -> Dict:
    """Train (or keep, if already trained on the same corpus with the same parameters) the
    toy tokenizer. Returns :func:`train_byte_level_bpe`'s summary."""
    root = root or toy_shapes_root()
    out_dir = out_dir or os.path.join(root, "tokenizer")
    return train_byte_level_bpe(toy_tokenizer_corpus(root), out_dir, vocab_size=vocab_size,
                                min_frequency=min_frequency, force=force)
