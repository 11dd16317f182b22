import json

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from calgan_fast.archs import EDSR, RRDBNet
from calgan_fast.cli import main
from calgan_fast.data import imresize, read_image, write_image
from calgan_fast.metrics import rgb_to_y


def _img(h, w, seed):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _one_error_line(capsys, *parts):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("calgan: error: "), err
    for p in parts:
        assert p in err, err
    return err


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    g = RRDBNet(num_feat=8, num_block=1, num_grow_ch=4, scale=4)
    spec = {"type": "RRDBNet", "num_feat": 8, "num_block": 1, "num_grow_ch": 4, "scale": 4}
    path = tmp_path / "g.pth"
    torch.save({"params_ema": g.state_dict(), "network_g": spec, "scale": 4}, path)
    return g.eval(), path


def test_eval_sr_folder_matches_skimage(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "sr").mkdir()
    expected = []
    for i in range(2):
        gt = _img(36, 44, i)
        noise = np.random.default_rng(9 + i).integers(-20, 21, gt.shape)
        sr = np.clip(gt.astype(int) + noise, 0, 255).astype(np.uint8)
        write_image(tmp_path / "gt" / f"im{i}.png", gt)
        write_image(tmp_path / "sr" / f"im{i}x4.png", sr)
        a, b = rgb_to_y(sr)[4:-4, 4:-4], rgb_to_y(gt)[4:-4, 4:-4]
        expected.append((peak_signal_noise_ratio(b, a, data_range=255),
                         structural_similarity(b, a, data_range=255, gaussian_weights=True, sigma=1.5,
                                               use_sample_covariance=False)))
    assert main(["eval", "--sr", str(tmp_path / "sr"), "--gt", str(tmp_path / "gt"),
                 "--out", str(tmp_path / "res"), "--psnr-only", "--no-bicubic"]) == 0
    res = json.loads((tmp_path / "res" / "metrics.json").read_text())["sets"]["gt"]["sr"]
    for row, (p, s) in zip(res["images"], expected):
        assert row["psnr"] == pytest.approx(p, abs=1e-6)
        assert row["ssim"] == pytest.approx(s, abs=1e-6)
    assert res["mean"]["psnr"] == pytest.approx(np.mean([p for p, _ in expected]))
    assert "| gt | PSNR↑ |" in (tmp_path / "res" / "metrics.md").read_text()
    assert (tmp_path / "res" / "metrics_per_image.csv").read_text().startswith("set,method,image,psnr,ssim")
    capsys.readouterr()
    # Results are not overwritten silently.
    assert main(["eval", "--sr", str(tmp_path / "sr"), "--gt", str(tmp_path / "gt"),
                 "--out", str(tmp_path / "res"), "--psnr-only"]) == 2
    _one_error_line(capsys, "metrics.json: already exists")


def test_eval_model(tmp_path, tiny_ckpt, capsys):
    g, path = tiny_ckpt
    (tmp_path / "gt").mkdir()
    gt = _img(32, 40, 0)
    write_image(tmp_path / "gt" / "a.png", gt)
    write_image(tmp_path / "lr" / "ax4.png", imresize(gt, 0.25))
    assert main(["eval", "--model", str(path), "--lr", str(tmp_path / "lr"), "--gt", str(tmp_path / "gt"),
                 "--psnr-only"]) == 0
    assert "| gt | PSNR↑ |" in capsys.readouterr().out


def test_upscale_file_and_folder(tmp_path, tiny_ckpt, capsys):
    g, path = tiny_ckpt
    lr = _img(20, 24, 1)
    write_image(tmp_path / "in" / "x.png", lr)
    write_image(tmp_path / "in" / "y.png", _img(8, 8, 2))
    assert main(["upscale", str(tmp_path / "in" / "x.png"), str(tmp_path / "x_sr.png"),
                 "--model", str(path)]) == 0
    out = read_image(tmp_path / "x_sr.png")
    with torch.no_grad():
        ref = g(torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255)[0]
    ref = (ref.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    assert out.shape == (80, 96, 3) and np.abs(out.astype(int) - ref).max() <= 1
    assert main(["upscale", str(tmp_path / "in"), str(tmp_path / "outdir"), "--model", str(path),
                 "--tile", "8", "--overlap", "24"]) == 0
    tiled = read_image(tmp_path / "outdir" / "x.png")
    assert np.abs(tiled.astype(int) - out).max() <= 1
    assert (tmp_path / "outdir" / "y.png").exists()
    capsys.readouterr()
    before = (tmp_path / "x_sr.png").read_bytes()
    assert main(["upscale", str(tmp_path / "in" / "y.png"), str(tmp_path / "x_sr.png"),
                 "--model", str(path)]) == 2
    _one_error_line(capsys, "x_sr.png: already exists")
    assert (tmp_path / "x_sr.png").read_bytes() == before


def test_bad_inputs_one_clear_line(tmp_path, tiny_ckpt, capsys):
    _, path = tiny_ckpt
    cfg = tmp_path / "c.yml"
    cfg.write_text("datasets:\n  train:\n    dataroot_gt: somewhere\n    batchsize_per_gpu: 4\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    _one_error_line(capsys, "c.yml", "unknown key datasets.train.batchsize_per_gpu",
                    "did you mean datasets.train.batch_size_per_gpu")
    assert not (tmp_path / "run").exists()
    cfg.write_text(f"datasets:\n  train:\n    dataroot_gt: {tmp_path / 'missing'}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    _one_error_line(capsys, "datasets.train.dataroot_gt = ", "missing", "folder not found")
    # A checkpoint of another architecture.
    wrong = tmp_path / "edsr.pth"
    torch.save({"params": EDSR(num_feat=8, num_block=1).state_dict()}, wrong)
    write_image(tmp_path / "in.png", _img(8, 8, 0))
    assert main(["upscale", str(tmp_path / "in.png"), str(tmp_path / "o.png"), "--model", str(wrong),
                 "--arch", "RRDBNet,num_feat=8,num_block=1"]) == 2
    _one_error_line(capsys, "edsr.pth: does not fit RRDBNet")
    assert not (tmp_path / "o.png").exists()
    # A corrupt input image.
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["upscale", str(tmp_path / "bad.png"), str(tmp_path / "o.png"), "--model", str(path)]) == 2
    _one_error_line(capsys, "bad.png: cannot decode image")
    assert main(["eval", "--sr", str(tmp_path / "nope"), "--gt", str(tmp_path), "--psnr-only"]) == 2
    _one_error_line(capsys, "nope: --sr folder not found")
    assert main(["train", "--out", str(tmp_path / "norun"), "--resume"]) == 2
    _one_error_line(capsys, "config.yml: no saved config")


def test_train_and_resume_from_the_command_line(tmp_path, capsys):
    import yaml

    from tests.test_train import _log, _photos, _tiny

    cfg = _tiny(_photos(tmp_path / "data"), pretrain_iter=2, total_iter=2)
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "c.yml"), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"final model  {run / 'models' / 'net_g_final.pth'}" in out and "routing maps" in out
    assert main(["train", "--config", str(tmp_path / "c.yml"), "--out", str(run)]) == 2
    _one_error_line(capsys, "already holds a run; add --resume")
    # --resume alone takes the run's saved config; a finished run stays as it was.
    before = _log(run)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert _log(run) == before
