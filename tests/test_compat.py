"""calgan_fast.compat: the authors'-code-compatible discriminator and losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calgan_fast.compat import OfficialMOD, official_d_losses, official_discriminator_loss, official_gan_loss


def test_state_dict_keys_and_shapes():
    nf, n = 8, 3
    D = OfficialMOD(3, nf, n)
    sd = D.state_dict()
    c = 4 * nf
    convs = {0: (nf, 3, 3, 3), 2: (nf, nf, 4, 4), 5: (2 * nf, nf, 3, 3), 8: (2 * nf, 2 * nf, 4, 4),
             11: (c, 2 * nf, 3, 3), 14: (c, c, 3, 3), 17: (c, c, 3, 3)}
    expected = {f"FE.{i}.weight": s for i, s in convs.items()}
    expected["FE.0.bias"] = (nf,)
    for i, ch in {3: nf, 6: 2 * nf, 9: 2 * nf, 12: c, 15: c, 18: c}.items():
        for k in ("weight", "bias", "running_mean", "running_var"):
            expected[f"FE.{i}.{k}"] = (ch,)
        expected[f"FE.{i}.num_batches_tracked"] = ()
    expected.update({
        "w_gating1": (c, n),
        "orthonet.body.0.weight": (c * n, c), "orthonet.body.0.bias": (c * n,),
        "orthonet.trans.weight": (1, 1, c * n),
        "classifier.0.weight": (nf // 2, c), "classifier.0.bias": (nf // 2,),
        "classifier.2.weight": (1, nf // 2), "classifier.2.bias": (1,),
    })
    for i in range(n):
        for k in ("0.weight", "0.bias", "2.weight", "2.bias"):
            expected[f"classifiers.{i}.{k}"] = tuple(sd[f"classifier.{k}"].shape)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert len(D.FE) == 20
    assert not any(m.bias is not None for i, m in enumerate(D.FE) if isinstance(m, torch.nn.Conv2d) and i > 0)


def test_classifier_is_shared():
    D = OfficialMOD(3, 8, 4)
    assert all(c is D.classifier for c in D.classifiers)
    assert D.classifiers[2][0].weight.data_ptr() == D.classifier[0].weight.data_ptr()
    n_params = sum(p.numel() for p in D.parameters())
    c = 32
    fe = sum(p.numel() for p in D.FE.parameters())
    assert n_params == fe + c * 4 + (c * c * 4 + c * 4) + c * 4 + (c * 4 + 4 + 4 + 1)


def test_forward_matches_hand_computation():
    torch.manual_seed(0)
    D = OfficialMOD(3, 8, 3).eval()
    x = torch.rand(2, 3, 16, 12)
    out, routing, feats, ow = D(x)
    f = D.FE(x).flatten(2).transpose(1, 2)
    assert out.shape == (2, 12, 1) and routing.shape == (2, 12, 3) and len(feats) == 3
    assert feats[0].shape == (2, 12, 32) and ow.shape == (3, 32)
    torch.testing.assert_close(routing, torch.softmax(f @ D.w_gating1, -1))
    t = F.leaky_relu(F.leaky_relu(D.orthonet.body[0](f), 0.2) * D.orthonet.trans.weight, 0.2)
    top = routing.argmax(-1)
    for b in range(2):
        for p in range(12):
            e = int(top[b, p])
            chunk = t[b, p, e * 32:(e + 1) * 32]
            torch.testing.assert_close(out[b, p], D.classifier(chunk))
    # a given routing is used as is
    r = torch.zeros(2, 12, 3)
    r[..., 1] = 1
    out2, routing2, _, _ = D(x, routing=r)
    assert routing2 is r
    torch.testing.assert_close(out2[..., 0], D.classifier(feats[1])[..., 0])
    with pytest.raises(ValueError, match="routing"):
        D(x, routing=r[:, :5])


def test_official_losses_by_hand():
    ow = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # cos = 1/sqrt(2), off-diagonal; mean of squares over 4 entries = 2 * 0.5 / 4
    f0 = torch.tensor([[[1.0, 2.0]]])
    f1 = torch.tensor([[[3.0, 1.0]]])
    routing = torch.tensor([[[0.8, 0.2]]])
    out = official_d_losses(routing, (f0, f1), ow)
    assert out["ortho"].item() == pytest.approx(0.25)
    between = ((f0 * f1) / (3.0 * 4.0 + 1e-5)).mean().item()
    within = f0.var().item() + f1.var().item()
    assert out["lda"].item() == pytest.approx(between + within)
    # switch balance: f = [1, 0], P = [0.8, 0.2]: mean(f*P) = 0.4, * N^2 / hw = 0.4 * 4 / 1
    assert out["balance"].item() == pytest.approx(1.6)
    assert out["total"].item() == pytest.approx(10 * 0.25 + 10 * (between + within) + 0.05 * 1.6)


def test_gan_loss_equals_the_esrgan_model_formulas():
    """calgan_fast's relativistic loss is ESRGANModel's: same values and the same gradients."""
    from calgan_fast.losses import gan_loss

    torch.manual_seed(0)
    base_r, base_f = torch.randn(2, 1, 5, 5), torch.randn(2, 1, 5, 5)
    for for_d in (True, False):
        grads = []
        for fn in (official_gan_loss, lambda r, f, d: gan_loss(r, f, "relativistic", d)):
            r, f = base_r.clone().requires_grad_(True), base_f.clone().requires_grad_(True)
            loss = fn(r, f, for_d)
            loss.backward()
            grads.append((loss.detach(), r.grad, f.grad))
        (lo, gro, gfo), (lc, grc, gfc) = grads
        torch.testing.assert_close(lc, lo)
        torch.testing.assert_close(grc, gro)
        torch.testing.assert_close(gfc, gfo)
        # The opposite pass is detached: G's loss gives the real logits no gradient.
        if not for_d:
            assert grc is None and gro is None


def test_official_discriminator_loss_backward():
    torch.manual_seed(0)
    D = OfficialMOD(3, 8, 3)
    out = official_discriminator_loss(D, torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
    out["total"].backward()
    assert D.orthonet.trans.weight.grad is not None and D.w_gating1.grad is not None


def test_bad_input():
    D = OfficialMOD(3, 8, 3)
    with pytest.raises(ValueError, match="multiples of 4"):
        D(torch.rand(1, 3, 10, 16))
    with pytest.raises(ValueError, match="x"):
        D(torch.rand(1, 4, 16, 16))
