#!/usr/bin/env python
"""Install unip-v2 and compile its ops (`unip_v2._C`).

The CPU kernels are always built. The CUDA kernels are added when a GPU is visible and
nvcc is found, or when FORCE_CUDA=1 (then TORCH_CUDA_ARCH_LIST picks the architectures, as
in detectron2). Build with the environment's torch: `pip install --no-build-isolation --use-pep517 -e .`.
"""
import glob
import os
import platform
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

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
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
    from torch.utils.cpp_extension import BuildExtension as TorchBuildExtension
except ImportError:  # pragma: no cover - install-time message
    sys.exit("unip-v2 compiles against the installed torch: install torch first, then run "
             "`pip install --no-build-isolation --use-pep517 -e .` (or simply `make install`).")

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if force and CUDA_HOME is None:
        sys.exit("FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found: set CUDA_HOME.")
    return force or (torch.cuda.is_available() and CUDA_HOME is not None)


# The CPU kernels (csrc/cpu/kernels/) are one source compiled once per instruction set, each
# translation unit with its own flags, as PyTorch builds its own CPU kernels; the dispatcher
# (csrc/cpu/ms_deform_attn_cpu.cpp) picks the widest one the CPU runs. The baseline build is an
# ordinary source; the others are compiled by BuildExtension below. x86-64 with GCC or Clang
# only: other machines (Arm, MSVC) get the baseline build, which is correct everywhere.
CPU_KERNEL_ISAS = {  # name -> compiler flags; the link order (baseline first) matters, see below
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}


def cpu_kernel_isas():
    if os.environ.get("UNIP_V2_CPU_BASELINE_ONLY", "0") == "1":  # e.g. to test that build
        return {}
    if sys.platform == "win32" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    return CPU_KERNEL_ISAS


class BuildExtension(TorchBuildExtension):
    """torch's BuildExtension, plus one object per instruction set for the CPU kernels.

    Each csrc/cpu/kernels/ms_deform_attn_cpu_<isa>.cpp is compiled on its own (its own ninja
    file, so rebuilds stay incremental) with the extension's flags plus the ISA's, then linked
    after the extension's own objects. Order matters: where inline code (a std:: template, say)
    is compiled in several objects, the linker keeps the first copy, which is then the baseline
    one, safe on every CPU. The kernel sources themselves keep everything but their entry points
    internal, and at::vec sits in a per-ISA namespace.
    """

    def build_extension(self, ext):
        isa_sources = getattr(ext, "unip_v2_isa_sources", [])

        def compile_isa(isa_source):
            isa, source = isa_source
            args = ext.extra_compile_args
            cxx = list(args["cxx"] if isinstance(args, dict) else args) + CPU_KERNEL_ISAS[isa]
            return self.compiler.compile(
                [source],
                output_dir=os.path.join(self.build_temp, "isa-" + isa),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs={"cxx": cxx},
                depends=ext.depends,
            )

        # side by side: each is one ninja run of one file, in its own build directory
        with ThreadPoolExecutor(max(1, len(isa_sources))) as pool:
            objects = [o for objs in pool.map(compile_isa, isa_sources) for o in objs]
        previous = getattr(ext, "unip_v2_isa_objects", [])
        ext.extra_objects = [o for o in ext.extra_objects if o not in previous] + objects
        ext.unip_v2_isa_objects = objects
        super().build_extension(ext)


# torch's builder hands MAX_JOBS to ninja; unset, ninja runs 3 jobs on 2 cores and, with no
# timings from an earlier build, started the longest file (the bindings) last. With every
# file at once the 2-core build's critical path is that file alone.
os.environ.setdefault("MAX_JOBS", str((os.cpu_count() or 1) + 2))


def get_extensions():
    csrc = os.path.join(HERE, "csrc")
    sources = [os.path.join(csrc, "ms_deform_attn.cpp")]
    sources += sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    kernels = os.path.join(csrc, "cpu", "kernels")
    sources.append(os.path.join(kernels, "ms_deform_attn_cpu_default.cpp"))
    isa_sources = [(isa, os.path.join(kernels, f"ms_deform_attn_cpu_{isa}.cpp"))
                   for isa in cpu_kernel_isas()]
    depends = sorted(glob.glob(os.path.join(csrc, "**", "*.h"), recursive=True))
    depends += [source for _, source in isa_sources]  # a change there relinks the extension
    # -fopenmp: ATen's parallel_for is an inline OpenMP region, so the extension itself must
    # be compiled with OpenMP for the CPU kernels to use more than one thread.
    # -ffp-contract=off: no fused multiply-add unless the code asks for one (at::vec::fmadd), so
    # every instruction set computes the sampling geometry with the same roundings.
    # -Wno-unknown-pragmas: ATen's vector headers carry `#pragma unroll` and clang pragmas.
    # -fno-math-errno: sqrt may compile to the vector instruction (MT-AdamW's update loop);
    # errno is never read, and no value changes.
    # -g0: no debug information (Python's own flags ask for it): it doubled the time of the
    # bindings' translation unit, the longest of the build.
    extra_compile_args = {"cxx": ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
                                  "-Wno-psabi", "-Wno-unknown-pragmas"]}
    extra_link_args = ["-fopenmp"]
    define_macros = [(f"UNIP_V2_CPU_KERNELS_{isa.upper()}", None) for isa, _ in isa_sources]
    extension = CppExtension
    if want_cuda():
        extension = CUDAExtension
        sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        depends += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cuh")))
        define_macros.append(("UNIP_V2_WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    ext = extension(
        "unip_v2._C",
        sources,
        depends=depends,
        include_dirs=[csrc],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
    ext.unip_v2_isa_sources = isa_sources
    return [ext]


setup(
    name="unip-v2",
    version="0.1.0",
    description="Uni-Perceiver v2 as a Detectron2 extension project",
    license="Apache-2.0",
    python_requires=">=3.9",
    package_dir={"": "projects"},
    packages=find_packages("projects"),
    # tools/install.sh compiles unip_v2._C in place first, into a build directory of its own
    # that later runs rebuild incrementally, then registers the editable package with
    # UNIP_V2_SKIP_EXTENSION=1: pip would otherwise compile the same sources once more, in a
    # throw-away directory (about two minutes on 2 cores).
    ext_modules=[] if os.environ.get("UNIP_V2_SKIP_EXTENSION", "0") == "1" else get_extensions(),
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
