"""Builds fastprune (its Triton kernels live in the package, fastprune/kernels/) and the fastprune._C extension.

The C++ CPU kernels always build. The CUDA kernels build when nvcc and a CUDA build of torch are
present, so a CUDA compile or link error fails the build (and CI). FASTPRUNE_BUILD_EXT=0 skips the
extension entirely; fastprune then falls back to its Triton and reference backends.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["fastprune", "fastprune.*"])


def _cuda_home():
    """Where the CUDA toolkit lives. torch guesses from `which nvcc`; where nvcc is a wrapper script
    in /usr/local/bin (as on our build machines) that guess is wrong, so prefer the real folder."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def _extensions():
    if os.environ.get("FASTPRUNE_BUILD_EXT", "1") == "0":
        return [], {}
    cuda_home = _cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must precede the cpp_extension import
    import torch
    from torch.utils import cpp_extension

    # Without a GPU torch cannot detect the architecture: build Ampere and Hopper, plus PTX for newer.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/sparse/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("FASTPRUNE_BUILD_CUDA", "1") != "0"
    )
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++20 since 2.1x)
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "fastprune._C",
            cpu_sources + cuda_sources,
            define_macros=[("FASTPRUNE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastprune._C", cpu_sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"]
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(packages=PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)
