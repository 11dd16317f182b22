"""Argument types of the Triton kernels, for compiling them ahead of time (no GPU needed).

``triton.compile`` takes a kernel's signature: one type per argument that is not a constexpr.
At launch Triton reads the types from the tensors and integers the launchers pass; the compile
report (``python -m benchmarks.kernel_report``) and the compile tests (``tests/test_triton.py``)
compile without launching and take the types from this one table.

Pointers to routing metadata are int64 (``*i64``) or int32 (``*i32``); pointers to statistics and
partial sums are fp32 (``*fp32``, the accumulation dtype); every other pointer has the dtype of the
op's inputs; every other argument is an ``i32`` scalar.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["ARG_TYPES", "signature"]

_I64 = ("perm", "offsets", "expert", "count", "seg_off", "off_a", "off_b", "tile_off")
_I32 = (
    "blk_count", "blk_base",
    "tile_expert", "tile_start", "tile_stop",
    "slab_expert", "slab_start", "slab_stop",
    "seg_expert", "seg_start", "seg_stop",
    "exp_a", "start_a", "stop_a",
    "exp_b", "start_b", "stop_b",
    "grp_expert", "grp_start", "grp_stop",
    "g_start", "g_stop",
)
_FP32 = (
    "tile_sum", "tile_m2", "gmean", "gvar", "mean", "var", "cls_part", "proj_part", "part", "out",
    "dh", "g_sum", "g_m2", "d_part",
)

#: The type of every kernel argument whose type does not follow the inputs' dtype.
ARG_TYPES: dict[str, str] = {
    **{f"{name}_ptr": "*i64" for name in _I64},
    **{f"{name}_ptr": "*i32" for name in _I32},
    **{f"{name}_ptr": "*fp32" for name in _FP32},
}


def signature(fn, dtype: str, constexprs: Mapping[str, object]) -> dict[str, str]:
    """``{argument: type}`` of ``fn`` (a ``@triton.jit`` kernel) for inputs of ``dtype``
    (``"bf16"``, ``"fp16"`` or ``"fp32"``), leaving out the arguments given in ``constexprs``."""
    return {
        a: ARG_TYPES.get(a, f"*{dtype}" if a.endswith("_ptr") else "i32")
        for a in fn.arg_names
        if a not in constexprs
    }
