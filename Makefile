# unip-v2 developer commands.
#   make install      set up $(VENV) (idempotent; seconds when nothing changed)
#   make test         install, then run the test suite on CPU
#   make demo         install, then the main job: pre-train the toy Uni-Perceiver v2's image
#                     encoder on detection, train it on all six tasks, evaluate each, draw
#                     them, on CPU (31-37 minutes measured on 2 cores from a fresh clone, set-up
#                     included, on slow days; output/main_job)
#   make check-cuda   compile the CUDA kernels (no GPU needed; skipped without nvcc)
#   make clean        remove build outputs (keeps the venv)
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -q -ra -p no:cacheprovider
CUDA_ARCHS ?= $(or $(TORCH_CUDA_ARCH_LIST),8.0;9.0)

# torch's extension builder needs the venv's `ninja` on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export VENV

.PHONY: install test demo check-cuda clean

install:
	bash tools/install.sh

# pytest exits 5 when it collects no tests: that fails here like any other error.
test: install
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: FAILED, pytest collected no tests" >&2; fi; \
	exit $$rc

# DEMO_ARGS: options of tools/main_job.py, e.g. DEMO_ARGS="--fresh" or "SOLVER.MAX_ITER 50"
demo: install
	$(PY) tools/main_job.py $(DEMO_ARGS)

# Compile-only build of the CUDA sources into build/cuda-check (needs nvcc, not a GPU):
#   FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(PY) setup.py build_ext \
#       --build-lib build/cuda-check/lib --build-temp build/cuda-check/tmp
# then, from build/cuda-check/lib: import torch; from unip_v2 import _C; assert _C.with_cuda().
# Skipped (exit 0) when no nvcc is found, unless REQUIRE_CUDA_CHECK=1. See tools/check_cuda.sh.
check-cuda: install
	TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" bash tools/check_cuda.sh

clean:
	rm -rf build/ext-* build/lib.* build/temp.* build/cuda-check projects/unip_v2/_C*.so
	find projects tests -name __pycache__ -type d -prune -exec rm -rf {} +
