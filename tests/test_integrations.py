"""Integrations: BasicSR (registration, CALGANModel, the example YAML through BasicSR's pipeline)
and the minimal training loop of examples/."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import calgan_fast as cf
from tests.utils import load_module

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_YAML = ROOT / "examples" / "basicsr_calgan.yml"
MINIMAL_LOOP = ROOT / "examples" / "minimal_loop.py"

# Skip only when BasicSR is not installed at all; if it is, the integration must import.
needs_basicsr = pytest.mark.skipif(
    importlib.util.find_spec("basicsr") is None,
    reason='needs BasicSR: pip install --no-build-isolation "calgan_fast[basicsr]"')


def _env() -> dict:
    """Subprocess environment that imports this checkout's sources first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _write_pairs(root: Path, n: int = 3, size: int = 48, scale: int = 4) -> tuple[Path, Path]:
    """``n`` textured HR PNGs and their x4 downscaled LR copies under the same names."""
    import cv2

    hr_dir, lr_dir = root / "hr", root / "lr_x4"
    hr_dir.mkdir(parents=True)
    lr_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        wave = 60 * np.sin(xx / (2.0 + i) + yy / (3.0 + i))[..., None]
        img = np.clip(127 + wave + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        assert cv2.imwrite(str(hr_dir / f"{i:04d}.png"), img)
        small = cv2.resize(img, (size // scale, size // scale), interpolation=cv2.INTER_AREA)
        assert cv2.imwrite(str(lr_dir / f"{i:04d}.png"), small)
    return hr_dir, lr_dir


def _load_example() -> dict:
    with open(EXAMPLE_YAML) as f:
        return yaml.safe_load(f)


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, after: dict, prefix: str = "") -> list[str]:
    return [k for k, v in before.items() if k.startswith(prefix) and v.is_floating_point()
            and not torch.equal(v, after[k])]


# --------------------------------------------------------------------------------------------
# The torchvision alias BasicSR 1.4.2 needs


def test_functional_tensor_alias():
    from calgan_fast.integrations._torchvision_compat import OLD_NAME, install_functional_tensor_alias

    mod = install_functional_tensor_alias()
    assert mod is not None and hasattr(mod, "rgb_to_grayscale")
    assert install_functional_tensor_alias() is mod  # idempotent
    old = importlib.import_module(OLD_NAME)
    img = torch.rand(3, 8, 8)
    gray = old.rgb_to_grayscale(img)
    expect = (0.2989 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
    torch.testing.assert_close(gray, expect, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Registration and options


@needs_basicsr
def test_registration():
    integ = importlib.import_module("calgan_fast.integrations.basicsr")
    from basicsr.archs import build_network
    from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY

    assert ARCH_REGISTRY.get("CALGANFastDiscriminator") is integ.CALGANFastDiscriminator
    assert MODEL_REGISTRY.get("CALGANModel") is integ.CALGANModel
    from basicsr.models.srgan_model import SRGANModel

    assert issubclass(integ.CALGANModel, SRGANModel)
    # Importing again (or reloading) does not trip BasicSR's duplicate-name assertion.
    importlib.reload(integ)
    integ = importlib.import_module("calgan_fast.integrations.basicsr")
    assert MODEL_REGISTRY.get("CALGANModel") is integ.CALGANModel

    net = build_network({"type": "CALGANFastDiscriminator", "num_in_ch": 3, "num_feat": 8, "num_experts": 5})
    assert isinstance(net, cf.CALGANDiscriminator)
    assert net.num_experts == 5 and net.channels == 32
    # Same state_dict as the plain module: checkpoints move between the two.
    plain = cf.CALGANDiscriminator(num_feat=8, num_experts=5)
    plain.load_state_dict(net.state_dict())
    assert net(torch.rand(2, 3, 16, 16)).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="num_in_ch"):
        integ.CALGANFastDiscriminator(in_channels=4, num_in_ch=3)


@needs_basicsr
def test_options_from_yaml_section():
    from calgan_fast.integrations.basicsr import CALGANOptions

    opts = CALGANOptions.from_train_opt(_load_example()["train"])
    assert opts.d_weights() == {"lambda_b": 0.05, "lambda_o": 10.0, "lambda_d": 10.0, "lambda_dis": 1.0,
                                "lambda_z": 0.0}
    assert (opts.gen_weight, opts.balance_mode, opts.gan) == (0.005, "paper", "relativistic")
    assert CALGANOptions.from_train_opt({}) == CALGANOptions()
    with pytest.raises(ValueError, match="calgan_opt: unknown keys"):
        CALGANOptions.from_train_opt({"calgan_opt": {"dist_wieght": 1.0}})
    with pytest.raises(ValueError, match="calgan_opt:gan"):
        CALGANOptions.from_train_opt({"calgan_opt": {"gan": "wgan"}})
    with pytest.raises(ValueError, match="calgan_opt:balance_mode"):
        CALGANOptions.from_train_opt({"calgan_opt": {"balance_mode": "avg"}})
    with pytest.raises(ValueError, match="calgan_opt:ortho_weight"):
        CALGANOptions.from_train_opt({"calgan_opt": {"ortho_weight": -1}})
    with pytest.raises(ValueError, match="calgan_opt:dist_weight"):
        CALGANOptions.from_train_opt({"calgan_opt": {"dist_weight": float("nan")}})
    with pytest.raises(ValueError, match="calgan_opt:tau_end"):
        CALGANOptions.from_train_opt({"calgan_opt": {"tau_end": -1.0}})
    with pytest.raises(ValueError, match="calgan_opt:revive_every"):
        CALGANOptions.from_train_opt({"calgan_opt": {"revive_every": 0.5}})


@needs_basicsr
def test_options_map_to_the_trainers_settings():
    from calgan_fast.integrations.basicsr import CALGANOptions
    from calgan_fast.train import load_config
    from calgan_fast.train.step import GANSettings

    paper = GANSettings.from_config(load_config("paper", overrides={"datasets": {"train": {
        "dataroot_gt": "samples"}}, "path": {"pretrain_network_g": None}})["train"])
    assert CALGANOptions().gan_settings() == paper == GANSettings()
    opts = CALGANOptions(balance_weight=0.3, ortho_weight=2.0, dist_weight=0.1, adv_weight=1.5,
                         balance_mode="switch", gan="vanilla")
    assert opts.gan_settings({"gan_opt": {"loss_weight": 0.1}}) == GANSettings(
        gan_type="vanilla", balance="switch", lambda_b=0.3, lambda_o=2.0, lambda_d=0.1, lambda_dis=1.5,
        lambda_g=0.1)
    routing = CALGANOptions(balance_mode="mi", z_weight=0.01, tau_end=0.5, revive_every=100,
                            revive_threshold=0.02, usage_decay=0.9).gan_settings()
    assert routing == GANSettings(balance="mi", lambda_z=0.01, tau_end=0.5, revive_every=100,
                                  revive_threshold=0.02, usage_decay=0.9)


@needs_basicsr
def test_calgan_model_applies_the_routing_options(tmp_path):
    importlib.import_module("calgan_fast.integrations.basicsr")
    from basicsr.models import build_model

    opts = {"balance_mode": "usage", "z_weight": 0.01, "tau_end": 0.5, "revive_every": 2,
            "revive_threshold": 0.5, "usage_decay": 0.0}
    torch.manual_seed(0)
    model = build_model(_model_opt(tmp_path, opts, net_d_init_iters=0, total_iter=3))
    d = model.get_bare_model(model.net_d)
    taus = []
    for it in range(1, 4):
        model.feed_data(_model_batch(it))
        model.optimize_parameters(it)
        taus.append(d.config.tau)
        assert model.get_current_log()["l_d_z"] > 0
    assert taus == pytest.approx([1.0, 0.75, 0.5])
    assert model.gan.settings.balance == "usage" and model.gan.usage.shape == (d.num_experts,)


@needs_basicsr
def test_calgan_model_with_one_expert_has_no_routing_losses(tmp_path):
    importlib.import_module("calgan_fast.integrations.basicsr")
    from basicsr.models import build_model

    opt = _model_opt(tmp_path, {"balance_weight": 0.3, "ortho_weight": 2.0, "dist_weight": 0.1},
                     net_d_init_iters=0)
    opt["network_d"]["num_experts"] = 1
    torch.manual_seed(0)
    model = build_model(opt)
    s = model.gan.settings
    assert (s.lambda_b, s.lambda_o, s.lambda_d, s.lambda_z) == (0, 0, 0, 0) and s.lambda_dis > 0
    model.feed_data(_model_batch(1))
    model.optimize_parameters(1)
    log = model.get_current_log()
    assert log["l_d_total"] == pytest.approx(s.lambda_dis * log["l_d_adv"], rel=1e-5)


@needs_basicsr
def test_calgan_model_training_state_keeps_the_usage_average(tmp_path):
    importlib.import_module("calgan_fast.integrations.basicsr")
    from basicsr.models import build_model

    opts = {"balance_mode": "usage", "revive_every": 100, "usage_decay": 0.5}
    torch.manual_seed(0)
    model = build_model(_model_opt(tmp_path, opts, net_d_init_iters=0))
    for it in range(1, 3):
        model.feed_data(_model_batch(it))
        model.optimize_parameters(it)
    usage = model.gan.usage.clone()
    assert not torch.allclose(usage, torch.full_like(usage, 1 / len(usage)))
    states = Path(model.opt["path"]["training_states"])
    states.mkdir(parents=True)
    model.save_training_state(epoch=0, current_iter=2)
    assert sorted(p.name for p in states.iterdir()) == ["2.state"]  # nothing else for BasicSR to parse
    state = torch.load(states / "2.state", weights_only=True)
    assert state["iter"] == 2 and len(state["optimizers"]) == 2
    assert torch.equal(state["calgan"]["usage"], usage)

    torch.manual_seed(1)
    resumed = build_model(_model_opt(tmp_path, opts, net_d_init_iters=0))
    resumed.resume_training(state)
    assert torch.equal(resumed.gan.usage, usage)
    # A state written by BasicSR's own models (no "calgan") still resumes, from even usage.
    resumed = build_model(_model_opt(tmp_path, opts, net_d_init_iters=0))
    resumed.resume_training({k: v for k, v in state.items() if k != "calgan"})
    assert torch.allclose(resumed.gan.usage, torch.full_like(usage, 1 / len(usage)))


# --------------------------------------------------------------------------------------------
# CALGANModel through BasicSR's model API


def _model_opt(tmp_path: Path, calgan_opt: dict | None = None, **train_overrides) -> dict:
    """The example YAML as BasicSR's parse_options would hand it to a model, on CPU."""
    opt = _load_example()
    opt.update(dist=False, rank=0, world_size=1, is_train=True, auto_resume=False, root_path=str(tmp_path))
    exp = tmp_path / "experiments" / opt["name"]
    opt["path"].update(experiments_root=str(exp), models=str(exp / "models"),
                       training_states=str(exp / "training_states"), log=str(exp),
                       visualization=str(exp / "visualization"))
    if calgan_opt is not None:
        opt["train"]["calgan_opt"] = calgan_opt
    opt["train"].update(train_overrides)
    return opt


def _model_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(2, 3, 32, 32, generator=g)
    lq = torch.nn.functional.interpolate(gt, scale_factor=0.25, mode="area")
    return {"lq": lq, "gt": gt}


@needs_basicsr
def test_calgan_model_steps(tmp_path):
    importlib.import_module("calgan_fast.integrations.basicsr")
    from basicsr.models import build_model

    # Non-default weights: the logged total must be the weighted sum with exactly these.
    weights = {"balance_weight": 0.3, "ortho_weight": 2.0, "dist_weight": 0.1, "adv_weight": 1.5}
    opt = _model_opt(tmp_path, {**weights, "gen_weight": 0.02, "balance_mode": "switch", "gan": "vanilla"})
    torch.manual_seed(0)
    model = build_model(opt)
    assert type(model).__name__ == "CALGANModel"
    assert model.gen_weight == 0.02 and model.calgan_opt.gan == "vanilla"
    g0, d0 = _state(model.net_g), _state(model.net_d)
    for it in range(1, 4):
        model.feed_data(_model_batch(it))
        model.optimize_parameters(it)
        log = model.get_current_log()
        for key in ("l_g_pix", "l_g_gan", "l_d_total", "l_d_adv", "l_d_balance", "l_d_ortho", "l_d_dist",
                    "acc_d_real", "acc_d_fake", "d_experts_used"):
            assert key in log and math.isfinite(log[key]), (key, log)
        total = (weights["balance_weight"] * log["l_d_balance"] + weights["ortho_weight"] * log["l_d_ortho"]
                 + weights["dist_weight"] * log["l_d_dist"] + weights["adv_weight"] * log["l_d_adv"])
        assert log["l_d_total"] == pytest.approx(total, rel=1e-5)
        assert 0.0 <= log["acc_d_real"] <= 1.0 and 1 <= log["d_experts_used"] <= 12
    assert _changed(g0, _state(model.net_g)), "generator parameters did not change"
    d1 = _state(model.net_d)
    for part in ("features.", "router.", "proj", "w1", "b1", "w2", "b2"):
        assert _changed(d0, d1, part), f"discriminator parameters {part}* did not change"
    # D's parameters are trainable again after the G step froze them.
    assert all(p.requires_grad for p in model.net_d.parameters())


@needs_basicsr
def test_calgan_model_generator_loss_uses_hr_routing(tmp_path, monkeypatch):
    """The G step scores SR with the experts of HR: D's second call gets the first call's routing."""
    integ = importlib.import_module("calgan_fast.integrations.basicsr")
    from basicsr.models import build_model

    torch.manual_seed(0)
    model = build_model(_model_opt(tmp_path, {}, net_d_init_iters=0))
    assert model.gen_weight == 0.005  # neither calgan_opt.gen_weight nor gan_opt: the paper's λ_g
    calls = []
    forward = type(model.net_d).forward

    def spy(self, x, routing=None, return_aux=False):
        out = forward(self, x, routing=routing, return_aux=True)
        calls.append((x, routing, out.routing))
        return out if return_aux else out.logits

    monkeypatch.setattr(integ.CALGANFastDiscriminator, "forward", spy)
    model.feed_data(_model_batch())
    model.optimize_parameters(1)
    # G step: hr (own routing), sr (hr's); D step: hr (own routing), sr (hr's).
    assert len(calls) == 4
    (x0, r0, out0), (x1, r1, _), (x2, r2, out2), (x3, r3, _) = calls
    assert r0 is None and r2 is None
    assert torch.equal(x0, model.gt) and torch.equal(x2, model.gt)
    assert torch.equal(r1.expert, out0.expert) and torch.equal(r3.expert, out2.expert)
    assert x1.requires_grad and not x3.requires_grad  # G's loss reaches sr; D's step detaches it


@needs_basicsr
def test_calgan_model_gen_weight_from_gan_opt_and_wrong_d(tmp_path):
    importlib.import_module("calgan_fast.integrations.basicsr")
    from basicsr.models import build_model

    gan_opt = {"type": "GANLoss", "gan_type": "vanilla", "real_label_val": 1.0, "fake_label_val": 0.0,
               "loss_weight": 0.1}
    model = build_model(_model_opt(tmp_path, {}, gan_opt=gan_opt))
    assert model.gen_weight == pytest.approx(0.1)
    model = build_model(_model_opt(tmp_path, {"gen_weight": 0.25}, gan_opt=gan_opt))
    assert model.gen_weight == pytest.approx(0.25)  # calgan_opt wins over gan_opt
    opt = _model_opt(tmp_path, {})
    opt["network_d"] = {"type": "VGGStyleDiscriminator", "num_in_ch": 3, "num_feat": 8, "input_size": 128}
    with pytest.raises(TypeError, match="network_d"):
        build_model(opt)


# --------------------------------------------------------------------------------------------
# The example YAML through BasicSR's own train_pipeline, as a user runs it


@needs_basicsr
@pytest.mark.slow
def test_basicsr_example_yaml_trains_three_iterations(tmp_path):
    integ = importlib.import_module("calgan_fast.integrations.basicsr")
    from basicsr.archs import build_network

    hr_dir, lr_dir = _write_pairs(tmp_path / "data")
    opt = _load_example()
    assert opt["model_type"] == "CALGANModel" and opt["network_d"]["type"] == integ.ARCH_NAME
    assert opt["num_gpu"] == 0
    # Known starting weights, so the test can tell that training changed them.
    torch.manual_seed(0)
    net_g, net_d = build_network(opt["network_g"]), build_network(opt["network_d"])
    g0, d0 = _state(net_g), _state(net_d)
    torch.save({"params": g0, "params_ema": g0}, tmp_path / "g0.pth")
    torch.save({"params": d0}, tmp_path / "d0.pth")

    overrides = [
        f"datasets:train:dataroot_gt={hr_dir}", f"datasets:train:dataroot_lq={lr_dir}",
        f"datasets:val:dataroot_gt={hr_dir}", f"datasets:val:dataroot_lq={lr_dir}",
        f"path:pretrain_network_g={tmp_path / 'g0.pth'}", f"path:pretrain_network_d={tmp_path / 'd0.pth'}",
        "train:total_iter=3", "logger:print_freq=1",
    ]
    cmd = [sys.executable, "-m", "calgan_fast.integrations.basicsr", "-opt", str(EXAMPLE_YAML),
           "--force_yml", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    exp = tmp_path / "experiments" / opt["name"]
    logs = list(exp.glob("train_*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    iters = re.findall(r"iter:\s+(\d+), lr:.*?\](.*)", text)
    assert [int(i) for i, _ in iters] == [1, 2, 3], text[-2000:]
    for _, values in iters:
        found = dict(re.findall(r"(\w+): (\S+)", values))
        for key in ("l_g_pix", "l_g_gan", "l_d_total", "l_d_adv", "l_d_balance", "l_d_ortho", "l_d_dist"):
            assert key in found and math.isfinite(float(found[key])), (key, values)
    assert "Validation example_val" in text and "# psnr:" in text

    g1 = torch.load(exp / "models" / "net_g_latest.pth", map_location="cpu", weights_only=True)
    d1 = torch.load(exp / "models" / "net_d_latest.pth", map_location="cpu", weights_only=True)["params"]
    assert set(d1) == set(d0)
    assert _changed(g0, g1["params"]), "generator parameters did not change"
    assert _changed(d0, d1, "proj") and _changed(d0, d1, "features."), \
        "discriminator parameters did not change"
    assert all(torch.isfinite(v).all() for v in d1.values() if v.is_floating_point())


@needs_basicsr
def test_main_passes_argv_to_basicsr_and_restores_it(tmp_path):
    integ = importlib.import_module("calgan_fast.integrations.basicsr")
    saved = list(sys.argv)
    missing = tmp_path / "missing.yml"
    # BasicSR parses the given argv: it tries to open the named YAML.
    with pytest.raises(FileNotFoundError, match="missing.yml"):
        integ.main(["-opt", str(missing)], root_path=tmp_path)
    assert sys.argv == saved


# --------------------------------------------------------------------------------------------
# examples/minimal_loop.py


def _minimal_loop():
    return load_module("calgan_minimal_loop", MINIMAL_LOOP)


def test_minimal_loop_is_small_and_public():
    src = MINIMAL_LOOP.read_text()
    assert len(src.splitlines()) < 80
    # Public API only: nothing from calgan_fast's private modules or its ops internals.
    assert not re.search(r"calgan_fast\.(_|ops|nn|reference|kernels)", src)
    assert re.findall(r"^(?:import|from) calgan_fast\S*", src, flags=re.M) == ["import calgan_fast"]


def test_minimal_loop_trains():
    loop = _minimal_loop()
    g0, d0, hist0 = loop.main(steps=0, batch_size=2, size=32, experts=5, log_every=0)
    assert hist0 == []
    g, d, hist = loop.main(steps=3, batch_size=2, size=32, experts=5, log_every=0)
    assert len(hist) == 3
    for row in hist:
        assert all(math.isfinite(v) for v in row.values()), row
        assert 0.0 <= row["acc_d_real"] <= 1.0
    # Same seed, same start: the three steps moved both networks.
    assert _changed(_state(g0), _state(g)), "generator parameters did not change"
    for part in ("features.", "router.", "proj", "w1", "w2"):
        assert _changed(_state(d0), _state(d), part), f"discriminator parameters {part}* did not change"
    # And training is reproducible from the seed.
    _, d_again, hist_again = loop.main(steps=3, batch_size=2, size=32, experts=5, log_every=0)
    assert len(hist_again) == len(hist)
    for again, first in zip(hist_again, hist):
        assert again == pytest.approx(first)


@pytest.mark.slow
def test_minimal_loop_command_line():
    cmd = [sys.executable, str(MINIMAL_LOOP), "--steps", "2", "--size", "32", "--batch-size", "2",
           "--experts", "3", "--log-every", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert [ln.split(":")[0] for ln in lines] == ["step 1", "step 2"]
    assert "nan" not in proc.stdout and "inf" not in proc.stdout


def test_example_yaml_has_the_keys_the_test_overrides():
    """The example YAML holds every key the tests override (BasicSR's --force_yml cannot add keys)."""
    opt = _load_example()
    for path in ("datasets:train:dataroot_gt", "datasets:train:dataroot_lq", "datasets:val:dataroot_gt",
                 "datasets:val:dataroot_lq", "path:pretrain_network_g", "path:pretrain_network_d",
                 "train:total_iter", "logger:print_freq"):
        node = copy.deepcopy(opt)
        for key in path.split(":"):
            assert key in node, path
            node = node[key]


def test_compat_recipe_of_the_docs():
    """The authors'-code recipe shown in the docs: one G and one D step with OfficialMOD."""
    from calgan_fast import compat

    torch.manual_seed(0)
    D = compat.OfficialMOD(3, 8, 4)
    hr = torch.rand(2, 3, 16, 16)
    sr = torch.rand(2, 3, 16, 16, requires_grad=True)
    D.requires_grad_(False)
    with torch.no_grad():
        real_out, routing, _, _ = D(hr)
    fake_out, _, _, _ = D(sr, routing=routing)
    l_g_gan = compat.official_gan_loss(real_out, fake_out, for_discriminator=False)
    D.requires_grad_(True)
    l_g_gan.backward()
    assert sr.grad is not None and torch.isfinite(sr.grad).all() and sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in D.parameters())
    d = compat.official_discriminator_loss(D, hr, sr.detach())
    d["total"].backward()
    assert math.isfinite(d["total"].item())
    assert D.w_gating1.grad is not None and D.orthonet.trans.weight.grad.abs().sum() > 0
