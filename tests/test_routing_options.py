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
    x = torch.rand(4, 3, 16, 16)
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
    with pytest.raises(SystemExit, match="unknown"):
        bench.main([*common, "--setting", "nope"])
    with pytest.raises(SystemExit, match="unknown option"):
        bench.main([*common, "--set", "lambda_q=1"])
