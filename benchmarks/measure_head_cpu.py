"""Speed of the ``cpu`` head against ``torch`` and the speed of light, measured in one run.

    python -m benchmarks.measure_head_cpu [--threads 2] [--rounds 7]

Times forward+backward of the routed head at M=16384, c=256, N=12, hdim=32, fp32 (the shape of the
targets), the ``torch`` backend and a same-shape ``(M, c) x (c, c)`` fp32 matmul, interleaved round
by round so that the load of a shared machine hits all of them alike, and prints the best time of
each (and the medians' ratio), the speedup of ``cpu`` over ``torch`` and its share of the speed of light:
useful FLOPs
``3 (2 M c^2 + 2 M c hdim)`` at the matmul's GFLOP/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import calgan_fast
from benchmarks.inputs import head_inputs, head_output_grads, matmul_operands
from calgan_fast.ops.routed_head import backend_ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("-m", type=int, default=16384)
    ap.add_argument("-c", type=int, default=256)
    ap.add_argument("-n", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m, c, n = args.m, args.c, args.n
    hdim = c // 8
    x, expert, gate, proj, w1, b1, w2, b2 = head_inputs(m, c, n)
    gl, gm, gv = head_output_grads(m, c, n)
    a, b = matmul_operands(m, c)

    def head(name):
        fwd, bwd = backend_ops(name)

        def run():
            _, count, mean, _, perm, offsets, aux = fwd(x, expert, gate, proj, w1, b1, w2, b2)
            bwd(gl, gm, gv, x, expert, gate, proj, w1, b1, w2, b2, count, mean, perm, offsets, aux)

        return run

    fns = {"matmul": lambda: torch.mm(a, b)}
    for name in ("cpu", "torch"):
        if name in calgan_fast.available_backends("cpu"):
            fns[name] = head(name)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(args.rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    best = {k: min(t) for k, t in times.items()}
    med = {k: statistics.median(t) for k, t in times.items()}
    mm_gflops = 2 * m * c * c / best["matmul"] / 1e9
    useful = 3 * (2 * m * c * c + 2 * m * c * hdim)
    print(
        f"M={m} c={c} N={n} hdim={hdim} fp32, {args.threads} threads, best of {args.rounds}, "
        f"torch {torch.__version__}"
    )
    print(f"matmul (M,c)x(c,c): {best['matmul'] * 1e3:.1f} ms = {mm_gflops:.0f} GFLOP/s")
    for k in ("cpu", "torch"):
        if k in best:
            sol = useful / best[k] / 1e9 / mm_gflops
            print(
                f"{k:6s} fwd+bwd: {best[k] * 1e3:.1f} ms = {useful / best[k] / 1e9:.0f} GFLOP/s useful, "
                f"{100 * sol:.0f} % of the speed of light"
            )
    if "cpu" in best and "torch" in best:
        print(
            f"cpu vs torch: {best['torch'] / best['cpu']:.2f}x (best of each); medians "
            f"{med['cpu'] * 1e3:.1f} vs {med['torch'] * 1e3:.1f} ms, {med['torch'] / med['cpu']:.2f}x"
        )


if __name__ == "__main__":
    main()
