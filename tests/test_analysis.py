"""Routing analysis (routing quality, NMI, maps, t-SNE) and training plots."""

import csv
import json

import numpy as np
import pytest
import torch

from calgan_fast import CALGANDiscriminator
from calgan_fast.analysis import content_labels, nmi, routing_quality
from calgan_fast.cli import main
from calgan_fast.data import write_image
from calgan_fast.viz import palette

from .test_train import _photos, _tiny


def _has(mod: str) -> bool:
    try:
        __import__(mod)
    except ImportError:
        return False
    return True


needs_analysis = pytest.mark.skipif(
    not (_has("sklearn") and _has("matplotlib")),
    reason="needs scikit-learn and matplotlib (pip install calgan_fast[analysis])",
)


def test_nmi_known_answers():
    i = np.arange(400)
    assert nmi(i % 5, i % 5) == pytest.approx(1.0)
    assert nmi(i % 5, (i + 3) % 5 * 7) == pytest.approx(1.0)  # renamed labels
    assert nmi(i % 4, i // 100) == pytest.approx(0.0, abs=1e-12)  # independent by construction
    # Expert e in {0, 1} determines the label in {0, 1, 2, 3} only in part: label = 2 e + coin.
    e, coin = i % 2, (i // 2) % 2
    # MI = H(e) = log 2; H(label) = log 4; NMI = log 2 / ((log 2 + log 4) / 2) = 2/3.
    assert nmi(e, 2 * e + coin) == pytest.approx(2 / 3)
    assert nmi(np.zeros(5), np.zeros(5)) == 1.0 and nmi(np.zeros(5), np.arange(5)) == 0.0
    if _has("sklearn"):
        from sklearn.metrics import normalized_mutual_info_score

        rng = np.random.default_rng(0)
        a, b = rng.integers(0, 6, 500), rng.integers(0, 4, 500)
        b[:250] = a[:250] % 4
        assert nmi(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)


def test_routing_quality_on_a_synthetic_routing():
    # A 20x20 feature map: expert = texture quintile by construction (content-aware, balanced on 4 of 6).
    content = torch.arange(400).reshape(1, 20, 20) * 5 // 400  # quintiles 0..4, 80 pixels each
    expert = torch.where(content < 2, 0, content - 1)  # quintiles 0 and 1 share expert 0
    rq = routing_quality(expert, 6, content)
    assert rq["usage"] == pytest.approx([0.4, 0.2, 0.2, 0.2, 0, 0])
    assert rq["experts_alive"] == 4  # share > 1 / 24
    ent = -(0.4 * np.log(0.4) + 3 * 0.2 * np.log(0.2)) / np.log(6)
    assert rq["usage_entropy"] == pytest.approx(ent)
    h_e, h_c = -(0.4 * np.log(0.4) + 3 * 0.2 * np.log(0.2)), np.log(5)
    assert rq["nmi_content"] == pytest.approx(h_e / ((h_e + h_c) / 2))  # MI = H(expert): expert is a function
    one = routing_quality(torch.zeros(1, 20, 20, dtype=torch.long), 4, content)  # one expert for all
    assert one["usage_entropy"] == 0.0 and one["experts_alive"] == 1 and one["nmi_content"] == 0.0


def test_content_labels_rank_flat_below_textured():
    g = torch.Generator().manual_seed(0)
    img = torch.full((1, 3, 40, 40), 0.5)
    img[..., 20:] = torch.rand(1, 3, 40, 20, generator=g)  # right half textured
    lab = content_labels(img)
    assert lab.shape == (1, 10, 10)
    assert torch.bincount(lab.reshape(-1), minlength=5).tolist() == [20] * 5
    assert lab[0, :, :4].max() <= 2 and lab[0, :, 6:].min() >= 2  # flat cells in the low quintiles


def _trained_d(images: torch.Tensor, steps: int = 30) -> CALGANDiscriminator:
    """A small D trained for a few steps: real crops against blurred copies of them."""
    from calgan_fast.losses import discriminator_loss

    torch.manual_seed(0)
    d = CALGANDiscriminator(num_feat=8, num_experts=4)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3)
    blur = torch.nn.functional.avg_pool2d
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention
    try:
        for _ in range(steps):
            fake = torch.nn.functional.interpolate(blur(images, 4), scale_factor=4, mode="bilinear")
            loss = discriminator_loss(d, images, fake)["total"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return d


@needs_analysis
def test_analyze_writes_maps_tsne_and_routing_quality(tmp_path, capsys):
    from calgan_fast.data import img2tensor, read_image

    folder = _photos(tmp_path / "hr", n=2, size=48)
    imgs = torch.stack([img2tensor(read_image(p)) for p in sorted(folder.iterdir())])
    d = _trained_d(imgs)
    torch.save({"iter": 30, "net_d": d.state_dict()}, tmp_path / "iter_0000030.pth")
    for p in sorted(folder.iterdir()):  # "SR": a blurred copy
        write_image(tmp_path / "sr" / p.name, (read_image(p) // 2 * 2).astype(np.uint8))
    out = tmp_path / "an"
    assert (
        main(
            [
                "analyze",
                "--d",
                str(tmp_path / "iter_0000030.pth"),
                "--images",
                str(folder),
                "--sr",
                str(tmp_path / "sr"),
                "--out",
                str(out),
                "--tsne-points",
                "50",
            ]
        )
        == 0
    )
    assert "HR routing: usage entropy" in capsys.readouterr().out
    rep = json.loads((out / "routing_quality.json").read_text())
    assert rep["num_experts"] == 4 and set(rep["images"]) == {"img0.png", "img1.png"}
    for name, entry in rep["images"].items():
        stem = name[:-4]
        assert (out / f"{stem}_routing.png").stat().st_size > 1000
        assert (out / f"{stem}_tsne.png").stat().st_size > 1000
        rows = list(csv.DictReader((out / f"{stem}_tsne.csv").open()))
        assert len(rows) == 50 == entry["tsne"]["points"]  # one point per sampled feature pixel
        used = sorted({int(r["expert"]) for r in rows})
        assert used == entry["tsne"]["experts"]
        # One colour per expert used, the expert's palette colour.
        colours = entry["tsne"]["colours"]
        assert sorted(map(int, colours)) == used and len(set(colours.values())) == len(used)
        for e, hexc in colours.items():
            assert hexc == "#" + bytes(palette(4)[int(e)]).hex()
        for key in ("hr", "sr"):
            q = entry[key]
            assert sum(q["usage"]) == pytest.approx(1.0) and 0.0 <= q["nmi_content"] <= 1.0
            assert 1 <= q["experts_alive"] <= 4 and 0.0 <= q["usage_entropy"] <= 1.0
        assert 0.0 <= entry["sr"]["agreement_with_hr_routing"] <= 1.0
    # Pooled over the images: 2 images of 12x12 feature pixels.
    assert rep["hr"]["pixels"] == 2 * 12 * 12
    capsys.readouterr()
    assert (
        main(
            ["analyze", "--d", str(tmp_path / "iter_0000030.pth"), "--images", str(folder), "--out", str(out)]
        )
        == 2
    )
    assert "routing_quality.json: already exists" in capsys.readouterr().err
    torch.save({"params": {}}, tmp_path / "g.pth")
    assert (
        main(
            ["analyze", "--d", str(tmp_path / "g.pth"), "--images", str(folder), "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "not a CAL-GAN discriminator checkpoint" in capsys.readouterr().err


@needs_analysis
def test_training_logs_routing_quality_and_plots(tmp_path):
    from calgan_fast.train import train

    root = _photos(tmp_path / "photos")
    train(_tiny(root), tmp_path / "run", progress=False)
    hist = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert "routing" not in hist[0]  # phase 1: D is not trained yet
    rq = hist[-1]["routing"]
    assert rq["num_experts"] == 3 and sum(rq["usage"]) == pytest.approx(1.0)
    assert {"usage_entropy", "experts_alive", "nmi_content"} <= set(rq)
    png = tmp_path / "run" / "training.png"
    assert png.stat().st_size > 5000
    png.unlink()
    assert main(["plots", str(tmp_path / "run"), "--output", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 5000 and not png.exists()


def test_plots_of_a_folder_without_a_log(tmp_path, capsys):
    assert main(["plots", str(tmp_path)]) == 2
    assert "train_log.jsonl: no training log" in capsys.readouterr().err
