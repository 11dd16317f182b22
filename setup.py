"""Builds calgan_fast and its extension ``calgan_fast._C`` from ``csrc/``.

The C++ (CPU) part is always built; the CUDA part when a CUDA toolkit and a CUDA build of torch
are both present. Environment variables (also in the README):

| variable | effect |
|---|---|
| ``CALGAN_FAST_SKIP_CUDA_BUILD=1`` | build the CPU part only, even where CUDA is available |
| ``FORCE_CUDA=1`` | build the CUDA part or fail (no toolkit / CPU-only torch is an error) |
| ``CUDA_HOME`` | the toolkit to use (default: ``/usr/local/cuda`` or the one ``nvcc`` belongs to) |
| ``TORCH_CUDA_ARCH_LIST`` | GPU architectures to compile for (default ``8.0;9.0+PTX``) |
| ``MAX_JOBS`` | parallel compile jobs (ninja) |
| ``CALGAN_FAST_SKIP_EXT=1`` | build no extension at all (pure Python; ``cpu``/``cuda`` backends absent) |
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Compiler flags of the C++ sources, the same in CMakeLists.txt. -fno-trapping-math lets the compiler
# if-convert (and so vectorise) the compares of the row loops; nothing reads floating-point flags.
CXX_FLAGS = ("-O3", "-fopenmp", "-fno-trapping-math")
# nvcc flags of the CUDA sources, the same in CMakeLists.txt. `--threads 0` compiles the
# architectures of TORCH_CUDA_ARCH_LIST in parallel (one nvcc thread per target).
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-lineinfo", "--threads", "0")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip() not in ("", "0", "false", "False")


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return home if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) else None


def _refuse_isolated_torch(torch) -> None:
    """Stops a build against a torch that pip (or ``python -m build``) put into a temporary, isolated
    build environment: the extension would then not load with the torch that is installed."""
    where = os.path.realpath(torch.__file__)
    if any(mark in where for mark in ("pip-build-env-", "build-env-", "pip-req-build-")):
        sys.exit(
            f"calgan_fast: this is an isolated build, against torch {torch.__version__} from a temporary "
            f"build environment ({os.path.dirname(where)}), not the torch installed where calgan_fast "
            "will run; the extension would fail to load there.\n"
            "  Use: pip install --no-build-isolation .   (or pip wheel --no-build-isolation ...)"
        )


def _extensions():
    if _flag("CALGAN_FAST_SKIP_EXT"):
        return [], {}
    try:
        import torch
    except ImportError:
        sys.exit(
            "calgan_fast: building the extension needs the torch it will run with, and this build "
            "environment has none (pip's build isolation hides the installed torch).\n"
            "  Install torch first, then: pip install --no-build-isolation .\n"
            "  (or run `bash install.sh`, which does both; CALGAN_FAST_SKIP_EXT=1 installs pure Python)"
        )
    _refuse_isolated_torch(torch)
    cuda_home = _find_cuda_home()
    if cuda_home is not None:
        # Must be set before torch.utils.cpp_extension is imported: it reads it once.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    skip_cuda = _flag("CALGAN_FAST_SKIP_CUDA_BUILD")
    force_cuda = _flag("FORCE_CUDA")
    if skip_cuda and force_cuda:
        sys.exit("calgan_fast: FORCE_CUDA=1 and CALGAN_FAST_SKIP_CUDA_BUILD=1 contradict each other")
    with_cuda = False
    if not skip_cuda:
        reasons = []
        if cuda_home is None:
            reasons.append("no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)")
        if torch.version.cuda is None:
            reasons.append(f"torch {torch.__version__} is a CPU-only build")
        if not reasons:
            with_cuda = True
        elif force_cuda:
            sys.exit("calgan_fast: FORCE_CUDA=1 but the CUDA part cannot be built: " + "; ".join(reasons))
        else:
            print("calgan_fast: building the CPU part only: " + "; ".join(reasons), file=sys.stderr)
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"  # PTX: newer GPUs JIT-compile it

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = list(CXX_FLAGS)  # the C++ standard is the one torch asks for
    define_macros = []
    extra_link = ["-fopenmp"]
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        define_macros.append(("CALGAN_CUDA_ARCH_LIST", '"' + os.environ["TORCH_CUDA_ARCH_LIST"] + '"'))
        nvcc = list(NVCC_FLAGS)
        ext = CUDAExtension(
            "calgan_fast._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=extra_link,
        )
    else:
        ext = CppExtension(
            "calgan_fast._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros, extra_compile_args={"cxx": cxx}, extra_link_args=extra_link,
        )
    use_ninja = shutil.which("ninja") is not None or _has_ninja_module()
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)}


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401

        return True
    except ImportError:
        return False


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["calgan_fast", "calgan_fast.*"]) + ["calgan_fast.kernels"],
    package_dir={"calgan_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
