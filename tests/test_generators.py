"""Generators through the one registry: the project's RRDBNet/EDSR, SwinIR's sizes, spandrel's
architectures; training them with ``calgan train``, and files that spandrel detects."""

import pytest
import torch
import yaml

from calgan_fast.archs import (
    CheckpointError,
    RRDBNet,
    build_generator,
    generator_names,
    load_generator,
    training_generator,
)
from calgan_fast.cli import main
from calgan_fast.data import imresize, read_image, write_image
from calgan_fast.train import ConfigError, load_config
from tests.test_train import REPO, _photos, _tiny

spandrel = pytest.importorskip("spandrel")

#: One small configuration per kind of generator. RRDBNet keeps ESRGAN's growth of 32 channels,
#: the only one spandrel's ESRGAN reads.
TINY = {
    "RRDBNet": {"type": "RRDBNet", "num_feat": 4, "num_block": 1, "num_grow_ch": 32},
    "EDSR": {"type": "EDSR", "num_feat": 4, "num_block": 1},
    "SwinIR_tiny": {"type": "SwinIR_tiny"},
    "SPAN": {"type": "SPAN", "feature_channels": 4},
}


def _config(tmp_path, network_g=None, pretrain=None, scale=4):
    cfg = _tiny(_photos(tmp_path / "data", n=2, size=32), pretrain_iter=1, total_iter=1)
    cfg["logger"]["save_checkpoint_freq"] = 2
    cfg["scale"] = scale
    if network_g is not None:
        cfg["network_g"] = dict(network_g)
    cfg["path"]["pretrain_network_g"] = None if pretrain is None else str(pretrain)
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _detected_by_spandrel(path):
    return spandrel.ModelLoader().load_from_file(str(path))


@pytest.mark.parametrize("name", list(TINY))
def test_every_generator_trains_two_iterations_and_loads_back(tmp_path, name):
    run = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path, TINY[name])), "--out", str(run)]) == 0
    final = run / "models" / "net_g_final.pth"
    model, spec, scale = load_generator(final)
    assert scale == 4 and spec["scale"] == 4
    with torch.no_grad():
        assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)
    if name == "EDSR":  # spandrel has no EDSR: the project's registry detects it
        assert spec["type"] == "EDSR" and spec["num_feat"] == 4
        with pytest.raises(spandrel.UnsupportedModelError):
            _detected_by_spandrel(final)
    else:
        desc = _detected_by_spandrel(final)
        assert desc.architecture.id == {"RRDBNet": "ESRGAN", "SwinIR_tiny": "SwinIR"}.get(name, name)
        assert desc.scale == 4
        # spandrel's model computes what the trainer's EMA generator computes
        x = torch.rand(1, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(desc.model.eval()(x), model(x), rtol=1e-4, atol=1e-5)


def test_trainer_checkpoint_x2_rrdb_is_detected_with_its_scale(tmp_path):
    run = tmp_path / "run"
    assert (
        main(["train", "--config", str(_config(tmp_path, TINY["RRDBNet"], scale=2)), "--out", str(run)]) == 0
    )
    desc = _detected_by_spandrel(run / "models" / "net_g_final.pth")
    assert (desc.architecture.id, desc.scale) == ("ESRGAN", 2)
    assert load_generator(run / "models" / "net_g_final.pth")[2] == 2


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_community_swinir_file_finetunes_and_upscales(tmp_path, capsys, fmt):
    torch.manual_seed(0)
    src = build_generator("SwinIR_tiny", scale=4)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"001_classicalSR_x4_tiny.{fmt}"
    if fmt == "pth":
        torch.save({"params": sd}, path)  # as SwinIR's published files
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    # network_g stays the default RRDBNet: the file's architecture replaces it.
    run = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path, pretrain=path)), "--out", str(run)]) == 0
    model, spec, scale = load_generator(run / "models" / "net_g_final.pth")
    assert spec["type"] == "SwinIR" and spec["embed_dim"] == 12 and spec["depths"] == [1, 1] and scale == 4
    # the community file itself and the fine-tuned one both upscale
    lr = tmp_path / "lr.png"
    write_image(lr, read_image(tmp_path / "data" / "img0.png")[:10, :12])
    for i, model_file in enumerate((path, run / "models" / "net_g_final.pth")):
        out = tmp_path / f"sr{i}.png"
        assert main(["upscale", str(lr), str(out), "--model", str(model_file), "--device", "cpu"]) == 0
        assert read_image(out).shape == (40, 48, 3)
    capsys.readouterr()
    if fmt == "safetensors":  # calgan eval --model runs the detected file too
        gt = read_image(tmp_path / "data" / "img0.png")
        write_image(tmp_path / "gt" / "a.png", gt)
        write_image(tmp_path / "lq" / "a.png", imresize(gt, 0.25))
        assert (
            main(
                [
                    "eval",
                    "--model",
                    str(path),
                    "--lr",
                    str(tmp_path / "lq"),
                    "--gt",
                    str(tmp_path / "gt"),
                    "--psnr-only",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        table = capsys.readouterr().out
        row = next(ln for ln in table.splitlines() if "PSNR" in ln)
        assert path.stem in table and float(row.split("|")[-2].strip("* ")) > 10  # the model's PSNR column


def test_pretrained_file_of_another_scale_is_one_clear_error(tmp_path, capsys):
    path = tmp_path / "span_x4.pth"
    torch.save(build_generator("SPAN", feature_channels=4, scale=4).state_dict(), path)
    cfg = _config(tmp_path, pretrain=path, scale=2)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("calgan: error: ") and "\n" not in err
    assert "span_x4.pth is a x4 SPAN, but scale = 2" in err


def test_basicsr_rrdb_layout_stays_the_projects_rrdbnet(tmp_path):
    # BasicSR's RRDB_PSNR_x4.pth layout: spandrel detects it as ESRGAN but would rebuild it in the
    # old "model.N" layout with a fixed growth of 32; the registry keeps the BasicSR layout.
    g = RRDBNet(num_feat=8, num_block=2, num_grow_ch=4)
    torch.save({"params": g.state_dict()}, tmp_path / "rrdb.pth")
    model, spec = training_generator({"type": "EDSR"}, 4, tmp_path / "rrdb.pth")
    assert isinstance(model, RRDBNet)
    assert spec == {"type": "RRDBNet", "scale": 4, "num_feat": 8, "num_block": 2, "num_grow_ch": 4}
    assert set(model.state_dict()) == set(g.state_dict())


def test_undetectable_file_is_loaded_into_network_g_or_is_a_clear_error(tmp_path):
    g = RRDBNet(num_feat=8, num_block=1, num_grow_ch=4)
    renamed = {f"generator.{k}": v for k, v in g.state_dict().items()}
    torch.save(renamed, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd\.pth: spandrel does not recognise"):
        load_generator(tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd\.pth: does not fit RRDBNet"):
        training_generator(
            {"type": "RRDBNet", "num_feat": 8, "num_block": 1, "num_grow_ch": 4}, 4, tmp_path / "odd.pth"
        )


def test_registry_names_and_errors():
    names = generator_names()
    for n in (
        "RRDBNet",
        "EDSR",
        "EDSR_paper",
        "SwinIR_M",
        "SwinIR_tiny",
        "SwinIR",
        "HAT",
        "DAT",
        "SPAN",
        "Compact",
        "ESRGAN",
    ):
        assert n in names
    with pytest.raises(ConfigError, match=r"unknown generator 'SwinIR-M'; known: .*SwinIR_M"):
        load_config("quickstart", overrides={"network_g": {"type": "SwinIR-M"}})
    with pytest.raises(
        ConfigError, match=r"unknown option\(s\) embed_dims for SwinIR; accepted: .*embed_dim"
    ):
        load_config("quickstart", overrides={"network_g": {"type": "SwinIR", "embed_dims": 60}})
    # every architecture takes its upscaling factor as ``scale``
    assert build_generator("Compact", num_feat=4, num_conv=1, scale=3)(torch.rand(1, 3, 4, 4)).shape[-1] == 12


def test_swinir_m_is_the_papers_size():
    m = build_generator("SwinIR_M", scale=4)
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(11.9e6, rel=0.01)
    hp = m.hyperparameters
    assert (
        hp["embed_dim"],
        hp["depths"],
        hp["num_heads"],
        hp["window_size"],
        hp["img_size"],
        hp["upsampler"],
        hp["upscale"],
    ) == (180, [6] * 6, [6] * 6, 8, 64, "pixelshuffle", 4)


def test_swinir_example_config():
    cfg = load_config(None, REPO / "examples" / "swinir_calgan.yml")
    assert cfg["network_g"] == {"type": "SwinIR_M"} and cfg["scale"] == 4
    assert cfg["path"]["pretrain_network_g"].endswith("SwinIR-M_x4.pth")
    assert cfg["datasets"]["train"]["dataroot_lq"].endswith("LR_bicubic_sub/X4")
