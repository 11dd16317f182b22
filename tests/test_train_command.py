"""``calgan train`` as a user drives it: base rule, --set, resume/extend, start-up checks, samples."""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from calgan_fast.cli import _fmt_warning, main
from calgan_fast.data import HRFolderDataset, read_image
from calgan_fast.train import ConfigError, load_config, train
from calgan_fast.train.config import DEFAULTS, PRESETS, merge
from calgan_fast.train.overrides import build_config, parse_sets
from calgan_fast.train.startup import check_files, memory_warning, select_subset
from tests.test_train import _log, _photos


def _tiny_yml(path: Path, data: Path, **train) -> Path:
    """A small user config (no base named): a few iterations on generated photos."""
    tr = {"pretrain_iter": 2, "total_iter": 2, "perceptual_opt": {"enabled": False}}
    tr.update(train)
    cfg = {
        "name": "tiny",
        "device": "cpu",
        "datasets": {
            "train": {
                "dataroot_gt": str(data),
                "gt_size": 16,
                "batch_size_per_gpu": 2,
                "num_worker_per_gpu": 0,
            },
            "val": {"dataroot_gt": str(data), "max_images": 1},
        },
        "network_g": {"num_feat": 4, "num_conv": 1},
        "network_d": {"num_feat": 4, "num_experts": 3},
        "train": tr,
        "logger": {"print_freq": 1, "sample_freq": 2, "save_checkpoint_freq": 2, "sample_crop_size": 32},
        "val": {"val_freq": 2},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("calgan: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def test_config_alone_starts_from_quickstart(tmp_path, capsys):
    # The rule --help states: no --preset and no base: key -> the quickstart preset.
    yml = _tiny_yml(tmp_path / "my.yml", _photos(tmp_path / "data"))
    cfg = build_config(None, yml)
    user = yaml.safe_load(yml.read_text())
    expected = merge(merge(DEFAULTS, PRESETS["quickstart"]), user)
    assert dict(cfg) == expected and cfg.base == "quickstart"
    assert cfg["network_d"]["num_experts"] == 3 and cfg["train"]["d_opt"]["lambda_d"] == 0.1
    assert cfg["network_g"]["type"] == "CompactSR"
    # A config can name its base; --preset must agree with it.
    # (the paper's generator is RRDBNet: the CompactSR options of this file go with its type)
    text = yml.read_text()
    yml.write_text("base: paper\n" + text.replace("network_g:\n", "network_g:\n  type: CompactSR\n", 1))
    assert build_config(None, yml)["train"]["d_opt"]["lambda_d"] == PRESETS["paper"].get("train", {}).get(
        "d_opt", {}
    ).get("lambda_d", DEFAULTS["train"]["d_opt"]["lambda_d"])
    assert (
        load_config(None, yml)["train"]["d_opt"]["lambda_d"]
        == build_config(None, yml)["train"]["d_opt"]["lambda_d"]
    )
    with pytest.raises(ConfigError, match="--preset quickstart but .*names base: paper"):
        build_config("quickstart", yml)
    # The run prints what differs from its base, and records the resolved config.
    yml.write_text(text)
    run = tmp_path / "run"
    assert main(["train", "--config", str(yml), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "settings: preset quickstart (the default base), with these changes:" in out
    assert "  network_d.num_experts: 4 -> 3" in out and "  train.total_iter: 300 -> 2" in out
    assert yaml.safe_load((run / "config.yml").read_text()) == expected


def test_set_is_typed_and_validated(tmp_path, capsys):
    over = parse_sets(
        [
            "train.total_iter=600",
            "train.optim_g.lr=2e-4",
            "network_d.routing=argmax",
            "train.grad_clip=null",
            "train.scheduler.milestones=[10, 20]",
        ]
    )
    cfg = build_config(
        "quickstart",
        sets=[
            "train.total_iter=600",
            "train.optim_g.lr=2e-4",
            "train.scheduler.milestones=[10, 20]",
            "train.grad_clip=0.5",
        ],
    )
    assert over["train"]["total_iter"] == 600 and over["train"]["grad_clip"] is None
    assert cfg["train"]["total_iter"] == 600 and cfg["train"]["optim_g"]["lr"] == 2e-4
    assert cfg["train"]["scheduler"]["milestones"] == [10, 20] and cfg["train"]["grad_clip"] == 0.5
    assert cfg.origin["train.total_iter"] == "--set"
    assert main(["train", "--set", "train.totl_iter=5", "--out", str(tmp_path / "r")]) == 2
    assert "--set train.totl_iter: unknown key (did you mean train.total_iter?)" in _err(capsys)
    assert main(["train", "--set", "train.total_iter=many", "--out", str(tmp_path / "r")]) == 2
    assert "train.total_iter = 'many'; expected an integer" in _err(capsys)
    assert main(["train", "--set", "train.total_iter", "--out", str(tmp_path / "r")]) == 2
    assert "expected KEY=VALUE" in _err(capsys)
    assert not (tmp_path / "r").exists()


def test_resume_extends_and_finished_run_says_so(tmp_path, capsys):
    yml = _tiny_yml(tmp_path / "my.yml", _photos(tmp_path / "data"))
    run = tmp_path / "run"
    assert main(["train", "--config", str(yml), "--out", str(run)]) == 0
    capsys.readouterr()
    events = sorted((run / "tb").iterdir())
    # Finished: says so and how to extend; writes nothing (no new event file either).
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--out", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "the run is complete (iteration 4 of 4" in out
    assert f"calgan train --out {run} --resume --set train.total_iter=" in out
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert sorted((run / "tb").iterdir()) == events
    # Extend: a raised total_iter continues from iteration 4 and is recorded.
    part = tmp_path / "more.yml"
    part.write_text("logger:\n  print_freq: 2\n")
    assert (
        main(["train", "--out", str(run), "--resume", "--config", str(part), "--set", "train.total_iter=4"])
        == 0
    )
    out = capsys.readouterr().out
    assert "train.total_iter: 2 -> 4" in out and "logger.print_freq: 1 -> 2" in out
    assert [x["iter"] for x in _log(run)] == [1, 2, 3, 4, 6]
    saved = yaml.safe_load((run / "config.yml").read_text())
    assert saved["train"]["total_iter"] == 4 and saved["logger"]["print_freq"] == 2
    change = json.loads((run / "config_changes.jsonl").read_text().splitlines()[-1])
    assert change["iter"] == 4 and change["changes"]["train.total_iter"] == {"old": 2, "new": 4}
    # What cannot change on resume says why.
    assert main(["train", "--out", str(run), "--resume", "--set", "network_d.num_experts=5"]) == 2
    assert "network_d.num_experts: cannot change when resuming" in _err(capsys)
    assert main(["train", "--out", str(run), "--resume", "--preset", "paper"]) == 2
    assert "--preset cannot be given with --resume" in _err(capsys)


def test_missing_files_name_key_and_leave_no_run_folder(tmp_path, capsys, monkeypatch):
    data = _photos(tmp_path / "data")
    yml = _tiny_yml(tmp_path / "my.yml", data)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    cases = [
        (
            ["--set", "datasets.train.dataroot_gt=photos"],
            [
                "datasets.train.dataroot_gt = 'photos' (set in --set)",
                str(tmp_path / "photos"),
                "relative to the current directory",
                "'samples'",
            ],
        ),
        (
            ["--set", "datasets.val.dataroot_gt=val_hr"],
            ["datasets.val.dataroot_gt = 'val_hr'", "null to train without validation"],
        ),
        (
            ["--set", "path.pretrain_network_g=psnr.pth"],
            [
                "path.pretrain_network_g = 'psnr.pth' (set in --set)",
                str(tmp_path / "psnr.pth"),
                "RRDB_PSNR_x4.pth",
                "train.pretrain_iter > 0",
            ],
        ),
        (
            [
                "--set",
                "train.perceptual_opt.enabled=true",
                "--set",
                "train.perceptual_opt.weights_path=vgg.pth",
            ],
            [
                "train.perceptual_opt.enabled = true (set in --set)",
                str(tmp_path / "vgg.pth"),
                "vgg19-dcbb9e9d.pth",
                "enabled: false",
            ],
        ),
        (
            ["--set", "datasets.train.file_list=names.txt"],
            ["datasets.train.file_list = 'names.txt'", "file not found"],
        ),
    ]
    for extra, parts in cases:
        assert main(["train", "--config", str(yml), "--out", str(run), *extra]) == 2, extra
        err = _err(capsys)
        for p in parts:
            assert p in err, (p, err)
        assert not run.exists(), extra
    # The preset's own path names where it was set.
    cfg = build_config("paper", sets=["datasets.train.dataroot_gt=data"])
    with pytest.raises(ConfigError, match=r"path\.pretrain_network_g = .* \(set in preset paper\)"):
        check_files(cfg, cfg.origin)


def test_paper_preset_on_cpu_warns_with_estimated_memory(tmp_path, capsys, monkeypatch):
    msg = memory_warning(load_config("paper"), "cpu")
    assert msg and "GB for one step (batch" in msg and "batch_size_per_gpu" in msg
    assert memory_warning(load_config("quickstart"), "cpu") is None
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"training on the CPU needs about \d+\.\d GB"):
        assert main(["train", "--preset", "paper", "--set", "device=cpu", "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert "datasets.train.dataroot_gt = 'datasets/DIV2K/DIV2K_train_HR' (set in preset paper)" in err
    assert not (tmp_path / "run").exists()
    # The paper preset has its validation key, ready to fill.
    assert "dataroot_gt" in load_config("paper")["datasets"]["val"]


def test_training_subset(tmp_path):
    data = _photos(tmp_path / "data", n=5)
    (tmp_path / "list.txt").write_text("img3.png\n# a comment\nimg1\n")

    def pick(**spec):
        ds = HRFolderDataset(data, gt_size=16)
        return [p.name for p in select_subset(ds, {"dataroot_gt": str(data), **spec}).files]

    assert pick(glob="img[0-2]*") == ["img0.png", "img1.png", "img2.png"]
    assert pick(file_list=str(tmp_path / "list.txt")) == ["img1.png", "img3.png"]
    assert pick(max_images=2) == ["img0.png", "img1.png"]
    assert pick(glob="img[1-4]*", max_images=2) == ["img1.png", "img2.png"]
    with pytest.raises(ConfigError, match="glob = 'x\\*': no file name"):
        pick(glob="x*")
    (tmp_path / "bad.txt").write_text("img9\n")
    with pytest.raises(ConfigError, match="1 listed name.*img9"):
        pick(file_list=str(tmp_path / "bad.txt"))


def test_third_party_warnings_keep_their_origin():
    import calgan_fast.train.trainer as tr

    assert _fmt_warning("x", UserWarning, tr.__file__, 1) == "calgan: warning: x\n"
    other = _fmt_warning("y", UserWarning, os.path.join(os.path.dirname(np.__file__), "core.py"), 7)
    assert not other.startswith("calgan:") and "UserWarning: y" in other


def test_samples_logs_and_console(tmp_path, capsys):
    yml = _tiny_yml(tmp_path / "my.yml", _photos(tmp_path / "data"), total_iter=2)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(yml),
                "--out",
                str(run),
                "--set",
                "logger.sample_crops=2",
                "--set",
                "logger.sample_images=2",
                "--set",
                "datasets.val.max_images=2",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    text = out.out + out.err
    assert "validation, iteration 2 (phase 1" in text and "bicubic:" in text
    assert "iteration 2: phase 1 done; phase 2 (CAL-GAN) starts" in text
    assert f"train: 3 image(s) from {tmp_path / 'data'}" in text
    # Phase 1 has an SR panel but no routing map (D is untrained); phase 2 has both.
    names = sorted(p.name for p in (run / "samples").iterdir())
    assert names == ["iter_0000002_sr.png", "iter_0000004_routing.png", "iter_0000004_sr.png"]
    panel = read_image(run / "samples" / "iter_0000004_sr.png")
    # 2 images x 2 crops = 4 rows of 32-pixel crops with a label band each, plus a title.
    assert panel.shape[0] >= 4 * (32 + 14) + 14 and panel.shape[1] >= 3 * 32
    log = _log(run)
    assert {"expert_usage", "expert_usage_sampled", "lr_d"} <= set(log[-1])
    assert sum(log[-1]["expert_usage"]) == pytest.approx(1.0)
    metrics = json.loads((run / "metrics.json").read_text())["final"]
    assert metrics["images"] == 2 and 0 < metrics["bicubic_psnr"] < 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"samples/sr", "samples/routing"} <= set(acc.Tags()["images"])
    assert {"lr/g", "lr/d", "val/bicubic_psnr"} <= set(acc.Tags()["scalars"])


def test_routing_panel_usage_is_what_the_map_shows():
    from calgan_fast import CALGANDiscriminator
    from calgan_fast.train.samples import routing_panel, routing_usage

    torch.manual_seed(0)
    d = CALGANDiscriminator(num_feat=4, num_experts=3)
    gt = torch.rand(3, 32, 32)
    panel, usage = routing_panel(d, [(gt[:, ::4, ::4], gt)], torch.device("cpu"))
    d.eval()
    expert = d(gt[None], return_aux=True).routing.expert
    assert np.allclose(usage, routing_usage(expert, 3)) and usage.sum() == pytest.approx(1.0)
    assert panel.shape[1] == 3 * 32 + 8


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CALGAN_FAST_SLOW_TESTS", "0") in ("", "0"),
    reason="runs phase 1 of the quickstart preset (about a minute); set CALGAN_FAST_SLOW_TESTS=1",
)
def test_quickstart_phase1_beats_bicubic(tmp_path, monkeypatch):
    monkeypatch.setenv("CALGAN_FAST_HOME", str(tmp_path / "home"))
    cfg = load_config("quickstart", overrides={"train": {"total_iter": 0}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, tmp_path / "run", progress=False)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    assert m["iter"] == cfg["train"]["pretrain_iter"]
    print(f"quickstart phase 1: PSNR-Y {m['psnr']:.2f} dB, bicubic {m['bicubic_psnr']:.2f} dB")
    assert m["psnr"] > m["bicubic_psnr"] + 0.5
    # No colour cast: the mean colour of the SR image matches the HR image's.
    from calgan_fast.archs import generator_from_checkpoint
    from calgan_fast.train.trainer import build_dataset, sample_dir

    g = generator_from_checkpoint(tmp_path / "run" / "models" / "net_g_final.pth")
    item = build_dataset(cfg["datasets"]["val"], 4, False, sample_dir())[0]
    with torch.no_grad():
        sr = g(item["lq"][None])[0].clamp(0, 1)
    assert (sr.mean((1, 2)) - item["gt"].mean((1, 2))).abs().max() < 0.01


def test_example_paper_config_loads():
    path = Path(__file__).resolve().parents[1] / "examples" / "train_paper.yml"
    cfg = build_config(None, path)
    assert cfg.base == "paper" and cfg["datasets"]["val"]["dataroot_gt"] is None
    assert cfg["network_d"]["num_experts"] == load_config("paper")["network_d"]["num_experts"]
