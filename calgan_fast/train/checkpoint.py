"""Training checkpoints on disk: names, discovery, atomic writes, pruning and safe loading.

The trainer writes ``iter_XXXXXXX.pth`` (seven or more digits) into the run's ``checkpoints/``
folder. Only files named exactly so count as checkpoints: anything else in the folder (a user's
``backup_iter_0000099.pth``, an editor's copy) is never read, never pruned and never deleted.

A write goes to a hidden temporary file in the same folder, is flushed and ``fsync``-ed, and only
then renamed over the target, so a process killed midway leaves the previous checkpoints whole; a
write that fails removes its temporary file. Checkpoints are read with ``weights_only=True``.

A checkpoint holds every random state (:func:`rng_state`: torch's CPU generator, the CUDA
generators when CUDA is in use, numpy's and Python's), so a resumed run draws the same numbers as
one that was not interrupted.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = ["CKPT_RE", "checkpoint_name", "list_checkpoints", "atomic_save", "prune_checkpoints",
           "load_newest_checkpoint", "CorruptCheckpointError",
           "remove_stale_temporaries", "load_module_state", "rng_state", "set_rng_state"]

#: The whole file name of a trainer checkpoint; nothing else in the folder is one.
CKPT_RE = re.compile(r"^iter_(\d{7,})\.pth$")


#: The temporary file of an unfinished :func:`atomic_save` of a checkpoint (a killed process).
_TMP_RE = re.compile(r"^\.iter_\d{7,}\.pth\.tmp\d+$")


class CorruptCheckpointError(RuntimeError):
    """A file with a checkpoint's name that cannot be read as one."""


def checkpoint_name(it: int) -> str:
    """The file name of the checkpoint written after iteration ``it``."""
    return f"iter_{it:07d}.pth"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(iteration, path)]`` of the trainer's own checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_file() and (m := CKPT_RE.match(p.name))]
    return sorted(found)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` is either the old file or the whole new one.

    The data goes to ``.<name>.tmp<pid>`` next to ``path``, is fsync-ed, then renamed; on any
    failure the temporary file is removed and the error re-raised.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> list[Path]:
    """Deletes all but the newest ``keep`` trainer checkpoints of ``folder``; returns the deleted."""
    old = [p for _, p in list_checkpoints(folder)[:-keep]] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return old


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files that checkpoint writes killed midway left in ``folder``."""
    folder = Path(folder)
    stale = [p for p in folder.iterdir() if _TMP_RE.match(p.name)] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` of ``exc``, cut to ``limit`` characters (torch.load's
    errors span many lines)."""
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read(path: Path) -> Mapping:
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or random bytes, not a torch file, ...
        raise CorruptCheckpointError(f"{path}: cannot read checkpoint ({one_line(exc)})") from None
    if not isinstance(st, Mapping):
        raise CorruptCheckpointError(f"{path}: holds a {type(st).__name__}, not a training checkpoint")
    return st


def load_newest_checkpoint(folder: str | os.PathLike, required: tuple[str, ...] = ()) -> tuple[Path, Mapping]:
    """``(path, state)`` of the newest readable checkpoint in ``folder``.

    A newest file that cannot be read (cut short, overwritten with other bytes) is skipped with a
    warning naming it, and the previous one is tried. A readable file that lacks a key of
    ``required`` (e.g. a generator-only file named like a checkpoint) raises
    :class:`CorruptCheckpointError` naming the file and the missing keys: it is not a crash
    leftover, and resuming from an older file would hide it.
    """
    ckpts = list_checkpoints(folder)
    if not ckpts:
        raise CorruptCheckpointError(f"{folder}: holds no checkpoint")
    errors = []
    for _, path in reversed(ckpts):
        try:
            st = _read(path)
        except CorruptCheckpointError as exc:
            errors.append(str(exc))
            continue
        missing = [k for k in required if k not in st]
        if missing:
            raise CorruptCheckpointError(
                f"{path}: not a training checkpoint of this trainer (no {', '.join(map(repr, missing))}; "
                f"keys: {', '.join(map(str, list(st)[:8]))})")
        for e in errors:
            warnings.warn(f"{e}; resuming from the previous checkpoint {path.name}", stacklevel=2)
        return path, st
    raise CorruptCheckpointError("no readable checkpoint: " + "; ".join(errors))


def load_module_state(module: torch.nn.Module, sd, what: str, path: str | os.PathLike) -> None:
    """``module.load_state_dict(sd)``, or one :class:`CorruptCheckpointError` line naming ``path``,
    the network ``what`` and the first keys and shapes that differ (a run resumed with another
    architecture or width)."""
    if not isinstance(sd, Mapping):
        raise CorruptCheckpointError(f"{path}: {what} holds a {type(sd).__name__}, not a state_dict")
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} in the file vs {tuple(v.shape)} in the model" for k, v in own.items()
              if k in sd and isinstance(sd[k], torch.Tensor) and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = f" (+{len(keys) - 2} more)" if len(keys) > 2 else ""
                parts.append(f"{label}: {', '.join(keys[:2])}{more}")
        raise CorruptCheckpointError(
            f"{path}: {what} does not fit the configured network (was the run saved with another "
            f"config?); " + "; ".join(parts))
    module.load_state_dict(sd)


def rng_state() -> dict:
    """Every random state a training step draws from, as tensors and lists (``weights_only``
    loadable): ``torch`` (CPU), ``cuda`` (all devices, when CUDA is initialised), ``numpy``, ``python``."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Restores what :func:`rng_state` returned (the CUDA states only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
