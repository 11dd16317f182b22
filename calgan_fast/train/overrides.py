"""How a training configuration is put together from its layers, and how a run is extended.

One rule: a configuration is the built-in defaults, updated by its **base** preset, updated by
the YAML file (``--config``), updated by ``--set key=value`` overrides, in that order. The base
is ``--preset`` when given, else the file's ``base:`` key, else ``quickstart``.

``--resume`` starts from the run's saved ``config.yml`` instead; a partial ``--config`` or
``--set`` given with it updates the saved configuration (for example a larger
``train.total_iter``), and the change is recorded in the run folder.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .config import DEFAULTS, PRESETS, ConfigError, merge, read_yaml, validate

__all__ = ["DEFAULT_BASE", "LayeredConfig", "build_config", "changed_keys", "config_for_resume",
           "parse_sets", "read_yaml"]

#: The base of a configuration that names none (``calgan train --help`` says the same).
DEFAULT_BASE = "quickstart"

# Keys a resumed run cannot change: the saved weights would not fit.
_FIXED_ON_RESUME = ("scale", "network_g", "network_d")


class LayeredConfig(dict):
    """A validated configuration (a dict) that remembers its base and where each key was set.

    ``base``: the preset it started from. ``origin``: dotted key -> the layer that last set it
    (``preset quickstart``, the YAML file's path, ``--set``, or ``saved config <path>``).
    """

    base: str | None
    origin: dict[str, str]


def _leaves(d: Mapping, prefix: tuple = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        path = (*prefix, str(k))
        if isinstance(v, Mapping) and path != ("network_g",) and v:
            out.update(_leaves(v, path))
        else:
            out[".".join(path)] = v
    return out


def _all_keys() -> list[str]:
    keys = list(_leaves(DEFAULTS))
    keys += [k for k in _leaves(PRESETS[DEFAULT_BASE]) if k.startswith("network_g.")]
    return keys


def parse_sets(items: Sequence[str] | None) -> dict:
    """``["train.total_iter=600", "network_d.tau=0.5"]`` as a nested mapping.

    Values are read as YAML (``600`` is an integer, ``1e-4`` a number, ``null``/``true`` what
    YAML says, ``[1, 2]`` a list). A key that does not exist is a ConfigError naming the closest
    valid key; types are checked when the mapping is merged, as for a YAML file.
    """
    out: dict = {}
    known = _all_keys()
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.total_iter=600")
        parts = key.split(".")
        if not parts[0] == "network_g" and key not in known:
            if not any(k.startswith(key + ".") for k in known):
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"--set {key}: unknown key{hint}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p} is set as a value by another --set")
            node = nxt
        node[parts[-1]] = value
    return out


def _record(origin: dict, layer: Mapping, where: str) -> None:
    for k in _leaves(layer):
        origin[k] = where


def build_config(preset: str | None = None, path: str | os.PathLike | None = None,
                 sets: Sequence[str] | Mapping | None = None) -> LayeredConfig:
    """Defaults <- base preset <- YAML file <- ``--set``, validated (see the module's rule)."""
    data = read_yaml(path) if path is not None else {}
    named = data.pop("base", None)
    if named is not None and named not in PRESETS:
        raise ConfigError(f"{path}: base = {named!r}; expected one of {list(PRESETS)}")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if preset is not None and named is not None and preset != named:
        raise ConfigError(f"--preset {preset} but {path} names base: {named}; give one of them")
    base = preset or named or DEFAULT_BASE
    origin: dict[str, str] = {}
    cfg = merge(DEFAULTS, PRESETS[base], f"preset {base}")
    _record(origin, PRESETS[base], f"preset {base}")
    where = str(path) if path is not None else "config"
    if data:
        cfg = merge(cfg, data, where)
        _record(origin, data, where)
    over = parse_sets(sets) if not isinstance(sets, Mapping) else dict(sets)
    if over:
        cfg = merge(cfg, over, "--set")
        _record(origin, over, "--set")
    validate(cfg, where if not over else f"{where} with --set")
    out = LayeredConfig(cfg)
    out.base, out.origin = base, origin
    return out


def base_config(base: str) -> dict:
    """The configuration of a base preset alone (not validated)."""
    return merge(DEFAULTS, PRESETS[base], f"preset {base}")


def changed_keys(cfg: Mapping, ref: Mapping) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, value in ref, value in cfg)]`` for every leaf that differs."""
    a, b = _leaves(ref), _leaves(cfg)
    return [(k, a.get(k), b[k]) for k in b if a.get(k, object()) != b[k]]


def config_for_resume(run: str | os.PathLike, path: str | os.PathLike | None = None,
                      sets: Sequence[str] | Mapping | None = None) -> tuple[LayeredConfig, list]:
    """The saved configuration of ``run``, updated by a partial YAML file and ``--set``.

    Returns the configuration and its changes ``[(key, old, new)]``. Changing the generator,
    the discriminator or the scale is a ConfigError (the checkpoint would not fit).
    """
    saved_path = Path(run) / "config.yml"
    if not saved_path.is_file():
        raise ConfigError(f"{saved_path}: no saved config in the run folder to resume "
                          "(--resume continues a run that `calgan train` started in --out)")
    saved = read_yaml(saved_path)
    saved.pop("base", None)
    where = f"saved config {saved_path}"
    cfg = merge(DEFAULTS, saved, where)
    origin: dict[str, str] = {}
    _record(origin, saved, where)
    data = read_yaml(path) if path is not None else {}
    data.pop("base", None)
    if data:
        cfg = merge(cfg, data, str(path))
        _record(origin, data, str(path))
    over = parse_sets(sets) if not isinstance(sets, Mapping) else dict(sets)
    if over:
        cfg = merge(cfg, over, "--set")
        _record(origin, over, "--set")
    validate(cfg, str(path or "--set") if (data or over) else where)
    old = merge(DEFAULTS, saved, where)
    changes = changed_keys(cfg, old)
    for key, was, now in changes:
        if key.split(".")[0] in _FIXED_ON_RESUME:
            raise ConfigError(f"{key}: cannot change when resuming ({was!r} -> {now!r}); the saved "
                              "weights are for the old value. Start a new run with --out elsewhere "
                              "and path.pretrain_network_g pointing at this run's model instead")
    out = LayeredConfig(cfg)
    out.base, out.origin = None, origin
    return out, changes


def record_changes(run: str | os.PathLike, cfg: Mapping, changes: list, iteration: int) -> None:
    """Writes the updated ``config.yml`` and appends the changes to ``config_changes.jsonl``."""
    run = Path(run)
    tmp = run / f".config.yml.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(copy.deepcopy(dict(cfg)), f, sort_keys=False)
    os.replace(tmp, run / "config.yml")
    line = {"iter": iteration, "changes": {k: {"old": a, "new": b} for k, a, b in changes}}
    with open(run / "config_changes.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
