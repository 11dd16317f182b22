"""The routing options: balance modes, the router z-loss, temperature, reviving silent experts, and
the routing-quality benchmark on tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from calgan_fast import CALGANDiscriminator
from calgan_fast.analysis import routing_quality
from calgan_fast.losses import BALANCE_MODES, balancing_loss, discriminator_loss, router_z_loss

ROOT = Path(__file__).resolve().parents[1]


def _net(n=4, nf=4, **kw):
    torch.manual_seed(0)
    return CALGANDiscriminator(num_feat=nf, num_experts=n, **kw)


def test_usage_and_entropy_modes_by_hand():
    # B=1, N=2, 1x2 pixels, both routed to expert 0: f = [1, 0], P = [0.55, 0.45].
    probs = torch.tensor([[0.7, 0.4], [0.3, 0.6]]).view(1, 2, 1, 2)
    expert = torch.tensor([[[0, 0]]])
    assert balancing_loss(probs, expert, "usage").item() == pytest.approx(2 * 0.55)
    h = -(0.55 * math.log(0.55) + 0.45 * math.log(0.45))
    assert balancing_loss(probs, expert, "entropy").item() == pytest.approx(1 - h / math.log(2), abs=1e-6)
    # Even usage and flat router: usage 1, entropy 0; the paper's term is 1 too.
    flat = torch.full((2, 3, 2, 2), 1 / 3)
    even = torch.tensor([[[0, 1], [2, 0]], [[1, 2], [0, 1]]])
    assert balancing_loss(flat, even[:, :, :] % 3, "usage").item() == pytest.approx(1.0, abs=0.02)
    assert balancing_loss(flat, even, "entropy").item() == pytest.approx(0.0, abs=1e-6)
    # mi: H(P) = log 2 (P = [0.55, 0.45] is not even: H < log 2) minus the pixels' mean entropy.
    pix = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3) + 0.4 * math.log(0.4) + 0.6 * math.log(0.6)) / 2
    assert balancing_loss(probs, expert, "mi").item() == pytest.approx(1 - (h - pix) / math.log(2), abs=1e-6)
    certain = torch.eye(3)[even].permute(0, 3, 1, 2)  # one-hot router outputs, even usage
    assert balancing_loss(certain, even, "mi").item() == pytest.approx(0.0, abs=0.05)
    assert balancing_loss(flat, even, "mi").item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="mode"):
        balancing_loss(flat, even, "nope")
    assert set(BALANCE_MODES) == {"paper", "switch", "usage", "entropy", "mi"}


def test_usage_term_rebalances_a_rigged_router_more_than_the_paper_term():
    """On a router rigged to send most pixels to expert 0, a few steps on the usage (or entropy)
    term spread the usage evenly; the same steps on the paper's Eq. 4, which only flattens each
    pixel's router output, leave it less even."""
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    entropy = {}
    for mode in ("start", "usage", "entropy", "mi", "paper"):
        net = _net(n=4).eval()
        with torch.no_grad():
            net.router.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
        opt = torch.optim.SGD(net.router.parameters(), lr=2.0)
        for _ in range(30 if mode != "start" else 0):
            out = net(x, return_aux=True)
            loss = balancing_loss(out.routing.probs, out.routing.expert, mode)
            opt.zero_grad()
            loss.backward()
            opt.step()
        expert = net(x, return_aux=True).routing.expert
        entropy[mode] = routing_quality(expert, 4)["usage_entropy"]
    assert entropy["start"] < 0.3, entropy
    assert entropy["usage"] > 0.9 and entropy["entropy"] > 0.9 and entropy["mi"] > 0.75, entropy
    assert entropy["paper"] < entropy["usage"] - 0.2, entropy


def test_router_z_loss_value_gradient_and_weight():
    logits = torch.tensor([[1.0, 2.0], [0.0, -1.0]]).view(1, 2, 1, 2)
    want = (math.log(math.e + 1) ** 2 + math.log(math.exp(2) + math.exp(-1)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="logits"):
        router_z_loss(logits[0])
    net = _net().train()
    hr, sr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    torch.manual_seed(1)
    base = discriminator_loss(net, hr, sr, {"lambda_z": 0.0})
    torch.manual_seed(1)
    with_z = discriminator_loss(net, hr, sr, {"lambda_z": 0.5})
    assert "z" not in base and with_z["z"].item() > 0
    assert with_z["total"].item() == pytest.approx(base["total"].item() + 0.5 * with_z["z"].item(), rel=1e-5)
    # Its gradient shrinks the router's logits.
    with_z["z"].backward()
    b = net.router.bias
    with torch.no_grad():
        b -= 0.1 * b.grad
    torch.manual_seed(1)
    assert discriminator_loss(net, hr, sr, {"lambda_z": 0.5})["z"].item() < with_z["z"].item()


def test_routing_carries_logits_only_when_routed_here():
    net = _net().train()
    out = net(torch.rand(2, 3, 16, 16), return_aux=True)
    assert out.routing.logits is not None and out.routing.logits.shape == out.routing.probs.shape
    torch.testing.assert_close(out.routing.logits.softmax(1), out.routing.probs)
    assert out.routing.detach().logits is not None
    fake = net(torch.rand(2, 3, 16, 16), routing=out.routing.detach(), return_aux=True)
    assert fake.routing.logits is None


def test_set_tau_changes_the_sampling_temperature():
    net = _net()
    net.set_tau(0.25)
    assert net.config.tau == 0.25
    with pytest.raises(ValueError, match="tau"):
        net.set_tau(0.0)
    # A low temperature samples the argmax expert more often than a high one.
    x = torch.rand(2, 3, 16, 16)
    net.train()
    with torch.no_grad():
        net.router.weight.mul_(20)
        feats = net.feature_map(x)
        logits = net.router(feats)
        agree = {}
        for tau in (0.1, 10.0):
            net.set_tau(tau)
            torch.manual_seed(0)
            agree[tau] = (net.route(logits).expert == logits.argmax(1)).float().mean().item()
    assert agree[0.1] > agree[10.0] + 0.1, agree


def test_revive_gives_a_silent_expert_pixels_and_keeps_the_scores():
    net = _net(n=4).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        net.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -50.0]))  # expert 3 gets no pixel
    before = net(x, return_aux=True)
    usage = torch.tensor(routing_quality(before.routing.expert, 4)["usage"])
    assert usage[3] == 0
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(x).sum().backward()
    opt.step()
    with torch.no_grad():
        net.router.bias[3] = -50.0
    before = net(x, return_aux=True)
    revived = net.revive_experts(usage, optimizer=opt, generator=torch.Generator().manual_seed(0))
    assert revived == [3]
    after = net(x, return_aux=True)
    share = routing_quality(after.routing.expert, 4)["usage"]
    assert share[3] > 0.05, share
    # The revived expert scores the pixels it took over as their former expert did.
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-3, atol=1e-3)
    # Its optimizer state starts afresh.
    assert opt.state[net.w1]["exp_avg"][3].abs().sum() == 0
    assert opt.state[net.w1]["exp_avg"][0].abs().sum() > 0
    # Nothing to do when all are alive, or when all are silent.
    assert net.revive_experts(torch.full((4,), 0.25)) == []
    assert net.revive_experts(torch.zeros(4)) == []
    with pytest.raises(ValueError, match="usage"):
        net.revive_experts(torch.ones(3))


def _load_benchmark():
    return importlib.import_module("benchmarks.routing_quality")


def test_routing_benchmark_runs_and_reports(tmp_path):
    import cv2

    bench = _load_benchmark()
    data = tmp_path / "photos"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        img = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
        cv2.imwrite(str(data / f"img{i}.png"), img)
    out = tmp_path / "out"
    common = ["--data", str(data), "--steps", "4", "--eval-every", "2", "--out", str(out),
              "--set", "num_feat=2", "--set", "num_experts=3", "--set", "crop=16", "--set", "batch=2"]
    assert bench.main([*common, "--setting", "usage", "--set", "revive_every=2", "--set", "tau_end=0.5"]) == 0
    assert bench.main([*common, "--setting", "paper", "--seeds", "0", "1"]) == 0
    result = json.loads((out / "usage_s0.json").read_text())
    assert [r["step"] for r in result["curve"]] == [0, 2, 4]
    assert result["setting"]["balance"] == "usage" and result["setting"]["tau_end"] == 0.5
    row = result["curve"][-1]
    assert 0 <= row["acc_train"] <= 1 and 0 <= row["acc_eval"] <= 1 and 1 <= row["experts_alive"] <= 3
    assert bench.main(["--report", str(out)]) == 0
    text = (out / "README.md").read_text()
    assert "| paper |" in text and "| usage |" in text and "balance=usage" in text
    assert (out / "routing_quality.png").stat().st_size > 0
    assert (out / "routing_tradeoff.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="unknown"):
        bench.main([*common, "--setting", "nope"])
    with pytest.raises(SystemExit, match="unknown option"):
        bench.main([*common, "--set", "lambda_q=1"])


# --------------------------------------------------------------------------------------------
# The routing options in training: read from the config, applied by the shared step


def _train_cfg(d_opt: dict | None = None, **network_d):
    from calgan_fast.train import load_config

    return load_config("quickstart", overrides={
        "datasets": {"train": {"dataroot_gt": "samples"}},
        "network_d": network_d,
        "train": {"total_iter": 5, "d_opt": d_opt or {}},
    })


def _settings(**d_opt):
    from calgan_fast.train.step import GANSettings

    return GANSettings.from_config(_train_cfg(d_opt)["train"])


def test_routing_options_are_read_from_the_config_and_default_to_the_paper():
    from calgan_fast.train import ConfigError, load_config
    from calgan_fast.train.step import GANSettings

    for preset in ("paper", "quickstart"):
        cfg = load_config(preset, overrides={"datasets": {"train": {"dataroot_gt": "samples"}}})
        s = GANSettings.from_config(cfg["train"])
        assert (s.balance, s.lambda_z, s.tau_end, s.revive_every) == ("paper", 0.0, None, 0)
    for mode in BALANCE_MODES:
        assert _settings(balance=mode).balance == mode
    s = _settings(lambda_z=0.01, tau_end=0.5, revive_every=50, revive_threshold=0.02, usage_decay=0.9)
    assert (s.lambda_z, s.tau_end, s.revive_every, s.revive_threshold, s.usage_decay) == (
        0.01, 0.5, 50, 0.02, 0.9)
    assert _settings(tau_end="1e-1").tau_end == 0.1  # YAML's reading of 1e-1
    bad = [({"balance": "avg"}, "train.d_opt.balance"), ({"lambda_z": -1.0}, "train.d_opt.lambda_z"),
           ({"tau_end": 0}, "train.d_opt.tau_end"), ({"revive_every": -1}, "train.d_opt.revive_every"),
           ({"revive_threshold": 1.0}, "train.d_opt.revive_threshold"),
           ({"usage_decay": 1.0}, "train.d_opt.usage_decay")]
    for d_opt, key in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _train_cfg(d_opt)


def test_usage_routing_example_is_the_paper_preset_with_usage_and_tau_half():
    from calgan_fast.train import load_config

    cfg = load_config(None, ROOT / "examples" / "train_paper_usage_routing.yml")
    paths = {"datasets": {"train": {"dataroot_gt": "datasets/DIV2K/DIV2K_train_HR"}},
             "path": {"pretrain_network_g": "experiments/pretrained_models/RRDB_PSNR_x4.pth"}}
    paper = load_config("paper", overrides=paths)
    assert cfg["train"]["d_opt"]["balance"] == "usage" and cfg["network_d"]["tau"] == 0.5
    cfg["train"]["d_opt"]["balance"], cfg["network_d"]["tau"] = "paper", paper["network_d"]["tau"]
    cfg["name"] = paper["name"]
    assert cfg == paper


def test_step_applies_the_balance_mode_and_the_z_loss():
    from calgan_fast.train.step import GANStep

    hr, sr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    net = _net().train()
    for mode in ("paper", "usage", "mi"):
        torch.manual_seed(1)
        d = GANStep(net, _settings(balance=mode)).discriminator_loss(hr, sr)
        r = d["routing"]
        torch.testing.assert_close(d["balance"], balancing_loss(r.probs, r.expert, mode))
    torch.manual_seed(1)
    plain = GANStep(net, _settings()).discriminator_loss(hr, sr)
    torch.manual_seed(1)
    with_z = GANStep(net, _settings(lambda_z=0.5)).discriminator_loss(hr, sr)
    assert "z" not in plain and with_z["z"] > 0
    torch.testing.assert_close(with_z["total"], plain["total"] + 0.5 * with_z["z"])


def test_step_anneals_the_temperature_linearly_over_the_run():
    from calgan_fast.train.step import GANStep

    net = _net(tau=2.0)
    step = GANStep(net, _settings(tau_end=0.5), total_iter=4)
    taus = []
    for i in range(1, 6):
        step.start_iteration(i)
        taus.append(net.config.tau)
    assert taus == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.5])
    fixed = _net(tau=2.0)
    GANStep(fixed, _settings(), total_iter=4).start_iteration(3)
    assert fixed.config.tau == 2.0


def test_step_revives_silent_experts_from_the_usage_average():
    from calgan_fast.train.step import GANStep

    net = _net(n=4).train()
    with torch.no_grad():
        net.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -50.0]))  # expert 3 gets no pixel
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    step = GANStep(net, _settings(revive_every=3, usage_decay=0.5), total_iter=10, seed=0)
    hr, sr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    revived = []
    for i in range(1, 4):
        d = step.discriminator_loss(hr, sr)
        opt.zero_grad()
        d["total"].backward()
        opt.step()
        revived.append(step.end_iteration(i, d, opt))
    assert revived == [[], [], [3]]
    assert step.usage[3] == 0.25  # counted as alive until its own usage says otherwise
    assert net.router.bias[3] > -10  # the router row of a busy expert
    with torch.no_grad():
        share = routing_quality(net.eval()(hr, return_aux=True).routing.expert, 4)["usage"]
    assert share[3] > 0
    # Off: the average is not even kept.
    off = GANStep(net, _settings(), total_iter=10)
    assert off.end_iteration(3, d, opt) == []
    assert torch.equal(off.usage, torch.full((4,), 0.25, dtype=torch.float64))
    # Its state goes into checkpoints.
    other = GANStep(net, _settings(revive_every=3), total_iter=10)
    other.load_state_dict(step.state_dict())
    assert torch.equal(other.usage, step.usage)
    # A state in another dtype or form (as a map_location or another writer gives it) comes back
    # as the float64 CPU average the updates need.
    other.load_state_dict({"usage": step.usage.float().tolist()})
    assert other.usage.dtype == torch.float64 and other.usage.device.type == "cpu"
    assert torch.allclose(other.usage, step.usage, atol=1e-7)
    other.end_iteration(4, d, opt)


def test_trainer_logs_the_options_and_resumes_them_exactly(tmp_path, capsys):
    import warnings

    from calgan_fast.train import train
    from tests.test_train import _log, _photos, _tiny

    torch.set_num_threads(1)
    data = _photos(tmp_path / "data")
    cfg = _tiny(data, pretrain_iter=1, total_iter=5, d_opt={"lambda_d": 0.1, "balance": "usage",
                                                            "lambda_z": 0.01, "tau_end": 0.5,
                                                            "revive_every": 2, "revive_threshold": 0.34,
                                                            "usage_decay": 0.0})
    cfg["logger"]["save_checkpoint_freq"] = 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, tmp_path / "a", progress=False)
        train(cfg, tmp_path / "b", stop_after=3, progress=False)
        train(cfg, tmp_path / "b", resume=True, progress=False)
    assert "iteration 3: revived silent expert(s)" in capsys.readouterr().out
    a = _log(tmp_path / "a")
    assert a == _log(tmp_path / "b")  # the run stopped just after a revival
    phase2 = [x for x in a if x["phase"] == 2]
    assert [x["tau"] for x in phase2] == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5])
    assert all(x["d_z"] > 0 for x in phase2)
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "iter_0000006.pth", weights_only=True)
    assert ckpt["gan_step"]["usage"].shape == (3,)


def test_step_revival_reads_the_argmax_usage_not_the_gumbel_samples():
    """At a high sampling temperature the Gumbel samples spread the pixels over every expert while
    the argmax (eval mode's routing) never picks expert 3: the revival sees it as silent."""
    from calgan_fast.train.step import GANStep

    net = _net(n=4, tau=50.0).train()
    with torch.no_grad():
        net.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -2.0]))
    step = GANStep(net, _settings(revive_every=1, usage_decay=0.0), total_iter=1, seed=0)
    torch.manual_seed(0)
    d = step.discriminator_loss(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
    sampled = d["stats"].count.float() / d["stats"].count.sum()
    assert sampled[3] > 1 / 16  # alive by the samples
    assert step.end_iteration(1, d) == [3]
    assert step.routing_usage(d)["usage"][3] == 0


def test_capacity_routing_caps_each_expert_and_keeps_eval_routing():
    bench = _load_benchmark()
    net = _net(n=4)
    logits = torch.zeros(2, 4, 8, 8)
    logits[:, 0] = 20.0  # a rigged router: every pixel prefers expert 0
    route = bench.capacity_routing(net, 1.25)
    torch.manual_seed(1)
    r = route(logits)
    counts = torch.bincount(r.expert.flatten(), minlength=4)
    cap = math.ceil(1.25 * 128 / 4)
    assert counts.max() <= cap and counts.sum() == 128, counts
    assert counts[0] == cap  # expert 0 keeps as many as it may, the rest move on
    # Gradients still reach the router through the gate of the chosen expert.
    logits.requires_grad_(True)
    route(logits).gate.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    net.eval()
    assert torch.equal(route(logits.detach()).expert, logits.detach().argmax(1))
