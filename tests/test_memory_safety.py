"""Out-of-range expert ids with ``check_range=False``: no backend reads or writes out of bounds.

The ``triton`` (device kernels), ``torch`` and ``cuda`` backends clamp an id into ``[0, N)`` on the
device: the result equals that of ``expert.clamp(0, N - 1)`` (ids < 0 count for expert 0, ids >= N
for expert N - 1). The ``cpu`` backend and the reference raise a ``RuntimeError`` naming the ids.
Each case runs in its own subprocess, so a crash shows as a signal instead of ending the session.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BAD_IDS = [10**9, 4, -1, -(2**62)]

_CASE = r"""
import sys, torch, calgan_fast as cf
backend, bad = sys.argv[1], int(sys.argv[2])
M, c, N, h = 64, 8, 4, 5
g = torch.Generator().manual_seed(0)
args = [torch.randn(M, c, generator=g), None, torch.rand(M, generator=g) + 0.5,
        torch.randn(N, c, c, generator=g), torch.randn(N, h, c, generator=g), torch.randn(N, h, generator=g),
        torch.randn(N, h, generator=g), torch.randn(N, generator=g)]
e = torch.randint(0, N, (M,), generator=g)
e[3] = bad
e[40] = bad

def run(ids):
    inp = [t if t is None else t.clone().requires_grad_(True) for t in args]
    inp[1] = ids
    try:
        out = cf.routed_head(*inp, backend=backend, check_range=False)
    except RuntimeError as err:
        print("RAISED", str(err).splitlines()[0])
        sys.exit(0)
    loss = out.logits.sum() + out.mean.square().sum() + out.var.sum()
    loss.backward()
    return [*out, *(inp[i].grad for i in (0, 2, 3, 4, 5, 6, 7))]

got = run(e)
want = run(e.clamp(0, N - 1))
assert int(got[1].sum()) == M, got[1]
for a, b in zip(got, want):
    assert torch.equal(a, b), (a, b)
print("CLAMPED", got[1].tolist())
"""


def _run(backend: str, bad: int, interpret: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", _CASE, backend, str(bad)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _check(proc: subprocess.CompletedProcess, expect: str) -> None:
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(expect), proc.stdout + proc.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("bad", BAD_IDS)
def test_triton_clamps_out_of_range_ids(bad):
    _check(_run("triton", bad, interpret=True), "CLAMPED")


@pytest.mark.parametrize("bad", [10**9, -1])
def test_torch_backend_clamps_out_of_range_ids(bad):
    _check(_run("torch", bad, interpret=False), "CLAMPED")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cpu_and_reference_raise(backend):
    from calgan_fast.ops.backends import extension

    if backend == "cpu" and extension() is None:
        pytest.skip("calgan_fast._C is not built")
    proc = _run(backend, 10**9, interpret=False)
    _check(proc, "RAISED")
