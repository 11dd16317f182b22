"""Block sizes of the routed-head kernels, and whether they run under the Triton interpreter.

Triton decides at ``@triton.jit`` time (from ``TRITON_INTERPRET``) whether a kernel is compiled or
interpreted; :data:`INTERPRET` records that decision for the kernels of this package, so that the
launchers pick tiny single configurations under the interpreter (it runs every program serially
on the CPU, and tiles smaller than the test shapes exercise the multi-tile paths).
"""

from __future__ import annotations

import triton


@triton.jit
def _probe_kernel(ptr):
    pass


#: True when the kernels of this package were defined under ``TRITON_INTERPRET=1``.
INTERPRET: bool = type(_probe_kernel).__name__ == "InterpretedFunction"


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``max(n, 1)``."""
    return 1 << max(0, int(n) - 1).bit_length()


#: Warps of the row-block routing kernels (histogram, scatter): a (BLOCK, NP) one-hot and its
#: cumsum over 1024 rows spill on sm_80 with 4 warps.
ROWS_WARPS = 8


def HIST_BLOCK() -> int:  # noqa: N802 - reads as the constant it stands for
    """Rows per program of the routing histogram / scatter."""
    return 32 if INTERPRET else 1024
