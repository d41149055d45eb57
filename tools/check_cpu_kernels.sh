#!/usr/bin/env bash
# Build and run tests/csrc/ms_deform_attn_cpu_check.cpp: every build of the CPU kernels of
# MultiScaleDeformableAttention against a float64 oracle, fp32 and fp64, forward and backward,
# without libtorch at run time (only its headers at build time).
#
#   bash tools/check_cpu_kernels.sh            # native: the baseline build, and on x86-64 the
#                                              # AVX2 / AVX-512 builds this CPU runs
#   bash tools/check_cpu_kernels.sh aarch64    # an Arm build (the baseline kernels on NEON),
#                                              # cross-compiled and run under qemu-aarch64
#
# aarch64 needs a cross compiler and qemu's user-mode emulator, e.g. on Debian/Ubuntu:
#   apt-get install g++-aarch64-linux-gnu qemu-user
# The instruction-set flags are read from setup.py (CPU_KERNEL_ISAS), the extension's own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
TARGET=${1:-native}
OUT="build/cpu-kernel-check/$TARGET"
mkdir -p "$OUT"

read -r -a INC < <("$PY" -c "
from torch.utils.cpp_extension import include_paths
print(' '.join('-I' + p for p in include_paths()))")
FLAGS=(-O2 -std=c++17 -ffp-contract=off -Wno-psabi -Wno-unknown-pragmas -Icsrc "${INC[@]}")
KERNELS=csrc/cpu/kernels

case "$TARGET" in
native)
    CXX=${CXX:-g++}
    RUN=()
    ISAS=()
    if [ "$(uname -m)" = x86_64 ]; then
        mapfile -t ISAS < <("$PY" - <<'PYEOF'
import ast
tree = ast.parse(open("setup.py").read())
for node in tree.body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CPU_KERNEL_ISAS":
        for isa, flags in ast.literal_eval(node.value).items():
            print(isa, " ".join(flags))
PYEOF
)
    fi
    ;;
aarch64)
    CXX=${CXX:-aarch64-linux-gnu-g++}
    command -v "$CXX" >/dev/null || { echo "no $CXX: apt-get install g++-aarch64-linux-gnu" >&2; exit 2; }
    command -v qemu-aarch64 >/dev/null || { echo "no qemu-aarch64: apt-get install qemu-user" >&2; exit 2; }
    RUN=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
    ISAS=()
    ;;
*)
    echo "usage: $0 [native|aarch64]" >&2
    exit 2
    ;;
esac

objects=("$OUT/default.o")
defines=()
echo "[check-cpu-kernels] $CXX: baseline kernels"
"$CXX" "${FLAGS[@]}" -c "$KERNELS/ms_deform_attn_cpu_default.cpp" -o "$OUT/default.o"
for line in "${ISAS[@]}"; do
    read -r isa flags <<< "$line"
    echo "[check-cpu-kernels] $CXX: $isa kernels ($flags)"
    # shellcheck disable=SC2086  # flags is a list
    "$CXX" "${FLAGS[@]}" $flags -c "$KERNELS/ms_deform_attn_cpu_$isa.cpp" -o "$OUT/$isa.o"
    objects+=("$OUT/$isa.o")
    defines+=("-DUNIP_V2_CPU_KERNELS_${isa^^}")
done
"$CXX" "${FLAGS[@]}" "${defines[@]}" tests/csrc/ms_deform_attn_cpu_check.cpp "${objects[@]}" \
    -o "$OUT/check"
"${RUN[@]}" "$OUT/check"
