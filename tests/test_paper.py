"""The paper's experiments: patch size, baselines, batch size, the paper preset, ablation configs."""

from __future__ import annotations

import importlib.util
import json
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch

from calgan_fast import CALGANDiscriminator
from calgan_fast.compat import OfficialMOD
from calgan_fast.nn import PATCH_SIZES, feature_extractor
from calgan_fast.nn.baselines import (
    UNetDiscriminatorSN,
    VGGStyleDiscriminator,
    build_discriminator,
    plain_discriminator_loss,
    plain_generator_loss,
)
from calgan_fast.train import load_config, train
from calgan_fast.train.config import ConfigError, with_process_batch

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = sorted((ROOT / "examples" / "ablations").glob("*.yml"))
BASELINES = sorted((ROOT / "examples" / "baselines").glob("*.yml"))


# ------------------------------------------------------------------ patch size (Table 5)


@pytest.mark.parametrize("p", PATCH_SIZES)
def test_patch_size_sets_the_feature_map(p):
    torch.manual_seed(0)
    D = CALGANDiscriminator(num_feat=4, num_experts=3, patch_size=p, backend="torch")
    out = D(torch.rand(2, 3, 32, 48), return_aux=True)
    assert out.logits.shape == (2, 1, 32 // p, 48 // p)
    assert out.routing.expert.shape == (2, 32 // p, 48 // p)
    assert int(out.stats.count.sum()) == 2 * (32 // p) * (48 // p)
    strides = [m.stride[0] for m in D.features if isinstance(m, torch.nn.Conv2d)]
    assert 2 ** strides.count(2) == p


def test_patch_size_4_is_the_authors_extractor():
    ours = feature_extractor(3, 8, 4).state_dict()
    theirs = {k[3:]: v for k, v in OfficialMOD(3, 8, 4).state_dict().items() if k.startswith("FE.")}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    # p = 8 and 16 append stages: the authors' modules 0..19 keep their shapes.
    longer = feature_extractor(3, 8, 16).state_dict()
    assert all(longer[k].shape == v.shape for k, v in ours.items())


@pytest.mark.parametrize("p", [0, 3, 6, 32, True])
def test_bad_patch_size(p):
    with pytest.raises(ValueError, match="patch_size"):
        CALGANDiscriminator(patch_size=p)


def test_input_must_be_a_multiple_of_the_patch_size():
    D = CALGANDiscriminator(num_feat=4, num_experts=2, patch_size=8)
    with pytest.raises(ValueError, match="multiples of 8"):
        D(torch.rand(1, 3, 36, 32))


def _config_error(tmp_path, text: str, match: str):
    path = tmp_path / "c.yml"
    path.write_text("datasets:\n  train:\n    dataroot_gt: somewhere\n" + text)
    with pytest.raises(ConfigError, match=match):
        load_config(None, path)


def test_config_errors_name_the_key(tmp_path):
    _config_error(tmp_path, "network_d:\n  patch_size: 3\n", r"network_d\.patch_size = 3")
    _config_error(tmp_path, "network_d:\n  patch_size: 32\n", r"network_d\.patch_size = 32")
    _config_error(tmp_path, "network_d:\n  type: PatchGAN\n", r"network_d\.type = 'PatchGAN'")
    _config_error(
        tmp_path,
        "    gt_size: 72\nnetwork_d:\n  patch_size: 16\n",
        r"gt_size = 72 must be a multiple of 16 \(network_d\.patch_size\)",
    )
    _config_error(
        tmp_path,
        "    gt_size: 64\nnetwork_d:\n  type: VGGStyleDiscriminator\n",
        r"VGGStyleDiscriminator takes 128 or 256",
    )
    _config_error(tmp_path, "    batch_size: 0\n", r"datasets\.train\.batch_size = 0")
    with pytest.raises(ValueError, match=r"network_d\.type = 'PatchGAN'"):
        build_discriminator({"type": "PatchGAN"})


# ------------------------------------------------------------------ batch size


def test_batch_size_is_split_over_the_processes():
    cfg = load_config("paper")
    assert cfg["datasets"]["train"]["batch_size"] == 48
    assert with_process_batch(cfg, 4)["datasets"]["train"]["batch_size_per_gpu"] == 12
    assert with_process_batch(cfg, 1)["datasets"]["train"]["batch_size_per_gpu"] == 48
    with pytest.raises(ConfigError, match=r"datasets\.train\.batch_size = 48 does not divide over 5"):
        with_process_batch(cfg, 5)
    # BasicSR's per-process key, when set, is used as it is.
    cfg["datasets"]["train"]["batch_size_per_gpu"] = 6
    assert with_process_batch(cfg, 5)["datasets"]["train"]["batch_size_per_gpu"] == 6


# ------------------------------------------------------------------ the paper preset


def test_paper_preset_is_the_papers_text():
    cfg = load_config("paper")
    tr, d = cfg["train"], cfg["network_d"]
    assert 4 * d["num_feat"] == 512 and d["num_experts"] == 12 and d["patch_size"] == 4
    assert d["type"] == "CALGANDiscriminator"
    assert (
        cfg["datasets"]["train"]["gt_size"] == 256
        and cfg["datasets"]["train"]["gt_size"] // cfg["scale"] == 64
    )
    assert tr["perceptual_opt"]["enabled"] is True
    assert (
        tr["pixel_opt"]["loss_weight"],
        tr["perceptual_opt"]["loss_weight"],
        tr["gan_opt"]["loss_weight"],
    ) == (0.01, 1.0, 0.005)
    assert tr["gan_opt"]["gan_type"] == "relativistic"
    assert (
        tr["d_opt"]["lambda_b"],
        tr["d_opt"]["lambda_o"],
        tr["d_opt"]["lambda_d"],
        tr["d_opt"]["lambda_dis"],
    ) == (0.05, 10.0, 10.0, 1.0)
    assert (
        tr["optim_g"]["lr"] == 1e-4 and tr["optim_d"]["lr"] == 1e-4 and tr["optim_g"]["betas"] == [0.9, 0.99]
    )
    assert (
        tr["total_iter"] == 300000 and tr["scheduler"]["milestones"] == [150000] and tr["ema_decay"] == 0.999
    )
    assert cfg["network_g"] == {"type": "RRDBNet", "num_feat": 64, "num_block": 23, "num_grow_ch": 32}


def _images(folder: Path, n: int = 3, size: int = 40) -> Path:
    from calgan_fast.data import write_image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        img = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        write_image(folder / f"img{i}.png", img)
    return folder


def _tiny_overrides(root: Path, gt_size: int = 32, **network_d) -> dict:
    return {
        "device": "cpu",
        "num_threads": 1,
        "datasets": {
            "train": {"dataroot_gt": str(root), "gt_size": gt_size, "batch_size": 2, "num_worker_per_gpu": 0},
            "val": {"dataroot_gt": None},
        },
        "network_g": {"type": "RRDBNet", "num_feat": 4, "num_block": 1, "num_grow_ch": 4},
        "network_d": {"num_feat": 4, **network_d},
        "path": {"pretrain_network_g": None},
        "train": {"pretrain_iter": 0, "total_iter": 2, "perceptual_opt": {"enabled": False}},
        "logger": {"print_freq": 1, "sample_freq": 2, "save_checkpoint_freq": 2, "use_tb_logger": False},
    }


def test_required_perceptual_loss_stops_with_where_vgg19_goes(tmp_path, monkeypatch):
    """enabled: true and no VGG19 file: torchvision's download is tried; offline, a clear error."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def offline(url, model_dir=None, **kw):
        calls.append((url, model_dir))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    over = _tiny_overrides(_images(tmp_path / "hr"))
    over["train"]["perceptual_opt"] = {"enabled": True}
    cfg = load_config(None, overrides=over)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            ConfigError,
            match=r"train\.perceptual_opt: VGG19 weights not found: looked for .*"
            r"vgg19-dcbb9e9d\.pth",
        ):
            train(cfg, tmp_path / "run", progress=False)
    assert calls and calls[0][0].endswith("vgg19-dcbb9e9d.pth")
    assert Path(calls[0][1]) == tmp_path / "torch" / "hub" / "checkpoints"


def test_perceptual_download_lands_in_the_torch_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import vgg19

    from calgan_fast.losses import PerceptualLoss, default_vgg19_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    state = vgg19(weights=None).state_dict()

    def fake_download(url, model_dir=None, **kw):  # what torchvision's download leaves behind
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(model_dir) / url.rsplit("/", 1)[1])

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    with pytest.raises(FileNotFoundError):
        PerceptualLoss("imagenet")  # nothing is downloaded unless asked
    loss = PerceptualLoss("imagenet", download=True)
    assert default_vgg19_path().is_file()
    torch.testing.assert_close(loss.features[0].weight, state["features.0.weight"])


# ------------------------------------------------------------------ plain-GAN baselines


def _basicsr_arch():
    if importlib.util.find_spec("basicsr") is None:
        pytest.skip("needs BasicSR")
    from calgan_fast.integrations._torchvision_compat import install_functional_tensor_alias

    install_functional_tensor_alias()
    from basicsr.archs import discriminator_arch

    return discriminator_arch


@pytest.mark.parametrize("size", [128, 256])
def test_vgg_style_loads_basicsr_state_dict(size):
    arch = _basicsr_arch()
    torch.manual_seed(0)
    theirs = arch.VGGStyleDiscriminator(3, 8, input_size=size).eval()
    ours = VGGStyleDiscriminator(3, 8, input_size=size).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_unet_sn_loads_basicsr_state_dict():
    arch = _basicsr_arch()
    torch.manual_seed(0)
    theirs = arch.UNetDiscriminatorSN(3, 8)
    theirs(torch.rand(1, 3, 16, 16))  # one power iteration, so u and v are not their initial values
    theirs.eval()
    ours = UNetDiscriminatorSN(3, 8).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.rand(2, 3, 32, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("D", [lambda: VGGStyleDiscriminator(3, 4), lambda: UNetDiscriminatorSN(3, 4)])
def test_plain_losses_train_only_what_they_should(D):
    torch.manual_seed(0)
    D = D().train()
    hr, sr = torch.rand(2, 3, 128, 128), torch.rand(2, 3, 128, 128, requires_grad=True)
    bns = [m for m in D.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [b.running_mean.clone() for b in bns]
    real = D(hr)
    after_real = [b.running_mean.clone() for b in bns]
    l_g = plain_generator_loss(D, hr, sr, real=real)
    l_g.backward()
    assert sr.grad.abs().sum() > 0 and all(p.grad is None for p in D.parameters())
    d = plain_discriminator_loss(D, hr, sr, real=real)
    assert set(d) == {"adv", "total", "acc_d_real", "acc_d_fake"}
    d["total"].backward()
    assert all(p.grad is not None for p in D.parameters() if p.requires_grad)
    # Real passes move the running statistics, fake passes do not.
    assert all(not torch.equal(a, b) for a, b in zip(before, after_real))
    assert all(torch.equal(a, b.running_mean) for a, b in zip(after_real, bns))


# ------------------------------------------------------------------ ablation configs, one command each


def test_every_table_has_its_configs():
    names = {p.stem for p in ABLATIONS}
    assert {"table3_no_balancing", "table3_no_orthogonality", "table3_no_distribution"} <= names
    assert {f"table4_experts_{n}" for n in (1, 4, 8, 12, 16)} <= names
    assert {f"table5_patch_{p}" for p in (1, 4, 8, 16)} <= names
    assert {p.stem for p in BASELINES} == {"esrgan_vgg", "realesrgan_unet"}


@pytest.mark.parametrize("path", ABLATIONS + BASELINES, ids=lambda p: p.stem)
def test_ablation_config_trains_two_iterations(path, tmp_path, monkeypatch):
    """The file as a user runs it (``calgan train --config FILE``), at tiny sizes."""
    monkeypatch.setenv("CALGAN_FAST_HOME", str(tmp_path / "home"))
    full = load_config(None, path)
    d = full["network_d"]
    assert (
        full["train"]["perceptual_opt"]["enabled"] is True and full["datasets"]["train"]["batch_size"] == 48
    )
    if path.stem.startswith("table3_"):
        key = {"balancing": "lambda_b", "orthogonality": "lambda_o", "distribution": "lambda_d"}[
            path.stem[10:]
        ]
        assert full["train"]["d_opt"][key] == 0
    gt = 128 if d["type"] == "VGGStyleDiscriminator" else 32
    # Tiny sizes; what the file chooses (type, N, p, λ) is kept.
    cfg = load_config(None, path, overrides=_tiny_overrides(_images(tmp_path / "hr", size=gt + 8), gt))
    for key in ("type", "num_experts", "patch_size"):
        assert cfg["network_d"][key] == d[key]
    assert cfg["train"]["d_opt"] == full["train"]["d_opt"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        last = train(cfg, tmp_path / "run", progress=False)
    assert last["iter"] == 2 and all(
        torch.isfinite(torch.tensor(last[k])) for k in ("l_gen", "d_adv", "d_total")
    )
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    if d["type"] != "CALGANDiscriminator" or d["num_experts"] == 1:
        # Plain GAN and the standard GAN configuration: the adversarial loss alone.
        assert last["d_total"] == pytest.approx(last["d_adv"])
    else:
        assert len(last["expert_usage"]) == d["num_experts"]


# ------------------------------------------------------------------ D in eval mode


def _real_and_degraded(k: int, g: torch.Generator, size: int = 32):
    import torch.nn.functional as F

    hr = torch.rand(k, 3, size, size, generator=g) * 0.6 + 0.2 * torch.rand(k, 3, 1, 1, generator=g)
    sr = F.interpolate(F.avg_pool2d(hr, 4), scale_factor=4, mode="bilinear", align_corners=False)
    return hr, sr


def test_fake_and_eval_passes_leave_running_statistics_alone():
    D = CALGANDiscriminator(num_feat=4, num_experts=3, backend="torch").train()
    bns = [m for m in D.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    snap = [(b.running_mean.clone(), b.running_var.clone(), int(b.num_batches_tracked)) for b in bns]
    real = D(torch.rand(2, 3, 16, 16), return_aux=True)
    moved = [(b.running_mean.clone(), b.running_var.clone(), int(b.num_batches_tracked)) for b in bns]
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(snap, moved))
    D(torch.rand(2, 3, 16, 16), routing=real.routing.detach())  # the fake pass
    D.eval()
    D(torch.rand(2, 3, 16, 16))
    for (m, v, n), b in zip(moved, bns):
        assert torch.equal(m, b.running_mean) and torch.equal(v, b.running_var) and n == b.num_batches_tracked
    assert all(not b.training for b in bns)


def test_eval_mode_routes_and_scores_as_training():
    """A small D trained on real vs degraded crops: eval mode gives train mode's argmax routing and
    accuracy on held-out crops. Its running statistics would not (eval_bn="running")."""
    import copy

    from calgan_fast.losses import _accuracy, discriminator_loss
    from calgan_fast.viz import routing_image, routing_map

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        D = CALGANDiscriminator(num_feat=8, num_experts=4, backend="torch")
        opt = torch.optim.Adam(D.parameters(), 1e-3, betas=(0.9, 0.99))
        for _ in range(100):
            hr, sr = _real_and_degraded(8, g)
            d = discriminator_loss(D, hr, sr, {"lambda_d": 0.1})
            opt.zero_grad()
            d["total"].backward()
            opt.step()
        hr, sr = _real_and_degraded(16, g)
        train_mode = copy.deepcopy(D)
        object.__setattr__(train_mode.config, "routing", "argmax")  # train-mode BN, argmax routing
        with torch.no_grad():
            rt = train_mode(hr, return_aux=True)
            acc_train = _accuracy(rt.logits, train_mode(sr, routing=rt.routing), "relativistic")
            D.eval()
            re = D(hr, return_aux=True)
            acc_eval = _accuracy(re.logits, D(sr, routing=re.routing), "relativistic")
            running = copy.deepcopy(D)
            object.__setattr__(running.config, "eval_bn", "running")
            rr = running(hr, return_aux=True)
            acc_running = _accuracy(rr.logits, running(sr, routing=rr.routing), "relativistic")
        assert min(a.item() for a in acc_train) > 0.9  # D has learned
        assert torch.equal(re.routing.expert, rt.routing.expert)
        assert [a.item() for a in acc_eval] == [a.item() for a in acc_train]
        assert sum(a.item() for a in acc_running) / 2 < 0.8  # fixed statistics score fakes differently
        np_map = routing_map(D, hr, index=3)  # the batch scored together, as in training
        assert np_map.shape == (32, 32, 3)
        assert (np_map[::4, ::4] == routing_image(rt.routing, 3)).all()
        assert not D.training
    finally:
        torch.set_num_threads(threads)


def test_calibrate_bn_averages_real_batch_statistics():
    from calgan_fast.nn import calibrate_bn

    D = CALGANDiscriminator(num_feat=4, num_experts=2, backend="torch", eval_bn="running").eval()
    batches = [torch.rand(2, 3, 16, 16) for _ in range(3)]
    calibrate_bn(D, batches)
    first = D.features[1]  # LReLU after the first conv; BN 3 sees conv 2's output
    bn, conv = D.features[3], D.features[2]
    with torch.no_grad():
        means = [conv(first(D.features[0](x))).mean(dim=(0, 2, 3)) for x in batches]
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0))
    assert not D.training
    with pytest.raises(ValueError, match="batches"):
        calibrate_bn(D, [])
