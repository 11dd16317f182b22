"""The benchmark report's interleaved head table: ratios and speed of light from the recorded times."""

from __future__ import annotations

import glob
import os

from tests.utils import load_module

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "report.py")


def _report():
    return load_module("calgan_bench_report", _PATH)


def test_head_interleaved_table():
    bench = {
        "extra_info": {
            "kind": "head_interleaved",
            "shape": "M=16 c=4 N=2",
            "rounds": 3,
            "useful_flops": 3_000_000,
            "matmul_flops": 2_000_000,
            "median_ms": {"torch": 100.0, "cpu": 40.0, "matmul": 20.0},
            "best_ms": {"torch": 90.0, "cpu": 30.0, "matmul": 10.0},
        }
    }
    lines = _report().head_interleaved_table([bench, {"extra_info": {"M": 16}}])
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in lines
        if line.startswith("| ")
    }
    assert rows["cpu"] == ["40.0", "30.0", "2.50", "3.00", "50 %"]  # 3e6 FLOPs in 30 ms against 2e6 in 10 ms
    assert rows["torch"][2:] == ["1.00", "1.00", "17 %"]
    assert rows["matmul"][2:] == ["-", "-", "-"]
    assert _report().head_interleaved_table([{"extra_info": {"M": 16}}]) == []


def test_results_md_is_the_report_of_the_committed_json():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob("benchmarks/results/*.json", root_dir=root))
    assert paths, "no committed benchmark JSON"
    cwd = os.getcwd()
    try:
        os.chdir(root)
        text = _report().render(paths)
    finally:
        os.chdir(cwd)
    with open(os.path.join(root, "benchmarks", "RESULTS.md")) as f:
        committed = f.read()
    assert committed == text, (
        "benchmarks/RESULTS.md differs from `python -m benchmarks.report benchmarks/results/*.json`"
    )
    for word in ("final", "before", "not kept", "T20", "Z;"):
        assert word not in committed
