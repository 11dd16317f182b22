"""Speed of one discriminator step on CPU, the paper variant against the compat module, measured
in one run with the variants interleaved round by round.

    python benchmarks/measure_dstep_cpu.py [--rounds 7] [--size 4,128,128]

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
from calgan_fast.compat import OfficialMOD, official_discriminator_loss
from calgan_fast.losses import discriminator_loss

NUM_FEAT, NUM_EXPERTS = 64, 12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--size", default="4,128,128", help="B,H,W")
    args = ap.parse_args()
    b, h, w = (int(v) for v in args.size.split(","))
    torch.manual_seed(0)
    hr = torch.rand(b, 3, h, w)
    sr = (hr + 0.05 * torch.randn_like(hr)).clamp(0, 1)

    def make(name):
        if name == "compat":
            d = OfficialMOD(num_in_ch=3, num_feat=NUM_FEAT, num_expert=NUM_EXPERTS).train()

            def loss():
                return official_discriminator_loss(d, hr, sr)["total"]
        else:
            d = calgan_fast.CALGANDiscriminator(in_channels=3, num_feat=NUM_FEAT, num_experts=NUM_EXPERTS,
                                                backend=name).train()

            def loss():
                return discriminator_loss(d, hr, sr)["total"]

        def step():
            d.zero_grad(set_to_none=True)
            loss().backward()

        return step

    names = [n for n in calgan_fast.available_backends("cpu") if n != "reference"] + ["compat"]
    steps = {n: make(n) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for f in steps.values():
        f()  # warm-up
    for _ in range(args.rounds):
        for n, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    print(f"D step B={b} {h}x{w} N={NUM_EXPERTS} nf={NUM_FEAT}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}")
    best = {n: min(t) for n, t in times.items()}
    med = {n: statistics.median(t) for n, t in times.items()}
    for n in names:
        print(f"{n:8s} best {best[n] * 1e3:7.1f} ms ({best['compat'] / best[n]:.2f}x compat), "
              f"median {med[n] * 1e3:7.1f} ms ({med['compat'] / med[n]:.2f}x compat)")


if __name__ == "__main__":
    main()
