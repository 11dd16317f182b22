"""Backends of the routed head: what each is, whether it can run here, and ``auto`` dispatch.

A backend is a pair of functions ``forward(x, expert, gate, proj, w1, b1, w2, b2)`` and
``backward(glogits, gmean, gvar, x, expert, gate, proj, w1, b1, w2, b2, count, mean, perm,
offsets, aux)`` in a module imported on first use (so Triton and the extension load lazily);
``aux`` holds the per-expert statistics a forward hands to its backward (``Backend.aux_shape``:
per-expert cross-covariances of ``y`` and the gated rows for ``cpu``, empty for the backends that keep nothing else);
:mod:`calgan_fast.ops.routed_head` wraps every pair in the same ``torch.library`` custom ops.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import _env

REINSTALL = (
    "reinstall from the source tree with `bash install.sh` (or "
    "`pip install --no-build-isolation .` inside an environment that has torch)"
)


def extension():
    """The compiled ``calgan_fast._C`` module, or ``None`` when it was not built or fails to load."""
    try:
        from .. import _C  # noqa: PLC0415

        return _C
    except (ImportError, OSError):
        return None


def _cpu_available() -> tuple[bool, str]:
    ext = extension()
    if ext is None:
        return False, f"calgan_fast._C is not built; {REINSTALL}"
    if not hasattr(torch.ops.calgan_fast_C, "routed_head_fwd_cpu"):
        return False, f"calgan_fast._C was built without the CPU kernel; {REINSTALL}"
    return True, ""


def _cuda_available() -> tuple[bool, str]:
    ext = extension()
    if ext is None:
        return False, f"calgan_fast._C is not built; {REINSTALL} with nvcc and a CUDA build of torch"
    if not getattr(ext, "WITH_CUDA", False):
        return False, (
            "calgan_fast._C was built without CUDA; with nvcc (CUDA_HOME) and a CUDA build of "
            f"torch, {REINSTALL} (FORCE_CUDA=1 to build without a visible GPU)"
        )
    if not hasattr(torch.ops.calgan_fast_C, "routed_head_fwd_cuda"):
        return False, f"calgan_fast._C was built without the CUDA kernels; {REINSTALL}"
    return True, ""


def _triton_available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed: `pip install triton` (it ships with CUDA torch on Linux)"
    return True, ""


def _always() -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class Backend:
    name: str
    module: str | None  # module holding forward/backward; None for the reference
    devices: tuple[str, ...]  # device types its tensors may live on
    probe: Callable[[], tuple[bool, str]]
    description: str
    xcov_aux: bool = False  # its forward hands (N, c, c) cross-covariances to its backward

    def aux_shape(self, c: int, n: int) -> tuple[int, ...]:
        """Shape of the ``aux`` output of the forward for ``c`` channels and ``n`` experts."""
        return (n, c, c) if self.xcov_aux else (0,)

    def available(self) -> tuple[bool, str]:
        """``(True, "")`` when it can run here, else ``(False, how to get it)``."""
        return self.probe()

    def runs_on(self, device: torch.device) -> bool:
        if device.type in self.devices:
            return True
        # Under the interpreter, Triton kernels take CPU tensors.
        return self.name == "triton" and device.type == "cpu" and _env.triton_interpret()

    def impl(self):
        assert self.module is not None
        return importlib.import_module(self.module)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", None, ("cpu", "cuda", "meta"), _always,
                "dense and masked plain PyTorch: every expert on every pixel (oracle, slow)"),
        Backend("torch", "calgan_fast.ops.torch_impl", ("cpu", "cuda", "meta"), _always,
                "rows sorted by expert, one GEMM chain per expert, plain PyTorch"),
        Backend("triton", "calgan_fast.ops.triton_impl", ("cuda",), _triton_available,
                "fused Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1)"),
        Backend("cuda", "calgan_fast.ops.cpp_impl", ("cuda",), _cuda_available,
                "fused CUDA kernels of calgan_fast._C"),
        Backend("cpu", "calgan_fast.ops.cpp_impl", ("cpu",), _cpu_available,
                "fused C++ kernel of calgan_fast._C (OpenMP, vectorised)", xcov_aux=True),
    )
}


def available_backends(device: torch.device | str) -> list[str]:
    """Names of the backends that can run on tensors of ``device`` on this machine."""
    device = torch.device(device)
    return [n for n, b in BACKENDS.items() if b.runs_on(device) and b.available()[0]]


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    """The backend that ``backend`` names for tensors on ``device``.

    ``"auto"`` (or the value of ``CALGAN_FAST_BACKEND`` when set) picks, for CUDA tensors,
    ``triton`` then ``cuda`` then ``torch``; for CPU tensors ``cpu`` then ``torch``. An explicit
    name that cannot run here raises a ``RuntimeError`` saying how to get it.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    name = backend.lower()
    source = f"backend: unknown backend {backend!r}"
    if name == "auto" and _env.backend_override():
        name = _env.backend_override()
        source = f"{_env.BACKEND_ENV}={name!r} (environment): unknown backend"
    if name == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
        for cand in order:
            b = BACKENDS[cand]
            if cand == "cuda" and dtype == torch.float64:
                continue  # the CUDA kernels take fp16/bf16/fp32 only
            if b.runs_on(device) and b.available()[0]:
                return b
        return BACKENDS["torch"]
    if name not in BACKENDS:
        raise ValueError(f"{source}; choose one of {', '.join(['auto', *BACKENDS])}")
    b = BACKENDS[name]
    ok, how = b.available()
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available: {how}")
    if not b.runs_on(device):
        raise RuntimeError(
            f"backend {name!r} runs on {'/'.join(b.devices)} tensors, but the inputs are on "
            f"{device}; move them or choose another backend (available here: "
            f"{', '.join(available_backends(device))})"
        )
    return b
