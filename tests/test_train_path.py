"""One tiny run checked against what its config says: the discriminator's weighted loss, its
scheduler, and validation of the EMA generator."""

import json

import pytest
import torch

from calgan_fast.archs import generator_from_checkpoint
from calgan_fast.data import HRFolderDataset, tensor2img
from calgan_fast.metrics import psnr
from calgan_fast.train import train

from .test_train import _log, _photos, _tiny

LAMBDAS = {"lambda_b": 0.3, "lambda_o": 2.0, "lambda_d": 0.1, "lambda_dis": 0.7}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("path")
    photos = _photos(root / "photos")
    # ema_decay 1: the EMA generator stays the pre-trained one and differs from the trained one.
    cfg = _tiny(photos, ema_decay=1.0, d_opt=LAMBDAS)
    train(cfg, root / "run", progress=False)
    return root / "run", photos, cfg


def test_discriminator_total_is_the_configured_weighted_sum(run):
    path, _, _ = run
    lines = [x for x in _log(path) if x["phase"] == 2]
    assert lines
    for x in lines:
        want = (
            LAMBDAS["lambda_b"] * x["d_balance"]
            + LAMBDAS["lambda_o"] * x["d_ortho"]
            + LAMBDAS["lambda_d"] * x["d_dist"]
            + LAMBDAS["lambda_dis"] * x["d_adv"]
        )
        assert x["d_total"] == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_discriminator_scheduler_steps_once_per_iteration(run):
    path, _, cfg = run
    st = torch.load(path / "checkpoints" / "iter_0000006.pth", weights_only=True)
    d_steps = cfg["train"]["total_iter"]
    assert st["sched_d"]["last_epoch"] == d_steps
    lr = float(cfg["train"]["optim_d"]["lr"])
    decays = sum(m <= d_steps for m in cfg["train"]["scheduler"]["milestones"])
    assert decays >= 1
    assert st["opt_d"]["param_groups"][0]["lr"] == pytest.approx(
        lr * cfg["train"]["scheduler"]["gamma"] ** decays
    )


def test_validation_measures_the_ema_generator(run):
    path, photos, cfg = run
    metrics = json.loads((path / "metrics.json").read_text())["final"]
    model = generator_from_checkpoint(path / "models" / "net_g_final.pth")  # params_ema
    item = HRFolderDataset(photos, scale=4, gt_size=None, use_hflip=False, use_rot=False)[0]
    with torch.no_grad():
        sr = model(item["lq"][None])[0]
    want = psnr(tensor2img(sr), tensor2img(item["gt"]), 4, True)
    assert metrics["psnr"] == pytest.approx(want, abs=1e-6)
