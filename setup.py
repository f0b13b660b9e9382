"""Build fastdiff and its C++/CUDA extension `fastdiff._C`.

CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA kernels
(csrc/cuda/*.cu, csrc/cuda/*.cpp) are built when torch is a CUDA build and nvcc
is found; set FASTDIFF_NO_CUDA=1 to skip them, FASTDIFF_NO_EXT=1 to build no
extension at all (fastdiff then runs on its `torch` and `triton` backends).

Use `pip install --no-build-isolation -e .` so the extension is compiled
against the torch that is installed.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


def _extensions():
    if os.environ.get("FASTDIFF_NO_EXT") == "1":
        return [], {}
    cuda_home = _cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME at import time.
        os.environ.setdefault("CUDA_HOME", cuda_home)
    import torch
    from torch.utils import cpp_extension as ce

    if not torch.cuda.is_available():
        # No GPU visible (a CI machine): build for Hopper (the H100/H200 we
        # measure on) rather than every architecture nvcc knows.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    cpu_sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    with_cuda = (
        os.environ.get("FASTDIFF_NO_CUDA") != "1"
        and torch.version.cuda is not None
        and cuda_home is not None
        and bool(cuda_sources)
    )
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden"]
    if torch.backends.openmp.is_available():
        cxx.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    # torch's CUDA headers include cusparse.h / cublas_v2.h, shipped in the
    # nvidia wheels that a CUDA build of torch depends on.
    for sp in sys.path:
        inc = os.path.join(sp, "nvidia", "cu13", "include")
        if os.path.isdir(inc):
            include_dirs.append(inc)
            break
    kwargs = dict(
        name="fastdiff._C",
        include_dirs=include_dirs,
        py_limited_api=False,
    )
    link = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    if with_cuda:
        ext = ce.CUDAExtension(
            sources=cpu_sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx + ["-DFASTDIFF_WITH_CUDA"],
                "nvcc": ["-O3", "-std=c++17", "-DFASTDIFF_WITH_CUDA",
                         "-lineinfo"],
            },
            extra_link_args=link,
            **kwargs,
        )
    else:
        ext = ce.CppExtension(
            sources=cpu_sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            **kwargs,
        )
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=[
        "fastdiff", "fastdiff.ops", "fastdiff.diffusion", "fastdiff.sampling",
        "fastdiff.nn", "fastdiff.data", "fastdiff.eval", "fastdiff.kernels",
    ],
    # Triton kernels live in kernels/ at the repository root (one file per
    # op, no Python API of their own) and are importable as fastdiff.kernels.
    package_dir={"fastdiff.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
