"""Each loss against a value computed by hand on a tiny input."""

from __future__ import annotations

import math

import pytest
import torch

from calgan_fast import CALGANDiscriminator, ExpertStats
from calgan_fast.losses import (
    DEFAULT_WEIGHTS,
    PerceptualLoss,
    balancing_loss,
    discriminator_loss,
    distribution_loss,
    gan_loss,
    generator_adversarial_loss,
    orthogonal_loss,
    resolve_weights,
)


def _sp(x):  # softplus
    return math.log1p(math.exp(x))


def test_balancing_paper_by_hand():
    # B=1, N=2, 1x2 pixels: max probs 0.7 and 0.6 -> (N/M) * 1.3 = 2/2 * 1.3
    probs = torch.tensor([[0.7, 0.4], [0.3, 0.6]]).view(1, 2, 1, 2)
    expert = torch.tensor([[[0, 1]]])
    assert balancing_loss(probs, expert, "paper").item() == pytest.approx(1.3)


def test_balancing_switch_by_hand():
    # B=1, N=2, h*w=2: f = [0.5, 0.5], P = [0.55, 0.45]; mean(f*P) = 0.25; * N^2 / (h*w) = 0.5
    probs = torch.tensor([[0.7, 0.4], [0.3, 0.6]]).view(1, 2, 1, 2)
    expert = torch.tensor([[[0, 1]]])
    assert balancing_loss(probs, expert, "switch").item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mode"):
        balancing_loss(probs, expert, "other")
    with pytest.raises(ValueError, match="expert"):
        balancing_loss(probs, expert[:, :, :1], "paper")


def test_orthogonal_by_hand():
    # N=2, c=1: psi = [[a], [b]] -> G = [[a², ab], [ab, b²]]
    proj = torch.tensor([2.0, 3.0]).view(2, 1, 1)
    expected = (4 - 1) ** 2 + 2 * 6**2 + (9 - 1) ** 2
    assert orthogonal_loss(proj).item() == pytest.approx(expected)
    q = torch.linalg.qr(torch.randn(9, 9))[0]  # orthonormal rows -> zero loss
    assert orthogonal_loss(q[:3].reshape(3, 3, 3)).item() == pytest.approx(0, abs=1e-10)


def test_distribution_by_hand():
    # experts 0, 1 used, 2 empty (its mean is ignored even if non-zero)
    mean = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    var = torch.tensor([0.5, 0.25, 0.0])
    count = torch.tensor([3, 2, 0])
    total, btw, wi = distribution_loss(ExpertStats(count, mean, var), return_parts=True)
    assert btw.item() == pytest.approx(0.5)  # cos = 1/sqrt(2)
    assert wi.item() == pytest.approx(0.75)
    assert total.item() == pytest.approx(1.25)


def test_gan_losses_by_hand():
    real = torch.tensor([1.0, 3.0])
    fake = torch.tensor([0.0, -2.0])
    # relativistic D: 0.5·BCE(real - mean(fake)=-1, 1) + 0.5·BCE(fake - mean(real)=2, 0)
    d = 0.5 * sum(_sp(-(r + 1)) for r in (1.0, 3.0)) / 2 + 0.5 * sum(_sp(f - 2) for f in (0.0, -2.0)) / 2
    assert gan_loss(real, fake, "relativistic", True).item() == pytest.approx(d)
    g = 0.5 * sum(_sp(r + 1) for r in (1.0, 3.0)) / 2 + 0.5 * sum(_sp(-(f - 2)) for f in (0.0, -2.0)) / 2
    assert gan_loss(real, fake, "relativistic", False).item() == pytest.approx(g)
    assert gan_loss(real, fake, gan_type="relativistic").item() == pytest.approx(d)
    v = sum(_sp(-r) for r in (1.0, 3.0)) / 2 + sum(_sp(f) for f in (0.0, -2.0)) / 2
    assert gan_loss(real, fake, "vanilla", True).item() == pytest.approx(v)
    want = sum(_sp(-f) for f in (0.0, -2.0)) / 2
    assert gan_loss(real, fake, "vanilla", False).item() == pytest.approx(want)
    with pytest.raises(ValueError, match="gan_type"):
        gan_loss(real, fake, "wgan")


def test_relativistic_gradients_detach_the_opposite_pass():
    # D: d/dr only through BCE(r - mean(f.detach()), 1); G: d/dr is zero (real detached).
    real = torch.tensor([1.0, 3.0], requires_grad=True)
    fake = torch.tensor([0.0, -2.0], requires_grad=True)
    gan_loss(real, fake, "relativistic", True).backward()
    want_r = [0.5 * (torch.sigmoid(torch.tensor(r + 1.0)).item() - 1) / 2 for r in (1.0, 3.0)]
    want_f = [0.5 * torch.sigmoid(torch.tensor(f - 2.0)).item() / 2 for f in (0.0, -2.0)]
    assert real.grad.tolist() == pytest.approx(want_r)
    assert fake.grad.tolist() == pytest.approx(want_f)
    real.grad = fake.grad = None
    gan_loss(real, fake, "relativistic", False).backward()
    assert real.grad is None  # no path from the loss to the real logits
    # G: each fake logit gets -0.5·(σ(r_j + 1) … ) / 2 from mean(f) plus 0.5·(σ(f − 2) − 1) / 2.
    s_real = sum(torch.sigmoid(torch.tensor(r + 1.0)).item() for r in (1.0, 3.0)) / 2
    want_g = [-0.5 * s_real / 2 + 0.5 * (torch.sigmoid(torch.tensor(f - 2.0)).item() - 1) / 2
              for f in (0.0, -2.0)]
    assert fake.grad.tolist() == pytest.approx(want_g)


def test_resolve_weights():
    assert resolve_weights(None) == DEFAULT_WEIGHTS
    assert resolve_weights({"lambda_d": 0.1})["lambda_d"] == 0.1
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_weights({"lambda_dd": 0.1})


def _d():
    torch.manual_seed(0)
    return CALGANDiscriminator(num_feat=8, num_experts=4, backend="torch").train()


def test_discriminator_loss_total_and_order():
    D = _d()
    hr, sr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16, requires_grad=True)
    w = {"lambda_b": 0.5, "lambda_o": 2.0, "lambda_d": 0.1, "lambda_dis": 1.5}
    out = discriminator_loss(D, hr, sr, weights=w)
    terms = {"lambda_b": "balance", "lambda_o": "ortho", "lambda_d": "dist", "lambda_dis": "adv"}
    expected = sum(w[k] * out[terms[k]] for k in w)
    torch.testing.assert_close(out["total"], expected)
    out["total"].backward()
    assert sr.grad is None  # sr is detached
    assert D.proj.grad is not None and D.router.weight.grad is not None
    assert 0 <= out["acc_d_real"] <= 1 and 0 <= out["acc_d_fake"] <= 1
    assert not out["routing"].gate.requires_grad


def test_generator_loss_leaves_d_untouched():
    D = _d()
    hr, sr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16, requires_grad=True)
    loss = generator_adversarial_loss(D, hr, sr)
    loss.backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in D.parameters())
    assert all(p.requires_grad for p in D.parameters())  # restored


def test_perceptual_loss_random_weights_and_file(tmp_path):
    torch.manual_seed(0)
    pl = PerceptualLoss(weights=None, layer_weights={"conv1_2": 0.1, "conv2_2": 1.0})
    x = torch.rand(1, 3, 32, 32)
    assert pl(x, x).item() == 0
    y = torch.rand(1, 3, 32, 32, requires_grad=True)
    loss = pl(y, x)
    loss.backward()
    assert loss.item() > 0 and y.grad is not None
    assert all(not p.requires_grad for p in pl.parameters())
    # A saved state dict (torchvision layout) loads through the real code path.
    from torchvision.models import vgg19

    path = tmp_path / "vgg.pth"
    torch.save(vgg19(weights=None).state_dict(), path)
    pl2 = PerceptualLoss(weights=path, layer_weights={"conv1_2": 1.0})
    ref = vgg19(weights=None)
    ref.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(pl2.features[0].weight, ref.features[0].weight)


def test_perceptual_loss_missing_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        PerceptualLoss(weights=missing)
    with pytest.raises(ValueError, match="layer_weights"):
        PerceptualLoss(weights=None, layer_weights={"conv9_9": 1.0})


def test_shared_real_pass_gives_the_same_losses():
    # With deterministic routing, handing both losses one real pass equals running it in each.
    torch.manual_seed(0)
    D = CALGANDiscriminator(num_feat=8, num_experts=4, routing="argmax", backend="torch").train()
    hr, sr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    real = D(hr, return_aux=True)
    torch.testing.assert_close(generator_adversarial_loss(D, hr, sr, real=real),
                               generator_adversarial_loss(D, hr, sr))
    shared = discriminator_loss(D, hr, sr, real=real)
    own = discriminator_loss(D, hr, sr)
    for k in ("balance", "ortho", "dist", "adv", "total"):
        torch.testing.assert_close(shared[k], own[k])
    shared["total"].backward()
    g_shared = D.proj.grad.clone()
    D.zero_grad()
    own["total"].backward()
    torch.testing.assert_close(g_shared, D.proj.grad)
