"""Training configuration: BasicSR-like YAML keys, presets, and strict validation.

A configuration is the built-in defaults, updated by a preset (``quickstart`` or ``paper``),
updated by the user's YAML file. Every key must exist in the defaults (a typo is an error naming
the key, the file and the closest valid key); ``network_g`` takes the options of the generator it
names (checked when the generator is built).
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Mapping
from typing import Any

import yaml

__all__ = ["ConfigError", "DEFAULTS", "PRESETS", "load_config", "merge", "validate"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the file."""


#: Every key a configuration may hold, with its default (the paper's setting, docs/design.md §8).
DEFAULTS: dict[str, Any] = {
    "name": "calgan",
    "model_type": "CALGANModel",
    "scale": 4,
    "manual_seed": 0,
    "device": "auto",  # auto | cpu | cuda
    "num_threads": None,  # torch.set_num_threads on CPU; None keeps torch's choice
    "datasets": {
        "train": {
            "type": "HRFolderDataset",  # or PairedFolderDataset
            "dataroot_gt": None,  # a folder, or "samples" for the bundled sample photos
            "dataroot_lq": None,
            "gt_size": 256,
            "use_hflip": True,
            "use_rot": True,
            "batch_size_per_gpu": 48,  # per process; the paper's 48 is the total
            "num_worker_per_gpu": 4,
            "cache": False,
            "skip_bad_images": False,
            "max_pixels": 256 * 1024 * 1024,
        },
        "val": {
            "type": "HRFolderDataset",
            "dataroot_gt": None,  # None: no validation
            "dataroot_lq": None,
            "max_images": None,
            "skip_bad_images": False,
            "max_pixels": 256 * 1024 * 1024,
        },
    },
    "network_g": {"type": "RRDBNet", "num_feat": 64, "num_block": 23, "num_grow_ch": 32},
    "network_d": {
        "num_feat": 64,
        "num_experts": 12,
        "hidden": None,
        "routing": "gumbel",
        "tau": 1.0,
        "share_classifier": False,
        "backend": "auto",
    },
    "path": {"pretrain_network_g": None, "param_key_g": None, "strict_load_g": True},
    "train": {
        "pretrain_iter": 0,  # phase 1: L1 (PSNR) pre-training iterations
        "total_iter": 300000,  # phase 2: CAL-GAN iterations
        "optim_pretrain": {"type": "Adam", "lr": 2e-4, "betas": [0.9, 0.99], "weight_decay": 0.0},
        "scheduler_pretrain": {"type": "MultiStepLR", "milestones": [], "gamma": 0.5},
        "optim_g": {"type": "Adam", "lr": 1e-4, "betas": [0.9, 0.99], "weight_decay": 0.0},
        "optim_d": {"type": "Adam", "lr": 1e-4, "betas": [0.9, 0.99], "weight_decay": 0.0},
        "scheduler": {"type": "MultiStepLR", "milestones": [150000], "gamma": 0.5},
        "ema_decay": 0.999,
        "grad_clip": None,  # max gradient norm for G and D, None: off
        "amp": None,  # None | bf16 | fp16 (GPU only)
        "sync_bn": False,
        "pixel_opt": {"loss_weight": 0.01},
        "perceptual_opt": {
            "enabled": "auto",  # auto: used when VGG19 weights are found, else a warning
            "loss_weight": 1.0,
            "weights_path": None,  # None: torchvision's file in the torch hub cache
        },
        "gan_opt": {"gan_type": "relativistic", "loss_weight": 0.005},
        "d_opt": {"balance": "paper", "lambda_b": 0.05, "lambda_o": 10.0, "lambda_d": 10.0, "lambda_dis": 1.0},
    },
    "logger": {
        "print_freq": 100,
        "sample_freq": 5000,
        "save_checkpoint_freq": 5000,
        "keep_checkpoints": 3,
        "use_tb_logger": True,
        "chance_warn_iters": 1000,  # warn when D's accuracy stayed at chance this long
        "chance_margin": 0.05,
    },
    "val": {"val_freq": 5000, "crop_border": None, "test_y_channel": True},
}

# Sections whose keys are free (checked elsewhere).
_OPEN = {("network_g",)}

PRESETS: dict[str, dict[str, Any]] = {
    # A tiny run on the bundled sample photos: CPU, a few minutes on 2 cores.
    "quickstart": {
        "name": "quickstart",
        "device": "auto",
        # One thread: tiny convolutions gain little from a second one, and lose a lot when other
        # programs share the cores. Set 2 (or null) on an idle machine.
        "num_threads": 1,
        "datasets": {
            "train": {"dataroot_gt": "samples", "gt_size": 64, "batch_size_per_gpu": 8,
                      "num_worker_per_gpu": 0, "cache": True},
            "val": {"dataroot_gt": "samples", "max_images": 1},
        },
        "network_g": {"type": "RRDBNet", "num_feat": 16, "num_block": 1, "num_grow_ch": 8},
        "network_d": {"num_feat": 16, "num_experts": 4},
        "train": {
            "pretrain_iter": 300,
            "total_iter": 300,
            "optim_pretrain": {"lr": 1e-3},
            "optim_g": {"lr": 1e-4},
            "optim_d": {"lr": 2e-4},
            "scheduler": {"milestones": []},
            "ema_decay": 0.99,
            # VGG19 on CPU would dominate a quick start; the paper preset uses it.
            "perceptual_opt": {"enabled": False},
            "pixel_opt": {"loss_weight": 1.0},
            # λ_d = 0.1: with the paper's 10, D stays at chance for ~1000 iterations.
            "d_opt": {"lambda_d": 0.1},
        },
        "logger": {"print_freq": 10, "sample_freq": 100, "save_checkpoint_freq": 100,
                   "keep_checkpoints": 2, "chance_warn_iters": 200},
        "val": {"val_freq": 300},
    },
    # docs/design.md §8: DIV2K, RRDB 23x64 from a PSNR checkpoint, 300k iterations, N = 12.
    "paper": {
        "name": "paper",
        "datasets": {"train": {"dataroot_gt": "datasets/DIV2K/DIV2K_train_HR", "gt_size": 256,
                               "batch_size_per_gpu": 48}},
        "path": {"pretrain_network_g": "experiments/pretrained_models/RRDB_PSNR_x4.pth"},
    },
}


def merge(base: Mapping, update: Mapping, where: str = "config", _path: tuple = ()) -> dict:
    """``base`` updated by ``update`` recursively; a key missing from ``base`` is a ConfigError."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        path = (*_path, key)
        dotted = ".".join(map(str, path))
        if key not in out:
            close = difflib.get_close_matches(str(key), [str(k) for k in out], n=1)
            hint = f" (did you mean {'.'.join(map(str, (*_path, close[0])))}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {dotted}{hint}")
        if isinstance(out[key], dict) and path not in _OPEN:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {dotted} must be a mapping, got {type(value).__name__}")
            out[key] = merge(out[key], value, where, path)
        elif path in _OPEN:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {dotted} must be a mapping, got {type(value).__name__}")
            # Another generator type starts from its own defaults; the same type is updated.
            same = value.get("type", out[key].get("type")) == out[key].get("type")
            out[key] = {**(out[key] if same else {}), **copy.deepcopy(dict(value))}
        else:
            out[key] = _typed(out[key], value, f"{where}: {dotted}")
    return out


def _typed(default, value, what: str):
    """``value`` checked against the type of its default (YAML reads ``1e-4`` as a string)."""
    if default is None or value is None:
        return copy.deepcopy(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{what} = {value!r}; expected true or false")
        return value
    if isinstance(default, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} = {value!r}; expected a number") from None
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{what} = {value!r}; expected an integer")
        return value
    if isinstance(default, list) and not isinstance(value, list):
        raise ConfigError(f"{what} = {value!r}; expected a list")
    if isinstance(default, str) and not isinstance(value, (str, bool)):
        raise ConfigError(f"{what} = {value!r}; expected a string")
    return copy.deepcopy(value)


_CHOICES = {
    ("device",): ("auto", "cpu", "cuda"),
    ("datasets", "train", "type"): ("HRFolderDataset", "PairedFolderDataset"),
    ("datasets", "val", "type"): ("HRFolderDataset", "PairedFolderDataset"),
    ("network_d", "routing"): ("gumbel", "argmax"),
    ("train", "amp"): (None, "bf16", "fp16"),
    ("train", "perceptual_opt", "enabled"): ("auto", True, False),
    ("train", "gan_opt", "gan_type"): ("relativistic", "vanilla"),
    ("train", "d_opt", "balance"): ("paper", "switch"),
    ("train", "optim_g", "type"): ("Adam", "AdamW"),
    ("train", "optim_d", "type"): ("Adam", "AdamW"),
    ("train", "optim_pretrain", "type"): ("Adam", "AdamW"),
    ("train", "scheduler", "type"): ("MultiStepLR",),
    ("train", "scheduler_pretrain", "type"): ("MultiStepLR",),
}


def _get(cfg, path):
    for k in path:
        cfg = cfg[k]
    return cfg


def validate(cfg: Mapping, where: str = "config") -> None:
    """Value checks that a typo-free config can still fail; raises ConfigError naming the key."""
    for path, choices in _CHOICES.items():
        v = _get(cfg, path)
        if v not in choices:
            raise ConfigError(f"{where}: {'.'.join(path)} = {v!r}; expected one of {list(choices)}")
    if cfg["scale"] not in (2, 3, 4):
        raise ConfigError(f"{where}: scale = {cfg['scale']!r}; expected 2, 3 or 4")
    tr = cfg["datasets"]["train"]
    if not tr["dataroot_gt"]:
        raise ConfigError(f"{where}: datasets.train.dataroot_gt is not set (a folder of HR images, "
                          "or 'samples')")
    if not isinstance(tr["gt_size"], int) or tr["gt_size"] % 4 or tr["gt_size"] % cfg["scale"]:
        raise ConfigError(f"{where}: datasets.train.gt_size = {tr['gt_size']!r} must be a multiple of 4 "
                          f"(the discriminator) and of scale {cfg['scale']}")
    for key in ("pretrain_iter", "total_iter"):
        v = cfg["train"][key]
        if not isinstance(v, int) or v < 0:
            raise ConfigError(f"{where}: train.{key} = {v!r}; expected an integer >= 0")
    if cfg["train"]["pretrain_iter"] + cfg["train"]["total_iter"] == 0:
        raise ConfigError(f"{where}: train.pretrain_iter + train.total_iter is 0: nothing to train")
    for key in ("print_freq", "sample_freq", "save_checkpoint_freq", "keep_checkpoints", "chance_warn_iters"):
        v = cfg["logger"][key]
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}: logger.{key} = {v!r}; expected an integer >= 1")
    if not isinstance(cfg["val"]["val_freq"], int) or cfg["val"]["val_freq"] < 1:
        raise ConfigError(f"{where}: val.val_freq = {cfg['val']['val_freq']!r}; expected an integer >= 1")
    if tr["type"] == "PairedFolderDataset" and not tr["dataroot_lq"]:
        raise ConfigError(f"{where}: datasets.train.dataroot_lq is needed by PairedFolderDataset")


def load_config(preset: str | None = None, path: str | os.PathLike | None = None,
                overrides: Mapping | None = None) -> dict:
    """Defaults <- preset <- YAML file <- overrides, validated. Raises ConfigError."""
    cfg = copy.deepcopy(DEFAULTS)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        cfg = merge(cfg, PRESETS[preset], f"preset {preset}")
    where = "config"
    if path is not None:
        where = str(path)
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{line} invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        cfg = merge(cfg, data, where)
    if overrides:
        cfg = merge(cfg, overrides, "overrides")
    validate(cfg, where)
    return cfg
