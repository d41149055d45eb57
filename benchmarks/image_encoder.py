#!/usr/bin/env python
"""Forward time of the R50 image encoder (f_image) with the compiled deformable-attention op
vs. the pure-PyTorch reference op, in one run on the same weights and input.

The model is configs/proposal_network/R50_coco.yaml (Table 7 sizes: d=256, 6 encoder and 6
decoder layers, 300 queries, top-200 proposals), randomly initialised, in eval mode, on one
512 x 512 image (or --size), batch 1. Each backend: --warmup untimed runs, then the median
of --repeats. Only the op differs between the two rows, so the ratio is what the compiled op
buys for the whole encoder.

    python benchmarks/image_encoder.py [--size 512] [--repeats 5] [--device cpu|cuda]
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

import unip_v2  # noqa: F401  first: registers the project and makes detectron2 importable

from detectron2.config import get_cfg

from unip_v2 import add_unip_v2_config
from unip_v2.layers import ms_deform_attn_backend as backends
from unip_v2.layers import ms_deform_attn_module
from unip_v2.modeling.image_encoder import ImageEncoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "proposal_network", "R50_coco.yaml")


def build_encoder(device):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.MODEL.DEVICE = device
    torch.manual_seed(0)
    return ImageEncoder(cfg).to(device).eval()


def set_backend(encoder, backend):
    n = 0
    for module in encoder.modules():
        if hasattr(module, "backend") and module.__class__.__name__ == "MSDeformAttn":
            module.backend = backend
            n += 1
    return n


class OpTimer:
    """Accumulates the time spent inside the op calls of MSDeformAttn (the rest of the
    encoder is the same for both rows), installed by wrapping the function it calls."""

    def __init__(self, device):
        self.device, self.total = device, 0.0
        self._op = ms_deform_attn_module.ms_deform_attn

    def __call__(self, *args, **kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = self._op(*args, **kwargs)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.total += time.perf_counter() - t
        return out


def time_forward(encoder, images, sizes, warmup, repeats, device):
    """Median forward time and median time inside the op, over `repeats` runs."""
    times, op_times = [], []
    timer = OpTimer(device)
    ms_deform_attn_module.ms_deform_attn = timer
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                timer.total = 0.0
                t = time.perf_counter()
                out = encoder(images, sizes)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t)
                    op_times.append(timer.total)
    finally:
        ms_deform_attn_module.ms_deform_attn = timer._op
    return statistics.median(times), statistics.median(op_times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if os.environ.get("UNIP_V2_MSDA_BACKEND"):
        sys.exit("unset UNIP_V2_MSDA_BACKEND: it would override the backend of both rows")

    compiled = "cuda" if args.device == "cuda" else "cpu"
    backends.resolve_backend(compiled, torch.device(args.device))  # raises if not compiled
    encoder = build_encoder(args.device)
    n_layers = set_backend(encoder, "reference")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, args.size, args.size, generator=g).to(args.device)
    sizes = [(args.size, args.size)]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}, device {args.device}")
    print(f"R50 image encoder (configs/proposal_network/R50_coco.yaml), input 1 x 3 x "
          f"{args.size} x {args.size}, eval, {n_layers} MSDeformAttn layers, median of "
          f"{args.repeats}")
    rows = []
    for backend in ("reference", compiled):
        set_backend(encoder, backend)
        t, op_t, out = time_forward(encoder, images, sizes, args.warmup, args.repeats,
                                    args.device)
        rows.append((backend, t, op_t, out))
    ref_t, ref_op = rows[0][1], rows[0][2]
    diff = (rows[0][3].regional_tokens - rows[1][3].regional_tokens).abs().max().item()
    print("| op backend | encoder forward ms | speed-up | of which in the op, ms | op speed-up |")
    print("|---|---|---|---|---|")
    for backend, t, op_t, _ in rows:
        print(f"| {backend} | {t * 1000:.1f} | {ref_t / t:.2f}x | {op_t * 1000:.1f} | "
              f"{ref_op / op_t:.1f}x |")
    print(f"max |difference| of the regional tokens between the two rows: {diff:.2e}")


if __name__ == "__main__":
    main()
