"""CALGANDiscriminator: shapes, routing reuse, gumbel vs argmax, eval determinism, bad input."""

from __future__ import annotations

import pytest
import torch

from calgan_fast import CALGANDiscriminator, DiscriminatorOutput, Routing
from calgan_fast.viz import palette, routing_image


def _d(**kw):
    torch.manual_seed(0)
    kw.setdefault("num_feat", 8)
    kw.setdefault("num_experts", 4)
    kw.setdefault("backend", "torch")
    return CALGANDiscriminator(**kw)


@pytest.mark.parametrize("b, h, w, n", [(1, 16, 16, 1), (2, 32, 24, 4), (3, 12, 20, 7)])
def test_shapes(b, h, w, n):
    D = _d(num_experts=n)
    x = torch.rand(b, 3, h, w)
    logits = D(x)
    assert logits.shape == (b, 1, h // 4, w // 4)
    out = D(x, return_aux=True)
    assert isinstance(out, DiscriminatorOutput)
    assert out.routing.expert.shape == (b, h // 4, w // 4) and out.routing.expert.dtype == torch.long
    assert out.routing.gate.shape == (b, h // 4, w // 4)
    assert out.routing.probs.shape == (b, n, h // 4, w // 4)
    assert out.stats.count.shape == (n,) and int(out.stats.count.sum()) == b * (h // 4) * (w // 4)
    assert out.stats.mean.shape == (n, D.channels) and out.stats.var.shape == (n,)


def test_hidden_and_channels():
    D = _d(num_feat=8, hidden=5)
    assert D.channels == 32 and D.hidden == 5 and D.w1.shape == (4, 5, 32)
    assert _d(num_feat=8).hidden == 4  # c / 8


def test_routing_reuse_uses_hr_experts_without_gradient():
    D = _d().train()
    hr, sr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16, requires_grad=True)
    real = D(hr, return_aux=True)
    fake = D(sr, routing=real.routing.detach(), return_aux=True)
    assert torch.equal(fake.routing.expert, real.routing.expert)
    assert torch.all(fake.routing.gate == 1.0)
    assert not fake.routing.gate.requires_grad
    # The fake logits carry no gradient to the router (the routing was given).
    D.zero_grad()
    fake.logits.sum().backward()
    assert D.router.weight.grad is None or torch.all(D.router.weight.grad == 0)
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    # A routing given with grad is detached too.
    fake2 = D(sr, routing=real.routing, return_aux=True)
    assert not fake2.routing.gate.requires_grad


def test_real_pass_gate_carries_router_gradient():
    for mode in ("gumbel", "argmax"):
        D = _d(routing=mode).train()
        out = D(torch.rand(2, 3, 16, 16), return_aux=True)
        assert torch.allclose(out.routing.gate, torch.ones_like(out.routing.gate))
        out.logits.sum().backward()
        assert D.router.weight.grad is not None and D.router.weight.grad.abs().sum() > 0, mode


def test_gumbel_vs_argmax():
    x = torch.rand(2, 3, 32, 32)
    D = _d(routing="argmax", num_experts=8).train()
    e1 = D(x, return_aux=True).routing.expert
    e2 = D(x, return_aux=True).routing.expert
    assert torch.equal(e1, e2)  # argmax: deterministic
    D.config = type(D.config)(**{**D.config.__dict__, "routing": "gumbel"})
    torch.manual_seed(1)
    g1 = D(x, return_aux=True).routing.expert
    torch.manual_seed(2)
    g2 = D(x, return_aux=True).routing.expert
    assert not torch.equal(g1, g2)  # gumbel noise changes the routing


def test_eval_is_deterministic_and_argmax():
    D = _d(routing="gumbel").eval()
    x = torch.rand(2, 3, 16, 16)
    a = D(x, return_aux=True)
    b = D(x, return_aux=True)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.routing.expert, a.routing.probs.argmax(1))


def test_share_classifier():
    D = _d(share_classifier=True, num_experts=5)
    assert D.w1.shape[0] == 1
    proj, w1, *_ = D.head_weights()
    assert w1.shape[0] == 5
    D(torch.rand(1, 3, 16, 16)).sum().backward()
    assert D.w1.grad.shape == D.w1.shape


def test_backends_agree():
    D = _d(num_experts=6).eval()
    x = torch.rand(2, 3, 16, 16)
    ref = D(x)
    D.config = type(D.config)(**{**D.config.__dict__, "backend": "reference"})
    torch.testing.assert_close(D(x), ref, rtol=1e-5, atol=1e-5)


def test_head_init_is_orthogonal():
    from calgan_fast.losses import orthogonal_loss

    D = _d(num_feat=16, num_experts=6)
    assert orthogonal_loss(D.proj) < 0.05  # unit-norm, nearly orthogonal experts


@pytest.mark.parametrize(
    "shape, match",
    [((2, 1, 16, 16), "3 channels"), ((2, 3, 18, 16), "multiples of 4"), ((3, 16, 16), r"\(B, C, H, W\)"),
     ((0, 3, 16, 16), "empty batch")],
)
def test_bad_input(shape, match):
    with pytest.raises(ValueError, match=match):
        _d()(torch.rand(*shape))


def test_bad_routing():
    D = _d()
    r = D(torch.rand(2, 3, 16, 16), return_aux=True).routing
    with pytest.raises(ValueError, match="routing"):
        D(torch.rand(2, 3, 32, 16), routing=r)
    with pytest.raises(TypeError, match="routing"):
        D(torch.rand(2, 3, 16, 16), routing=r.expert)
    with pytest.raises(ValueError, match="routing"):
        _d(num_experts=5)(torch.rand(2, 3, 16, 16), routing=r)


def test_bad_config():
    with pytest.raises(ValueError, match="routing"):
        CALGANDiscriminator(routing="soft")
    with pytest.raises(ValueError, match="num_experts"):
        CALGANDiscriminator(num_experts=0)


def test_routing_image():
    D = _d(num_experts=4).eval()
    r = D(torch.rand(2, 3, 16, 20), return_aux=True).routing
    img = routing_image(r, index=1)
    assert img.shape == (4, 5, 3) and img.dtype.name == "uint8"
    expected = palette(4)[r.expert[1].numpy()]
    assert (img == expected).all()
    colours = palette(24)
    assert len({tuple(c) for c in colours}) == 24  # distinguishable, fixed
    with pytest.raises(IndexError):
        routing_image(r, index=2)
    assert isinstance(r, Routing) and r.num_experts == 4
