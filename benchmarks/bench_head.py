"""Routed-head benchmarks (docs/design.md §7): every available backend, ``reference`` and a same-shape
matmul (the speed of light), forward and forward+backward.

    python -m pytest benchmarks/bench_head.py --benchmark-json=head.json
    python -m benchmarks.report head.json -o benchmarks/RESULTS.md

``test_head_interleaved`` times the routed backends and the matmul at the targets' shape
round-robin in one test, for ratios that a drift of the machine's speed cannot move.

Environment: ``CALGAN_BENCH_DEVICE`` (``cpu`` default, or ``cuda``), ``CALGAN_BENCH_DTYPE``
(default fp32 on CPU, bf16 on CUDA), ``CALGAN_BENCH_FULL=1`` for every docs/design.md §7 shape on CPU
(the CPU default keeps c = 256 and M <= 16384 so a run takes minutes), ``CALGAN_BENCH_BACKENDS``
(comma-separated subset), ``CALGAN_BENCH_INTERLEAVED_ROUNDS`` (15).
"""

from __future__ import annotations

import os

import pytest
import torch

import calgan_fast
from benchmarks.inputs import head_inputs, head_output_grads, matmul_operands
from benchmarks.roundrobin import time_round_robin
from calgan_fast import routed_head

DEVICE = os.environ.get("CALGAN_BENCH_DEVICE", "cpu")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAME = os.environ.get("CALGAN_BENCH_DTYPE", "bf16" if DEVICE == "cuda" else "fp32")
DTYPE = _DTYPES[DTYPE_NAME]
FULL = DEVICE == "cuda" or os.environ.get("CALGAN_BENCH_FULL", "0") == "1"

MS = [4096, 16384, 65536] if FULL else [4096, 16384]
CS = [256, 512] if FULL else [256]
NS = [1, 4, 8, 12, 16]
MODES = ["fwd", "fwd+bwd"]


def _backends() -> list[str]:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.exit("CALGAN_BENCH_DEVICE=cuda but no GPU is visible", returncode=2)
    names = calgan_fast.available_backends(DEVICE)
    wanted = os.environ.get("CALGAN_BENCH_BACKENDS")
    if wanted:
        names = [n for n in names if n in wanted.split(",")]
    return names + ["matmul"]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def useful_flops(m: int, c: int, hdim: int, mode: str) -> int:
    fwd = 2 * m * c * c + 2 * m * c * hdim
    return fwd if mode == "fwd" else 3 * fwd


def _rounds(m, c, n, backend):
    if DEVICE == "cuda":
        return 20
    work = m * c * c * (n if backend == "reference" else 1)
    return max(3, min(20, int(2e10 / max(work, 1))))


def _make_run(backend, m, c, n, bwd):
    """One call of ``backend`` (or of the same-shape matmul), with its backward where ``bwd``."""
    if backend == "matmul":
        a, b = matmul_operands(m, c, device=DEVICE, dtype=DTYPE, requires_grad=bwd)
        grad = torch.randn(m, c, device=DEVICE, dtype=DTYPE)

        def run():
            out = a @ b
            if bwd:
                out.backward(grad)
                a.grad = b.grad = None
            _sync()
    else:
        inputs = head_inputs(m, c, n, device=DEVICE, dtype=DTYPE, requires_grad=bwd)
        floats = [inputs[0], *inputs[2:]]
        gl = head_output_grads(m, c, n, device=DEVICE)[0]

        def run():
            out = routed_head(*inputs, backend=backend, check_range=False)
            if bwd:
                loss = (out.logits.float() * gl).sum() + out.mean.sum() + out.var.sum()
                loss.backward()
                for t in floats:
                    t.grad = None
            _sync()

    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("backend", _backends())
def test_head(benchmark, backend, m, c, n, mode):
    if backend == "matmul" and n != NS[0]:
        pytest.skip("the matmul does not depend on N: measured once per (M, c)")
    hdim = c // 8
    bwd = mode == "fwd+bwd"
    run = _make_run(backend, m, c, n, bwd)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run()  # warm-up (compiles kernels)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, rounds=_rounds(m, c, n, backend), warmup_rounds=1, iterations=1)
    flops = useful_flops(m, c, hdim, mode) if backend != "matmul" else (2 if not bwd else 6) * m * c * c
    benchmark.extra_info.update({
        "backend": backend, "M": m, "c": c, "N": n, "hdim": hdim, "mode": mode, "dtype": DTYPE_NAME,
        "device": DEVICE, "flops": flops, "useful_flops": useful_flops(m, c, hdim, mode),
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    })


INTERLEAVED_ROUNDS = int(os.environ.get("CALGAN_BENCH_INTERLEAVED_ROUNDS", "15"))


def test_head_interleaved(benchmark):
    """Forward+backward at M = 16384, c = 256, N = 12 (the shape of the head's targets) of every
    routed backend and of the same-shape matmul with its backward, each once per round, round after
    round, each call timed on its own: a drift of the machine's speed during the run then hits all
    of them alike, where the tests above time one after another. Per-variant medians and best times
    go to ``extra_info``; the report takes the ratios and the speed of light from them."""
    m, c, n = 16384, 256, 12
    hdim = c // 8
    names = [b for b in _backends() if b != "reference"]
    runs = {b: _make_run(b, m, c, n, bwd=True) for b in names}
    benchmark.group = f"head interleaved {DEVICE} M={m} c={c} N={n} {DTYPE_NAME}"
    median, best = time_round_robin(benchmark, runs, INTERLEAVED_ROUNDS)
    benchmark.extra_info.update({
        "kind": "head_interleaved", "shape": f"M={m} c={c} N={n} hdim={hdim} {DTYPE_NAME} fwd+bwd",
        "device": DEVICE, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "rounds": INTERLEAVED_ROUNDS, "useful_flops": useful_flops(m, c, hdim, "fwd+bwd"),
        "matmul_flops": 6 * m * c * c,
        "median_ms": median, "best_ms": best,
    })
