"""Discriminator-step benchmark (docs/design.md §7): one full D step of the paper variant against the
authors'-code-compatible module, same N and num_feat.

A step is: real pass, fake pass routed by the real routing, every loss, backward. The paper
variant runs ``calgan_fast.losses.discriminator_loss`` on ``CALGANDiscriminator`` (once per routed-head
backend available here); the compat module runs ``calgan_fast.compat.official_discriminator_loss``
(``official_d_losses`` + ``official_gan_loss``) on ``OfficialMOD``.

    python -m pytest benchmarks/bench_dstep.py --benchmark-json=dstep.json

Environment: ``CALGAN_BENCH_DEVICE`` (``cpu`` default: B=4 at 128x128; ``cuda``: B=24 at 256x256),
``CALGAN_BENCH_DSTEP_SIZE`` (``B,H,W`` override), ``CALGAN_BENCH_ROUNDS`` (timed rounds, default 3).
``test_dstep_interleaved`` times the same steps round-robin in one test, for ratios that a drift of
the machine's speed between the per-variant tests cannot move.
Peak memory (``extra_info["peak_mem_mb"]``): allocator peak on CUDA; on CPU the rise of the peak
resident set during one step, measured in a fresh process (Linux; see ``peak_memory_cpu_subprocess``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import calgan_fast
from benchmarks.inputs import DSTEP_EXPERTS, DSTEP_FEAT, dstep_images, make_dstep
from benchmarks.roundrobin import time_round_robin

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = os.environ.get("CALGAN_BENCH_DEVICE", "cpu")
_DEFAULT_SIZE = "24,256,256" if DEVICE == "cuda" else "4,128,128"
B, H, W = (int(v) for v in os.environ.get("CALGAN_BENCH_DSTEP_SIZE", _DEFAULT_SIZE).split(","))
NUM_FEAT, NUM_EXPERTS = DSTEP_FEAT, DSTEP_EXPERTS
ROUNDS = int(os.environ.get("CALGAN_BENCH_ROUNDS", "3"))


def _variants() -> list[str]:
    heads = [b for b in calgan_fast.available_backends(DEVICE) if b != "reference"]
    return [f"calgan:{b}" for b in heads] + ["official"]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _make_step(variant: str):
    hr, sr = dstep_images(B, H, W, device=DEVICE)
    if variant == "official":
        return make_dstep("compat", hr, sr, sync=_sync)
    return make_dstep("calgan", hr, sr, backend=variant.split(":", 1)[1], sync=_sync)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mb(step) -> float:
    """Peak memory of one ``step`` above what was in use before it (MiB).

    CUDA: the caching allocator's peak. CPU (Linux): the process's peak resident set (VmHWM), reset
    just before the step through ``/proc/self/clear_refs``, minus the resident set before it. Meant
    to run in a fresh process whose malloc returns large blocks to the system on free (see
    :func:`peak_memory_cpu_subprocess`); NaN where ``/proc`` is not available.
    """
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = _proc_status_kb("VmRSS")
    except (OSError, KeyError):
        return float("nan")
    step()
    return (_proc_status_kb("VmHWM") - base) / 1024


def peak_memory_cpu_subprocess(variant: str) -> float:
    """:func:`peak_memory_mb` of ``variant`` after one warm-up step, in a fresh process.

    glibc keeps freed memory resident (its mmap threshold grows as large blocks are freed), which
    would hide the peak of the measured step; a fixed threshold makes every large tensor its own
    mapping, so the resident set follows the live tensors.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_dstep", "--peak", variant],
        cwd=_ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", _variants())
def test_dstep(benchmark, variant):
    step = _make_step(variant)
    step()  # warm-up (and the lazy load of the kernels)
    benchmark.group = f"dstep {DEVICE} B={B} {H}x{W} N={NUM_EXPERTS} nf={NUM_FEAT}"
    model, _, backend = variant.partition(":")
    benchmark.extra_info.update(
        {
            # the keys benchmarks/report.py renders
            "kind": "dstep",
            "model": "compat" if model == "official" else model,
            "backend": backend or "-",
            "shape": f"B={B} {H}x{W} N={NUM_EXPERTS} nf={NUM_FEAT}",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "peak_mem_mb": round(
                peak_memory_mb(step) if DEVICE == "cuda" else peak_memory_cpu_subprocess(variant), 1
            ),
            "variant": variant,
            "device": DEVICE,
        }
    )
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def test_dstep_interleaved(benchmark):
    """Every variant once per round, round after round, each step timed on its own: a drift of the
    machine's speed during the run (common on shared virtual machines) then hits all variants
    alike, where the per-variant tests above time one variant after another. The per-variant
    medians and their ratios to the compat module go to ``extra_info``."""
    steps = {v: _make_step(v) for v in _variants()}
    benchmark.group = f"dstep interleaved {DEVICE} B={B} {H}x{W} N={NUM_EXPERTS} nf={NUM_FEAT}"
    median, best = time_round_robin(benchmark, steps, ROUNDS)
    benchmark.extra_info.update(
        {
            "kind": "dstep_interleaved",
            "shape": f"B={B} {H}x{W} N={NUM_EXPERTS} nf={NUM_FEAT}",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": DEVICE,
            "rounds": ROUNDS,
            "median_ms": median,
            "best_ms": best,
        }
    )


if __name__ == "__main__":
    # python -m benchmarks.bench_dstep --peak VARIANT: print the peak memory (MiB) of one step.
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        _step = _make_step(sys.argv[2])
        _step()
        print(peak_memory_mb(_step))
    else:
        sys.exit(
            "usage: python -m benchmarks.bench_dstep --peak VARIANT (the benchmark itself runs under pytest)"
        )
