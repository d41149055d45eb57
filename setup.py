#!/usr/bin/env python
"""Install unip-v2 and compile its ops (`unip_v2._C`).

The CPU kernels are always built. The CUDA kernels are added when a GPU is visible and
nvcc is found, or when FORCE_CUDA=1 (then TORCH_CUDA_ARCH_LIST picks the architectures, as
in detectron2). Build with the environment's torch: `pip install --no-build-isolation --use-pep517 -e .`.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _resolve_cuda_home() -> None:
    """Point CUDA_HOME at a real toolkit before torch guesses it.

    torch takes the parent of the `nvcc` found on PATH, which is wrong when that nvcc is a
    wrapper script (e.g. /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc): the
    headers and libcudart are not under /usr/local. Keep an explicit CUDA_HOME/CUDA_PATH.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


_resolve_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - install-time message
    sys.exit("unip-v2 compiles against the installed torch: install torch first, then run "
             "`pip install --no-build-isolation --use-pep517 -e .` (or simply `make install`).")

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if force and CUDA_HOME is None:
        sys.exit("FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found: set CUDA_HOME.")
    return force or (torch.cuda.is_available() and CUDA_HOME is not None)


def get_extensions():
    csrc = os.path.join(HERE, "csrc")
    sources = [os.path.join(csrc, "ms_deform_attn.cpp")]
    sources += sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    depends = sorted(glob.glob(os.path.join(csrc, "**", "*.h"), recursive=True))
    # -fopenmp: ATen's parallel_for is an inline OpenMP region, so the extension itself must
    # be compiled with OpenMP for the CPU kernels to use more than one thread.
    extra_compile_args = {"cxx": ["-O3", "-fopenmp", "-Wno-psabi"]}
    extra_link_args = ["-fopenmp"]
    define_macros = []
    extension = CppExtension
    if want_cuda():
        extension = CUDAExtension
        sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        depends += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cuh")))
        define_macros.append(("UNIP_V2_WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    return [
        extension(
            "unip_v2._C",
            sources,
            depends=depends,
            include_dirs=[csrc],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


setup(
    name="unip-v2",
    version="0.1.0",
    description="Uni-Perceiver v2 as a Detectron2 extension project",
    license="Apache-2.0",
    python_requires=">=3.9",
    package_dir={"": "projects"},
    packages=find_packages("projects"),
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
