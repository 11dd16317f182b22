"""Benchmark evaluation: pyiqa metrics, multi-set tables, the bicubic baseline, LR made on the fly."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from calgan_fast.archs import RRDBNet
from calgan_fast.cli import main
from calgan_fast.data import img2tensor, imresize, read_image, write_image
from calgan_fast.metrics import psnr, rgb_to_y, ssim
from calgan_fast.train.evaluate import bicubic_lr

SHARED_DATA = Path(
    os.environ.get("CALGAN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
SETS = [s for s in ("Set5", "Set14") if (SHARED_DATA / s / "HR").is_dir()]
needs_sets = pytest.mark.skipif(not SETS, reason="Set5/Set14 not present (set CALGAN_SHARED_DATA)")


def _has_pyiqa() -> bool:
    try:
        import pyiqa  # noqa: F401
    except ImportError:
        return False
    return True


needs_pyiqa = pytest.mark.skipif(
    not _has_pyiqa(), reason="pyiqa not installed (pip install calgan_fast[metrics])"
)


def _img(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([np.sin(xx / (3 + seed) + c) * np.cos(yy / (4 + c)) for c in range(3)], 2)
    return np.clip((smooth * 0.35 + 0.5) * 255 + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)


def _error(capsys, *parts):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("calgan: error: "), err
    for p in parts:
        assert p in err[-1], err[-1]
    return err[-1]


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    g = RRDBNet(num_feat=8, num_block=1, num_grow_ch=4, scale=4)
    spec = {"type": "RRDBNet", "num_feat": 8, "num_block": 1, "num_grow_ch": 4, "scale": 4}
    path = tmp_path / "g.pth"
    torch.save({"params_ema": g.state_dict(), "network_g": spec, "scale": 4}, path)
    return g.eval(), path


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """Empty weight caches for torch hub and pyiqa, and downloads that fail as on an offline machine."""
    import urllib.error

    import torch.hub as hub
    from pyiqa.utils import download_util

    cache = tmp_path / "cache"
    # torch.hub.set_dir pins the folder for the rest of the process; monkeypatch restores the unset
    # state afterwards, so later tests see $TORCH_HOME again.
    monkeypatch.setattr(hub, "_hub_dir", str(cache / "hub"))
    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(cache / "hub" / "pyiqa"))

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(hub, "download_url_to_file", offline)
    monkeypatch.setattr(download_util, "download_url_to_file", offline)
    yield cache


# ------------------------------------------------------------------ metrics


@needs_pyiqa
@needs_sets
def test_pyiqa_psnr_ssim_agree_with_the_library_on_set5_set14():
    import pyiqa

    kw = dict(test_y_channel=True, crop_border=4, color_space="ycbcr", device="cpu")
    p_iqa, s_iqa = pyiqa.create_metric("psnr", **kw), pyiqa.create_metric("ssim", **kw)
    n = 0
    for name in SETS:
        for path in sorted((SHARED_DATA / name / "HR").glob("*.png")):
            hr = read_image(path)
            sr = imresize(bicubic_lr(hr, 4), 4.0)
            gt = hr[: sr.shape[0], : sr.shape[1]]
            a, b = img2tensor(sr)[None], img2tensor(gt)[None]
            assert float(p_iqa(a, b)) == pytest.approx(psnr(sr, gt, 4, True), abs=2e-3)
            # pyiqa rounds Y to integers before SSIM; on the rounded Y the two SSIMs are the same.
            s_own = ssim(sr, gt, 4, True)
            s_rounded = ssim(rgb_to_y(sr).round(), rgb_to_y(gt).round(), 4)
            assert float(s_iqa(a, b)) == pytest.approx(s_rounded, abs=5e-4)  # Y in float32 there
            assert abs(s_own - s_rounded) < 3e-3
            n += 1
    assert n >= 5


@needs_pyiqa
def test_missing_weights_name_the_file_and_where_to_put_it(offline_cache):
    from calgan_fast.metrics import MetricWeightsError, build_metric

    with pytest.raises(MetricWeightsError) as exc:
        build_metric("lpips")
    msg = str(exc.value)
    assert "lpips: weights file" in msg and ".pth" in msg and "put it at" in msg
    assert str(offline_cache) in msg and "comes from http" in msg


@needs_pyiqa
def test_requested_metric_with_missing_weights_exits_nonzero(tmp_path, offline_cache, capsys):
    write_image(tmp_path / "gt" / "a.png", _img(32, 32, 0))
    assert main(["eval", "--gt", str(tmp_path / "gt"), "--metrics", "psnr", "dists"]) == 2
    _error(capsys, "dists: weights file", "put it at", str(offline_cache))
    # The default set leaves out what it cannot build, with a note, and still gives PSNR/SSIM.
    assert main(["eval", "--gt", str(tmp_path / "gt"), "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "calgan: note: lpips left out: lpips: weights file" in err
    res = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert res["protocol"]["metrics"] == ["psnr", "ssim"]


def test_unknown_metric_is_an_error(tmp_path, capsys):
    write_image(tmp_path / "gt" / "a.png", _img(32, 32, 0))
    assert main(["eval", "--gt", str(tmp_path / "gt"), "--metrics", "psnr", "lpipz"]) == 2
    _error(capsys, "unknown metric 'lpipz'")


@needs_pyiqa
def test_lpips_from_a_cache_with_random_weights(tmp_path, offline_cache, capsys):
    """A cache filled with random weights of the right layout: nothing is downloaded and eval's
    per-image LPIPS is pyiqa's on the same images."""
    import pyiqa
    import torchvision
    from pyiqa.archs.lpips_arch import LPIPS, default_model_urls
    from pyiqa.utils import download_util

    torch.manual_seed(0)
    hub_ckpt = offline_cache / "hub" / "checkpoints"
    hub_ckpt.mkdir(parents=True)
    torch.save(torchvision.models.alexnet().state_dict(), hub_ckpt / "alexnet-owt-7be5be79.pth")
    lin = LPIPS(pretrained=False, pnet_rand=True, net="alex")
    lin_state = {k: v.abs() for k, v in lin.state_dict().items() if k.startswith("lin")}  # LPIPS's are >= 0
    pdir = Path(download_util.DEFAULT_CACHE_DIR)
    pdir.mkdir(parents=True)
    torch.save(lin_state, pdir / Path(default_model_urls["0.1_alex"]).name)
    for i in range(2):
        write_image(tmp_path / "gt" / f"{i}.png", _img(48, 40, i))
    assert (
        main(
            ["eval", "--gt", str(tmp_path / "gt"), "--metrics", "psnr", "lpips", "--out", str(tmp_path / "r")]
        )
        == 0
    )
    res = json.loads((tmp_path / "r" / "metrics.json").read_text())
    ref = pyiqa.create_metric("lpips", device="cpu")
    for row in res["sets"]["gt"]["Bicubic"]["images"]:
        hr = read_image(tmp_path / "gt" / row["name"])
        sr = imresize(bicubic_lr(hr, 4), 4.0)
        want = float(ref(img2tensor(sr)[None], img2tensor(hr[: sr.shape[0], : sr.shape[1]])[None]))
        assert row["lpips"] == pytest.approx(want, rel=1e-5) and row["lpips"] > 0
    assert "| LPIPS↓ |" in (tmp_path / "r" / "metrics.md").read_text()


# ------------------------------------------------------------------ tables


@needs_sets
def test_bicubic_table_on_set5_set14_matches_a_direct_computation(tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                "--sets",
                *SETS,
                "--data-root",
                str(SHARED_DATA),
                "--psnr-only",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert res["methods"] == ["Bicubic"] and list(res["sets"]) == SETS
    n_images = 0
    for name in SETS:
        rows = res["sets"][name]["Bicubic"]["images"]
        direct = []
        for path in sorted((SHARED_DATA / name / "HR").glob("*.png")):
            hr = read_image(path)
            # The published LR set when present (the library's bicubic reproduces it bit for bit).
            lr_path = SHARED_DATA / name / "LR_bicubic" / "X4" / f"{path.stem}x4.png"
            lr = read_image(lr_path) if lr_path.exists() else bicubic_lr(hr, 4)
            sr = imresize(lr, 4.0)
            gt = hr[: sr.shape[0], : sr.shape[1]]
            direct.append((path.name, psnr(sr, gt, 4, True), ssim(sr, gt, 4, True)))
        assert [r["name"] for r in rows] == [d[0] for d in direct]
        for r, (_, p, s) in zip(rows, direct):
            assert r["psnr"] == pytest.approx(p, abs=1e-9) and r["ssim"] == pytest.approx(s, abs=1e-9)
        mean = res["sets"][name]["Bicubic"]["mean"]
        assert mean["psnr"] == pytest.approx(np.mean([d[1] for d in direct]))
        n_images += len(direct)
    if "Set5" in SETS:  # the figure every SR paper prints for bicubic x4 on Set5
        assert res["sets"]["Set5"]["Bicubic"]["mean"]["psnr"] == pytest.approx(28.42, abs=0.02)
    md = (tmp_path / "r" / "metrics.md").read_text()
    assert md.startswith("| Set | Metric | Bicubic |") and f"| {SETS[0]} | PSNR↑ |" in md
    per_image = list(csv.reader((tmp_path / "r" / "metrics_per_image.csv").open()))
    assert per_image[0] == ["set", "method", "image", "psnr", "ssim"] and len(per_image) == 1 + n_images
    per_set = list(csv.reader((tmp_path / "r" / "metrics_per_set.csv").open()))
    assert len(per_set) == 1 + len(SETS)


def test_eval_from_gt_alone_equals_eval_from_a_bicubic_lr_folder(tmp_path, tiny_ckpt, capsys):
    _, path = tiny_ckpt
    for i, (h, w) in enumerate([(36, 44), (34, 41)]):  # the second is not a multiple of the scale
        gt = _img(h, w, i)
        write_image(tmp_path / "data" / "toy" / "HR" / f"im{i}.png", gt)
        write_image(tmp_path / "lr" / f"im{i}x4.png", bicubic_lr(gt, 4))
    gt_dir = tmp_path / "data" / "toy" / "HR"
    assert (
        main(
            [
                "eval",
                "--model",
                str(path),
                "--gt",
                str(gt_dir),
                "--psnr-only",
                "--out",
                str(tmp_path / "a"),
                "--save-sr",
                str(tmp_path / "sr_a"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "--model",
                str(path),
                "--gt",
                str(gt_dir),
                "--lr",
                str(tmp_path / "lr"),
                "--psnr-only",
                "--out",
                str(tmp_path / "b"),
                "--save-sr",
                str(tmp_path / "sr_b"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "--model",
                str(path),
                "--sets",
                "toy",
                "--data-root",
                str(tmp_path / "data"),
                "--psnr-only",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    a, b, c = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "abc")
    assert a["methods"] == ["Bicubic", "g"]
    assert a["sets"] == b["sets"] == c["sets"]
    for i in range(2):
        sa, sb = (
            read_image(tmp_path / "sr_a" / "toy" / f"im{i}.png"),
            read_image(tmp_path / "sr_b" / "toy" / f"im{i}.png"),
        )
        assert np.array_equal(sa, sb) and sa.shape[0] == (36, 32)[i]
    # The model's SR of im0 saved by --save-sr gives the figures of the table.
    row = a["sets"]["toy"]["g"]["images"][0]
    assert row["psnr"] == pytest.approx(
        psnr(
            read_image(tmp_path / "sr_a" / "toy" / "im0.png"),
            read_image(gt_dir / "im0.png")[:36, :44],
            4,
            True,
        ),
        abs=1e-9,
    )
    # The SR folder written by --save-sr evaluated with --sr gives the same numbers.
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--sr",
                str(tmp_path / "sr_a" / "toy"),
                "--gt",
                str(gt_dir),
                "--psnr-only",
                "--no-bicubic",
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    d = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert d["sets"]["toy"]["toy"]["images"] == a["sets"]["toy"]["g"]["images"]


def test_eval_argument_errors(tmp_path, capsys):
    write_image(tmp_path / "gt" / "a.png", _img(32, 32, 0))
    assert main(["eval", "--psnr-only"]) == 2
    _error(capsys, "give the test sets")
    assert main(["eval", "--sets", "Nope", "--data-root", str(tmp_path), "--psnr-only"]) == 2
    _error(capsys, "Nope: test set not found under --data-root")
    assert main(["eval", "--gt", str(tmp_path / "gt"), "--save-sr", str(tmp_path / "s"), "--psnr-only"]) == 2
    _error(capsys, "--save-sr needs --model")
    assert main(["eval", "--gt", str(tmp_path / "gt"), "--psnr-only", "--out", str(tmp_path / "r")]) == 0
    assert main(["eval", "--gt", str(tmp_path / "gt"), "--psnr-only", "--out", str(tmp_path / "r")]) == 2
    _error(capsys, "metrics.json: already exists")
