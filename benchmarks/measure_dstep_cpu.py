"""Speed of one discriminator step on CPU, the paper variant against the compat module, measured
in one run with the variants interleaved round by round.

    python -m benchmarks.measure_dstep_cpu [--rounds 7] [--size 4,128,128]

A step is what ``bench_dstep.py`` times (real pass, fake pass routed by the real routing, every
loss, backward), N = 12, num_feat = 64. ``bench_dstep.py`` times one variant after the other, so
a shared machine's load can drift between them; here each round times every variant once, and the
best and the median of the rounds are printed with the ratios to the compat module.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import calgan_fast
from benchmarks.inputs import DSTEP_EXPERTS, DSTEP_FEAT, dstep_images, make_dstep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--size", default="4,128,128", help="B,H,W")
    args = ap.parse_args()
    b, h, w = (int(v) for v in args.size.split(","))
    hr, sr = dstep_images(b, h, w)
    names = [n for n in calgan_fast.available_backends("cpu") if n != "reference"] + ["compat"]
    steps = {n: make_dstep("compat", hr, sr) if n == "compat" else make_dstep("calgan", hr, sr, backend=n)
             for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for f in steps.values():
        f()  # warm-up
    for _ in range(args.rounds):
        for n, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    print(f"D step B={b} {h}x{w} N={DSTEP_EXPERTS} nf={DSTEP_FEAT}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}")
    best = {n: min(t) for n, t in times.items()}
    med = {n: statistics.median(t) for n, t in times.items()}
    for n in names:
        print(f"{n:8s} best {best[n] * 1e3:7.1f} ms ({best['compat'] / best[n]:.2f}x compat), "
              f"median {med[n] * 1e3:7.1f} ms ({med['compat'] / med[n]:.2f}x compat)")


if __name__ == "__main__":
    main()
