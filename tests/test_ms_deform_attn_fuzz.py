"""Fuzz the multi-scale deformable attention op with malformed and edge-case calls.

Each call starts from a small valid problem and applies one or two random mutations: wrong
dimensions, dtypes and devices, negative / zero / overflowing level sizes, inconsistent
level_start_index, value lengths, mismatched heads / levels / points / batch, non-contiguous
tensors, NaN / inf values, empty batches, queries and points. The calls go to the Python op
(`ms_deform_attn`, compiled and reference backends) and to the raw extension functions
(`unip_v2._C.ms_deform_attn_forward` / `_backward`), which must check their own arguments.

A mutation that makes the call malformed must raise an exception whose message names the op;
a call that stays valid must return the right shape and agree with the other backend (the
reference against the compiled kernel, NaN and inf where the other has them). The calls run in
worker subprocesses, many per process, so that a crash (a segfault is a negative return code)
fails the test and names the call (seed and index) instead of killing the test session.

UNIP_V2_FUZZ_CALLS sets the number of calls (default 1200), UNIP_V2_FUZZ_SEED the seed.
Run one call by hand: python tests/test_ms_deform_attn_fuzz.py SEED INDEX 1
"""
import math
import os
import random
import subprocess
import sys

import pytest

CALLS = int(os.environ.get("UNIP_V2_FUZZ_CALLS", "1200"))
SEED = int(os.environ.get("UNIP_V2_FUZZ_SEED", "20240611"))
WORKERS = 2  # subprocesses, each importing torch once (most of their time) for its calls
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------- the worker
# Everything below up to the test runs only in the worker process (torch is imported there).


def _base_problem(rng, torch):
    """A small valid problem: dict of the five op inputs, plus its sizes."""
    N, L, M = rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 2)
    D, Lq, P = rng.randint(1, 5), rng.randint(1, 4), rng.randint(1, 3)
    shapes = [(rng.randint(1, 5), rng.randint(1, 5)) for _ in range(L)]
    dtype = rng.choice([torch.float32, torch.float64])
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    sizes = [h * w for h, w in shapes]
    S = sum(sizes)
    starts = [sum(sizes[:i]) for i in range(L)]
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    return dict(
        value=torch.randn(N, S, M, D, generator=g, dtype=torch.float64).to(dtype),
        spatial_shapes=torch.tensor(shapes, dtype=torch.int64).view(L, 2),
        level_start_index=torch.tensor(starts, dtype=torch.int64),
        sampling_locations=loc.to(dtype),
        attention_weights=torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64).to(dtype),
    )


def _with_levels(args, shapes, torch, starts=None):
    """args with new level sizes, value resized to their total, and (by default) consistent
    start indices; sizes may be huge (Python ints, wrapped to int64 as a C++ caller would)."""
    def wrap(x):
        return (x + 2 ** 63) % 2 ** 64 - 2 ** 63
    sizes = [wrap(h * w) for h, w in shapes]
    if starts is None:
        starts = [wrap(sum(sizes[:i])) for i in range(len(shapes))]
    S = wrap(sum(sizes))
    v = args["value"]
    out = dict(args)
    out["spatial_shapes"] = torch.tensor([[wrap(h), wrap(w)] for h, w in shapes],
                                         dtype=torch.int64).view(len(shapes), 2)
    out["level_start_index"] = torch.tensor(starts, dtype=torch.int64)
    if 0 <= S <= 10_000:
        out["value"] = torch.randn(v.shape[0], S, v.shape[2], v.shape[3], dtype=v.dtype)
    return out


def _noncontiguous(t, torch):
    """A copy of t with the same shape and values, laid out with gaps (strided view)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype) if t.dim() else t
    wide[..., : 2 * t.shape[-1]: 2] = t
    return wide[..., : 2 * t.shape[-1]: 2]


FLOATS = ("value", "sampling_locations", "attention_weights")
NAMES = ("value", "spatial_shapes", "level_start_index", "sampling_locations",
         "attention_weights")


# Mutations that keep the call valid, and those that make it malformed (but "starts" and
# "noncontiguous" may leave it valid, and say so).
VALID_KINDS = ("nonfinite", "empty", "zero_level", "far", "valid", "reduced")
MALFORMED_KINDS = ("dims", "dtype", "negative", "overflow", "starts", "length", "loc_shape",
                   "weights_shape", "noncontiguous", "device")


def _mutate(rng, args, torch, kinds=VALID_KINDS + MALFORMED_KINDS):
    """Apply one random mutation of `kinds`. Returns (args, description, malformed);
    malformed is None when only the call can tell (a strided view of a size-1 dimension is
    still contiguous)."""
    a = dict(args)
    v, ss = a["value"], a["spatial_shapes"]
    N, S, M, D = v.shape
    L = ss.shape[0]
    _, Lq, _, _, P, _ = a["sampling_locations"].shape
    kind = rng.choice(kinds)
    if kind == "dims":
        name = rng.choice(NAMES)
        t = a[name]
        a[name] = t.unsqueeze(rng.randint(0, t.dim())) if rng.random() < 0.5 or t.dim() < 2 \
            else t.flatten(0, 1)
        return a, f"dims: {name} -> {tuple(a[name].shape)}", True
    if kind == "dtype":
        name = rng.choice(NAMES)
        options = [torch.int32, torch.int64, torch.float16, torch.float32, torch.float64,
                   torch.bfloat16, torch.bool, torch.complex64, torch.uint8]
        dtype = rng.choice([d for d in options if d != a[name].dtype])
        a[name] = a[name].to(dtype)
        return a, f"dtype: {name} -> {dtype}", True
    if kind == "negative":
        shapes = [tuple(r) for r in ss.tolist()]
        l, k = rng.randrange(L), rng.randrange(2)
        hw = list(shapes[l])
        hw[k] = -rng.randint(1, 5)
        shapes[l] = tuple(hw)
        a = _with_levels(a, shapes, torch, starts=a["level_start_index"].tolist())
        return a, f"negative: spatial_shapes = {shapes}", True
    if kind == "overflow":
        shapes = [tuple(r) for r in ss.tolist()]
        l = rng.randrange(L)
        # H * W past int64: 2^80; wrapping to exactly 0 (2^32 * 2^32) or to 4 (a plausible S)
        shapes[l] = rng.choice([(2 ** 40, 2 ** 40), (2 ** 32, 2 ** 32), (2 ** 62 + 1, 4),
                                (4, 2 ** 62 + 1), (2 ** 63 - 1, 2), (3 * 2 ** 61, 2 ** 61)])
        return _with_levels(a, shapes, torch), f"overflow: spatial_shapes = {shapes}", True
    if kind == "starts":
        starts = a["level_start_index"].tolist()
        how = rng.choice(["shift", "huge", "negative", "reverse", "longer", "shorter"])
        i = rng.randrange(L)
        if how == "shift":
            starts[i] += rng.choice([-1, 1])
        elif how == "huge":
            starts[i] = rng.choice([2 ** 62, 2 ** 63 - 1, S])
        elif how == "negative":
            starts[i] = -rng.randint(1, 2 ** 40)
        elif how == "reverse":
            starts = [S - 1 - x for x in starts] if L > 1 else [S]
        elif how == "longer":
            starts = starts + [S]
        else:
            starts = starts[:-1]
        malformed = starts != a["level_start_index"].tolist()
        a["level_start_index"] = torch.tensor(starts, dtype=torch.int64)
        return a, f"starts ({how}): level_start_index = {starts}", malformed
    if kind == "length":
        extra = rng.choice([-1, 1, 7])
        if S + extra < 0:
            extra = 1
        a["value"] = torch.randn(N, S + extra, M, D, dtype=v.dtype)
        return a, f"length: value S = {S + extra}, levels hold {S}", True
    if kind == "loc_shape":
        shape = [N, Lq, M, L, P, 2]
        i = rng.choice([0, 2, 3, 4, 5])
        shape[i] += rng.choice([1, -1]) if shape[i] > 1 else 1
        a["sampling_locations"] = torch.rand(*shape, dtype=v.dtype)
        return a, f"loc_shape: sampling_locations {tuple(shape)}", True
    if kind == "weights_shape":
        shape = [N, Lq, M, L, P]
        i = rng.randrange(5)
        shape[i] += 1
        a["attention_weights"] = torch.rand(*shape, dtype=v.dtype)
        return a, f"weights_shape: attention_weights {tuple(shape)}", True
    if kind == "noncontiguous":
        name = rng.choice(NAMES)
        a[name] = _noncontiguous(a[name], torch)
        return a, f"noncontiguous: {name} strides {a[name].stride()}", \
            (None if a[name].is_contiguous() else True)
    if kind == "device":
        name = rng.choice(NAMES)
        a[name] = torch.empty(a[name].shape, dtype=a[name].dtype, device="meta")
        return a, f"device: {name} on meta", True
    if kind == "nonfinite":
        name = rng.choice(FLOATS)
        t = a[name].clone()
        flat = t.view(-1)
        for _ in range(rng.randint(1, 3) if flat.numel() else 0):
            flat[rng.randrange(flat.numel())] = rng.choice([math.nan, math.inf, -math.inf])
        a[name] = t
        return a, f"nonfinite: {name}", False
    if kind == "empty":
        which = rng.choice(["batch", "queries", "points"])
        n, q, p = {"batch": (0, Lq, P), "queries": (N, 0, P), "points": (N, Lq, 0)}[which]
        a["value"] = v[:n].contiguous()
        a["sampling_locations"] = torch.rand(n, q, M, L, p, 2, dtype=v.dtype)
        a["attention_weights"] = torch.rand(n, q, M, L, p, dtype=v.dtype)
        return a, f"empty: {which}", False
    if kind == "zero_level":
        shapes = [tuple(r) for r in ss.tolist()]
        l = rng.randrange(L)
        shapes[l] = rng.choice([(0, shapes[l][1]), (shapes[l][0], 0), (0, 0), (0, 2 ** 40)])
        return _with_levels(a, shapes, torch), f"zero_level: spatial_shapes = {shapes}", False
    if kind == "far":
        t = a["sampling_locations"].clone()
        if t.numel():
            t.view(-1)[rng.randrange(t.numel())] = rng.choice([1e30, -1e30, 3.0, -2.0])
        a["sampling_locations"] = t
        return a, "far: a location far outside", False
    if kind == "reduced":
        dtype = rng.choice([torch.float16, torch.bfloat16])
        for name in FLOATS:
            a[name] = a[name].to(dtype)
        return a, f"reduced: all floats {dtype}", False
    return a, "valid", False


def _reference(args, torch):
    from unip_v2.layers import ms_deform_attn_reference
    return ms_deform_attn_reference(*[args[n] for n in NAMES])


def _grads(args, grad_out, torch):
    """Reference gradients (value, locations, weights), in float64 on the same inputs."""
    from unip_v2.layers import ms_deform_attn_reference
    leaves = {n: args[n].double().requires_grad_() for n in FLOATS}
    out = ms_deform_attn_reference(leaves["value"], args["spatial_shapes"],
                                   args["level_start_index"], leaves["sampling_locations"],
                                   leaves["attention_weights"])
    grads = torch.autograd.grad(out, [leaves[n] for n in FLOATS], grad_out.double(),
                                allow_unused=True, materialize_grads=True)
    return grads


def _close(mine, theirs, dtype, torch):
    """Equal up to the rounding of `dtype` (the call's); NaN where the other has NaN, inf of
    the same sign."""
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 5e-2)
    try:
        torch.testing.assert_close(mine.double(), theirs.double(), atol=tol, rtol=tol,
                                   equal_nan=True)
    except AssertionError as e:
        return str(e).splitlines()[0]
    return None


def _run_one(seed, index):
    """One fuzz call. Returns None if it behaved, else what went wrong."""
    import torch
    from unip_v2 import _C
    from unip_v2.layers import ms_deform_attn

    rng = random.Random(seed * 1_000_003 + index)
    args = _base_problem(rng, torch)
    descs, malformed = [], False
    # Two mutations: a valid one first, so that the second, maybe malformed one is not
    # overwritten (an empty batch would replace a non-contiguous tensor).
    plan = [VALID_KINDS + MALFORMED_KINDS] if rng.random() < 0.7 else [
        VALID_KINDS, VALID_KINDS + MALFORMED_KINDS]
    for kinds in plan:
        args, desc, bad = _mutate(rng, args, torch, kinds)
        descs.append(desc)
        malformed = malformed or bool(bad)
    target = rng.choice(["op_cpu", "op_reference", "C_forward", "C_backward"])
    desc = f"{target}: " + "; ".join(descs)
    call_args = [args[n] for n in NAMES]
    grad_out = None
    try:
        if target == "op_cpu":
            out = ms_deform_attn(*call_args, backend="cpu")
        elif target == "op_reference":
            out = ms_deform_attn(*call_args, backend="reference")
        elif target == "C_forward":
            out = _C.ms_deform_attn_forward(*call_args)
        else:
            v, loc = args["value"], args["sampling_locations"]
            shape = (v.shape[0], loc.shape[1], v.shape[2] * v.shape[3]) if (
                v.dim() == 4 and loc.dim() == 6) else (1, 1, 1)
            grad_out = torch.randn(*shape, dtype=torch.float64).to(
                v.dtype if v.dtype.is_floating_point else torch.float32)
            if rng.random() < 0.15:  # the gradient itself malformed
                how = rng.choice(["shape", "dtype", "noncontiguous"])
                if how == "shape":
                    grad_out = grad_out.unsqueeze(0)
                elif how == "dtype":
                    grad_out = grad_out.to(torch.float16 if grad_out.dtype != torch.float16
                                           else torch.float32)
                else:
                    grad_out = _noncontiguous(grad_out, torch)
                malformed = malformed or how != "noncontiguous" or not grad_out.is_contiguous()
                desc += f"; grad_output {how}"
            out = _C.ms_deform_attn_backward(*call_args, grad_out)
    except Exception as e:  # noqa: BLE001 - any Python exception is an acceptable refusal
        # grid_sample (the reference) may not take fp16 / bf16 on CPU; the kernels must.
        reduced_reference = target == "op_reference" and args["value"].dtype in (
            torch.float16, torch.bfloat16)
        if not malformed and not reduced_reference:
            return f"{desc}: a valid call raised {type(e).__name__}: {e}"
        if "ms_deform_attn" not in str(e) and malformed:
            return f"{desc}: {type(e).__name__} without the op's name: {str(e)[:300]}"
        return None
    if malformed:
        return f"{desc}: a malformed call returned instead of raising"
    # A valid call: shapes, then agreement with the other backend.
    v, loc, w = args["value"], args["sampling_locations"], args["attention_weights"]
    N, S, M, D = v.shape
    Lq = loc.shape[1]
    reduced = v.dtype in (torch.float16, torch.bfloat16)
    if reduced:
        args = {n: (args[n].float() if n in FLOATS else args[n]) for n in NAMES}
    if target == "C_backward":
        if tuple(tuple(g.shape) for g in out) != (tuple(v.shape), tuple(loc.shape), tuple(w.shape)):
            return f"{desc}: gradient shapes {[tuple(g.shape) for g in out]}"
        # Non-finite locations have a defined gradient (zero) and are compared. An inf / NaN
        # value or weight makes the gradients non-finite, and there the backward kernels'
        # order of products (weight folded into each corner) may give NaN where the
        # reference gives inf: only the shapes are checked. fp16 / bf16: shapes only too.
        finite = all(torch.isfinite(args[n]).all() for n in ("value", "attention_weights"))
        if not finite or reduced:
            return None
        ref = _grads(args, grad_out, torch)
        for name, mine, theirs in zip(FLOATS, out, ref):
            if name == "sampling_locations":  # per pixel, as in the op tests
                size_wh = args["spatial_shapes"].flip(-1).double().clamp(min=1)
                mine = mine.double() / size_wh[:, None, :]
                theirs = theirs / size_wh[:, None, :]
            problem = _close(mine, theirs, v.dtype, torch)
            if problem:
                return f"{desc}: grad of {name} differs from the reference: {problem}"
        return None
    if tuple(out.shape) != (N, Lq, M * D):
        return f"{desc}: output shape {tuple(out.shape)}, expected {(N, Lq, M * D)}"
    if target == "op_reference":
        other = _C.ms_deform_attn_forward(*[args[n] for n in NAMES])
    else:
        other = _reference(args, torch)
    problem = _close(out, other, v.dtype, torch)
    return f"{desc}: differs from the other backend: {problem}" if problem else None


def _worker(seed, start, count):
    """Run calls [start, start + count); print BEGIN before each (so that a crash can be
    traced to its call) and FAIL for each call that misbehaved."""
    import warnings
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(1)
    for index in range(start, start + count):
        print(f"BEGIN {index}", flush=True)
        try:
            problem = _run_one(seed, index)
        except Exception as e:  # noqa: BLE001 - a bug of this harness, not of the op
            problem = f"the fuzz harness itself failed: {type(e).__name__}: {e}"
        if problem:
            print(f"FAIL {index} {problem}", flush=True)
    print("DONE", flush=True)


# ------------------------------------------------------------------------------ the test


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", UNIP_V2_MSDA_BACKEND="")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "projects")] + paths)
    return env


def test_fuzz_malformed_calls_raise_and_valid_calls_match():
    pytest.importorskip("unip_v2._C", reason="compiled extension not built")
    chunk = max(1, math.ceil(CALLS / WORKERS))
    procs = []
    for start in range(0, CALLS, chunk):
        cmd = [sys.executable, os.path.abspath(__file__), str(SEED), str(start),
               str(min(chunk, CALLS - start))]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=_env(), cwd=REPO))
    failures = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        lines = stdout.splitlines()
        begun = [ln for ln in lines if ln.startswith("BEGIN")]
        failures += [ln for ln in lines if ln.startswith("FAIL")]
        if proc.returncode != 0 or not lines or lines[-1] != "DONE":
            last = begun[-1].split()[1] if begun else "?"
            failures.append(
                f"CRASH: worker {proc.args[-3:]} exited with {proc.returncode} during call "
                f"{last} (seed {SEED}; rerun: python tests/test_ms_deform_attn_fuzz.py {SEED} "
                f"{last} 1): {stderr[-2000:]}")
    assert not failures, f"{len(failures)} of {CALLS} fuzz calls misbehaved:\n" + "\n".join(
        failures[:30])


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
