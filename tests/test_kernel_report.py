"""The compile report of the Triton kernels (``python -m benchmarks.kernel_report``) shows no register spill.

Compiles the kernels with Triton's compiler and ptxas for sm_80 and sm_90 (no GPU needed) at the
paper's M = 800k, c in {256, 512}, N = 16, bf16: the configuration CI checks. The full report
(fp16 and fp32 too, N = 12) is ``python -m benchmarks.kernel_report --fail-on-spill``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@_needs_triton
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


_PTXAS_LOG = """\
ptxas info : Compiling entry function '_ZN11calgan_fast3dev14_bwd_dy_kernelIN3c104HalfEEEvPKT_lS6_' for 'sm'
ptxas info    : Function properties for _ZN11calgan_fast3dev14_bwd_dy_kernelIN3c104HalfEEEvPKT_lS6_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 39936 bytes smem, 400 bytes cmem[0]
ptxas info : Compiling entry function '_ZN11calgan_fast3dev20_routing_scan_kernelEPKlllPlS3_S3_' for 'sm_90'
ptxas info    : Function properties for _ZN11calgan_fast3dev20_routing_scan_kernelEPKlllPlS3_S3_
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 8192 bytes smem
"""


def test_ptxas_parsing_names_kernels_and_dtypes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import kernel_report
    finally:
        sys.path.pop(0)
    rows = kernel_report.parse_ptxas(_PTXAS_LOG)
    got = [(r["kernel"], r["dtype"], r["regs"], r["spill"], r["stack"], r["smem"]) for r in rows]
    assert got == [("_bwd_dy_kernel", "fp16", 168, 0, 0, 39936), ("_routing_scan_kernel", "", 32, 8, 8, 8192)]
    for mangled in ("_ZN11calgan_fast3dev14_bwd_dy_kernelIN3c104HalfEEEvPKT_lS6_",):
        assert kernel_report._mangled_label(mangled) == ("_bwd_dy_kernel", "fp16")
    # The launches the report lists are those of csrc/cuda/routed_head_launch.h.
    bwd = [k for op, k, _ in kernel_report.cuda_launches(800_000, 512, 16) if op == "bwd"]
    assert len(bwd) == kernel_report._bwd_launch_constant()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_kernel_report_has_no_spills():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/kernel_report.py"), "--cuda-only", "--arch", "80", "90",
         "--c", "512", "--n", "16", "--fail-on-spill"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| sm_")]
    kernels = {(r[1].strip(), r[2].strip()) for r in rows}
    new = ("dy", "dx", "dproj", "dw1", "prep", "finish")
    for name in [f"_bwd_{k}_kernel" for k in new] + ["_routed_head_fwd_kernel"]:
        for arch in ("sm_80", "sm_90"):
            assert (arch, name) in kernels, (arch, name)
    for r in rows:
        assert int(r[4]) > 0 and r[5].strip() == "0", "|".join(r)
    assert "**op call: 11 launches**" in proc.stdout
