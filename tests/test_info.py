import subprocess
import sys

from calgan_fast.info import collect


def test_info_lists_every_backend():
    info = collect()
    names = [row[0] for row in info["backends"]]
    assert names == ["reference", "torch", "triton", "cuda", "cpu"]
    runs = dict((row[0], row[1]) for row in info["backends"])
    assert "cpu" in runs["torch"] and "cpu" in runs["reference"]


def test_info_module_runs():
    out = subprocess.run([sys.executable, "-m", "calgan_fast.info"], capture_output=True, text=True,
                         check=True)
    assert "backend" in out.stdout and "torch" in out.stdout
