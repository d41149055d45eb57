#!/usr/bin/env python
"""Time of one optimiser step of MT-AdamW (unip_v2.solver.MTAdamW) against torch's AdamW on the
parameters of the R50 generalist (configs/uni_perceiver_v2/R50.yaml: R50 image encoder with
Table 7's region proposal network, RoBERTa-base with RoBERTa's 50,265-token vocabulary, the
6-layer unified decoder with conditional MoE), in one run, as a ratio.

Both optimisers get the model's own parameter groups (`optimizer_param_groups`, merged like
`build_optimizer` does) and the same random gradients; torch's AdamW runs as build_optimizer
builds it (fused where this torch has it for the device, else foreach). Each: --warmup
untimed steps (the moments are allocated there), then the median of --repeats steps. MT-AdamW
does more per step (the global gradient norm and the scaling by w_k / ||grad||), so the ratio
says what that costs; it is timed as the model's optimiser would run (the compiled fused CPU
kernel where it applies) and with torch's foreach ops.

    python benchmarks/mt_adamw.py [--repeats 10] [--device cpu|cuda]
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import unip_v2  # noqa: F401  first: registers the project and makes detectron2 importable

from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.solver.build import reduce_param_groups

from unip_v2 import add_unip_v2_config
from unip_v2.modeling.text_encoder import train_byte_level_bpe
from unip_v2.solver import MTAdamW, optimizer_param_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "uni_perceiver_v2", "R50.yaml")
ROBERTA_VOCABULARY = 50265


def build_model(device):
    """The R50 generalist's modules with uninitialised storage on ``device`` (the values do not
    matter to an optimiser step); RoBERTa's vocabulary size for the word embeddings."""
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.MODEL.DEVICE = device
    # any BPE builds the model; the word embedding is resized to RoBERTa's vocabulary below
    tok = tempfile.mkdtemp(prefix="unip_v2_bench_tok_")
    train_byte_level_bpe(["a red circle", "a blue square"] * 3, tok, vocab_size=280,
                         min_frequency=1)
    cfg.MODEL.TEXT_ENCODER.TOKENIZER = tok
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ("toy_shapes_val",)
    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    model = model.to_empty(device=device)
    model.text_encoder.roberta.resize_token_embeddings(ROBERTA_VOCABULARY, mean_resizing=False)
    return cfg, model


def time_steps(opt, params, grads, warmup, repeats, device, before_step=None):
    for p, g in zip(params, grads):
        p.grad = g
    times = []
    for i in range(warmup + repeats):
        if before_step is not None:
            before_step()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    cfg, model = build_model(args.device)
    groups = reduce_param_groups(optimizer_param_groups(cfg, model))
    params = [p for g in groups for p in g["params"]]
    count = sum(p.numel() for p in params)
    g = torch.Generator(device=args.device).manual_seed(0)
    grads = [torch.randn(p.shape, generator=g, device=args.device) * 1e-3 for p in params]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02, generator=g)

    try:
        adamw = torch.optim.AdamW(groups, lr=1e-4, fused=True)
        adamw_kind = "fused"
    except (TypeError, RuntimeError):
        adamw = torch.optim.AdamW(groups, lr=1e-4, foreach=True)
        adamw_kind = "foreach"
    t_adamw = time_steps(adamw, params, grads, args.warmup, args.repeats, args.device)
    del adamw

    rows = []
    for fused in (None, False):
        mt = MTAdamW(groups, lr=1e-4, fused=fused)
        t = time_steps(mt, params, grads, args.warmup, args.repeats, args.device,
                       before_step=lambda opt=mt: opt.set_task(0.25, 1.0))
        kind = "fused CPU kernel" if fused is None and mt._kernel is not None and \
            args.device == "cpu" else "foreach"
        rows.append((f"MT-AdamW ({kind})", t))
        del mt
        if kind == "foreach":
            break

    cpu = platform.processor() or platform.machine()
    print(f"R50 generalist: {count / 1e6:.1f} M trainable parameters in {len(groups)} groups, "
          f"device {args.device} ({cpu}, {torch.get_num_threads()} threads), torch "
          f"{torch.__version__}, median of {args.repeats} steps")
    print("| optimiser | step (ms) | vs AdamW |")
    print("|---|---|---|")
    print(f"| torch AdamW ({adamw_kind}) | {t_adamw * 1e3:.1f} | 1.00x |")
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.1f} | {t / t_adamw:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
