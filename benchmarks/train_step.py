#!/usr/bin/env python
"""Time of one training iteration of the toy generalist, stage by stage, against another
commit of this repository measured in the same run.

    python benchmarks/train_step.py [--baseline 28d8439 | --baseline PATH | --baseline none]
                                    [--iters 6] [--warmup 2] [--config-file ...]

The iteration is tools/train_net.py's (configs/toy/uni_perceiver_v2_R50_tiny.yaml, 8 images a
batch): the data mapper on 8 images, the forward pass, the backward pass and the optimiser
step. Each checkout runs in its own process (one after the other, never side by side) from
the same starting point:
- the same initial weights (this checkout's model, saved once and loaded strictly into both),
- the same 8-image batches (mapped once here and saved; each process still times its own
  mapper on the same images as the "data" stage),
- the same random seed before every iteration (denoising noise, point sampling, MoE noise),
so the first iteration's losses and gradients must agree to float tolerance: the script prints
the largest relative difference of the loss terms and of the parameters' gradients, and fails
above --loss-rtol / --grad-rtol.

Times: the median iteration over --iters iterations after --warmup ones, in each of --rounds
rounds that alternate the checkouts (baseline, this, baseline, this, ...: a machine whose speed
drifts slows both alike), pooled; then, in the last round, --profile-iters iterations under
torch.profiler, whose record_function ranges (added by module hooks, so the
other checkout needs no change) split the time into stages: data, backbone, pixel encoder,
proposal decoder, region proposals and global tokens, matcher, criterion (without the
matcher), text encoder, unified decoder, the rest of the forward, backward and optimiser.

--baseline COMMIT extracts that commit (git archive) into build/baseline-COMMIT and compiles
its unip_v2._C there with this interpreter (about a minute, once).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/toy/uni_perceiver_v2_R50_tiny.yaml"
DEFAULT_BASELINE = "28d8439"
SEED = 1234

# (stage label, attribute path from the meta-architecture); None: timed around the call
STAGES = [
    ("data", None),
    ("backbone", "image_encoder.backbone"),
    ("pixel encoder", "image_encoder.pixel_encoder"),
    ("proposal decoder", "image_encoder.proposal_decoder"),
    ("region proposals + global tokens", ("image_encoder.region_proposals",
                                          "image_encoder.global_tokens")),
    # the criterion moved into the detection task; the old path times older checkouts
    ("matcher", ("tasks.detection.criterion.matcher", "criterion.matcher")),
    ("criterion", ("tasks.detection.criterion", "criterion")),
    ("text encoder", "text_encoder"),
    ("unified decoder", "unified_decoder"),
    ("forward", None),
    ("backward", None),
    ("optimiser", None),
]


# ------------------------------------------------------------------------------ child side
def build(cfg_file, tokenizer, workers=0):
    import unip_v2  # noqa: F401  (registers the toy datasets and the model)
    from detectron2.config import get_cfg
    from unip_v2 import add_unip_v2_config

    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(cfg_file)
    cfg.merge_from_list(["MODEL.TEXT_ENCODER.TOKENIZER", tokenizer, "SEED", str(SEED),
                         "DATALOADER.NUM_WORKERS", str(workers)])
    cfg.freeze()
    return cfg


def dataset_dicts(cfg, n):
    from detectron2.data import DatasetCatalog

    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    return [dicts[i % len(dicts)] for i in range(n)]


def seed_everything(seed):
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def map_batch(mapper, dicts, seed):
    import copy

    seed_everything(seed)
    return [mapper(copy.deepcopy(d)) for d in dicts]


class StageHooks:
    """Opens a torch.profiler.record_function range around the forward of each stage module."""

    def __init__(self, model):
        import torch

        self.handles = []
        for label, paths in STAGES:
            if paths is None:
                continue
            for path in (paths,) if isinstance(paths, str) else paths:
                module = model
                for part in path.split("."):
                    module = getattr(module, part, None)
                if not isinstance(module, torch.nn.Module):
                    continue
                self._hook(module, "stage:" + label)

    def _hook(self, module, label):
        import torch

        stack = []

        def pre(_module, _args):
            r = torch.profiler.record_function(label)
            r.__enter__()
            stack.append(r)

        def post(_module, _args, _out):
            stack.pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(pre),
                         module.register_forward_hook(post)]

    def remove(self):
        for h in self.handles:
            h.remove()


def moved_names(names, own):
    """{name in `names`: name in `own`} for the parameters that moved between two checkouts:
    a name missing from one whose dotted suffix, or extension, is the only unmatched name of
    the other."""
    only_theirs, only_own = set(names) - set(own), set(own) - set(names)
    moved = {}
    for key in sorted(only_own):
        match = [k for k in only_theirs if k.endswith("." + key) or key.endswith("." + k)]
        if len(match) == 1:
            moved[match[0]] = key
    return moved


def grown(big, small) -> bool:
    """Whether `big` is `small`'s table grown along dim 0 (same trailing shape, more rows)."""
    return (big.dim() == small.dim() >= 1 and big.shape[1:] == small.shape[1:]
            and big.shape[0] > small.shape[0])


def load_matching(model, state):
    """Loads this checkout's initial weights into `model`, which may be an older checkout's.
    Two differences between commits are bridged, each printed: a parameter that moved (its
    name in one is a dotted suffix of its name in the other, e.g. the detection temperature
    `logit_scale` before the task interface and `tasks.detection.logit_scale` after it), and
    a table that grew along dim 0 (the text encoder's position embeddings, 34 rows for a
    16-token context, 42 for 40): the older, smaller model gets the leading rows, the only
    positions its shorter context reaches. Anything else must match exactly (strict load)."""
    import torch

    own = model.state_dict()
    state = dict(state)
    for theirs, key in moved_names(state, own).items():
        print(f"[train_step] {theirs} -> {key}")
        state[key] = state.pop(theirs)
    for key, want in own.items():
        have = state.get(key)
        if isinstance(have, torch.Tensor) and grown(have, want):
            print(f"[train_step] {key}: leading {want.shape[0]} of {have.shape[0]} rows")
            state[key] = have[:want.shape[0]]
    model.load_state_dict(state)


def child(args):
    import numpy as np  # noqa: F401
    import torch

    import unip_v2
    from unip_v2.data.dataset_mappers import build_dataset_mapper
    from unip_v2.engine import Trainer

    here = os.path.realpath(os.path.dirname(unip_v2.__file__))
    want = os.path.realpath(os.path.join(args.checkout, "projects", "unip_v2"))
    if here != want:
        raise SystemExit(f"imported unip_v2 from {here}, expected {want}")
    cfg = build(os.path.join(args.checkout, args.config_file), args.tokenizer)
    work = args.work
    model = Trainer.build_model(cfg)
    load_matching(model, torch.load(os.path.join(work, "init.pth"), weights_only=True))
    model.train()
    optimizer = Trainer.build_optimizer(cfg, model)
    mapper = build_dataset_mapper(cfg, is_train=True)
    batches = torch.load(os.path.join(work, "batches.pth"), weights_only=False)
    dicts = dataset_dicts(cfg, cfg.SOLVER.IMS_PER_BATCH * len(batches))
    per_batch = cfg.SOLVER.IMS_PER_BATCH
    grads_file = os.path.join(work, f"grads-{args.name}.pth")

    def step(i, profile_ranges):
        import contextlib

        def rng(label):
            return (torch.profiler.record_function("stage:" + label) if profile_ranges
                    else contextlib.nullcontext())

        t0 = time.perf_counter()
        with rng("data"):
            map_batch(mapper, dicts[i * per_batch:(i + 1) * per_batch], SEED + i)
        t1 = time.perf_counter()
        seed_everything(SEED + 1000 + i)
        with rng("forward"):
            losses = model(batches[i])
        total = sum(losses.values())
        t2 = time.perf_counter()
        with rng("backward"):
            optimizer.zero_grad(set_to_none=True)
            total.backward()
        t3 = time.perf_counter()
        if i == 0 and not profile_ranges and not os.path.exists(grads_file):
            torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                       grads_file)
        with rng("optimiser"):
            optimizer.step()
        t4 = time.perf_counter()
        return {k: float(v) for k, v in losses.items()}, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)

    n = len(batches)
    losses, times = [], []
    for i in range(args.warmup + args.iters):
        loss, t = step(i % n, False)
        if i < n:
            losses.append(loss)
        if i >= args.warmup:
            times.append(t)
    stages = {}
    if args.profile_iters:
        hooks = StageHooks(model)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for i in range(args.profile_iters):
                step(i % n, True)
        hooks.remove()
        for e in prof.key_averages():
            if e.key.startswith("stage:"):
                stages[e.key[6:]] = e.cpu_time_total / 1e3 / args.profile_iters
    result = {"losses": losses, "times": times, "stages": stages,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "model": cfg.MODEL.dump(), "batch": per_batch}
    with open(os.path.join(work, f"result-{args.name}.json"), "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------- parent side
def run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return res


def prepare_baseline(spec):
    """A checkout of `spec` (a directory, or a commit of this repository) with its _C built."""
    if os.path.isdir(spec):
        path = os.path.abspath(spec)
    else:
        sha = run(["git", "-C", ROOT, "rev-parse", "--verify", "--short",
                   spec + "^{commit}"]).stdout.strip()
        path = os.path.join(ROOT, "build", f"baseline-{sha}")
        if not os.path.isdir(os.path.join(path, "projects")):
            os.makedirs(path, exist_ok=True)
            archive = subprocess.Popen(["git", "-C", ROOT, "archive", sha], stdout=subprocess.PIPE)
            run(["tar", "-x", "-C", path], stdin=archive.stdout)
            archive.wait()
    if not any(f.startswith("_C") for f in os.listdir(os.path.join(path, "projects", "unip_v2"))):
        print(f"[train_step] compiling unip_v2._C of {path} (once)", flush=True)
        run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp",
             "build/temp", "--build-lib", "build/lib"], cwd=path)
    return path


def prepare_inputs(args, work):
    """Toy dataset and tokenizer (generated if missing), initial weights and batches."""
    import torch

    from unip_v2.data.dataset_mappers import build_dataset_mapper
    from unip_v2.engine import Trainer

    run([sys.executable, os.path.join(ROOT, "tools", "make_toy_dataset.py")], cwd=ROOT)
    run([sys.executable, os.path.join(ROOT, "tools", "train_toy_tokenizer.py")], cwd=ROOT)
    cfg = build(os.path.join(ROOT, args.config_file), args.tokenizer)
    seed_everything(SEED)
    model = Trainer.build_model(cfg)
    torch.save(model.state_dict(), os.path.join(work, "init.pth"))
    mapper = build_dataset_mapper(cfg, is_train=True)
    n = max(args.warmup + args.iters, args.profile_iters)
    per_batch = cfg.SOLVER.IMS_PER_BATCH
    dicts = dataset_dicts(cfg, per_batch * n)
    batches = [map_batch(mapper, dicts[i * per_batch:(i + 1) * per_batch], SEED + i)
               for i in range(n)]
    torch.save(batches, os.path.join(work, "batches.pth"))


def measure(name, checkout, args, work, profile_iters):
    env = dict(os.environ, PYTHONPATH=os.path.join(checkout, "projects"))
    env.pop("UNIP_V2_MSDA_BACKEND", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--checkout", checkout,
           "--work", work, "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--profile-iters", str(profile_iters), "--config-file", args.config_file,
           "--tokenizer", args.tokenizer]
    print(f"[train_step] timing {name} ({checkout})", flush=True)
    run(cmd, cwd=ROOT, env=env)
    with open(os.path.join(work, f"result-{name}.json")) as f:
        return json.load(f)


def iteration_ms(result):
    return statistics.median(sum(t) for t in result["times"]) * 1e3


def stage_rows(result):
    """Exclusive stage times (ms): the criterion without the matcher; "other forward" is the
    forward minus the stages inside it."""
    s = dict(result["stages"])
    if not s:
        return {}
    inside = ["backbone", "pixel encoder", "proposal decoder", "region proposals + global tokens",
              "matcher", "criterion", "text encoder", "unified decoder"]
    s["criterion"] = s.get("criterion", 0.0) - s.get("matcher", 0.0)
    s["other forward"] = s.get("forward", 0.0) - sum(s.get(k, 0.0) for k in inside)
    order = ["data"] + inside + ["other forward", "backward", "optimiser"]
    return {k: s.get(k, 0.0) for k in order}


def compare_losses(base, cur, rtol):
    """Largest relative difference per loss term at the first iteration (same weights, batch
    and seed): the two checkouts must compute the same losses."""
    a, b = base["losses"][0], cur["losses"][0]
    if set(a) != set(b):
        raise SystemExit(f"the loss terms differ: only baseline {sorted(set(a) - set(b))}, "
                         f"only current {sorted(set(b) - set(a))}")
    worst = max(((abs(a[k] - b[k]) / max(abs(a[k]), 1e-6), k) for k in a))
    total_a, total_b = sum(a.values()), sum(b.values())
    print(f"\nfirst iteration, same weights / batch / seed: total loss {total_a:.6f} (baseline) vs "
          f"{total_b:.6f} (this checkout); largest relative difference of the {len(a)} terms: "
          f"{worst[0]:.2e} ({worst[1]})")
    later = [f"{sum(x.values()):.4f}/{sum(y.values()):.4f}"
             for x, y in zip(base["losses"][1:], cur["losses"][1:])]
    print(f"total loss at the next iterations (baseline/this): {', '.join(later)}")
    if worst[0] > rtol:
        raise SystemExit(f"loss {worst[1]} differs by {worst[0]:.2e} > --loss-rtol {rtol}")


def compare_gradients(work, rtol):
    """Relative difference of the first iteration's gradients, over all parameters and for
    the worst parameter (among those whose gradient is not negligible)."""
    import torch

    a = torch.load(os.path.join(work, "grads-baseline.pth"), weights_only=True)
    b = torch.load(os.path.join(work, "grads-current.pth"), weights_only=True)
    moved = moved_names(b, a)
    b = {moved.get(k, k): v for k, v in b.items()}
    for k in set(a) & set(b):  # a table that grew (see load_matching): its shared rows
        if grown(a[k], b[k]):
            a[k] = a[k][:b[k].shape[0]]
        elif grown(b[k], a[k]):
            b[k] = b[k][:a[k].shape[0]]
    if set(a) != set(b):
        raise SystemExit(f"parameters with gradients differ: only baseline "
                         f"{sorted(set(a) - set(b))[:5]}, "
                         f"only current {sorted(set(b) - set(a))[:5]}")
    total = torch.cat([g.flatten().double() for g in a.values()]).norm().item()
    diff = torch.cat([(a[k].double() - b[k].double()).flatten() for k in a]).norm().item()
    worst = max((((a[k].double() - b[k].double()).norm() / a[k].double().norm()).item(), k)
                for k in a if a[k].double().norm().item() > 1e-6 * total)
    print(f"first iteration's gradients ({len(a)} parameters): relative difference "
          f"{diff / total:.2e} overall, {worst[0]:.2e} for the worst parameter ({worst[1]})")
    if diff / total > rtol:
        raise SystemExit(f"gradients differ by {diff / total:.2e} > --grad-rtol {rtol}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help="a commit of this repository, a checkout directory, or 'none'")
    parser.add_argument("--config-file", default=CONFIG)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile-iters", type=int, default=2)
    parser.add_argument("--loss-rtol", type=float, default=1e-4)
    parser.add_argument("--grad-rtol", type=float, default=1e-3)
    parser.add_argument("--tokenizer", default=None,
                        help="default: $DETECTRON2_DATASETS/toy_shapes/tokenizer")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkout", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokenizer is None:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
        args.tokenizer = os.path.join(root, "toy_shapes", "tokenizer")
    if args.child:
        args.name = args.child
        return child(args)

    work = tempfile.mkdtemp(prefix="unip_v2_train_step_")
    try:
        prepare_inputs(args, work)
        checkouts = {"current": ROOT}
        if args.baseline != "none":
            checkouts = {"baseline": prepare_baseline(args.baseline), "current": ROOT}
        results = {}
        for r in range(args.rounds):
            profile = args.profile_iters if r == args.rounds - 1 else 0
            for name, path in checkouts.items():
                res = measure(name, path, args, work, profile)
                if name in results:  # pool the timings, keep round 1's losses
                    res["times"] = results[name]["times"] + res["times"]
                    res["losses"] = results[name]["losses"]
                results[name] = res
        report(args, results)
        if "baseline" in results:
            compare_gradients(work, args.grad_rtol)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(args, results):
    import platform

    cur = results["current"]
    print(f"\ntorch {cur['torch']}, {cur['threads']} threads, {platform.machine()}, "
          f"{os.cpu_count()} CPUs; {args.config_file}, {cur['batch']} images a batch; median of "
          f"{args.rounds} x {args.iters} iterations (rounds alternating the checkouts, each "
          f"after {args.warmup} warm-up ones); stages: torch.profiler over "
          f"{args.profile_iters} iterations (profiling adds overhead)")
    names = list(results)
    header = "| stage | " + " | ".join(f"{n} ms" for n in names)
    header += " | speed-up |" if "baseline" in results else " |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    rows = {n: stage_rows(results[n]) for n in names}
    for stage in rows["current"]:
        vals = [rows[n].get(stage, 0.0) for n in names]
        line = f"| {stage} | " + " | ".join(f"{v:.1f}" for v in vals)
        if "baseline" in results:
            line += f" | {vals[0] / vals[-1]:.2f}x |" if vals[-1] > 0 else " | - |"
        else:
            line += " |"
        print(line)
    its = [iteration_ms(results[n]) for n in names]
    line = "| **iteration (no profiler)** | " + " | ".join(f"**{v:.0f}**" for v in its)
    line += f" | **{its[0] / its[-1]:.2f}x** |" if "baseline" in results else " |"
    print(line)
    if "baseline" in results:
        base_model, cur_model = results["baseline"]["model"], cur["model"]
        if base_model != cur_model:
            print("note: the two checkouts' MODEL configs differ (new keys or defaults)")
        compare_losses(results["baseline"], cur, args.loss_rtol)


if __name__ == "__main__":
    main()
