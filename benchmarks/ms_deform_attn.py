#!/usr/bin/env python
"""Speed and peak memory of multi-scale deformable attention, every backend vs. the reference.

Shapes (batch 1, 8 heads x 32 channels, 4 levels at strides 8/16/32/64, 4 points):
  encoder  image 512 and 800 px square, Lq = S (every map position is a query)
  decoder  value maps of the 800 px image, Lq = 300 and 900 object queries
Locations are what the layers produce: an encoder query reads its own pixel on every level
plus offsets of a few pixels (N(0, 2 px)); a decoder query reads inside its box (random boxes,
points within half the box). One stress row reads uniformly random locations (no cache
locality at all), so the worst case is visible too.

The CPU kernel is timed at every instruction set this machine runs (AVX-512, AVX2 + FMA, the
x86-64 baseline; on Arm only the baseline), each in its own process with UNIP_V2_CPU_ISA
forcing it, and each against the pure-PyTorch reference timed in that same process on the same
inputs: median of `--repeats` runs after a warm-up. Peak memory is the extra memory one call
needs (inputs excluded): on CUDA from the allocator's peak; on CPU the growth of the peak
resident set (VmHWM, reset through /proc/self/clear_refs) of a fresh process during one call.

    python benchmarks/ms_deform_attn.py [--repeats 5] [--device cpu|cuda|all] [--isa all|best]
                                        [--skip-memory]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from unip_v2.layers import ms_deform_attn
from unip_v2.layers import ms_deform_attn_backend as backends

M, D, L, P = 8, 32, 4, 4
STRIDES = (8, 16, 32, 64)


def level_shapes(side):
    return [(-(-side // s), -(-side // s)) for s in STRIDES]


def make_problem(kind, side, lq, device, dtype=torch.float32, seed=0):
    """Inputs of one benchmark row: value, spatial_shapes, level_start_index, locations,
    weights, and a grad_output for the backward pass."""
    g = torch.Generator().manual_seed(seed)
    shapes = level_shapes(side)
    ss = torch.tensor(shapes, dtype=torch.long)
    starts = torch.cat([ss.new_zeros(1), (ss[:, 0] * ss[:, 1]).cumsum(0)[:-1]])
    S = int((ss[:, 0] * ss[:, 1]).sum())
    size_wh = ss.flip(-1).double()  # (L, 2) as (W, H)
    if kind == "encoder":
        lq = S
        centres = []
        for h, w in shapes:  # each query's own pixel centre, normalised
            y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
                                  indexing="ij")
            centres.append(torch.stack([x.flatten(), y.flatten()], -1))
        ref = torch.cat(centres).double()[None, :, None, None, None, :]
        offsets = torch.randn(1, lq, M, L, P, 2, generator=g, dtype=torch.float64) * 2.0
        loc = ref + offsets / size_wh[None, None, None, :, None, :]
    elif kind == "decoder":
        centre = torch.rand(1, lq, 1, 1, 1, 2, generator=g, dtype=torch.float64)
        size = torch.rand(1, lq, 1, 1, 1, 2, generator=g, dtype=torch.float64) * 0.4 + 0.02
        spread = torch.rand(1, lq, M, L, P, 2, generator=g, dtype=torch.float64) - 0.5
        loc = centre + spread * size
    elif kind == "uniform":
        lq = S
        loc = torch.rand(1, lq, M, L, P, 2, generator=g, dtype=torch.float64)
    else:
        raise ValueError(kind)
    value = torch.randn(1, S, M, D, generator=g, dtype=torch.float64)
    weights = torch.rand(1, lq, M, L, P, generator=g, dtype=torch.float64)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    grad = torch.randn(1, lq, M * D, generator=g, dtype=torch.float64)
    floats = [t.to(device=device, dtype=dtype).contiguous() for t in (value, loc, weights, grad)]
    return floats[0], ss.to(device), starts.to(device), floats[1], floats[2], floats[3]


def run_once(backend, problem, mode):
    value, ss, starts, loc, w, grad = problem
    if mode == "fwd":
        with torch.no_grad():
            ms_deform_attn(value, ss, starts, loc, w, backend=backend)
        return
    leaves = [t.detach().requires_grad_() for t in (value, loc, w)]
    out = ms_deform_attn(leaves[0], ss, starts, leaves[1], leaves[2], backend=backend)
    out.backward(grad)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(backend, problem, mode, device, repeats):
    run_once(backend, problem, mode)  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        run_once(backend, problem, mode)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mb(row, backend, mode, device, isa=None):
    kind, side, lq = row
    if device == "cuda":
        problem = make_problem(kind, side, lq, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(backend, problem, mode)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # CPU: a fresh process, so the peak RSS is this one call's.
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, str(side), str(lq),
           backend, mode]
    # A fixed mmap threshold: every large block is a fresh mapping, returned on free, so the
    # resident set sees each allocation (glibc's dynamic threshold would otherwise serve it
    # from heap memory that building the inputs left resident).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    if isa is not None:
        env["UNIP_V2_CPU_ISA"] = isa
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(kind, side, lq, backend, mode):
    """Entry point of the memory subprocess: one call, report its peak RSS growth."""
    problem = make_problem(kind, int(side), None if lq == "None" else int(lq), "cpu")
    # No warm-up: memory freed by a first call stays in the allocator and would hide the
    # second call's allocations from the resident set.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_mb("VmRSS")
    run_once(backend, problem, mode)
    print(json.dumps({"peak_mb": max(_status_mb("VmHWM") - before, 0.0)}))


ROWS = [("encoder", 512, None), ("encoder", 800, None), ("decoder", 800, 300),
        ("decoder", 800, 900), ("uniform", 800, None)]


ISAS = ("avx512", "avx2", "default")  # widest first; UNIP_V2_CPU_ISA values


def describe(row):
    kind, side, lq = row
    S = sum(h * w for h, w in level_shapes(side))
    if kind == "decoder":
        return f"decoder {side}px Lq={lq}"
    label = "encoder" if kind == "encoder" else "stress: uniform locations"
    return f"{label} {side}px Lq=S={S}"


def cpu_name():
    """The CPU's model name and its vector extensions, for the table's heading."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wide = [f for f in ("avx512f", "avx2", "fma", "asimd", "sve") if f in flags]
    return f"{model} ({os.cpu_count()} cores; {' '.join(wide) or 'no AVX2/AVX-512'})"


def time_rows(device, repeats, skip_memory, isa=None):
    """{row index: {backend: (fwd ms, fwd+bwd ms, peak MB or None)}} for the reference and the
    compiled backend of `device`, timed here, one row after the other."""
    results = {}
    for i, row in enumerate(ROWS):
        problem = make_problem(*row, device=device)
        results[i] = {}
        for backend in ("reference", device):
            fwd = time_ms(backend, problem, "fwd", device, repeats)
            both = time_ms(backend, problem, "fwdbwd", device, repeats)
            mem = None if skip_memory else peak_mb(row, backend, "fwdbwd", device, isa)
            results[i][backend] = (fwd, both, mem)
        del problem
    return results


def isa_child(isa, repeats, skip_memory):
    """Entry point of the per-ISA subprocess: prints its results as one JSON line."""
    ops = backends.compiled_ops()
    got = ops.cpu_isa()
    if got != isa:
        raise SystemExit(f"UNIP_V2_CPU_ISA={isa} but the kernel runs {got}")
    print(json.dumps(time_rows("cpu", repeats, skip_memory, isa)))


def run_isa(isa, repeats, skip_memory):
    cmd = [sys.executable, os.path.abspath(__file__), "--child-isa", isa, "--repeats",
           str(repeats)] + (["--skip-memory"] if skip_memory else [])
    res = subprocess.run(cmd, capture_output=True, text=True,
                         env=dict(os.environ, UNIP_V2_CPU_ISA=isa))
    if res.returncode != 0:
        raise RuntimeError(f"benchmark at ISA {isa} failed:\n{res.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def print_rows(results, device, label):
    for i, row in enumerate(ROWS):
        ref = results[i]["reference"]
        for backend in ("reference", device):
            fwd, both, mem = results[i][backend]
            mem_s = "-" if mem is None else f"{mem:.0f}"
            ratio_mem = "-" if mem is None or not mem else f"{ref[2] / mem:.1f}x less"
            if backend == "reference":
                ratio_mem = "1x"
            name = f"{backend} ({device})" if backend == "reference" else label
            print(f"| {describe(row)} | {name} | {fwd:.1f} | {ref[0] / fwd:.1f}x | {both:.1f} | "
                  f"{ref[1] / both:.1f}x | {mem_s} | {ratio_mem} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--isa", choices=("all", "best"), default="all",
                        help="CPU: every instruction set this machine runs, or only the widest")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--child-isa", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.child_isa:
        return isa_child(args.child_isa, args.repeats, args.skip_memory)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [args.device]
    ops = backends.compiled_ops()
    best = ops.cpu_isa() if ops else None
    isas = list(ISAS[ISAS.index(best):]) if best else []
    if args.isa == "best":
        isas = isas[:1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"CPU: {cpu_name()}")
    print(f"CPU kernel ISA: {best or 'not built'}"
          + (f"; also timed with UNIP_V2_CPU_ISA={', '.join(isas[1:])}" if len(isas) > 1 else ""))
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"M={M} heads x D={D}, L={L} levels (strides 8-64), P={P} points, batch 1, fp32\n")
    header = ("| shape | backend | fwd ms | fwd speed-up | fwd+bwd ms | fwd+bwd speed-up |"
              " peak MB fwd+bwd | memory vs ref |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for device in devices:
        if not backends._has_compiled(device):
            print(f"| (no compiled {device} backend: {backends._missing_reason(device)}) |")
            continue
        if device == "cpu":
            for isa in isas:
                print_rows(run_isa(isa, args.repeats, args.skip_memory), "cpu", f"cpu ({isa})")
        else:
            print_rows(time_rows(device, args.repeats, args.skip_memory), device, device)


if __name__ == "__main__":
    main()
