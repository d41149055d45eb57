#!/usr/bin/env bash
# Idempotent setup of the unip-v2 development environment (a venv inside the checkout).
#
#   bash tools/install.sh                  # or: make install
#
# Environment:
#   VENV                            venv directory (default: .venv, relative to the repo root)
#   PYTHON                          interpreter that creates the venv (default: python3)
#   UNIP_V2_SYSTEM_SITE_PACKAGES=1  create the venv with --system-site-packages (machines
#                                   with torch preinstalled and no package registry)
#   UNIP_V2_TORCH_SPEC              what to install when no working torch/torchvision is
#                                   found (default: "torch==2.14.1 torchvision==0.29.2")
#   UNIP_V2_INSTALLER=uv|pip        what installs the packages (default: uv, itself installed
#                                   into the venv by pip; pip still fetches detectron2's sdist)
#
# Every step checks first and is skipped when already satisfied, so a second run installs
# nothing and takes seconds. Each step prints one line: "[install] <step>: done|skipped".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${UNIP_V2_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.2}"
CONSTRAINTS="$ROOT/tools/constraints.txt"
D2_VERSION="0.6"
D2_BUILD="$ROOT/build/detectron2"

case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
# torch's extension builder looks for `ninja` on PATH; the venv's ninja must be found.
export PATH="$VENV/bin:$PATH"
export PIP_DISABLE_PIP_VERSION_CHECK=1

start=$SECONDS
# Each step's line ends with the seconds since the start, so a slow step shows itself.
say() { echo "[install] $* [$((SECONDS - start)) s]"; }
die() { echo "[install] ERROR: $*" >&2; exit 1; }
INSTALLER="${UNIP_V2_INSTALLER:-uv}"
case "$INSTALLER" in uv|pip) ;; *) die "UNIP_V2_INSTALLER must be uv or pip, not '$INSTALLER'" ;; esac
# uv, not pip, by default: it unpacks and links wheels in parallel, so the 5.5 GB torch step
# took 26-46 s on fresh installs here with uv's cache empty, against 80-125 s with pip. uv does not
# read pip's configuration, so the indexes and find-links pip is configured with (pip.conf,
# PIP_* variables) are handed to it, and it picks the best version across all of them as pip
# does (--index-strategy unsafe-best-match; uv's default takes a package from the first index
# that has it).
UV_ARGS=()
uv_args_from_pip_config() {
    local key value v index_url="" env_index_url=""
    # lines such as global.extra-index-url='file:///a file:///b' or :env:.index-url='...'
    while IFS='=' read -r key value; do
        value="${value#\'}"; value="${value%\'}"
        case "$key" in   # the first pattern that matches wins
            *.extra-index-url) for v in $value; do UV_ARGS+=(--extra-index-url "$v"); done ;;
            *.find-links) for v in $value; do UV_ARGS+=(--find-links "$v"); done ;;
            :env:.index-url) env_index_url="$value" ;;   # PIP_INDEX_URL wins, as in pip
            *.index-url) index_url="$value" ;;
        esac
    done < <("$PY" -m pip config list 2>/dev/null)
    index_url="${env_index_url:-$index_url}"
    [ -z "$index_url" ] || UV_ARGS+=(--index-url "$index_url")
    UV_ARGS+=(--index-strategy unsafe-best-match)
}
pip_install() {
    if [ "$INSTALLER" = uv ]; then
        "$VENV/bin/uv" pip install -q --python "$PY" -c "$CONSTRAINTS" "${UV_ARGS[@]}" "$@"
    else
        "$PY" -m pip install -q -c "$CONSTRAINTS" "$@"
    fi
}

# Prints the requirements (arguments) that the venv does not satisfy, one per line.
unsatisfied() {
    "$PY" - "$@" <<'PYEOF'
import sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip always vendors packaging
    from pip._vendor.packaging.requirements import Requirement
for arg in sys.argv[1:]:
    req = Requirement(arg)
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        print(arg)
        continue
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        print(arg)
PYEOF
}

# One Python process checks what imports (torch once, not once per step). Fills PROBE:
#   PROBE[torch]=ok|missing  PROBE[detectron2]=ok|missing  PROBE[deps]="<pip names missing>"
declare -A PROBE=()
probe() {
    PROBE=()
    local key value
    while read -r key value; do PROBE[$key]="$value"; done < <("$PY" - 2>/dev/null <<'PYEOF'
import importlib
import warnings

warnings.simplefilter("ignore")


def works(fn):
    try:
        fn()
        return True
    except Exception:
        return False


def torch_ok():
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5)
    assert keep.tolist() == [0], keep


print("torch", "ok" if works(torch_ok) else "missing")
print("detectron2", "ok" if works(lambda: importlib.import_module("detectron2")) else "missing")
deps = {  # pip name -> module to import
    "timm": "timm",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "fvcore": "fvcore",
    "pycocotools": "pycocotools.mask",
    "pycocoevalcap": "pycocoevalcap.cider.cider",
    "opencv-python-headless": "cv2",
    "scipy": "scipy",
    "pytest": "pytest",
}
missing = [name for name, mod in deps.items() if not works(lambda: importlib.import_module(mod))]
print("deps", " ".join(missing))
print("complete", "yes")
PYEOF
)
    [ "${PROBE[complete]:-}" = yes ] \
        || die "the import probe crashed; run $PY -c 'import torch, torchvision, detectron2, timm' to see why"
}
STALE=1   # PROBE must be (re)filled before use: set again after every install

# 1. the venv ------------------------------------------------------------------------------
if [ -x "$PY" ] && "$PY" -c "import sys; assert sys.prefix != sys.base_prefix" 2>/dev/null; then
    say "1/7 venv $VENV: skipped (exists)"
else
    venv_args=()
    if [ "${UNIP_V2_SYSTEM_SITE_PACKAGES:-0}" = "1" ]; then
        venv_args+=(--system-site-packages)
    fi
    "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
    say "1/7 venv $VENV: done (${venv_args[*]:-isolated})"
fi

# 2. build tools ---------------------------------------------------------------------------
build_tools=("pip>=23.2,<25.1" "setuptools>=64" wheel ninja)
[ "$INSTALLER" = uv ] && build_tools+=("uv>=0.5")
mapfile -t missing < <(unsatisfied "${build_tools[@]}")
if [ "${#missing[@]}" -eq 0 ]; then
    say "2/7 ${build_tools[*]}: skipped (present)"
else
    # pip here: it installs uv
    "$PY" -m pip install -q -c "$CONSTRAINTS" "${missing[@]}"
    say "2/7 ${build_tools[*]}: done (${missing[*]})"
fi
[ "$INSTALLER" = uv ] && uv_args_from_pip_config

# 3. torch + torchvision -------------------------------------------------------------------
[ "$STALE" = 1 ] && { probe; STALE=0; }
if [ "${PROBE[torch]}" = ok ]; then
    say "3/7 torch/torchvision: skipped (present, torchvision.ops.nms runs)"
else
    # shellcheck disable=SC2086  # TORCH_SPEC is a list of requirements
    pip_install $TORCH_SPEC
    probe; STALE=0
    [ "${PROBE[torch]}" = ok ] || die "installed $TORCH_SPEC, but torch/torchvision (torchvision.ops.nms) does not work"
    say "3/7 torch/torchvision: done ($TORCH_SPEC)"
fi

# 4. Pillow<10 (detectron2 0.6 uses Image.LINEAR at import time) --------------------------
mapfile -t missing < <(unsatisfied "Pillow>=9.5,<10")
if [ "${#missing[@]}" -eq 0 ]; then
    say "4/7 Pillow>=9.5,<10: skipped ($("$PY" -c 'import PIL; print(PIL.__version__)'))"
else
    pip_install "Pillow>=9.5,<10"
    STALE=1
    say "4/7 Pillow>=9.5,<10: done"
fi

# 5. detectron2 ----------------------------------------------------------------------------
# No detectron2 wheel exists for this Python/torch. The registry's pb1-detectron2 sdist holds
# detectron2 v0.6's Python files but not detectron2/layers/csrc, so it is installed without
# its compiled ops (unip_v2.utils.detectron2_compat covers the import of detectron2._C).
[ "$STALE" = 1 ] && { probe; STALE=0; }
if [ "${PROBE[detectron2]}" = ok ]; then
    say "5/7 detectron2: skipped (already importable)"
else
    mkdir -p "$D2_BUILD"
    sdist="$(ls "$D2_BUILD"/pb1[-_]detectron2-"$D2_VERSION".tar.gz 2>/dev/null | head -n1 || true)"
    if [ -z "$sdist" ]; then
        # setup.py imports torch: no build isolation, even to read the metadata.
        "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary :all: \
            "pb1-detectron2==$D2_VERSION" -d "$D2_BUILD"
        sdist="$(ls "$D2_BUILD"/pb1[-_]detectron2-"$D2_VERSION".tar.gz | head -n1)"
    fi
    rm -rf "$D2_BUILD/src"
    mkdir -p "$D2_BUILD/src"
    tar -xzf "$sdist" -C "$D2_BUILD/src" --strip-components=1
    setup_py="$D2_BUILD/src/setup.py"
    grep -q "ext_modules=get_extensions()," "$setup_py" \
        || die "cannot patch $setup_py: 'ext_modules=get_extensions(),' not found (sdist changed?)"
    sed -i 's/ext_modules=get_extensions(),/ext_modules=[],/' "$setup_py"
    grep -q "ext_modules=\[\]," "$setup_py" && ! grep -q "ext_modules=get_extensions()" "$setup_py" \
        || die "patching $setup_py failed"
    pip_install --no-build-isolation "$D2_BUILD/src"
    "$PY" -c "import detectron2" || die "detectron2 installed but does not import"
    STALE=1
    say "5/7 detectron2: done (pb1-detectron2==$D2_VERSION, Python only)"
fi

# 6. other dependencies (pip name -> import name) ------------------------------------------
[ "$STALE" = 1 ] && { probe; STALE=0; }
read -r -a missing <<< "${PROBE[deps]:-}"
if [ "${#missing[@]}" -eq 0 ]; then
    say "6/7 timm transformers tokenizers fvcore pycocotools pycocoevalcap opencv scipy pytest: skipped (all import)"
else
    pip_install "${missing[@]}"
    probe; STALE=0
    [ -z "${PROBE[deps]:-}" ] || die "installed, but these still do not import: ${PROBE[deps]}"
    say "6/7 other dependencies: done (${missing[*]})"
fi

# 7. unip-v2 itself (editable; compiles csrc into unip_v2._C) ------------------------------
# Object files live in a build directory of this venv's own, so that ninja recompiles only
# what changed and two venvs on one checkout do not invalidate each other's objects.
EXT_BUILD="build/ext-$(printf '%s' "$VENV" | cksum | cut -d' ' -f1)"
build_inplace() {  # prints "compiled" or "up-to-date"
    local log
    # torch's BuildExtension always relinks and copies the .so; ninja (one run for the
    # extension, one per instruction-set build of the CPU kernels) prints "[i/n] ..." for every
    # source it recompiles.
    log="$("$PY" setup.py -q build_ext --inplace --build-temp "$EXT_BUILD/temp" \
        --build-lib "$EXT_BUILD/lib" 2>&1)" || { echo "$log" >&2; die "building unip_v2._C failed"; }
    if grep -qE '^\[[0-9]+/[0-9]+\] ' <<< "$log"; then echo compiled; else echo up-to-date; fi
}
# Checked from outside the checkout so that the current directory does not count.
if (cd / && "$PY" -c "
import importlib.util, os, sys
spec = importlib.util.find_spec('unip_v2')
want = os.path.realpath(os.path.join(sys.argv[1], 'projects', 'unip_v2', '__init__.py'))
assert spec is not None and spec.origin and os.path.realpath(spec.origin) == want
" "$ROOT") >/dev/null 2>&1; then
    # build_inplace runs in a subshell here: its die ends only that subshell, so its status
    # is checked (an unchecked failure used to report "done" over the old extension)
    built="$(build_inplace)" || die "building unip_v2._C failed (the compiler's messages are above)"
    if [ "$built" = up-to-date ]; then
        say "7/7 unip-v2: skipped (installed, unip_v2._C up to date)"
    else
        say "7/7 unip-v2: done (csrc changed: unip_v2._C recompiled in place)"
    fi
else
    # --use-pep517: without a pyproject.toml, pip<25.1 would otherwise run the legacy
    # `setup.py develop`, which recent setuptools turns into a pip call *with* build
    # isolation, where torch (imported by setup.py) is missing.
    # Compiled once, here, into $EXT_BUILD, where the next run finds up-to-date objects;
    # UNIP_V2_SKIP_EXTENSION keeps pip from compiling it again in a throw-away directory.
    build_inplace >/dev/null
    pep517=()
    [ "$INSTALLER" = pip ] && pep517=(--use-pep517)   # uv always builds through PEP 517
    UNIP_V2_SKIP_EXTENSION=1 pip_install --no-build-isolation --no-deps "${pep517[@]}" -e .
    say "7/7 unip-v2: done ($INSTALLER pip install -e ., unip_v2._C compiled)"
fi

(cd / && "$PY" -c "import unip_v2; from unip_v2 import _C") \
    || die "unip_v2 or its compiled ops (unip_v2._C) do not import"
echo "[install] ready in $((SECONDS - start)) s: $PY"
