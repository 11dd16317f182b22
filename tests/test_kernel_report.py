"""The compile report of the Triton kernels (``python -m benchmarks.kernel_report``) shows no register spill.

Compiles the kernels with Triton's compiler and ptxas for sm_80 and sm_90 (no GPU needed) at the
paper's M = 800k, c in {256, 512}, N = 16, bf16: the configuration CI checks. The full report
(fp16 and fp32 too, N = 12) is ``python -m benchmarks.kernel_report --fail-on-spill``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_kernel_report_has_no_spills():
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_report", "--arch", "80", "90", "--dtype", "bf16",
         "--c", "256", "512", "--n", "16", "--fail-on-spill"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| sm_")]
    kernels = {line.split("|")[6].strip() for line in rows}
    assert {"fwd", "dy", "dx", "dproj", "dw1", "routing_scatter"} <= kernels, kernels
    for line in rows:
        cells = [c.strip() for c in line.split("|")]
        if "op call" not in cells[6]:
            assert int(cells[7]) > 0, f"no ptxas register count: {line}"
            assert cells[8] == "0", line
