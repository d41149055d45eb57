"""The multi-scale deformable attention op: every backend against the pure-PyTorch reference,
determinism of the CPU backward, degenerate locations, bad inputs, backend selection."""
import logging
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from unip_v2.layers import ms_deform_attn, ms_deform_attn_reference
from unip_v2.layers import ms_deform_attn_backend as backend_mod

COMPILED = [b for b in ("cpu", "cuda") if backend_mod._has_compiled(b)]
DEVICE_OF = {"cpu": "cpu", "cuda": "cuda"}


def make_inputs(N=2, shapes=((6, 4), (3, 2)), M=2, D=5, Lq=7, P=3, dtype=torch.float32,
                device="cpu", outside=0.2, seed=0):
    """Random op inputs; about `outside` of the locations fall outside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.long)
    starts = torch.cat([ss.new_zeros(1), (ss[:, 0] * ss[:, 1]).cumsum(0)[:-1]])
    S, L = int((ss[:, 0] * ss[:, 1]).sum()), len(shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64)
    # stretch a fraction of the locations beyond the map: partly and wholly outside
    far = torch.rand(N, Lq, M, L, P, 1, generator=g, dtype=torch.float64) < outside
    loc = torch.where(far, loc * 1.6 - 0.3, loc)
    weights = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    floats = [t.to(device=device, dtype=dtype) for t in (value, loc, weights)]
    return floats[0], ss.to(device), starts.to(device), floats[1], floats[2]


# (N, shapes, M, D, Lq, P): batch > 1, one level, non-square levels, D not a multiple of 8,
# D spanning the vector paths (16, 32, 40, 64), many points outside the map.
CASES = [
    (1, ((6, 4), (3, 2)), 2, 2, 2, 2),
    (3, ((5, 7),), 3, 7, 11, 4),
    (2, ((9, 13), (5, 7), (3, 4), (2, 2)), 4, 13, 17, 3),
    (2, ((8, 8), (4, 4), (2, 2)), 8, 32, 33, 4),
    (1, ((7, 5), (4, 3)), 2, 40, 9, 2),
    (2, ((4, 6), (1, 1), (2, 3)), 1, 64, 5, 5),
    (2, ((3, 17), (11, 2)), 2, 16, 6, 1),
]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_reference(backend, case):
    N, shapes, M, D, Lq, P = case
    inputs = make_inputs(N, shapes, M, D, Lq, P, device=DEVICE_OF[backend], outside=0.3)
    value, ss, starts, loc, w = [t.requires_grad_() if t.is_floating_point() else t
                                 for t in inputs]
    grad_out = torch.randn(N, Lq, M * D, generator=torch.Generator().manual_seed(1)).to(value)
    results = []
    for b in (backend, "reference"):
        out = ms_deform_attn(value, ss, starts, loc, w, backend=b)
        grads = torch.autograd.grad(out, (value, loc, w), grad_out)
        results.append((out, *grads))
    # Two fp32 results that sum in different orders: each is ~1e-5 from a float64 oracle where
    # per-pixel location gradients reach tens, hence a relative tolerance with the absolute one
    # (as in test_cpu_instruction_set_paths).
    assert_same_results(results[0], results[1], ss, atol=1e-5, rtol=1e-5)


def per_pixel(grad_locations, spatial_shapes):
    """d/d(location) = (W, H) * d/d(pixel coordinate): divide the level size out so that
    fp32 rounding, which grows with it, is compared at unit scale."""
    size_wh = spatial_shapes.flip(-1).to(grad_locations)  # (L, 2) as (W, H)
    return grad_locations / size_wh[:, None, :]


def assert_same_results(mine, ref, spatial_shapes, atol, rtol=0.0):
    """mine, ref: (output, grad_value, grad_locations, grad_weights)."""
    names = ("output", "grad_value", "grad_locations per pixel", "grad_weights")
    for name, a, b in zip(names, mine, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name.startswith("grad_locations"):
            a, b = per_pixel(a, spatial_shapes), per_pixel(b, spatial_shapes)
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("case", CASES[:3])
def test_fp64_gradcheck(backend, case):
    N, shapes, M, D, Lq, P = case
    value, ss, starts, loc, w = make_inputs(N, shapes, M, min(D, 4), min(Lq, 4), P,
                                            dtype=torch.float64, device=DEVICE_OF[backend])
    inputs = tuple(t.requires_grad_() for t in (value, loc, w))
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn(v, ss, starts, l, a, backend=backend), inputs)


def test_reference_gradcheck():
    value, ss, starts, loc, w = make_inputs(1, ((4, 3), (2, 2)), 2, 3, 3, 2, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (value, loc, w))
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn_reference(v, ss, starts, l, a), inputs)


def test_reference_is_grid_sample_of_one_point():
    """Independent check of the reference itself: one head, one level, one point, weight 1
    reads the bilinear interpolation at pixel (x * W - 0.5, y * H - 0.5)."""
    H, W = 3, 4
    value = torch.arange(H * W, dtype=torch.float64).view(1, H * W, 1, 1)
    ss = torch.tensor([[H, W]])
    starts = torch.tensor([0])
    x, y = 1.25, 1.5  # pixel coordinates
    loc = torch.tensor([(x + 0.5) / W, (y + 0.5) / H], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    w = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn_reference(value, ss, starts, loc, w)
    expected = y * W + x  # value is linear in the pixel index, so bilinear is exact
    assert out.item() == pytest.approx(expected)


@pytest.mark.skipif("cpu" not in COMPILED, reason="compiled CPU backend not built")
def test_cpu_backward_is_deterministic():
    value, ss, starts, loc, w = make_inputs(2, ((16, 12), (8, 6), (4, 3)), 8, 32, 300, 4)
    grad_out = torch.randn(2, 300, 8 * 32)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (value, loc, w)]
        out = ms_deform_attn(leaves[0], ss, starts, leaves[1], leaves[2], backend="cpu")
        runs.append(torch.autograd.grad(out, leaves, grad_out))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


ISAS = ("default", "avx2", "avx512")  # narrowest first


def machine_isa():
    """The widest instruction set of the CPU kernels this CPU runs, from /proc/cpuinfo: an
    oracle independent of the extension's own detection (x86-64 Linux only)."""
    if platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"):
        return None
    with open("/proc/cpuinfo") as f:
        flags = next(set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags"))
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "default"


@pytest.mark.skipif("cpu" not in COMPILED, reason="compiled CPU backend not built")
def test_cpu_kernels_built_for_every_isa_of_this_machine():
    """Without UNIP_V2_CPU_ISA the widest instruction set the CPU supports runs: the per-ISA
    objects were built and linked, and the detection agrees with /proc/cpuinfo."""
    expected = machine_isa()
    if expected is None:
        pytest.skip("x86-64 Linux only")
    env = {k: v for k, v in os.environ.items() if k != "UNIP_V2_CPU_ISA"}
    res = subprocess.run([sys.executable, "-c", "from unip_v2 import _C; print(_C.cpu_isa())"],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-1] == expected


@pytest.mark.skipif("cpu" not in COMPILED, reason="compiled CPU backend not built")
def test_no_wide_instructions_outside_the_isa_kernels():
    """Only the AVX2 and AVX-512 builds of the kernels may hold AVX-encoded instructions, and the
    AVX2 build no 512-bit ones: a std:: or c10 inline function compiled in a wider object and kept
    by the linker for baseline code would crash (SIGILL) on an older CPU."""
    if platform.machine() != "x86_64" or shutil.which("objdump") is None:
        pytest.skip("x86-64 with binutils' objdump only")
    from unip_v2 import _C
    res = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    vex = re.compile(r"^\s*[0-9a-f]+:\s+v\w+\s.*%[xyz]mm", re.M)
    wide = re.compile(r"%zmm|%k[1-7]")
    avx2 = re.compile(r"kernels_avx2|::AVX2::")
    avx512 = re.compile(r"kernels_avx512|::AVX512::")
    bad = []
    for body in re.split(r"\n(?=[0-9a-f]+ <)", res.stdout):
        head = re.match(r"[0-9a-f]+ <(.*)>:", body)
        if head is None:
            continue
        name = head.group(1)
        if avx512.search(name):
            continue
        if avx2.search(name):
            if wide.search(body):
                bad.append(f"512-bit code in the AVX2 build: {name}")
        elif vex.search(body):
            bad.append(f"AVX code outside the ISA builds: {name}")
    assert not bad, "\n".join(bad[:20])


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")
def test_every_kernel_build_against_a_float64_oracle_without_libtorch():
    """tools/check_cpu_kernels.sh compiles the kernel sources with the extension's
    per-instruction-set flags into a standalone program (tests/csrc/ms_deform_attn_cpu_check.cpp)
    that checks each build the CPU runs, fp32 and fp64, forward and backward, against its own
    float64 oracle: the check that `tools/check_cpu_kernels.sh aarch64` runs on an Arm build."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(["bash", os.path.join(root, "tools", "check_cpu_kernels.sh"), "native"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "all kernel builds agree with the float64 oracle" in res.stdout
    assert "ok   default  fp64" in res.stdout
    best = machine_isa() or "default"
    for isa in ISAS[1:ISAS.index(best) + 1]:
        assert f"ok   {isa}" in res.stdout, res.stdout[-2000:]


@pytest.mark.skipif("cpu" not in COMPILED, reason="compiled CPU backend not built")
@pytest.mark.parametrize("isa,scalar_geometry", [("default", "0"), ("avx2", "0"), ("avx2", "1"),
                                                  ("avx512", "0"), ("avx512", "1")])
@pytest.mark.parametrize("seed", [0, 1])
def test_cpu_instruction_set_paths(isa, scalar_geometry, seed):
    """Each code path of the CPU kernel (chosen once per process) matches the reference:
    UNIP_V2_CPU_ISA caps the instruction set, UNIP_V2_CPU_SCALAR_GEOMETRY=1 takes the path
    that tensors too large for 32-bit offsets use; each runs in a fresh interpreter, which
    reports the instruction set it ran."""
    best = machine_isa() or "default"
    expected = ISAS[min(ISAS.index(isa), ISAS.index(best))]
    script = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_ms_deform_attn_op import CASES, assert_same_results, make_inputs
from unip_v2 import _C
from unip_v2.layers import ms_deform_attn, ms_deform_attn_reference
assert _C.cpu_isa() == {expected!r}, _C.cpu_isa()
torch.manual_seed({seed})
# fp32: the kernel and the reference sum in different orders; per-pixel location gradients
# reach tens, so a relative tolerance of a few float32 epsilons goes with the absolute one
for dtype, atol, rtol in ((torch.float32, 1e-5, 1e-5), (torch.float64, 1e-12, 0.0)):
    for N, shapes, M, D, Lq, P in CASES:
        ins = [t.requires_grad_() if t.is_floating_point() else t
               for t in make_inputs(N, shapes, M, D, Lq, P, dtype=dtype)]
        g = torch.randn(N, Lq, M * D, dtype=dtype)
        a = ms_deform_attn(*ins, backend="cpu"); b = ms_deform_attn_reference(*ins)
        ga = torch.autograd.grad(a, (ins[0], ins[3], ins[4]), g)
        gb = torch.autograd.grad(b, (ins[0], ins[3], ins[4]), g)
        assert_same_results((a, *ga), (b, *gb), ins[1], atol=atol, rtol=rtol)
print("ok")
"""
    env = dict(os.environ, UNIP_V2_CPU_ISA=isa, UNIP_V2_CPU_SCALAR_GEOMETRY=scalar_geometry)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision(backend, dtype):
    """fp16 / bf16 accumulate in fp32: the result matches the fp32 reference run on the
    same (rounded) inputs up to the output's rounding."""
    inputs = make_inputs(2, ((8, 6), (4, 3)), 4, 32, 20, 4, dtype=dtype,
                         device=DEVICE_OF[backend])
    value, ss, starts, loc, w = [t.requires_grad_() if t.is_floating_point() else t
                                 for t in inputs]
    grad_out = torch.randn(2, 20, 128, device=value.device).to(dtype)
    out = ms_deform_attn(value, ss, starts, loc, w, backend=backend)
    grads = torch.autograd.grad(out, (value, loc, w), grad_out)
    ref_in = [t.detach().float().requires_grad_() for t in (value, loc, w)]
    ref = ms_deform_attn_reference(ref_in[0], ss, starts, ref_in[1], ref_in[2])
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.float())
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    for mine, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(mine.float(), theirs, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("backend", COMPILED + ["reference"])
def test_nonfinite_and_far_locations_sample_zeros(backend):
    device = DEVICE_OF.get(backend, "cpu")
    value, ss, starts, loc, w = make_inputs(1, ((5, 4), (3, 2)), 2, 6, 5, 2, device=device)
    bad = [float("nan"), float("inf"), -float("inf"), -5.0, 7.0]
    loc = loc.clone()
    for q, x in enumerate(bad):
        loc[0, q, :, :, :, q % 2] = x  # one coordinate non-finite or far outside
    leaves = [t.requires_grad_() for t in (value, loc, w)]
    out = ms_deform_attn(leaves[0], ss, starts, leaves[1], leaves[2], backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), leaves)
    for grad in grads:
        assert torch.isfinite(grad).all()
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", COMPILED + ["reference"])
def test_empty_queries(backend):
    device = DEVICE_OF.get(backend, "cpu")
    value, ss, starts, loc, w = make_inputs(2, ((3, 3),), 2, 4, 0, 2, device=device)
    out = ms_deform_attn(value, ss, starts, loc, w, backend=backend)
    assert out.shape == (2, 0, 8)


# ----------------------------------------------------------------------------- bad input

def _good():
    return dict(zip(("value", "spatial_shapes", "level_start_index", "sampling_locations",
                     "attention_weights"), make_inputs(2, ((4, 3), (2, 2)), 2, 5, 6, 3)))


def _bad_cases():
    yield "value rank", dict(value=torch.zeros(2, 16, 10)), "value", "(2, 16, 10)"
    yield "batch mismatch", dict(sampling_locations=torch.zeros(3, 6, 2, 2, 3, 2)), \
        "sampling_locations", "(3, 6, 2, 2, 3, 2)"
    yield "heads mismatch", dict(attention_weights=torch.zeros(2, 6, 3, 2, 3)), \
        "attention_weights", "(2, 6, 3, 2, 3)"
    yield "levels mismatch", dict(spatial_shapes=torch.tensor([[4, 4]]),
                                  level_start_index=torch.tensor([0])), \
        "sampling_locations", "(2, 6, 2, 2, 3, 2)"
    yield "points mismatch", dict(attention_weights=torch.zeros(2, 6, 2, 2, 4)), \
        "attention_weights", "(2, 6, 2, 2, 4)"
    yield "integer value", dict(value=torch.zeros(2, 16, 2, 5, dtype=torch.int64)), \
        "value", "(2, 16, 2, 5)"
    yield "mixed float dtypes", dict(sampling_locations=torch.zeros(2, 6, 2, 2, 3, 2,
                                                                    dtype=torch.float64)), \
        "sampling_locations", "(2, 6, 2, 2, 3, 2)"
    yield "int32 shapes", dict(spatial_shapes=torch.tensor([[4, 3], [2, 2]], dtype=torch.int32)), \
        "spatial_shapes", "(2, 2)"
    yield "shapes not (L, 2)", dict(spatial_shapes=torch.tensor([[4, 3, 1], [2, 2, 1]])), \
        "spatial_shapes", "(2, 3)"
    yield "start index wrong", dict(level_start_index=torch.tensor([0, 11])), \
        "level_start_index", "[0, 11]"
    yield "start index length", dict(level_start_index=torch.tensor([0, 12, 16])), \
        "level_start_index", "(3,)"
    yield "S mismatch", dict(value=torch.zeros(2, 17, 2, 5)), "value", "(2, 17, 2, 5)"
    yield "negative shape", dict(spatial_shapes=torch.tensor([[-4, 3], [2, 2]])), \
        "spatial_shapes", "(-4, 3)"
    yield "non-contiguous", dict(value=torch.zeros(2, 5, 2, 16).transpose(1, 3)), \
        "value", "(2, 16, 2, 5)"
    yield "device mismatch", dict(attention_weights=torch.zeros(2, 6, 2, 2, 3, device="meta")), \
        "attention_weights", "(2, 6, 2, 2, 3)"
    yield "not a tensor", dict(value=[[1.0]]), "value", ""


@pytest.mark.parametrize("label,override,name,shape", list(_bad_cases()),
                         ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_with_tensor_and_shape(label, override, name, shape):
    """The checks run before any backend is chosen, so one backend covers them all."""
    args = _good()
    args.update(override)
    with pytest.raises((ValueError, TypeError)) as info:
        ms_deform_attn(**args)
    message = str(info.value)
    assert name in message and shape in message, message


@pytest.mark.skipif("cpu" not in COMPILED, reason="compiled CPU backend not built")
def test_compiled_entry_points_check_their_inputs():
    """Calling the extension directly with bad input raises instead of reading out of
    bounds (the Python face is not the only guard)."""
    ops = backend_mod.compiled_ops()
    args = _good()
    value, ss, starts, loc, w = args.values()
    with pytest.raises(RuntimeError, match="level_start_index"):
        ops.ms_deform_attn_forward(value, ss, torch.tensor([0, 13]), loc, w)
    with pytest.raises(RuntimeError, match="S = 16"):
        ops.ms_deform_attn_forward(value, torch.tensor([[4, 3], [3, 2]]), starts, loc, w)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.ms_deform_attn_forward(value.transpose(0, 1), ss, starts, loc, w)
    with pytest.raises(RuntimeError, match="grad_output"):
        ops.ms_deform_attn_backward(value, ss, starts, loc, w, torch.zeros(2, 6, 7))


# ----------------------------------------------------------------------- backend choice

def test_env_var_overrides_backend(monkeypatch):
    value, ss, starts, loc, w = make_inputs()
    monkeypatch.setenv(backend_mod.ENV_VAR, "reference")
    assert backend_mod.resolve_backend("cpu", value.device) == "reference"
    monkeypatch.setenv(backend_mod.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        ms_deform_attn(value, ss, starts, loc, w)


def test_unknown_or_impossible_backend_raises(monkeypatch):
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    value, ss, starts, loc, w = make_inputs()
    with pytest.raises(ValueError, match="unknown backend"):
        ms_deform_attn(value, ss, starts, loc, w, backend="triton")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        ms_deform_attn(value, ss, starts, loc, w, backend="cuda")


def test_auto_prefers_compiled(monkeypatch):
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    expected = "cpu" if "cpu" in COMPILED else "reference"
    assert backend_mod.resolve_backend("auto", torch.device("cpu")) == expected
    assert backend_mod.resolve_backend(None, torch.device("cpu")) == expected


def test_missing_compiled_backend_warns_once_and_explicit_request_fails(monkeypatch, caplog):
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(backend_mod, "_compiled", None)
    monkeypatch.setattr(backend_mod, "_compiled_error", ImportError("simulated"))
    monkeypatch.setattr(backend_mod, "_warned", set())
    value, ss, starts, loc, w = make_inputs()
    with caplog.at_level(logging.WARNING, logger=backend_mod.__name__):
        out1 = ms_deform_attn(value, ss, starts, loc, w)
        out2 = ms_deform_attn(value, ss, starts, loc, w)
    warnings = [r for r in caplog.records if "pure-PyTorch reference" in r.getMessage()]
    assert len(warnings) == 1 and "simulated" in warnings[0].getMessage()
    torch.testing.assert_close(out1, ms_deform_attn_reference(value, ss, starts, loc, w))
    assert torch.equal(out1, out2)
    with pytest.raises(RuntimeError, match="not available"):
        ms_deform_attn(value, ss, starts, loc, w, backend="cpu")


# ------------------------------------------------------- malformed calls of the extension

_RAW_CALLS_SCRIPT = r'''
import torch
from unip_v2 import _C

def inputs(shapes, dtype=torch.float64, N=1, M=1, D=2, Lq=3, P=1):
    sizes = [h * w for h, w in shapes]
    v = torch.randn(N, sum(sizes), M, D, dtype=dtype)
    ss = torch.tensor(shapes, dtype=torch.int64)
    starts = torch.tensor([sum(sizes[:i]) for i in range(len(shapes))], dtype=torch.int64)
    loc = torch.tensor([0.3, 0.71, 0.113], dtype=dtype)[:Lq].view(1, Lq, 1, 1, 1, 1)
    loc = loc.expand(N, Lq, M, len(shapes), P, 2).contiguous()
    w = torch.ones(N, Lq, M, len(shapes), P, dtype=dtype)
    return [v, ss, starts, loc, w]

def overflowing(hw, S):
    """A level whose H * W wraps around int64 to S (the S value holds)."""
    v, _, _, loc, w = inputs([(2, 2)])
    v = torch.randn(1, S, 1, 2, dtype=torch.float64)
    return [v, torch.tensor([hw]), torch.tensor([0]), loc, w]

good = inputs([(2, 3), (2, 2)])
cases = {
    # H * W = 2^64 + 4 wraps to 4: the kernel then indexed rows 2^61 apart (a segfault)
    "H*W wraps to S": (overflowing((2 ** 62 + 1, 4), 4), "overflows"),
    "W*H wraps to S": (overflowing((4, 2 ** 62 + 1), 4), "overflows"),
    "H*W wraps to 0": (overflowing((2 ** 32, 2 ** 32), 0), "overflows"),
    "H*W = 2^80": (overflowing((2 ** 40, 2 ** 40), 4), "overflows"),
    # each level fits, their sum does not: starts as a wrapping int64 cumsum would give
    "sum of H*W wraps": ([torch.randn(1, 2, 1, 2, dtype=torch.float64),
                          torch.tensor([[2 ** 61, 2], [2 ** 61, 2], [1, 2]]),
                          torch.tensor([0, 2 ** 62, -2 ** 63]),
                          torch.full((1, 3, 1, 3, 1, 2), 0.3, dtype=torch.float64),
                          torch.ones(1, 3, 1, 3, 1, dtype=torch.float64)], "positions"),
    "negative start": (good[:2] + [torch.tensor([0, -6])] + good[3:], "level_start_index"),
    "huge start": (good[:2] + [torch.tensor([0, 2 ** 62])] + good[3:], "level_start_index"),
    "negative size": (good[:1] + [torch.tensor([[-2, -3], [2, 2]])] + good[2:], "negative"),
    "int value": ([good[0].long()] + good[1:], "value"),
    "complex value": ([g.to(torch.complex128) if g.is_floating_point() else g for g in good],
                      "value"),
    "value on meta": ([good[0].to("meta")] + good[1:], "meta"),
    "all on meta": ([g.to("meta") for g in good], "meta"),
    "sparse value": ([good[0].to_sparse()] + good[1:], "value"),
}
for name, (args, words) in cases.items():
    for fn in ("forward", "backward"):
        call = list(args)
        if fn == "backward":
            v, loc = call[0], call[3]
            call.append(torch.ones(v.shape[0], loc.shape[1], v.shape[2] * v.shape[3],
                                   dtype=torch.float64))
        try:
            getattr(_C, "ms_deform_attn_" + fn)(*call)
        except RuntimeError as e:
            assert "ms_deform_attn" in str(e) and words in str(e), (name, str(e))
            continue
        raise AssertionError(f"{fn} of {name!r} returned instead of raising")
print("ALL RAISED")
'''


@pytest.mark.skipif("cpu" not in COMPILED, reason="compiled CPU backend not built")
def test_extension_rejects_overflowing_and_inconsistent_levels_without_crashing():
    """The extension's own checks (not only the Python face) turn malformed calls into
    errors; H * W overflowing int64 used to wrap to a plausible S and segfault. Runs in a
    subprocess: a crash (negative return code) fails the test instead of the session."""
    res = subprocess.run([sys.executable, "-c", _RAW_CALLS_SCRIPT], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "ALL RAISED" in res.stdout, (res.returncode, res.stderr)


# ------------------------------------------------------------------------ double backward

@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_double_backward_raises_instead_of_a_silent_zero(backend):
    """A gradient of a gradient through a compiled backend has no kernel: an error naming
    the reference backend, even where autograd would otherwise drop this op's share (another
    path to value, or allow_unused)."""
    value, ss, starts, loc, w = make_inputs(1, ((3, 4),), 1, 2, 3, 2, dtype=torch.float64,
                                            device=DEVICE_OF[backend])
    value, loc, w = [t.requires_grad_() for t in (value, loc, w)]
    out = ms_deform_attn(value, ss, starts, loc, w, backend=backend)
    g_w, = torch.autograd.grad(out.square().sum(), w, create_graph=True)
    # d/d value of (g_w^2 + out) is not d out / d value alone: the penalty term depends on
    # value too; before, it was silently dropped.
    with pytest.raises(RuntimeError, match="differentiable once.*reference"):
        torch.autograd.grad(g_w.square().sum() + out.sum(), value)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(g_w.sum(), value, allow_unused=True)


def test_reference_double_backward_matches_finite_differences():
    """The reference is the backend for double backward; gradgradcheck is the oracle."""
    value, ss, starts, loc, w = make_inputs(1, ((3, 4), (2, 2)), 1, 2, 2, 2,
                                            dtype=torch.float64, outside=0.0)
    inputs = [t.requires_grad_() for t in (value, loc, w)]
    assert torch.autograd.gradgradcheck(
        lambda v, lo, wt: ms_deform_attn(v, ss, starts, lo, wt, backend="reference"),
        inputs, eps=1e-6, atol=1e-4)


# ------------------------------------------------------------- inf / NaN attention weights

def _one_pixel_per_query(weights, locations, dtype, device):
    """A 2 x 2 map holding 1, 2, 3, 4 (row-major), M = D = 1, one point per query."""
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype, device=device).view(1, 4, 1, 1)
    ss = torch.tensor([[2, 2]], device=device)
    starts = torch.tensor([0], device=device)
    Lq = len(weights)
    loc = torch.tensor(locations, dtype=dtype, device=device).view(1, Lq, 1, 1, 1, 2)
    w = torch.tensor(weights, dtype=dtype, device=device).view(1, Lq, 1, 1, 1)
    return value, ss, starts, loc, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", COMPILED + ["reference"])
def test_nonfinite_weights_follow_ieee_weight_times_sample(backend, dtype):
    """output = weight * bilinear sample, in IEEE arithmetic: inf * (a positive sample) = inf,
    inf * 0 (a location outside the map) = NaN, NaN * anything = NaN. Hand-computed; the
    compiled kernels used to give NaN at a pixel centre (inf times the zero bilinear weight of
    the other corners) and 0 outside the map."""
    inf, nan = float("inf"), float("nan")
    cases = [  # (weight, location (x, y), expected)
        (inf, (0.25, 0.25), inf),     # pixel centre of value 1: one corner, three of weight 0
        (-inf, (0.5, 0.5), -inf),     # the four corners, sample 2.5
        (inf, (0.75, 0.25), inf),     # pixel centre of value 2
        (inf, (2.0, 2.0), nan),       # outside the map: inf * 0
        (nan, (0.5, 0.5), nan),
        (nan, (-3.0, 0.5), nan),      # outside: NaN * 0
        (2.0, (0.5, 0.5), 5.0),       # finite: 2 * 2.5
        (2.0, (2.0, 2.0), 0.0),       # finite weight outside: 0
    ]
    device = DEVICE_OF.get(backend, "cpu")
    value, ss, starts, loc, w = _one_pixel_per_query(
        [c[0] for c in cases], [c[1] for c in cases], dtype, device)
    out = ms_deform_attn(value, ss, starts, loc, w, backend=backend).view(-1).cpu()
    expected = torch.tensor([c[2] for c in cases], dtype=dtype)
    torch.testing.assert_close(out, expected, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("backend", COMPILED)
def test_nonfinite_weights_agree_with_reference_on_random_inputs(backend):
    """Every query of a random problem with some inf / NaN weights: the compiled backend
    gives +inf, -inf and NaN exactly where the reference does (fp32, so the CPU takes the
    vector geometry where it has one)."""
    device = DEVICE_OF[backend]
    value, ss, starts, loc, w = make_inputs(2, ((4, 5), (2, 3)), 2, 7, 9, 3, device=device,
                                            outside=0.3)
    g = torch.Generator().manual_seed(3)
    pick = torch.rand(w.shape, generator=g) < 0.1
    bad = torch.tensor([float("inf"), -float("inf"), float("nan")])[
        torch.randint(0, 3, w.shape, generator=g)]
    w = torch.where(pick.to(device), bad.to(device), w)
    mine = ms_deform_attn(value, ss, starts, loc, w, backend=backend)
    ref = ms_deform_attn(value, ss, starts, loc, w, backend="reference")
    assert not torch.isfinite(ref).all()  # the case is not vacuous
    torch.testing.assert_close(mine, ref, equal_nan=True, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- zero-size level

@pytest.mark.parametrize("backend", COMPILED + ["reference"])
def test_zero_size_level_samples_nothing_on_every_backend(backend):
    """A level with H or W = 0 holds no positions: every location on it is outside the map
    and samples zero (weight * 0), the others are unaffected. Hand-computed: level 1 is the
    2 x 2 map 1, 2, 3, 4 sampled at its centre (2.5)."""
    device = DEVICE_OF.get(backend, "cpu")
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64, device=device)
    value = value.view(1, 4, 1, 1).requires_grad_()
    ss = torch.tensor([[0, 3], [2, 2], [5, 0]], device=device)
    starts = torch.tensor([0, 0, 4], device=device)
    loc = torch.full((1, 2, 1, 3, 1, 2), 0.5, dtype=torch.float64, device=device)
    w = torch.tensor([[3.0, 2.0, 7.0], [float("inf"), 1.0, 1.0]], dtype=torch.float64,
                     device=device).view(1, 2, 1, 3, 1)
    out = ms_deform_attn(value, ss, starts, loc, w, backend=backend).view(-1).cpu()
    # query 0: 3 * 0 + 2 * 2.5 + 7 * 0; query 1: inf * 0 (empty level) = NaN
    torch.testing.assert_close(out, torch.tensor([5.0, float("nan")], dtype=torch.float64),
                               equal_nan=True)
    w = w[:, :1].contiguous().requires_grad_()
    out = ms_deform_attn(value, ss, starts, loc[:, :1].contiguous(), w, backend=backend)
    grad_w, grad_v = torch.autograd.grad(out.sum(), (w, value))
    torch.testing.assert_close(grad_w.view(-1).cpu(),
                               torch.tensor([0.0, 2.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(grad_v.view(-1).cpu(),
                               torch.full((4,), 0.5, dtype=torch.float64))
