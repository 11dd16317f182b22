"""Bad input, each case in its own ``calgan`` process: no signal, no traceback, exit status 2 and
one ``calgan: error:`` line that names what was wrong."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from calgan_fast.archs import RRDBNet
from calgan_fast.data import write_image
from calgan_fast.train import train

from .test_train import _photos, _tiny

REPO = Path(__file__).resolve().parents[1]


def _img(h, w, seed):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Folders and files every case below starts from."""
    root = tmp_path_factory.mktemp("bad")
    photos = _photos(root / "photos")
    run = root / "run"
    train(_tiny(photos), run, stop_after=2, progress=False)
    for sub in ("gt", "sr", "gt_small", "sr_small", "sr_dup"):
        (root / sub).mkdir()
    write_image(root / "gt" / "a.png", _img(32, 32, 0))
    write_image(root / "sr" / "a.png", _img(32, 32, 1))
    write_image(root / "gt_small" / "tiny.png", _img(12, 12, 0))
    write_image(root / "sr_small" / "tiny.png", _img(12, 12, 1))
    write_image(root / "sr_dup" / "a.png", _img(32, 32, 1))
    write_image(root / "sr_dup" / "a.jpg", _img(32, 32, 2))
    (root / "corrupt.pth").write_bytes(os.urandom(3000))
    g = RRDBNet(num_feat=4, num_block=1, num_grow_ch=4, scale=4)
    torch.save({"params_ema": g.state_dict(), "network_g": {"type": "RRDBNet", "num_feat": 4, "num_block": 1,
                "num_grow_ch": 4, "scale": 4}}, root / "g.pth")
    write_image(root / "lr.png", _img(8, 8, 3))
    return root, run


def _copy_run(world, tmp_path) -> Path:
    import shutil

    _, run = world
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _edit_config(run: Path, section: str, key: str, value) -> None:
    cfg = yaml.safe_load((run / "config.yml").read_text())
    cfg[section][key] = value
    (run / "config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def _case_resume_other_experts(root, run):
    _edit_config(run, "network_d", "num_experts", 4)
    return ["train", "--resume", "--out", str(run)], {}, ["iter_0000002.pth", "net_d", "shape mismatch"]


def _case_resume_other_width(root, run):
    _edit_config(run, "network_g", "num_feat", 8)
    return ["train", "--resume", "--out", str(run)], {}, ["iter_0000002.pth", "params", "shape mismatch"]


def _case_generator_only_checkpoint(root, run):
    torch.save({"params": RRDBNet(num_feat=4, num_block=1, num_grow_ch=4).state_dict()},
               run / "checkpoints" / "iter_0000003.pth")
    return ["train", "--resume", "--out", str(run)], {}, ["iter_0000003.pth", "'net_d'"]


def _case_random_bytes_checkpoint(root, run):
    ck = run / "checkpoints"
    for p in ck.iterdir():
        p.write_bytes(os.urandom(2000))
    return ["train", "--resume", "--out", str(run)], {}, ["iter_0000002.pth", "cannot read checkpoint"]


def _case_corrupt_model(root, run):
    return (["upscale", str(root / "lr.png"), str(run / "out.png"), "--model", str(root / "corrupt.pth")], {},
            ["corrupt.pth", "cannot read checkpoint"])


def _case_bogus_backend_env(root, run):
    return ["train", "--resume", "--out", str(run)], {"CALGAN_FAST_BACKEND": "bogus"}, None


def _case_eval_scale_zero(root, run):
    return (["eval", "--sr", str(root / "sr"), "--gt", str(root / "gt"), "--scale", "0", "--psnr-only"], {},
            ["scale", "got 0"])


def _case_eval_too_small_for_ssim(root, run):
    return (["eval", "--sr", str(root / "sr_small"), "--gt", str(root / "gt_small"), "--scale", "1",
             "--psnr-only"], {}, ["tiny.png", "SSIM needs at least 11x11"])


def _case_eval_two_sr_files_one_stem(root, run):
    return (["eval", "--sr", str(root / "sr_dup"), "--gt", str(root / "gt"), "--psnr-only"], {},
            ["a.jpg", "a.png", "keep one"])


CASES = {name[6:]: fn for name, fn in globals().items() if name.startswith("_case_")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(world, tmp_path, case):
    root, _ = world
    run = _copy_run(world, tmp_path)
    argv, env, parts = CASES[case](root, run)
    base = {k: v for k, v in os.environ.items() if k != "CALGAN_FAST_BACKEND"}
    env = {**base, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", **env}
    proc = subprocess.run([sys.executable, "-m", "calgan_fast.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    err = proc.stderr
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("calgan: warning:")]
    assert proc.returncode == 2, f"exit status {proc.returncode} (negative: a signal)\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("calgan: error: "), err[-3000:]
    for p in parts or []:
        assert p in lines[0], lines[0]
    if case == "bogus_backend_env":
        assert "CALGAN_FAST_BACKEND" in lines[0] and "'bogus'" in lines[0], lines[0]
