#!/usr/bin/env python
"""Generate the toy_shapes dataset (coloured shapes on textured backgrounds, COCO format).

    python tools/make_toy_dataset.py                    # -> $DETECTRON2_DATASETS/toy_shapes
    python tools/make_toy_dataset.py --root /tmp/toy --num-train 200 --num-val 20 --force

Writes the train, val and novel splits (novel: val-like scenes that also hold the held-out
colour-shape combinations). Without --force an existing complete copy with the same
parameters is kept as it is. A progress bar shows on a terminal (--no-progress hides it).
"""
import argparse
import sys

from tqdm import tqdm

import unip_v2  # noqa: F401  (first: makes detectron2 importable)
from unip_v2.data.datasets import ensure_toy_shapes, toy_shapes_root


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None,
                        help=f"output directory (default: {toy_shapes_root()})")
    parser.add_argument("--num-train", type=int, default=2000, help="train images (>= 1)")
    parser.add_argument("--num-val", type=int, default=200, help="val images (>= 1)")
    parser.add_argument("--num-novel", type=int, default=200,
                        help="images of the novel split (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    parser.add_argument("--force", action="store_true",
                        help="regenerate even if a complete copy with these parameters exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


class _ProgressBar:
    """generate_toy_shapes' progress callback as one tqdm bar per split."""

    def __init__(self, disable: bool):
        self.disable, self.bar, self.split = disable, None, None

    def __call__(self, split: str, done: int, total: int) -> None:
        if split != self.split:
            self.close()
            self.split = split
            self.bar = tqdm(total=total, desc=f"toy_shapes {split}", unit="img",
                            disable=self.disable, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_summary(summary: dict) -> str:
    """Human-readable lines for a generate/ensure summary."""
    action = "generated" if summary.get("generated", True) else "up to date (kept)"
    lines = [f"toy_shapes at {summary['root']}: {action}",
             f"  categories: {summary['categories']} (+ {summary.get('novel_categories', 0)} "
             f"held out, in the novel split only)",
             f"  seconds: {summary['seconds']}" + ("" if summary.get("generated", True)
                                                   else " (when it was generated)")]
    for split, stats in summary["splits"].items():
        lines.append(
            f"  {split}: {stats['images']} images, {stats['instances']} instances, "
            f"{stats['instances_per_image']:.2f} per image, "
            f"{100 * stats['occluded_fraction']:.1f}% occluded")
        sizes = ", ".join(f"{k}={v}" for k, v in stats["size_quantiles"].items())
        areas = ", ".join(f"{k}={100 * v:.0f}%" for k, v in stats["area_fractions"].items())
        lines.append(f"    size / shorter side: {sizes}; COCO area ranges: {areas}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    # tqdm's own check: no bar when stderr is not a terminal (logs, CI), unless asked off
    progress = _ProgressBar(disable=True if args.no_progress else None)
    try:
        summary = ensure_toy_shapes(args.root, args.num_train, args.num_val, args.seed,
                                    force=args.force, num_novel=args.num_novel,
                                    progress=progress)
    except ValueError as e:
        print(f"make_toy_dataset: {e}", file=sys.stderr)
        return 2
    finally:
        progress.close()
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
