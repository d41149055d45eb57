#!/usr/bin/env python
"""What simple rules score on toy_shapes' classification labels (the category of each image's
largest object): chance, the majority label, guessing among the categories present, and the
category with the most pixels.

    python tools/toy_classification_baselines.py [--root DIR] [--split val]
"""
import argparse

import unip_v2  # noqa: F401  (first: makes detectron2 importable)
from unip_v2.data.datasets.toy_shapes_tasks import classification_label_baselines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="toy_shapes root (default: "
                        "$DETECTRON2_DATASETS/toy_shapes)")
    parser.add_argument("--split", default="val", choices=("train", "val"))
    args = parser.parse_args(argv)
    for rule, top1 in classification_label_baselines(args.root, args.split).items():
        print(f"{rule:>20s}: top-1 {top1:5.1f}%")


if __name__ == "__main__":
    main()
