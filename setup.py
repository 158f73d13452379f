"""Build of ensattr_fast's compiled ops.

CPU kernels are always built. CUDA kernels are built too when torch has CUDA and nvcc is found
(CUDA_HOME), or when FORCE_CUDA=1; FORCE_ONLY_CPU=1 turns them off. TORCH_CUDA_ARCH_LIST and
MAX_JOBS are respected. The extension compiles against the torch that is installed, so install
torch first and build without isolation: ``pip install --no-build-isolation .``.
"""

import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pragma: no cover - build-time message
    raise SystemExit(
        "ensattr_fast compiles against the installed torch, but torch is not importable here "
        f"({error}). Install torch first, then build without isolation:\n"
        "    pip install torch && pip install --no-build-isolation ."
    ) from None


def _flag(name: str) -> bool:
    return os.getenv(name, "0") == "1"


def _with_cuda() -> bool:
    if _flag("FORCE_ONLY_CPU"):
        return False
    return _flag("FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)


def _uses_openmp() -> bool:
    return "OpenMP" in torch.__config__.parallel_info()


def _extension():
    with_cuda = _with_cuda()
    sources = ["csrc/ensattr_fast.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3"]
    link = []
    if _uses_openmp():
        # at::parallel_for's OpenMP backend is a header template: it is only parallel when the
        # extension itself is compiled with -fopenmp.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    else:
        cxx.append("-fopenmp-simd")
    if not with_cuda:
        return CppExtension(
            "ensattr_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    arch_list = os.getenv("TORCH_CUDA_ARCH_LIST", "native")
    macros = [("WITH_CUDA", None), ("ENSATTR_FAST_CUDA_ARCH_LIST", f'"{arch_list}"')]
    return CUDAExtension(
        "ensattr_fast._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=link,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
