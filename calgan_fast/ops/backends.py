"""Backends of the routed head: what each is, what it can run, and ``auto`` dispatch.

Every backend is a module (imported on first use, so Triton and the extension load lazily) with
the same three functions:

- ``forward(x, expert, gate, proj, w1, b1, w2, b2)`` ->
  ``(logits, count, mean, var, perm, offsets, xcov)``;
- ``backward(glogits, gmean, gvar, x, expert, gate, proj, w1, b1, w2, b2, count, mean, perm,
  offsets, xcov)`` -> ``(dx, dgate, dproj, dw1, db1, dw2, db2)``;
- ``routing_metadata(expert, num_experts)`` -> ``(count, offsets, perm)``.

``xcov`` is what a forward hands to its backward: the ``(N, c, c)`` per-expert cross-covariances
of ``y`` and the gated rows for the backends with ``keeps_xcov``, an empty ``(0,)`` tensor for the
others. What a backend can run is in its fields (``devices``, ``dtypes``, ``interpreter``);
nothing is decided by its name. :mod:`calgan_fast.ops.routed_head` wraps every backend with
``fused`` set in the same ``torch.library`` custom ops; the reference is differentiated by autograd.
See docs/design.md §6.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from .. import _env

REINSTALL = (
    "reinstall from the source tree with `bash install.sh` (or "
    "`pip install --no-build-isolation .` inside an environment that has torch)"
)

_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def extension() -> ModuleType | None:
    """The compiled ``calgan_fast._C`` module, or ``None`` when it was not built or fails to load."""
    from .._ext import load_extension  # noqa: PLC0415 - the extension loads on first use

    return load_extension()


def _has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``calgan_fast_C::<op>`` exists and has a kernel for ``dispatch_key``."""
    if not hasattr(torch.ops.calgan_fast_C, op):
        return False  # an extension of another version, without this op
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"calgan_fast_C::{op}", dispatch_key)


def _cpu_available() -> tuple[bool, str]:
    if extension() is None:
        return False, f"calgan_fast._C is not built or does not load; {REINSTALL}"
    if not _has_kernel("routed_head_fwd", "CPU"):
        return False, f"calgan_fast._C was built without the CPU kernel; {REINSTALL}"
    return True, ""


def _cuda_available() -> tuple[bool, str]:
    ext = extension()
    if ext is None:
        return (
            False,
            f"calgan_fast._C is not built or does not load; {REINSTALL} with nvcc and a CUDA build of torch",
        )
    if not getattr(ext, "WITH_CUDA", False) or not _has_kernel("routed_head_fwd", "CUDA"):
        return False, (
            "calgan_fast._C was built without CUDA; with nvcc (CUDA_HOME) and a CUDA build of "
            f"torch, {REINSTALL} (FORCE_CUDA=1 to build without a visible GPU)"
        )
    return True, ""


def _triton_available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed: `pip install triton` (it ships with CUDA torch on Linux)"
    return True, ""


def _always() -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class Backend:
    """One implementation of the routed head and its routing, with what it can run."""

    name: str
    module: str  # the module holding forward/backward/routing_metadata
    devices: tuple[str, ...]  # device types its tensors may live on
    dtypes: tuple[torch.dtype, ...]  # dtypes of x it takes
    probe: Callable[[], tuple[bool, str]]
    description: str
    fused: bool = True  # wrapped in custom ops with its own backward (else plain autograd)
    interpreter: bool = False  # also takes CPU tensors under TRITON_INTERPRET=1
    keeps_xcov: bool = False  # its forward hands (N, c, c) cross-covariances to its backward

    def xcov_shape(self, c: int, num_experts: int) -> tuple[int, ...]:
        """Shape of the ``xcov`` output of the forward for ``c`` channels and ``num_experts`` experts."""
        return (num_experts, c, c) if self.keeps_xcov else (0,)

    def available(self) -> tuple[bool, str]:
        """``(True, "")`` when it can run here, else ``(False, how to get it)``.

        Probed once per process (what is built and installed does not change while it runs), so
        that a compiled graph reads a cached answer instead of tracing the probe."""
        found = _AVAILABLE.get(self.name)
        if found is None:
            found = _AVAILABLE[self.name] = self.probe()
        return found

    def runs_on(self, device: torch.device) -> bool:
        if device.type in self.devices:
            return True
        return self.interpreter and device.type == "cpu" and _env.triton_interpret()

    def takes(self, dtype: torch.dtype | None) -> bool:
        return dtype is None or dtype in self.dtypes

    def impl(self) -> ModuleType:
        # Imported once, then looked up: torch.compile traces a dictionary read, not an import.
        mod = _IMPLS.get(self.module)
        if mod is None:
            mod = _IMPLS[self.module] = importlib.import_module(self.module)
        return mod


_IMPLS: dict[str, ModuleType] = {}
_AVAILABLE: dict[str, tuple[bool, str]] = {}


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "reference",
            "calgan_fast.ops.reference_impl",
            ("cpu", "cuda", "meta"),
            _ALL_FLOATS,
            _always,
            "dense and masked plain PyTorch: every expert on every pixel (oracle, slow)",
            fused=False,
        ),
        Backend(
            "torch",
            "calgan_fast.ops.torch_impl",
            ("cpu", "cuda", "meta"),
            _ALL_FLOATS,
            _always,
            "rows sorted by expert, one GEMM chain per expert, plain PyTorch",
        ),
        Backend(
            "triton",
            "calgan_fast.ops.triton_impl",
            ("cuda",),
            _ALL_FLOATS,
            _triton_available,
            "fused Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1)",
            interpreter=True,
        ),
        Backend(
            "cuda",
            "calgan_fast.ops.cpp_impl",
            ("cuda",),
            _ALL_FLOATS[:3],
            _cuda_available,
            "fused CUDA kernels of calgan_fast._C",
        ),
        Backend(
            "cpu",
            "calgan_fast.ops.cpp_impl",
            ("cpu",),
            _ALL_FLOATS,
            _cpu_available,
            "fused C++ kernel of calgan_fast._C (OpenMP, vectorised)",
            keeps_xcov=True,
        ),
    )
}

#: The order ``auto`` tries, per device type (the first that runs the inputs wins).
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def available_backends(device: torch.device | str) -> list[str]:
    """Names of the backends that can run on tensors of ``device`` on this machine."""
    device = torch.device(device)
    return [n for n, b in BACKENDS.items() if b.runs_on(device) and b.available()[0]]


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    """The backend that ``backend`` names for tensors of ``dtype`` on ``device``.

    ``"auto"`` (or the value of ``CALGAN_FAST_BACKEND`` when set) picks, for CUDA tensors,
    ``triton`` then ``cuda`` then ``torch``; for CPU tensors ``cpu`` then ``torch`` (the first that
    runs them). An explicit name that cannot run them raises a ``RuntimeError`` saying why.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    name = backend.lower()
    source = f"backend: unknown backend {backend!r}"
    if name == "auto" and _env.backend_override():
        name = _env.backend_override()
        source = f"{_env.BACKEND_ENV}={name!r} (environment): unknown backend"
    if name == "auto":
        for cand in AUTO_ORDER.get(device.type, ("torch",)):
            b = BACKENDS[cand]
            if b.takes(dtype) and b.runs_on(device) and b.available()[0]:
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
    if not b.takes(dtype):
        raise TypeError(
            f"x: backend {name!r} takes {'/'.join(str(d).removeprefix('torch.') for d in b.dtypes)}, "
            f"got {dtype}; use backend='torch' for it"
        )
    return b
