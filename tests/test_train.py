import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from calgan_fast.archs import RRDBNet
from calgan_fast.data import write_image
from calgan_fast.train import ConfigError, RunFolderError, load_config, train, upscale_tiled
from calgan_fast.train.config import PRESETS

REPO = Path(__file__).resolve().parents[1]


def _photos(folder: Path, n=3, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        rng = np.random.default_rng(i)
        smooth = np.stack([np.sin(xx / (3 + i) + c) * np.cos(yy / (4 + c)) for c in range(3)], 2)
        img = np.clip((smooth * 0.35 + 0.5) * 255 + rng.normal(0, 12, smooth.shape), 0, 255)
        write_image(folder / f"img{i}.png", img.astype(np.uint8))
    return folder


def _tiny(root: Path, **train_over) -> dict:
    """A config small enough to run a handful of iterations in about a second."""
    tr = {"pretrain_iter": 2, "total_iter": 4, "ema_decay": 0.9, "perceptual_opt": {"enabled": False},
          "d_opt": {"lambda_d": 0.1}, "scheduler": {"milestones": [3]}}
    tr.update(train_over)
    return load_config(None, overrides={
        "name": "tiny", "device": "cpu",
        "datasets": {"train": {"dataroot_gt": str(root), "gt_size": 16, "batch_size_per_gpu": 2,
                               "num_worker_per_gpu": 0},
                     "val": {"dataroot_gt": str(root), "max_images": 1}},
        "network_g": {"type": "RRDBNet", "num_feat": 4, "num_block": 1, "num_grow_ch": 4},
        "network_d": {"num_feat": 4, "num_experts": 3},
        "train": tr,
        "logger": {"print_freq": 1, "sample_freq": 3, "save_checkpoint_freq": 2, "keep_checkpoints": 2,
                   "use_tb_logger": False, "chance_warn_iters": 2},
        "val": {"val_freq": 3},
    })


def _log(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    for x in lines:
        x.pop("it_per_s")
    return lines


def test_presets_load():
    q = load_config("quickstart")
    assert q["train"]["d_opt"]["lambda_d"] == 0.1 and q["train"]["d_opt"]["lambda_dis"] == 4.0
    p = load_config("paper")
    assert p["train"]["d_opt"]["lambda_d"] == 10.0 and p["network_d"]["num_experts"] == 12
    assert p["train"]["optim_g"]["lr"] == 1e-4 and p["train"]["scheduler"]["milestones"] == [150000]
    assert p["network_g"] == {"type": "RRDBNet", "num_feat": 64, "num_block": 23, "num_grow_ch": 32}
    assert set(PRESETS) == {"quickstart", "paper"}


def test_config_errors(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("train:\n  optim_g:\n    lr: 1e-3\n  totl_iter: 5\n")
    with pytest.raises(ConfigError,
                       match=r"c\.yml: unknown key train\.totl_iter \(did you mean train\.total_iter\?\)"):
        load_config("quickstart", cfg)
    cfg.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c\.yml: line \d+ invalid YAML"):
        load_config("quickstart", cfg)
    cfg.write_text("network_d:\n  routing: softmax\n")
    with pytest.raises(ConfigError, match=r"network_d\.routing = 'softmax'"):
        load_config("quickstart", cfg)
    with pytest.raises(ConfigError, match="nope.yml: config file not found"):
        load_config(None, tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match="dataroot_gt is not set"):
        load_config(None)
    cfg.write_text("train:\n  total_iter: 1e3\n")
    with pytest.raises(ConfigError, match=r"train\.total_iter = '1e3'; expected an integer"):
        load_config("quickstart", cfg)
    cfg.write_text("datasets:\n  train:\n    use_rot: maybe\n")
    with pytest.raises(ConfigError, match=r"datasets\.train\.use_rot = 'maybe'; expected true or false"):
        load_config("quickstart", cfg)
    cfg.write_text("train:\n  optim_g:\n    lr: 1e-4\n")  # YAML reads 1e-4 as a string
    assert load_config("quickstart", cfg)["train"]["optim_g"]["lr"] == 1e-4
    cfg.write_text("network_g:\n  num_conv: 2\n")  # same type: updated, not replaced
    assert load_config("quickstart", cfg)["network_g"]["num_feat"] == 32


def test_train_writes_run_folder(tmp_path):
    cfg = _tiny(_photos(tmp_path / "data"))
    cfg["logger"]["chance_margin"] = 0.5  # anything short of perfect counts as chance here
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="stayed at chance"):
        last = train(cfg, run, progress=False)
    assert last["iter"] == 6 and last["phase"] == 2
    log = _log(run)
    assert [x["phase"] for x in log] == [1, 1, 2, 2, 2, 2]
    assert {"acc_d_real", "acc_d_fake", "routing_entropy", "expert_usage", "l_gen"} <= set(log[-1])
    assert sum(log[-1]["expert_usage"]) == pytest.approx(1.0)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_0000004.pth", "iter_0000006.pth"]
    assert (run / "samples" / "iter_0000003_sr.png").exists()
    assert (run / "samples" / "iter_0000006_routing.png").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"]["iter"] == 6 and 0 < metrics["final"]["psnr"] < 100
    assert yaml.safe_load((run / "config.yml").read_text()) == cfg
    final = torch.load(run / "models" / "net_g_final.pth", weights_only=True)
    assert final["network_g"]["scale"] == 4 and "params_ema" in final
    # Re-running into the same folder without --resume changes nothing.
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match="already holds a run; add --resume"):
        train(cfg, run, progress=False)
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_resume_equals_uninterrupted(tmp_path):
    data = _photos(tmp_path / "data")
    torch.set_num_threads(1)
    cfg = _tiny(data, pretrain_iter=2, total_iter=5)
    cfg["logger"]["save_checkpoint_freq"] = 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, tmp_path / "a", progress=False)
        train(cfg, tmp_path / "b", stop_after=4, progress=False)  # interrupted in phase 2
        with pytest.raises(RunFolderError, match="holds no checkpoint"):
            train(cfg, tmp_path / "c", resume=True, progress=False)
        train(cfg, tmp_path / "b", resume=True, progress=False)
        # Killed after iteration 5 with its last checkpoint at 4: resuming redoes iteration 5.
        cfg["logger"]["save_checkpoint_freq"] = 2
        train(cfg, tmp_path / "k", stop_after=5, progress=False)
        (tmp_path / "k" / "checkpoints" / "iter_0000005.pth").unlink()
        train(cfg, tmp_path / "k", resume=True, progress=False)
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert _log(tmp_path / "k") == a
    assert len(a) == len(b) == 7
    assert a == b
    ga = torch.load(tmp_path / "a" / "models" / "net_g_final.pth", weights_only=True)
    gb = torch.load(tmp_path / "b" / "models" / "net_g_final.pth", weights_only=True)
    for k in ga["params_ema"]:
        assert torch.equal(ga["params_ema"][k], gb["params_ema"][k]), k


def test_tiled_equals_untiled():
    torch.manual_seed(0)
    g = RRDBNet(num_feat=8, num_block=1, num_grow_ch=4).eval()
    lq = torch.rand(1, 3, 37, 29)
    with torch.no_grad():
        ref = g(lq)
    out = upscale_tiled(g, lq, 4, tile=12, overlap=24)
    assert out.shape == ref.shape == (1, 3, 148, 116)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Too little context differs near the seams: the comparison above can fail.
    rough = upscale_tiled(g, lq, 4, tile=12, overlap=1)
    assert (rough - ref).abs().max() > 1e-4


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_ddp_two_processes_gloo_match_one_process(tmp_path):
    """2 ranks x batch 1 see the same samples as 1 rank x batch 2, so phase 1 must agree."""
    data = _photos(tmp_path / "data")
    cfg = _tiny(data, pretrain_iter=3, total_iter=2)
    one = dict(cfg)
    (tmp_path / "one.yml").write_text(yaml.safe_dump(one))
    two = yaml.safe_load(yaml.safe_dump(cfg))
    two["datasets"]["train"]["batch_size_per_gpu"] = 1
    (tmp_path / "two.yml").write_text(yaml.safe_dump(two))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "calgan_fast.cli", "train", "--config", str(tmp_path / "two.yml"),
           "--out", str(tmp_path / "ddp")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, tmp_path / "single", progress=False)
    a, b = _log(tmp_path / "ddp"), _log(tmp_path / "single")
    assert len(a) == len(b) == 5
    for x, y in zip(a[:3], b[:3]):  # phase 1 (L1 only): the same gradients
        assert x["l_pix"] == pytest.approx(y["l_pix"], rel=1e-4, abs=1e-6)
    assert (tmp_path / "ddp" / "models" / "net_g_final.pth").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CALGAN_FAST_SLOW_TESTS", "0") in ("", "0"),
                    reason="runs the quickstart preset (minutes); set CALGAN_FAST_SLOW_TESTS=1")
def test_quickstart_learns(tmp_path, monkeypatch):
    monkeypatch.setenv("CALGAN_FAST_HOME", str(tmp_path / "home"))
    cfg = load_config("quickstart")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, tmp_path / "run", progress=False)
    log = _log(tmp_path / "run")
    p1 = [x["l_pix"] for x in log if x["phase"] == 1]
    assert np.mean(p1[-10:]) < np.mean(p1[:10])  # L1 goes down (from near bicubic's)
    p2 = [0.5 * (x["acc_d_real"] + x["acc_d_fake"]) for x in log if x["phase"] == 2]
    assert np.mean(p2[-5:]) > 0.75  # well above chance
    run = tmp_path / "run"
    assert list((run / "samples").glob("*_routing.png")) and list((run / "checkpoints").glob("*.pth"))
    assert json.loads((run / "metrics.json").read_text())["final"]["psnr"] > 20
