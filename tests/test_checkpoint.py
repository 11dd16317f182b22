"""Training checkpoints: only the trainer's own files count, unreadable or mismatched files give one
clear error (or a fallback to the previous checkpoint), and a save killed midway loses nothing."""

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from calgan_fast.train import RunFolderError, train
from calgan_fast.train.trainer import Trainer

from .test_train import _log, _photos, _tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return _photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def full_run(photos, tmp_path_factory):
    """An uninterrupted run: what every resumed run below must reproduce."""
    run = tmp_path_factory.mktemp("full") / "run"
    train(_tiny(photos), run, progress=False)
    return run


@pytest.fixture(scope="module")
def full_log(full_run):
    return _log(full_run)


def _assert_same_final_state(run: Path, full_run: Path) -> None:
    """The last checkpoints hold the same weights, optimiser and scheduler states, accuracy
    window and random states."""
    a = torch.load(run / "checkpoints" / "iter_0000006.pth", weights_only=True)
    b = torch.load(full_run / "checkpoints" / "iter_0000006.pth", weights_only=True)
    def same(x, y, where):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert isinstance(y, dict) and x.keys() == y.keys(), where
            for k in x:
                same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        else:
            assert x == y, where

    same(a, b, "checkpoint")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_foreign_files_are_neither_read_nor_deleted(photos, full_log, tmp_path):
    run = tmp_path / "run"
    train(_tiny(photos), run, stop_after=4, progress=False)
    ck = run / "checkpoints"
    assert _names(ck) == ["iter_0000002.pth", "iter_0000004.pth"]
    # A user's copies: names that end like a checkpoint's, a newer-looking one among them.
    (ck / "backup_iter_0000099.pth").write_bytes((ck / "iter_0000002.pth").read_bytes())
    (ck / "old_iter_0000001.pth").write_bytes(b"not mine")
    (ck / "iter_0000100.pth.bak").write_bytes(b"not mine either")
    train(_tiny(photos), run, resume=True, progress=False)
    assert _log(run) == full_log  # resumed from iter_0000004, not from the backup
    assert _names(ck) == ["backup_iter_0000099.pth", "iter_0000004.pth", "iter_0000006.pth",
                          "iter_0000100.pth.bak", "old_iter_0000001.pth"]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(photos, full_log, full_run, tmp_path):
    run = tmp_path / "run"
    train(_tiny(photos), run, stop_after=4, progress=False)
    newest = run / "checkpoints" / "iter_0000004.pth"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # cut short
    with pytest.warns(UserWarning, match=r"iter_0000004\.pth: cannot read checkpoint.*iter_0000002\.pth"):
        train(_tiny(photos), run, resume=True, progress=False)
    assert _log(run) == full_log
    _assert_same_final_state(run, full_run)


def _resume_error(cfg, run) -> str:
    with pytest.raises(RunFolderError) as info:
        Trainer(cfg, run, resume=True, progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def short_run(photos, tmp_path_factory):
    run = tmp_path_factory.mktemp("short") / "run"
    train(_tiny(photos), run, stop_after=2, progress=False)
    return run


def test_resume_with_another_config_is_one_line_naming_file_and_mismatch(photos, short_run):
    cfg = _tiny(photos)
    cfg["network_d"]["num_experts"] = 4
    msg = _resume_error(cfg, short_run)
    assert "iter_0000002.pth" in msg and "net_d" in msg and "shape mismatch" in msg
    assert msg.count("mismatch") == 1  # a summary, not one line per tensor
    cfg = _tiny(photos)
    cfg["network_g"]["num_feat"] = 8
    msg = _resume_error(cfg, short_run)
    assert "iter_0000002.pth" in msg and "params" in msg and "(8," in msg


@pytest.mark.parametrize("content", ["generator_only", "random_bytes", "tensor"])
def test_unusable_checkpoint_is_a_clear_error(photos, tmp_path, content):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    ck.mkdir(parents=True)
    path = ck / "iter_0000002.pth"
    if content == "generator_only":
        torch.save({"params": {"w": torch.zeros(1)}, "iter": 2}, path)
    elif content == "random_bytes":
        path.write_bytes(os.urandom(4096))
    else:
        torch.save(torch.zeros(3), path)
    msg = _resume_error(_tiny(photos), run)
    assert "iter_0000002.pth" in msg
    if content == "generator_only":
        assert "'net_d'" in msg and "not a training checkpoint" in msg


def test_failed_save_removes_its_temporary_file_and_keeps_the_old_one(photos, short_run, tmp_path,
                                                                      monkeypatch):
    trainer = Trainer(_tiny(photos), short_run, resume=True, progress=False)
    trainer.it = 3
    ck = short_run / "checkpoints"
    before = _names(ck)

    def broken_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(b"partial")
        else:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        trainer.save_checkpoint()
    assert _names(ck) == before


def test_save_is_fsynced_before_the_rename(photos, short_run, monkeypatch):
    trainer = Trainer(_tiny(photos), short_run, resume=True, progress=False)
    trainer.it = 3
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    trainer.save_checkpoint()
    assert "replace" in events and "fsync" in events[: events.index("replace")]
    (short_run / "checkpoints" / "iter_0000003.pth").unlink()


_KILL_DURING_SAVE = """
import os, signal, sys
import torch
sys.path.insert(0, {repo!r})
from tests.test_train import _tiny
from calgan_fast.train import train

real_save = torch.save
def save_then_die(obj, f, *args, **kwargs):
    if obj.get("iter") == 4:  # half of the file written, then the process is killed
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        if isinstance(f, (str, os.PathLike)):
            f = open(f, "wb")
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save_then_die
train(_tiny({photos!r}), {run!r}, resume=True, progress=False)
"""


def test_killed_save_resumes_from_the_previous_checkpoint(photos, full_log, full_run, tmp_path):
    run = tmp_path / "run"
    train(_tiny(photos), run, stop_after=2, progress=False)
    code = _KILL_DURING_SAVE.format(repo=str(REPO), photos=str(photos), run=str(run))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ck = run / "checkpoints"
    assert [n for n in _names(ck) if not n.startswith(".")] == ["iter_0000002.pth"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_tiny(photos), run, resume=True, progress=False)
    assert not [w for w in caught if "checkpoint" in str(w.message)]  # the old file is whole
    assert _log(run) == full_log
    assert _names(ck) == ["iter_0000004.pth", "iter_0000006.pth"]  # the half-written file is gone
    _assert_same_final_state(run, full_run)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    from calgan_fast.train.checkpoint import atomic_save, rng_state, set_rng_state

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    atomic_save({"rng": rng_state()}, tmp_path / "s.pth")
    draws = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(4)
    np.random.seed(4)
    random.seed(4)
    set_rng_state(torch.load(tmp_path / "s.pth", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]
