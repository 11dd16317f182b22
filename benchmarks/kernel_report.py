"""Compile report of the GPU kernels of the routed head, made without a GPU.

Compiles every Triton kernel of ``calgan_fast.kernels`` with the launch settings the launchers pick
at the given shapes (default: the paper's, M = 800k rows, c in {256, 512}, N in {12, 16},
hdim = c/8, bf16/fp16/fp32) for sm_80 and sm_90, with Triton's own compiler and ptxas, and prints
per kernel: registers per thread, spill bytes (stores + loads), shared memory, programs per launch.
Per op call it adds the launches, and from the kernels' own tile loops the bytes each kernel moves
through global memory and its FLOPs, giving a roofline lower bound on an H100 (3.35 TB/s,
990 TFLOP/s dense bf16/fp16, 67 TFLOP/s fp32 on FMA units) next to that of one bf16 matmul of
the same shape, ``(M, c) @ (c, c)``.

``--cuda`` adds the ptxas report of the CUDA kernels (``csrc/cuda``), compiled with nvcc, per kernel
and dtype, and the launches of one forward and one backward call of the ``cuda`` backend;
``--cuda-only`` gives that part alone (no Triton needed).

    python -m benchmarks.kernel_report                      # every config, both architectures
    python -m benchmarks.kernel_report --arch 90 --dtype bf16 --c 256 --fail-on-spill

Exit status 1 with ``--fail-on-spill`` when any listed kernel spills. Needs triton (but for
``--cuda-only``); no GPU.
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


_DTYPE_NAMES = {"c10::Half": "fp16", "c10::BFloat16": "bf16", "float": "fp32"}


def _demangle(names: list[str]) -> list[str]:
    """Itanium-demangled names (cu++filt or c++filt); the mangled names where neither is found."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return list(names)
    proc = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return out if proc.returncode == 0 and len(out) == len(names) else list(names)


def _mangled_label(name: str) -> tuple[str, str]:
    """(kernel, dtype) from a mangled name: the last component of its nested name and the scalar
    type of its template arguments."""
    s = name[2:] if name.startswith("_Z") else name
    if s.startswith("N"):
        s = s[1:]
    parts = []
    while s and s[0].isdigit():
        n = int(re.match(r"\d+", s).group(0))
        s = s[len(str(n)):]
        parts.append(s[:n])
        s = s[n:]
    kernel = next((p for p in reversed(parts) if not p.startswith("_GLOBAL__N")), name)
    dtype = ""
    if s.startswith("I"):
        dtype = "bf16" if s.startswith("IN3c108BFloat16") else "fp16" if s.startswith("IN3c104Half") else (
            "fp32" if s.startswith("If") else "")
    return kernel, dtype


def kernel_label(mangled: str, demangled: str) -> tuple[str, str]:
    """(kernel, dtype) of one ptxas entry: from the demangled name when there is one, e.g.
    ``void calgan_fast::dev::_bwd_dy_kernel<c10::Half>(c10::Half const*, ...)`` gives
    ``("_bwd_dy_kernel", "fp16")``; otherwise from the mangled name itself."""
    if demangled == mangled:
        return _mangled_label(mangled)
    depth, cut = 0, len(demangled)
    for k, ch in enumerate(demangled):  # the first "(" outside template brackets ends the name
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = k
            break
    head = demangled[:cut]
    targs = ""
    if head.endswith(">"):
        depth = 0
        for k in range(len(head) - 1, -1, -1):
            depth += head[k] == ">"
            depth -= head[k] == "<"
            if depth == 0:
                targs, head = head[k + 1 : -1], head[:k]
                break
    kernel = head.split("::")[-1].split(" ")[-1]
    return kernel, _DTYPE_NAMES.get(targs.strip(), targs.strip())


def parse_ptxas(log: str) -> list[dict]:
    """One record per entry function of a ``ptxas -v`` log: kernel, dtype, regs, spill bytes
    (stores + loads), stack frame bytes, static shared memory bytes."""
    entries = []
    for line in log.splitlines():
        mm = re.search(r"Compiling entry function '(\w+)'", line)
        if mm:
            entries.append({"mangled": mm.group(1), "regs": -1, "spill": 0, "stack": 0, "smem": 0})
            continue
        if not entries:
            continue
        cur = entries[-1]
        mm = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if mm:
            cur["stack"] = int(mm.group(1))
            cur["spill"] = int(mm.group(2)) + int(mm.group(3))
        mm = re.search(r"Used (\d+) registers", line)
        if mm:
            cur["regs"] = int(mm.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(sm.group(1)) if sm else 0
    for cur, dem in zip(entries, _demangle([e["mangled"] for e in entries])):
        cur["kernel"], cur["dtype"] = kernel_label(cur["mangled"], dem)
    return entries


def cuda_launches(m: int, c: int, n: int, sms: int = H100_SMS) -> list[tuple[str, str, int]]:
    """(op, kernel, CTAs) of one forward and one backward call of the ``cuda`` backend at (M, c, N),
    hdim = c/8, as csrc/cuda/routed_head_launch.h launches them (grids sized by bounds, never by
    the routing)."""
    h = max(1, c // 8)
    tile, group = 64, 64 * 32
    cd = lambda a, b: -(-a // b)  # noqa: E731
    tiles, groups = cd(m, tile) + n, cd(m, group) + n
    blocks = cd(c, tile) ** 2
    slab = max(tile, cd(cd(m, max(1, 4 * sms // blocks)), tile) * tile)
    slabs = cd(m, slab) + n
    nb = cd(m, 256)
    lc = 2 * h + 1
    return [
        ("fwd", "_routing_hist_kernel", nb),
        ("fwd", "_routing_scan_kernel", 1),
        ("fwd", "_routing_place_kernel", nb),
        ("fwd", "_segment_maps_kernel", 2),
        ("fwd", "_routed_head_fwd_kernel", tiles),
        ("fwd", "_routed_head_stats_group_kernel", groups),
        ("fwd", "_routed_head_stats_merge_kernel", n),
        ("bwd", "_segment_maps_kernel", 3),
        ("bwd", "_bwd_prep_kernel", cd(h, 64) * cd(c, 64) * n),
        ("bwd", "_bwd_dy_kernel", tiles),
        ("bwd", "_bwd_dx_kernel", tiles * cd(c, 64)),
        ("bwd", "_bwd_dproj_kernel", slabs * blocks),
        ("bwd", "_bwd_dw1_kernel", slabs * cd(c, 64) * cd(h, 64)),
        ("bwd", "_group_sum_kernel", groups * cd(lc, 128)),
        ("bwd", "_expert_sum_kernel (classifier)", n * cd(lc, 128)),
        ("bwd", "_expert_sum_kernel (dproj)", n * min(cd(c * c, 128), 65535)),
        ("bwd", "_expert_sum_kernel (D)", n * min(cd(h * c, 128), 65535)),
        ("bwd", "_bwd_finish_kernel", cd(h, 64) * cd(c, 64) * n),
    ]


def _bwd_launch_constant() -> int | None:
    text = (ROOT / "csrc/cuda/routed_head_launch.h").read_text()
    mm = re.search(r"kBwdLaunches = (\d+)", text)
    return int(mm.group(1)) if mm else None


def cuda_report(archs, m: int = 800_000, cs=(256, 512), ns=(12, 16)) -> tuple[str, list[str]]:
    """ptxas -v of csrc/cuda/routed_head_cuda.cu per architecture (needs nvcc and torch's headers),
    and the launches of one op call. Returns the Markdown and the list of kernels that spill."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "CUDA kernels: nvcc not found\n", []
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    inc = [f"-I{p}" for p in include_paths()] + [
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{ROOT / 'csrc'}",
    ]
    lines = [
        "",
        "CUDA kernels (nvcc, ptxas -v; smem is static shared memory, the forward adds dynamic memory)",
        "",
        "| arch | kernel | dtype | regs | spill B | stack B | smem B |",
        "|---|---|---|---|---|---|---|",
    ]
    spills = []
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
            lines.append(f"| sm_{arch} | compile failed: {proc.stderr.strip().splitlines()[-1:]} | | | | | |")
            spills.append(f"sm_{arch}: the CUDA kernels did not compile")
            continue
        for r in sorted(parse_ptxas(proc.stderr), key=lambda r: (r["kernel"], r["dtype"])):
            lines.append(
                f"| sm_{arch} | {r['kernel']} | {r['dtype'] or '-'} | {r['regs']} | {r['spill']} "
                f"| {r['stack']} | {r['smem']} |"
            )
            if r["spill"]:
                spills.append(f"sm_{arch} {r['kernel']} {r['dtype']}: {r['spill']} B (CUDA)")
    lines += ["", f"CUDA launches per op call (M = {m}, hdim = c/8, {H100_SMS} SMs)", ""]
    lines += ["| c | N | op | kernel | CTAs |", "|---|---|---|---|---|"]
    for c in cs:
        for n in ns:
            launches_ = cuda_launches(m, c, n)
            for op, name, ctas in launches_:
                lines.append(f"| {c} | {n} | {op} | {name} | {ctas} |")
            for op in ("fwd", "bwd"):
                count = sum(1 for o, _, _ in launches_ if o == op)
                lines.append(f"| {c} | {n} | {op} | **op call: {count} launches** | |")
    const = _bwd_launch_constant()
    bwd = sum(1 for o, _, _ in cuda_launches(m, cs[0], ns[0]) if o == "bwd")
    if const is not None and const != bwd:
        spills.append(f"kernel_report lists {bwd} backward launches, routed_head_launch.h says {const}")
    return "\n".join(lines) + "\n", spills


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=800_000)
    ap.add_argument("--c", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--n", type=int, nargs="+", default=[12, 16])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=sorted(ES))
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--kernels", nargs="+", help="only these kernels (names as printed)")
    ap.add_argument("--cuda", action="store_true", help="also report the CUDA kernels (nvcc)")
    ap.add_argument("--cuda-only", action="store_true", help="report the CUDA kernels only (no Triton)")
    ap.add_argument("--fail-on-spill", action="store_true")
    args = ap.parse_args(argv)

    if args.cuda_only:
        text, spills = cuda_report(args.arch, args.m, args.c, args.n)
        print(text)
        if spills:
            print("\nspills:\n" + "\n".join(spills), file=sys.stderr)
        return 1 if spills and args.fail_on_spill else 0
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
        text, cuda_spills = cuda_report(args.arch, args.m, args.c, args.n)
        print(text)
        spills += cuda_spills
    if spills:
        print("\nspills:\n" + "\n".join(spills), file=sys.stderr)
        if args.fail_on_spill:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
