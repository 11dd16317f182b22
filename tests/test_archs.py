import pytest
import torch

from calgan_fast.archs import (
    EDSR,
    CheckpointError,
    RRDBNet,
    build_generator,
    generator_from_checkpoint,
    load_generator_weights,
)


def _tiny_rrdb(**kw):
    return RRDBNet(num_feat=8, num_block=2, num_grow_ch=4, **kw)


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_rrdbnet_shapes(scale):
    out = _tiny_rrdb(scale=scale)(torch.rand(2, 3, 8, 12))
    assert out.shape == (2, 3, 8 * scale, 12 * scale)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_edsr_shapes(scale):
    out = EDSR(scale=scale, num_feat=8, num_block=2)(torch.rand(1, 3, 5, 7))
    assert out.shape == (1, 3, 5 * scale, 7 * scale)


def test_rrdbnet_basicsr_key_layout():
    keys = set(RRDBNet(num_block=23).state_dict())
    expected = {"conv_first.weight", "conv_body.weight", "conv_up1.weight", "conv_up2.weight",
                "conv_hr.weight", "conv_last.bias", "body.22.rdb3.conv5.weight", "body.0.rdb1.conv1.bias"}
    assert expected <= keys
    assert len(keys) == 2 * (3 + 23 * 3 * 5 + 3)  # weight+bias: first/body/up1, 23x3x5 dense, up2/hr/last
    assert RRDBNet(num_block=23).state_dict()["body.0.rdb1.conv5.weight"].shape == (64, 64 + 4 * 32, 3, 3)
    assert RRDBNet(scale=2).state_dict()["conv_first.weight"].shape == (64, 12, 3, 3)


def test_edsr_sizes():
    base, paper = EDSR.baseline(), EDSR.paper()
    assert sum(p.numel() for p in base.parameters()) == pytest.approx(1.52e6, rel=0.02)
    assert sum(p.numel() for p in paper.parameters()) == pytest.approx(43.1e6, rel=0.02)
    assert paper.body[0].res_scale == 0.1 and len(paper.body) == 32
    assert {"conv_first.weight", "body.15.conv2.weight", "conv_after_body.weight", "upsample.0.weight",
            "upsample.2.weight", "conv_last.weight"} <= set(base.state_dict())


def test_registry():
    assert isinstance(build_generator("RRDBNet", num_block=1, num_feat=8, num_grow_ch=4), RRDBNet)
    assert len(build_generator("EDSR_baseline", scale=2).body) == 16
    with pytest.raises(ValueError, match="unknown generator 'SRResNet'"):
        build_generator("SRResNet")
    with pytest.raises(ValueError, match="unknown option.*num_blocks"):
        build_generator("RRDBNet", num_blocks=3)


@pytest.mark.parametrize("wrapper", [None, "params", "params_ema"])
def test_load_wrapped_checkpoint(tmp_path, wrapper):
    src, dst = _tiny_rrdb(), _tiny_rrdb()
    sd = src.state_dict()
    obj = sd if wrapper is None else {wrapper: sd}
    path = tmp_path / "g.pth"
    torch.save(obj, path)
    load_generator_weights(dst, path)
    x = torch.rand(1, 3, 6, 6)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_params_ema_preferred_and_module_prefix(tmp_path):
    a, b, dst = _tiny_rrdb(), _tiny_rrdb(), _tiny_rrdb()
    obj = {"params": a.state_dict(), "params_ema": {f"module.{k}": v for k, v in b.state_dict().items()}}
    load_generator_weights(dst, obj)
    assert torch.equal(dst.conv_last.weight, b.conv_last.weight)
    load_generator_weights(dst, obj, param_key="params")
    assert torch.equal(dst.conv_last.weight, a.conv_last.weight)


def test_wrong_architecture_is_one_clear_error(tmp_path):
    path = tmp_path / "edsr.pth"
    torch.save({"params": EDSR(num_feat=8, num_block=1).state_dict()}, path)
    dst = _tiny_rrdb()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"edsr\.pth: does not fit RRDBNet.*missing: .*unexpected"):
        load_generator_weights(dst, path)
    wider = tmp_path / "wide.pth"
    torch.save(RRDBNet(num_feat=16, num_block=2, num_grow_ch=4).state_dict(), wider)
    with pytest.raises(CheckpointError, match="shape mismatch: .*conv_first.weight"):
        load_generator_weights(dst, wider)
    for k, v in dst.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k])


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth: cannot read checkpoint"):
        load_generator_weights(_tiny_rrdb(), bad)
    with pytest.raises(CheckpointError, match="nope.pth: checkpoint file not found"):
        load_generator_weights(_tiny_rrdb(), tmp_path / "nope.pth")


def test_generator_from_checkpoint(tmp_path):
    g = _tiny_rrdb()
    spec = {"type": "RRDBNet", "num_feat": 8, "num_block": 2, "num_grow_ch": 4}
    torch.save({"params_ema": g.state_dict(), "network_g": spec}, tmp_path / "a.pth")
    torch.save({"params": g.state_dict()}, tmp_path / "b.pth")
    x = torch.rand(1, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(generator_from_checkpoint(tmp_path / "a.pth")(x), g(x))
        torch.testing.assert_close(generator_from_checkpoint(tmp_path / "b.pth", spec)(x), g(x))
    # A file without network_g in BasicSR's RRDB layout is detected from its keys.
    with torch.no_grad():
        torch.testing.assert_close(generator_from_checkpoint(tmp_path / "b.pth")(x), g(x))
    torch.save({"params": {f"g.{k}": v for k, v in g.state_dict().items()}}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"c\.pth: spandrel does not recognise"):
        generator_from_checkpoint(tmp_path / "c.pth")
