"""Compile report of the GPU kernels of the routed head, made without a GPU.

Compiles every Triton kernel of ``calgan_fast.kernels`` with the launch settings the launchers pick
at the given shapes (default: the paper's, M = 800k rows, c in {256, 512}, N in {12, 16},
hdim = c/8, bf16/fp16/fp32) for sm_80 and sm_90, with Triton's own compiler and ptxas, and prints
per kernel: registers per thread, spill bytes (stores + loads), shared memory, programs per launch.
Per op call it adds the launches, and from the kernels' own tile loops the bytes each kernel moves
through global memory and its FLOPs, giving a roofline lower bound on an H100 (3.35 TB/s,
990 TFLOP/s dense bf16/fp16, 67 TFLOP/s fp32 on FMA units) next to that of one bf16 matmul of
the same shape, ``(M, c) @ (c, c)``.

``--cuda`` adds the ptxas report of the CUDA kernels (``csrc/cuda``), compiled with nvcc.

    python -m benchmarks.kernel_report                      # every config, both architectures
    python -m benchmarks.kernel_report --arch 90 --dtype bf16 --c 256 --fail-on-spill

Exit status 1 with ``--fail-on-spill`` when any listed kernel spills. Needs triton; no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HBM_BPS = 3.35e12
PEAK = {"bf16": 990e12, "fp16": 990e12, "fp32": 67e12}
ES = {"bf16": 2, "fp16": 2, "fp32": 4}
H100_SMS = 132


@dataclass
class Launch:
    op: str  # "fwd" or "bwd"
    name: str
    fn: object
    consts: dict
    options: dict
    programs: int
    bytes: float
    flops: float
    result: dict = field(default_factory=dict)


def launches(k, m: int, c: int, n: int, dtype: str) -> list[Launch]:
    """The kernel launches of one forward and one backward call, with their traffic and FLOPs."""
    import torch
    import triton

    rh, ro = k.routed_head, k.routing
    from calgan_fast.kernels._config import HIST_BLOCK, ROWS_WARPS, next_pow2

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    h = max(1, c // 8)
    es = ES[dtype]
    cfg = rh._Cfg(m, c, h, tdt, torch.device("cpu"), sms=H100_SMS)
    np_ = max(16, next_pow2(n))
    nb = triton.cdiv(m, HIST_BLOCK())
    bm = cfg.block_m
    t = triton.cdiv(m, bm) + n  # tile bound (grid)
    tt = m / bm + n / 2  # tiles used, about
    s = triton.cdiv(m, cfg.slab_m) + n
    gemm, head, dy = cfg.gemm(), cfg.gemm(head=True), cfg.gemm(head="dy")
    opts = {"num_warps": gemm.pop("num_warps"), "num_stages": gemm.pop("num_stages")}
    for d in (head, dy):
        del d["num_warps"], d["num_stages"]
        d.update(SLOPE=rh.LRELU_SLOPE, BLOCK_H=cfg.block_h)
    bn, bk = cfg.block_n, cfg.block_k
    single = c <= cfg.dy_n
    rows_opts = {"num_warps": ROWS_WARPS}
    lc = 2 * h + 1
    out = [
        Launch(
            "fwd",
            "routing_hist",
            ro._routing_hist_kernel,
            {"BLOCK": HIST_BLOCK(), "NP": np_},
            rows_opts,
            nb,
            8 * m + 4 * nb * np_,
            0,
        ),
        Launch(
            "fwd",
            "routing_scan",
            ro._routing_scan_kernel,
            {"SEG_BLOCK": ro._SEG_BLOCK, "CHUNK": ro._scan_chunk(), "NP": np_},
            {},
            1,
            8 * nb * np_ + 16 * t,
            0,
        ),
        Launch(
            "fwd",
            "routing_scatter",
            ro._routing_scatter_kernel,
            {"BLOCK": HIST_BLOCK(), "NP": np_},
            rows_opts,
            nb,
            24 * m + 4 * nb * np_,
            0,
        ),
        # Bytes: what must cross DRAM at least (x and every scratch once per pass, the weights once:
        # tiles re-read x blocks and the expert's weights from L2). FLOPs: including recomputation.
        Launch(
            "fwd",
            "fwd",
            rh._routed_head_fwd_kernel,
            dict(head),
            opts,
            t,
            m * c * es + n * (c * c + h * c) * es + m * (8 + 3 * es) + 4 * tt * (c + 1),
            2 * m * c * c + 2 * m * c * h,
        ),
    ]
    grp = ro.merge_group()
    gt = triton.cdiv(t, grp) + n
    out += [
        Launch(
            "fwd",
            "segment_map (groups)",
            ro._segment_map_kernel,
            {"BLOCK": ro._SEG_BLOCK, "NP": np_},
            {},
            triton.cdiv(gt, ro._SEG_BLOCK),
            16 * gt,
            0,
        ),
        Launch(
            "fwd",
            "stats_group",
            rh._stats_group_kernel,
            {"BLOCK_C": cfg.block_c},
            {},
            gt,
            4 * tt * (c + 3),
            0,
        ),
        Launch(
            "fwd",
            "expert_stats",
            rh._expert_stats_kernel,
            {"BLOCK_C": cfg.block_c},
            {},
            n,
            4 * gt * (c + 3),
            0,
        ),
    ]
    out += [
        Launch(
            "bwd",
            "segment_maps",
            ro._segment_map_kernel,
            {"BLOCK": ro._SEG_BLOCK, "NP": np_},
            {},
            triton.cdiv(t, ro._SEG_BLOCK) + triton.cdiv(s, ro._SEG_BLOCK),
            16 * (t + s),
            0,
        ),
        # h, then u again per channel block unless SINGLE; du (dt) and dh (fp32) written once.
        Launch(
            "bwd",
            "dy",
            rh._routed_head_bwd_dy_kernel,
            dict(dy, SINGLE=single),
            opts,
            t,
            m * c * es + n * (c * c + 2 * h * c) * es + m * (c * es + 4 * h + 8 + 3 * es) + 4 * tt * lc,
            (1 if single else 2) * 2 * m * c * c + 2 * 2 * m * c * h,
        ),
        Launch(
            "bwd",
            "dx",
            rh._routed_head_bwd_dx_kernel,
            dict(gemm),
            opts,
            t * triton.cdiv(c, bn),
            2 * m * c * es + n * c * c * es + 8 * m,
            2 * m * c * c,
        ),
        Launch(
            "bwd",
            "dproj",
            rh._routed_head_bwd_dproj_kernel,
            dict(gemm),
            opts,
            s * triton.cdiv(c, bn) * triton.cdiv(c, bk),
            2 * m * c * es + 8 * m + 4 * s * c * c,
            2 * m * c * c,
        ),
        Launch(
            "bwd",
            "dw1",
            rh._routed_head_bwd_dw1_kernel,
            {a: v for a, v in dict(gemm, BLOCK_H=cfg.block_h).items() if a != "BLOCK_N"},
            opts,
            s * triton.cdiv(c, bk),
            m * (4 * h + c * es + es + 8) + 4 * s * h * c,
            2 * m * c * h,
        ),
    ]
    for what, rows, length in (("dproj", s, c * c), ("dw1", s, h * c), ("cls", t, lc)):
        block = min(1024, max(16, next_pow2(length)))
        cols = triton.cdiv(length, block)
        if rows > 2 * grp:
            g_rows = triton.cdiv(rows, grp) + n
            out.append(
                Launch(
                    "bwd",
                    f"group_sum ({what})",
                    ro._group_sum_kernel,
                    {"BLOCK": block},
                    {},
                    g_rows * cols,
                    4 * length * (rows + g_rows),
                    0,
                )
            )
            rows = g_rows
        out.append(
            Launch(
                "bwd",
                f"segment_sum ({what})",
                ro._segment_sum_kernel,
                {"BLOCK": block},
                {},
                n * cols,
                4 * length * (rows + n),
                0,
            )
        )
    return out


_COMPILED: dict = {}


def compile_launch(ln: Launch, dtype: str, arch: int) -> dict:
    """Registers, spill bytes and shared memory of one kernel, from Triton's ptxas run (each
    distinct kernel is compiled once: Triton's cache would skip ptxas and its report)."""
    import triton
    from calgan_fast.kernels.signature import signature
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {a: v for a, v in ln.consts.items() if a in ln.fn.arg_names}
    sig = signature(ln.fn, dtype, consts)
    key = (
        arch,
        ln.fn.__name__,
        tuple(sorted(consts.items())),
        tuple(sorted(ln.options.items())),
        tuple(sig.items()),
    )
    if key in _COMPILED:
        return _COMPILED[key]
    buf = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(buf):
        compiled = triton.compile(
            ASTSource(fn=ln.fn, signature=sig, constexprs=consts),
            target=GPUTarget("cuda", arch, 32),
            options=ln.options or None,
        )
    log = buf.getvalue()
    regs = re.findall(r"Used (\d+) registers", log)
    spill_st = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", log))
    spill_ld = sum(int(v) for v in re.findall(r"(\d+) bytes spill loads", log))
    _COMPILED[key] = {
        "regs": int(regs[-1]) if regs else -1,
        "spill": spill_st + spill_ld,
        "shared": compiled.metadata.shared,
        "warnings": re.findall(r"(C7\d{3})", log),
    }
    return _COMPILED[key]


def cuda_report(archs) -> str:
    """ptxas -v of csrc/cuda/routed_head_cuda.cu per architecture (needs nvcc and torch's headers)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "CUDA kernels: nvcc not found\n"
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    inc = [f"-I{p}" for p in include_paths()] + [
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{ROOT / 'csrc'}",
    ]
    lines = [
        "",
        "CUDA kernels (nvcc, ptxas -v)",
        "",
        "| arch | kernel | regs | spill B | smem B |",
        "|---|---|---|---|---|",
    ]
    for arch in archs:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                nvcc,
                "-std=c++20",
                "-O3",
                "--expt-relaxed-constexpr",
                "-DWITH_CUDA",
                "-DTORCH_EXTENSION_NAME=_C",
                *inc,
                "-gencode",
                f"arch=compute_{arch},code=sm_{arch}",
                "-Xptxas",
                "-v",
                "-c",
                str(ROOT / "csrc/cuda/routed_head_cuda.cu"),
                "-o",
                f"{tmp}/k.o",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines.append(f"| sm_{arch} | compile failed: {proc.stderr.strip().splitlines()[-1:]} | | | |")
            continue
        name = None
        for line in proc.stderr.splitlines():
            mm = re.search(r"Compiling entry function '(\w+)'", line)
            if mm:
                name = re.sub(r"^_Z\d+", "", mm.group(1))
                name = re.match(r"_?[A-Za-z]\w*?(?=I|P|[a-z]_|$)", name).group(0) if name else name
                spill = 0
                continue
            mm = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if mm:
                spill = int(mm.group(1)) + int(mm.group(2))
            mm = re.search(r"Used (\d+) registers.*?(?:, (\d+) bytes smem)?", line)
            if mm and name:
                smem = re.search(r"(\d+) bytes smem", line)
                lines.append(
                    f"| sm_{arch} | {name} | {mm.group(1)} | {spill} | {smem.group(1) if smem else 0} |"
                )
                name = None
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=800_000)
    ap.add_argument("--c", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--n", type=int, nargs="+", default=[12, 16])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=sorted(ES))
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--kernels", nargs="+", help="only these kernels (names as printed)")
    ap.add_argument("--cuda", action="store_true", help="also report the CUDA kernels (nvcc)")
    ap.add_argument("--fail-on-spill", action="store_true")
    args = ap.parse_args(argv)

    os.environ["TRITON_INTERPRET"] = "0"
    # A fresh cache: ptxas runs (and reports) for every kernel, none is taken from an earlier run.
    cache_dir = tempfile.TemporaryDirectory(prefix="calgan-kernel-report-")
    os.environ["TRITON_CACHE_DIR"] = cache_dir.name
    from calgan_fast.ops import triton_impl

    k = triton_impl._kernels()
    if k.INTERPRET:
        print(
            "kernel_report: triton was imported for the interpreter; run in a fresh process", file=sys.stderr
        )
        return 2
    spills = []
    print(
        "| arch | dtype | c | N | op | kernel | regs | spill B | smem KiB | programs | MB moved | GFLOP | "
        "bound us |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arch in args.arch:
        for dtype in args.dtype:
            for c in args.c:
                for n in args.n:
                    total = {"fwd": [0, 0.0, 0, 0.0], "bwd": [0, 0.0, 0, 0.0]}
                    for ln in launches(k, args.m, c, n, dtype):
                        if args.kernels and ln.name not in args.kernels:
                            continue
                        r = compile_launch(ln, dtype, arch)
                        bound = max(ln.bytes / HBM_BPS, ln.flops / PEAK[dtype]) * 1e6
                        tot = total[ln.op]
                        tot[0] += 1
                        tot[1] += bound
                        tot[2] += ln.bytes
                        tot[3] += ln.flops
                        warn = f" ({','.join(sorted(set(r['warnings'])))})" if r["warnings"] else ""
                        print(
                            f"| sm_{arch} | {dtype} | {c} | {n} | {ln.op} | {ln.name}{warn} | "
                            f"{r['regs']} | {r['spill']} | {r['shared'] / 1024:.1f} | {ln.programs} | "
                            f"{ln.bytes / 1e6:.0f} | "
                            f"{ln.flops / 1e9:.1f} | {bound:.0f} |"
                        )
                        if r["spill"]:
                            spills.append(f"sm_{arch} {dtype} c={c} {ln.name}: {r['spill']} B")
                    mm = args.m
                    mm_bytes = (2 * mm * c + c * c) * 2
                    mm_bound = max(mm_bytes / HBM_BPS, 2 * mm * c * c / PEAK["bf16"]) * 1e6
                    for op, (nl, bound, by, fl) in total.items():
                        print(
                            f"| sm_{arch} | {dtype} | {c} | {n} | {op} | **op call: {nl} launches** "
                            "| | | | | "
                            f"{by / 1e6:.0f} | {fl / 1e9:.1f} | {bound:.0f} (matmul bf16: {mm_bound:.0f}) |"
                        )
    if args.cuda:
        print(cuda_report(args.arch))
    if spills:
        print("\nspills:\n" + "\n".join(spills), file=sys.stderr)
        if args.fail_on_spill:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
