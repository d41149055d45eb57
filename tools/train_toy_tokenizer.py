#!/usr/bin/env python
"""Train the toy job's RoBERTa-style byte-level BPE tokenizer on the toy_shapes captions.

    python tools/make_toy_dataset.py          # first: the captions it trains on
    python tools/train_toy_tokenizer.py       # -> $DETECTRON2_DATASETS/toy_shapes/tokenizer
    python tools/train_toy_tokenizer.py --root /tmp/toy --vocab-size 500 --force

Without --force a tokenizer already trained on the same captions with the same parameters
is kept as it is.
"""
import argparse
import sys

import unip_v2  # noqa: F401  (first: makes detectron2 importable)
from unip_v2.data.datasets import toy_shapes_root
from unip_v2.data.datasets.toy_tokenizer import ensure_toy_tokenizer
from unip_v2.modeling.text_encoder import build_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None,
                        help=f"toy_shapes directory (default: {toy_shapes_root()})")
    parser.add_argument("--out", default=None, help="output directory (default: ROOT/tokenizer)")
    parser.add_argument("--vocab-size", type=int, default=1000,
                        help="target vocabulary size (>= 261; BPE may stop earlier)")
    parser.add_argument("--min-frequency", type=int, default=2,
                        help="a pair must occur this often to be merged")
    parser.add_argument("--force", action="store_true", help="retrain even if up to date")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = ensure_toy_tokenizer(args.root, args.out, vocab_size=args.vocab_size,
                                   min_frequency=args.min_frequency, force=args.force)
    # Load it back the way the model does, so a broken tokenizer fails here, not in training.
    tokenizer = build_tokenizer(summary["path"])
    action = "trained" if summary["trained"] else "up to date (kept)"
    print(f"tokenizer at {summary['path']}: {action}, {len(tokenizer)} tokens, "
          f"{summary['params']['num_texts']} texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
