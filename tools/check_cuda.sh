#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (`make check-cuda`): builds unip_v2._C with CUDA
# into build/cuda-check (the in-place CPU build is left alone), then imports the result
# and asserts it holds the CUDA kernels. Needs nvcc, not a GPU.
#
# Without nvcc it prints why and exits 0, unless REQUIRE_CUDA_CHECK=1.
# Environment: VENV (default .venv), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), CUDA_HOME.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"   # ninja
OUT="$ROOT/build/cuda-check"

# torch guesses CUDA_HOME as `which nvcc`/../.. which is wrong when nvcc on PATH is a
# wrapper script (/usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc): ask nvcc itself.
find_cuda_home() {
    local home="${CUDA_HOME:-${CUDA_PATH:-}}" nvcc top
    if [ -n "$home" ]; then echo "$home"; return; fi
    if nvcc="$(command -v nvcc)"; then
        top="$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)"
        if [ -n "$top" ] && [ -x "$top/bin/nvcc" ]; then (cd "$top" && pwd -P); return; fi
        dirname "$(dirname "$(readlink -f "$nvcc")")"
        return
    fi
    if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda; fi
}

CUDA_HOME="$(find_cuda_home || true)"
if [ -z "$CUDA_HOME" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    if [ "${REQUIRE_CUDA_CHECK:-0}" = "1" ]; then
        echo "check-cuda: FAILED: no nvcc found (CUDA_HOME='$CUDA_HOME') and REQUIRE_CUDA_CHECK=1" >&2
        exit 1
    fi
    echo "check-cuda: SKIPPED: no nvcc found (put it on PATH or set CUDA_HOME; REQUIRE_CUDA_CHECK=1 makes this an error)"
    exit 0
fi
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"

echo "check-cuda: compiling with $CUDA_HOME/bin/nvcc for TORCH_CUDA_ARCH_LIST='$TORCH_CUDA_ARCH_LIST'"
FORCE_CUDA=1 "$PY" setup.py build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp"

# build_ext writes only the .so; an empty __init__.py makes build/cuda-check/lib/unip_v2 a
# regular package, which (first on sys.path) shadows the installed CPU build.
touch "$OUT/lib/unip_v2/__init__.py"
cd "$OUT/lib"
"$PY" -c "
import torch
from unip_v2 import _C
assert _C.__file__.startswith('$OUT/'), 'imported the wrong build: ' + _C.__file__
assert _C.with_cuda(), 'unip_v2._C was built without CUDA'
print('check-cuda: OK:', _C.__file__, 'holds the CUDA kernels')
"
