"""Time the routed head at one shape for every backend, the reference and a plain matmul.

    python -m benchmarks.head_quick [--m 65536 --c 256 --n 12 --dtype bf16] [--json OUT.json]

Prints a Markdown table (ms, useful GFLOP/s, speed-up over ``reference``, share of the matmul's
throughput, peak memory) for forward and forward+backward; the targets of the fused backends at
the default shape are >= 10x ``reference`` and >= 50 % of the matmul's throughput (fwd+bwd).
Useful FLOPs: ``2 M c^2 + 2 M c hdim`` forward, three times that forward+backward; the matmul
is ``(M, c) x (c, c)`` in the same dtype (``2 M c^2`` forward, ``6 M c^2`` with its backward).
Needs a CUDA GPU; CUDA events time each call after warm-up, the median of the repetitions counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import calgan_fast
from benchmarks.inputs import head_inputs, head_output_grads, matmul_operands

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _time(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of one call (CUDA events on a GPU, a wall clock on the CPU)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak(fn) -> float:
    """Peak memory (MiB) allocated by one call above what was allocated before it (GPU only)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=65536)
    ap.add_argument("--c", type=int, default=256)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke test")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("head_quick: needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 1

    m, c, n, dt = args.m, args.c, args.n, DTYPES[args.dtype]
    hdim = max(1, c // 8)
    inputs = head_inputs(m, c, n, device=dev, dtype=dt, requires_grad=True)
    x = inputs[0]
    floats = [t for t in inputs if t.is_floating_point()]
    gl, gm, gv = head_output_grads(m, c, n, device=dev, logits_dtype=dt)

    flops_fwd = 2 * m * c * c + 2 * m * c * hdim
    rows = []

    a, w = matmul_operands(m, c, device=dev, dtype=dt, requires_grad=True)

    def mm_fwd():
        with torch.no_grad():
            a @ w

    def mm_fb():
        out = a @ w
        torch.autograd.grad(out, (a, w), out)

    for mode, fn in (("fwd", mm_fwd), ("fwd+bwd", mm_fb)):
        ms = _time(fn, args.reps)
        fl = 2 * m * c * c * (1 if mode == "fwd" else 3)
        rows.append({"backend": "matmul", "mode": mode, "ms": ms, "gflops": fl / ms / 1e6,
                     "peak_mib": _peak(fn)})

    backends = calgan_fast.available_backends(dev)
    for name in backends:
        def fwd(name=name):
            with torch.no_grad():
                calgan_fast.routed_head(*inputs, backend=name, check_range=False)

        def fb(name=name):
            out = calgan_fast.routed_head(*inputs, backend=name, check_range=False)
            torch.autograd.grad((out.logits, out.mean, out.var), floats, (gl, gm, gv))

        for mode, fn in (("fwd", fwd), ("fwd+bwd", fb)):
            try:
                reps = max(3, args.reps // 4) if name == "reference" else args.reps
                ms = _time(fn, reps)
                peak = _peak(fn)
            except Exception as exc:  # one broken backend must not hide the others' figures
                rows.append({"backend": name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"})
                continue
            fl = flops_fwd * (1 if mode == "fwd" else 3)
            rows.append({"backend": name, "mode": mode, "ms": ms, "gflops": fl / ms / 1e6, "peak_mib": peak})

    ref = {r["mode"]: r for r in rows if r["backend"] == "reference" and "ms" in r}
    mm = {r["mode"]: r for r in rows if r["backend"] == "matmul"}
    for r in rows:
        if "ms" not in r:
            continue
        if r["mode"] in ref:
            r["x_reference"] = ref[r["mode"]]["ms"] / r["ms"]
        r["of_matmul"] = r["gflops"] / mm[r["mode"]]["gflops"]

    gpu = torch.cuda.get_device_properties(dev).name if dev.type == "cuda" else "cpu"
    meta = {"M": m, "c": c, "N": n, "hdim": hdim, "dtype": args.dtype, "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _version("triton"), "x_MiB": m * c * x.element_size() / 2**20}
    print(f"## Routed head, M={m}, c={c}, N={n}, hdim={hdim}, {args.dtype} on {gpu}\n")
    print(f"torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}; "
          f"one (M, c) buffer is {meta['x_MiB']:.0f} MiB.\n")
    print("| backend | mode | ms | GFLOP/s | x reference | of matmul | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "ms" not in r:
            print(f"| {r['backend']} | {r['mode']} | error: {r['error'][:80]} | | | | |")
            continue
        xr = f"{r['x_reference']:.1f}" if "x_reference" in r else "-"
        print(f"| {r['backend']} | {r['mode']} | {r['ms']:.3f} | {r['gflops']:.0f} | {xr} | "
              f"{100 * r['of_matmul']:.0f} % | {r['peak_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
