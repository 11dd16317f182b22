"""Render pytest-benchmark JSON of ``bench_head.py`` (and ``bench_dstep.py``) as Markdown.

    python -m benchmarks.report head.json [dstep.json ...] [-o benchmarks/RESULTS.md] [--title T]

``benchmarks/RESULTS.md`` is this script's output for the JSON committed under
``benchmarks/results/`` (``python -m benchmarks.report benchmarks/results/*.json -o
benchmarks/RESULTS.md``); a test checks that the two agree. Per file: the command that produced
it, the machine, the versions, and the numbers of that one run.

Per row: median time, achieved GFLOP/s (useful FLOPs, docs/design.md §7), the speed-up over ``reference``
and the fraction of the speed of light — the GFLOP/s of a plain ``(M, c) x (c, c)`` matmul
(forward; forward+backward: its three matmuls) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict


def _median_s(b):
    return b["stats"]["median"]


def head_table(benches: list[dict]) -> list[str]:
    rows = [b for b in benches if b.get("extra_info", {}).get("M") is not None]
    if not rows:
        return []
    groups = defaultdict(dict)
    matmul = {}
    for b in rows:
        e = b["extra_info"]
        if e["backend"] == "matmul":
            matmul[(e["M"], e["c"], e["mode"], e["dtype"])] = e["flops"] / _median_s(b) / 1e9
        else:
            groups[(e["mode"], e["dtype"], e["M"], e["c"], e["N"])][e["backend"]] = b
    out = [
        "| mode | dtype | M | c | N | backend | ms | GFLOP/s | x reference | % of matmul | peak MiB |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    order = ["reference", "torch", "cpu", "triton", "cuda"]
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3], k[4])):
        mode, dtype, m, c, n = key
        ref = groups[key].get("reference")
        sol = matmul.get((m, c, mode, dtype))
        for name in sorted(groups[key], key=lambda s: order.index(s) if s in order else 99):
            b = groups[key][name]
            e = b["extra_info"]
            t = _median_s(b)
            gf = e["useful_flops"] / t / 1e9
            speed = f"{_median_s(ref) / t:.1f}" if ref is not None else "-"
            frac = f"{100 * gf / sol:.0f} %" if sol else "-"
            mem = f"{e['peak_mem_mb']:.0f}" if e.get("peak_mem_mb") is not None else "-"
            out.append(
                f"| {mode} | {dtype} | {m} | {c} | {n} | {name} | {t * 1e3:.2f} | {gf:.1f} | {speed} "
                f"| {frac} | {mem} |"
            )
    if matmul:
        out += [
            "",
            "Speed of light (plain matmul of the same shape, same run):",
            "",
            "| mode | dtype | M | c | GFLOP/s |",
            "|---|---|---:|---:|---:|",
        ]
        for (m, c, mode, dtype), gf in sorted(
            matmul.items(), key=lambda kv: (kv[0][2], kv[0][3], kv[0][0], kv[0][1])
        ):
            out.append(f"| {mode} | {dtype} | {m} | {c} | {gf:.1f} |")
    return out


def dstep_table(benches: list[dict]) -> list[str]:
    rows = [b for b in benches if b.get("extra_info", {}).get("kind") == "dstep"]
    if not rows:
        return []
    base = {}
    for b in rows:
        if b["extra_info"].get("model") == "compat":
            base[b["extra_info"].get("shape")] = _median_s(b)
    out = ["| model | backend | shape | ms | x compat | peak MiB |", "|---|---|---|---:|---:|---:|"]
    for b in sorted(rows, key=lambda b: (b["extra_info"].get("shape"), b["extra_info"].get("model"))):
        e = b["extra_info"]
        t = _median_s(b)
        ref = base.get(e.get("shape"))
        speed = f"{ref / t:.2f}" if ref else "-"
        mem = f"{e['peak_mem_mb']:.0f}" if e.get("peak_mem_mb") is not None else "-"
        out.append(
            f"| {e.get('model')} | {e.get('backend', '-')} | {e.get('shape')} | {t * 1e3:.1f} "
            f"| {speed} | {mem} |"
        )
    return out


def dstep_interleaved_table(benches: list[dict]) -> list[str]:
    rows = [b for b in benches if b.get("extra_info", {}).get("kind") == "dstep_interleaved"]
    out = []
    for b in rows:
        e = b["extra_info"]
        med, best = e.get("median_ms", {}), e.get("best_ms", {})
        base_med, base_best = med.get("official"), best.get("official")
        out += [
            f"Interleaved ({e.get('shape')}, {e.get('rounds')} rounds, every variant once per round):",
            "",
            "| variant | median ms | x compat (medians) | best ms | x compat (best) |",
            "|---|---:|---:|---:|---:|",
        ]
        for v in med:
            name = "compat" if v == "official" else v
            r_med = f"{base_med / med[v]:.2f}" if base_med else "-"
            r_best = f"{base_best / best[v]:.2f}" if base_best else "-"
            out.append(f"| {name} | {med[v]:.1f} | {r_med} | {best[v]:.1f} | {r_best} |")
        out.append("")
    return out[:-1] if out else out


def head_interleaved_table(benches: list[dict]) -> list[str]:
    rows = [b for b in benches if b.get("extra_info", {}).get("kind") == "head_interleaved"]
    out = []
    for b in rows:
        e = b["extra_info"]
        med, best = e.get("median_ms", {}), e.get("best_ms", {})
        mm = best.get("matmul")
        sol = e["matmul_flops"] / mm if mm else None  # matmul FLOPs per ms, best round
        out += [
            f"Interleaved ({e.get('shape')}, {e.get('rounds')} rounds, every variant once per round):",
            "",
            "| variant | median ms | best ms | x torch (medians) | x torch (best) "
            "| % of speed of light (best) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for v in med:
            r_med = f"{med['torch'] / med[v]:.2f}" if "torch" in med and v != "matmul" else "-"
            r_best = f"{best['torch'] / best[v]:.2f}" if "torch" in best and v != "matmul" else "-"
            pct = f"{100 * e['useful_flops'] / best[v] / sol:.0f} %" if sol and v != "matmul" else "-"
            out.append(f"| {v} | {med[v]:.1f} | {best[v]:.1f} | {r_med} | {r_best} | {pct} |")
        out.append("")
    return out[:-1] if out else out


#: The benchmark file behind each test name's prefix.
SUITES = {"test_head": "benchmarks/bench_head.py", "test_dstep": "benchmarks/bench_dstep.py"}

INTRO = [
    "Generated by `python -m benchmarks.report benchmarks/results/*.json -o benchmarks/RESULTS.md`",
    "from the pytest-benchmark JSON under `benchmarks/results/`; edit the JSON by running the",
    "command of its section again, never this file.",
    "",
    "Columns: median time; GFLOP/s of useful FLOPs (`2 M c² + 2 M c hdim` forward, three times that",
    'for forward and backward, docs/design.md §7); "x reference", the speed-up over the dense',
    '`reference` backend; "% of matmul", the GFLOP/s over that of a plain `(M, c) x (c, c)` matmul',
    "of the same run (the speed of light). Interleaved tables time every variant once per round,",
    "round after round, so that a drift of the machine's speed hits them alike. Peak memory is",
    "recorded on CUDA only.",
]


def command_line(path: str, data: dict) -> str:
    """The command that writes ``path``: the benchmark files its tests come from."""
    names = [b.get("name", "") for b in data.get("benchmarks", [])]
    files = sorted({f for prefix, f in SUITES.items() if any(n.startswith(prefix) for n in names)})
    extra = data["benchmarks"][0].get("extra_info", {}) if data.get("benchmarks") else {}
    env = "CALGAN_BENCH_DEVICE=cuda " if extra.get("device") == "cuda" else ""
    return f"{env}python -m pytest {' '.join(files)} --benchmark-json={path}"


def machine_lines(data: dict) -> list[str]:
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {}) or {}
    benches = data.get("benchmarks", [])
    extra = benches[0].get("extra_info", {}) if benches else {}
    commit = (data.get("commit_info", {}) or {}).get("id") or "?"
    return [
        f"- machine: {cpu.get('brand_raw', mi.get('processor', '?'))}, {cpu.get('count', '?')} logical CPUs"
        f"{', ' + extra['gpu'] if extra.get('gpu') else ''}",
        f"- versions: python {mi.get('python_version', '?')}, torch {extra.get('torch', '?')}, "
        f"torch threads {extra.get('threads', '?')}, calgan_fast commit {commit[:12]}",
    ]


def data_section(path: str, data: dict) -> list[str]:
    """The section of a data-loading run (``benchmarks/bench_data.py``'s JSON)."""
    mi, st = data.get("machine", {}), data.get("settings", {})
    size = st.get("size", ["?", "?"])
    lines = [f"## `{path.split('/')[-1]}`", "", f"    python -m benchmarks.bench_data --out {path}", "",
             f"- machine: {mi.get('cpus', '?')} logical CPUs; python {mi.get('python', '?')}, "
             f"torch {mi.get('torch', '?')}",
             f"- {st.get('batches', '?')} batches of {st.get('batch', '?')} crops of {st.get('gt_size', '?')}"
             f"x{st.get('gt_size', '?')} at x{st.get('scale', '?')}, from {st.get('images', '?')} images of "
             f"{size[1]}x{size[0]}", "",
             "| data source | workers | samples/s |", "|---|---:|---:|"]
    lines += [f"| {r['case']} | {r['workers']} | {r['samples_per_s']:.1f} |" for r in data.get("results", [])]
    return lines + [""]


def render(paths: list[str], title: str = "calgan_fast benchmark results") -> str:
    """The Markdown report of the JSON files at ``paths`` (in order)."""
    lines = [f"# {title}", "", *INTRO, ""]
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if "benchmarks" not in data and "results" in data:
            lines += data_section(path, data)
            continue
        benches = data.get("benchmarks", [])
        lines += [f"## `{path.split('/')[-1]}`", "", "    " + command_line(path, data), ""]
        lines += machine_lines(data) + [""]
        for table in (
            head_table(benches),
            head_interleaved_table(benches),
            dstep_table(benches),
            dstep_interleaved_table(benches),
        ):
            if table:
                lines += table + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("-o", "--output")
    ap.add_argument("--title", default="calgan_fast benchmark results")
    args = ap.parse_args(argv)
    text = render(args.json, args.title)
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.output)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
