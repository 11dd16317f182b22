"""Numerics and edge cases that plain random tests let through: offset data in the ``torch``
backend's backward and in the reference, the backend variable's error, strict metrics JSON, and the
training path's EMA and paired augmentation."""

import json

import numpy as np
import pytest
import torch

import calgan_fast
from calgan_fast.data import PairedFolderDataset, write_image
from calgan_fast.ops import resolve_backend
from calgan_fast.train import train
from calgan_fast.train.evaluate import evaluate_folders, write_results
from calgan_fast.train.inference import EMA

from .test_train import _photos, _tiny

# ---------------------------------------------------------------- offset data


def _offset_inputs(variant: str, m=400, c=4, n=3, h=5):
    """fp64 inputs whose projected rows have a mean far larger than their spread."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, c, generator=g, dtype=torch.float64) + 1e4
    gate = torch.ones(m, dtype=torch.float64)
    proj = torch.randn(n, c, c, generator=g, dtype=torch.float64)
    if variant == "all":
        gate, proj = gate + 1e4, proj + 1e4
    w1, b1 = (
        torch.randn(n, h, c, generator=g, dtype=torch.float64),
        torch.randn(n, h, generator=g, dtype=torch.float64),
    )
    w2, b2 = (
        torch.randn(n, h, generator=g, dtype=torch.float64),
        torch.randn(n, generator=g, dtype=torch.float64),
    )
    expert = torch.randint(0, n, (m,), generator=g)
    return [x, gate, proj], expert, [w1, b1, w2, b2]


def _var_grads(floats, expert, rest, backend):
    leaves = [t.detach().clone().requires_grad_(True) for t in floats]
    out = calgan_fast.routed_head(
        leaves[0], expert, *leaves[1:], *[t.to(leaves[0].dtype) for t in rest], backend=backend
    )
    return [out.var, *torch.autograd.grad(out.var.sum(), leaves)]


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "backend", [b for b in ("torch", "cpu") if b in calgan_fast.available_backends("cpu")]
)
@pytest.mark.parametrize("variant", ["x", "all"])
def test_variance_and_its_gradients_on_offset_inputs(backend, variant):
    """Within a small factor of the floor that rounding the inputs to fp32 alone causes."""
    floats, expert, rest = _offset_inputs(variant)
    oracle = _var_grads(floats, expert, rest, "reference")
    rounded = [t.float().double() for t in floats]
    floor = _var_grads(rounded, expert, [t.float().double() for t in rest], "reference")
    got = _var_grads([t.float() for t in floats], expert, [t.float() for t in rest], backend)
    for name, a, f, b in zip(["var", "dx", "dgate", "dproj"], got, floor, oracle):
        err, err_floor = _rel(a, b), _rel(f, b)
        assert err <= 4 * err_floor + 1e-5, f"{name}: {err:.2e} against a floor of {err_floor:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_accumulates_in_fp64(dtype):
    g = torch.Generator().manual_seed(3)
    m, c, n, h = 300, 8, 3, 4
    x = (torch.randn(m, c, generator=g) * 0.5 + (1e3 if dtype == torch.float32 else 60)).to(dtype)
    args = [
        torch.randint(0, n, (m,), generator=g),
        torch.ones(m, dtype=dtype),
        (torch.randn(n, c, c, generator=g) / c**0.5).to(dtype),
        torch.randn(n, h, c, generator=g).to(dtype),
        torch.randn(n, h, generator=g).to(dtype),
        torch.randn(n, h, generator=g).to(dtype),
        torch.randn(n, generator=g).to(dtype),
    ]
    got = calgan_fast.routed_head_ref(x, *args)
    want = calgan_fast.routed_head_ref(
        x.double(), *[t.double() if t.is_floating_point() else t for t in args]
    )
    for name, a, b in zip(["logits", "count", "mean", "var"], got, want):
        assert a.dtype == (torch.long if name == "count" else torch.float32)
        assert _rel(a, b) <= 1e-6 if name != "count" else torch.equal(a, b), name


# ---------------------------------------------------------------- small ones


def test_backend_variable_is_named_in_its_error(monkeypatch):
    monkeypatch.setenv("CALGAN_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"CALGAN_FAST_BACKEND='bogus'.*unknown backend"):
        resolve_backend("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"unknown backend 'nope'"):
        resolve_backend("nope", torch.device("cpu"))


def _same_image_folders(tmp_path):
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    for sub in ("gt", "sr"):
        (tmp_path / sub).mkdir()
        write_image(tmp_path / sub / "same.png", img)
    return tmp_path / "sr", tmp_path / "gt"


def test_metrics_json_is_strict_json(tmp_path):
    sr, gt = _same_image_folders(tmp_path)
    res = evaluate_folders(sr, gt, scale=4)
    (result,) = res["sets"]["gt"].values()
    assert result["images"][0]["psnr"] == float("inf")
    write_results(res, tmp_path / "out")

    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    data = json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=no_constants)
    (saved,) = data["sets"]["gt"].values()
    assert saved["images"][0]["psnr"] == "inf" and saved["mean"]["psnr"] == "inf"
    assert saved["images"][0]["ssim"] == pytest.approx(1.0)


def test_eval_rejects_a_scale_below_one(tmp_path):
    sr, gt = _same_image_folders(tmp_path)
    with pytest.raises(ValueError, match="scale: must be an integer >= 1, got 0"):
        evaluate_folders(sr, gt, scale=0)


# ---------------------------------------------------------------- training path


def test_ema_update_weights_the_average_not_the_new_parameters():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(11.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, torch.full((2, 3), 2.0))  # 0.9 * 1 + 0.1 * 11
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, torch.full((2, 3), 2.9))  # 0.9 * 2 + 0.1 * 11


def test_trainer_ema_restarts_from_the_pretrained_weights_and_follows_its_decay(tmp_path):
    """With ``ema_decay = 1`` the EMA generator is the pre-trained one at the end of phase 1 (reset
    there, never moved); with 0 it is the trained one."""
    photos = _photos(tmp_path / "photos")
    runs = {}
    for decay in (1.0, 0.0):
        run = tmp_path / f"run{decay}"
        cfg = _tiny(photos, ema_decay=decay)
        cfg["logger"]["keep_checkpoints"] = 5
        train(cfg, run, progress=False)
        runs[decay] = run
    pre = torch.load(runs[1.0] / "checkpoints" / "iter_0000002.pth", weights_only=True)["params"]
    final = torch.load(runs[1.0] / "models" / "net_g_final.pth", weights_only=True)
    for k, v in final["params_ema"].items():
        torch.testing.assert_close(v, pre[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(final["params"][k], pre[k]) for k in pre)
    final = torch.load(runs[0.0] / "models" / "net_g_final.pth", weights_only=True)
    for k, v in final["params_ema"].items():
        torch.testing.assert_close(v, final["params"][k], rtol=0, atol=0, msg=k)


def test_paired_crops_and_augmentations_keep_hr_and_lr_aligned(tmp_path):
    """HR made of 4x4 blocks of the LR pixels: every crop, flip and transpose of a pair must keep
    LR equal to HR's block corners (a transform applied to one of them only breaks it)."""
    (tmp_path / "hr").mkdir()
    (tmp_path / "lr").mkdir()
    lr = (np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)
    write_image(tmp_path / "lr" / "a.png", lr)
    write_image(tmp_path / "hr" / "a.png", np.kron(lr, np.ones((4, 4, 1), np.uint8)))
    ds = PairedFolderDataset(tmp_path / "hr", tmp_path / "lr", scale=4, gt_size=24)
    seen = set()
    for seed in range(24):
        item = ds[(0, seed)]
        gt, lq = item["gt"], item["lq"]
        assert gt.shape == (3, 24, 24) and lq.shape == (3, 6, 6)
        torch.testing.assert_close(gt[:, ::4, ::4], lq, rtol=0, atol=0)
        seen.add(tuple(lq[:, 0, 0].tolist()))
    assert len(seen) > 8  # the crops and views do vary
