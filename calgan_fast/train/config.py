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

from ..losses import BALANCE_MODES
from .step import GANSettings, SettingError

__all__ = ["ConfigError", "DEFAULTS", "PRESETS", "load_config", "merge", "validate", "with_process_batch"]


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
            "batch_size": 48,  # in total, split over the processes (the paper's 48)
            "batch_size_per_gpu": None,  # BasicSR's per-process key; when set it is used instead
            "num_worker_per_gpu": 4,
            "cache": False,
            "skip_bad_images": False,
            "max_pixels": 256 * 1024 * 1024,
            # A subset of dataroot_gt: file names matching a glob, the names listed in a text
            # file (one a line), and/or the first max_images of them (sorted by name).
            "glob": None,
            "file_list": None,
            "max_images": None,
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
        "type": "CALGANDiscriminator",  # or the plain-GAN VGGStyleDiscriminator, UNetDiscriminatorSN
        "num_feat": 128,  # c = 4·num_feat = 512, the paper's
        "num_experts": 12,
        "patch_size": 4,
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
        "d_opt": {
            "balance": "paper",  # a balancing loss of calgan_fast.losses.BALANCE_MODES ("paper": Eq. 4)
            "lambda_b": 0.05,
            "lambda_o": 10.0,
            "lambda_d": 10.0,
            "lambda_dis": 1.0,
            "lambda_z": 0.0,  # router z-loss (not in the paper)
            "tau_end": None,  # Gumbel temperature at the last iteration, from network_d.tau; null: constant
            "revive_every": 0,  # iterations between revivals of silent experts; 0: never
            "revive_threshold": None,  # share of a silent expert; null: 1 / (4 N)
            "usage_decay": 0.99,  # moving average of the experts' usage that revival reads
        },
    },
    "logger": {
        "print_freq": 100,
        "sample_freq": 5000,
        "save_checkpoint_freq": 5000,
        "keep_checkpoints": 3,
        "use_tb_logger": True,
        "chance_warn_iters": 1000,  # warn when D's accuracy stayed at chance this long
        "chance_margin": 0.05,
        "sample_images": 2,  # validation images shown in the sample panels
        "sample_crops": 2,  # crops per image
        "sample_crop_size": 128,  # HR side of a crop
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
            "train": {"dataroot_gt": "samples", "gt_size": 64, "batch_size": 8,
                      "num_worker_per_gpu": 0, "cache": True},
            "val": {"dataroot_gt": "samples", "max_images": 1},
        },
        # A compact net that adds its output to the bicubic upscaling of the input: it starts as
        # bicubic and ends phase 1 above it within a minute on a CPU.
        "network_g": {"type": "CompactSR", "num_feat": 32, "num_conv": 8},
        "network_d": {"num_feat": 16, "num_experts": 4},
        "train": {
            "pretrain_iter": 1000,
            "total_iter": 300,
            "optim_pretrain": {"lr": 1e-3},
            "optim_g": {"lr": 1e-4},
            "optim_d": {"lr": 2e-4},
            "scheduler": {"milestones": []},
            "ema_decay": 0.99,
            # VGG19 on CPU would dominate a quick start; the paper preset uses it.
            "perceptual_opt": {"enabled": False},
            "pixel_opt": {"loss_weight": 1.0},
            # λ_d = 0.1: with the paper's 10, D stays at chance for ~1000 iterations. λ_dis = 4: with
            # the 0.5 of each relativistic term and λ_dis = 1, the balancing loss holds D at chance
            # through the 300 iterations (with λ_b = 0 it learns; λ_dis = 4 keeps the balancing).
            "d_opt": {"lambda_d": 0.1, "lambda_dis": 4.0},
        },
        "logger": {"print_freq": 10, "sample_freq": 250, "save_checkpoint_freq": 250,
                   "keep_checkpoints": 2, "chance_warn_iters": 200},
        "val": {"val_freq": 500},
    },
    # The paper's text; where it is silent, the authors' released config (docs/paper.md lists
    # every setting and its source).
    "paper": {
        "name": "paper",
        "scale": 4,
        "datasets": {"train": {"type": "HRFolderDataset", "dataroot_gt": "datasets/DIV2K/DIV2K_train_HR",
                               "gt_size": 256, "use_hflip": True, "use_rot": True, "batch_size": 48,
                               "batch_size_per_gpu": None}},
        "network_g": {"type": "RRDBNet", "num_feat": 64, "num_block": 23, "num_grow_ch": 32},
        "network_d": {"type": "CALGANDiscriminator", "num_feat": 128, "num_experts": 12, "patch_size": 4,
                      "routing": "gumbel", "tau": 1.0, "share_classifier": False},
        "path": {"pretrain_network_g": "experiments/pretrained_models/RRDB_PSNR_x4.pth"},
        "train": {
            "pretrain_iter": 0,
            "total_iter": 300000,
            "optim_g": {"type": "Adam", "lr": 1e-4, "betas": [0.9, 0.99]},
            "optim_d": {"type": "Adam", "lr": 1e-4, "betas": [0.9, 0.99]},
            "scheduler": {"milestones": [150000], "gamma": 0.5},
            "ema_decay": 0.999,
            "pixel_opt": {"loss_weight": 0.01},
            "perceptual_opt": {"enabled": True, "loss_weight": 1.0},
            "gan_opt": {"gan_type": "relativistic", "loss_weight": 0.005},
            "d_opt": {"balance": "paper", "lambda_b": 0.05, "lambda_o": 10.0, "lambda_d": 10.0,
                      "lambda_dis": 1.0},
        },
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
    ("network_d", "type"): ("CALGANDiscriminator", "VGGStyleDiscriminator", "UNetDiscriminatorSN"),
    ("network_d", "patch_size"): (1, 2, 4, 8, 16),
    ("train", "amp"): (None, "bf16", "fp16"),
    ("train", "perceptual_opt", "enabled"): ("auto", True, False),
    ("train", "gan_opt", "gan_type"): ("relativistic", "vanilla"),
    ("train", "d_opt", "balance"): BALANCE_MODES,
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
    g = dict(cfg["network_g"])
    if not isinstance(g.get("type"), str):
        raise ConfigError(f"{where}: network_g.type is not set (a generator name, e.g. RRDBNet or SwinIR_M)")
    from ..archs import resolve_generator

    try:
        resolve_generator(g.pop("type"), g)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    tr = cfg["datasets"]["train"]
    if not tr["dataroot_gt"]:
        raise ConfigError(f"{where}: datasets.train.dataroot_gt is not set (a folder of HR images, "
                          "or 'samples')")
    nd = cfg["network_d"]
    # The multiple the discriminator needs: its patch size p, 8 for the U-Net's three halvings.
    mult = {"CALGANDiscriminator": nd["patch_size"], "UNetDiscriminatorSN": 8}.get(nd["type"], 4)
    if not isinstance(tr["gt_size"], int) or tr["gt_size"] % mult or tr["gt_size"] % cfg["scale"]:
        what = ("network_d.patch_size" if nd["type"] == "CALGANDiscriminator"
                else f"network_d.type {nd['type']}")
        raise ConfigError(f"{where}: datasets.train.gt_size = {tr['gt_size']!r} must be a multiple of {mult} "
                          f"({what}) and of scale {cfg['scale']}")
    if nd["type"] == "VGGStyleDiscriminator" and tr["gt_size"] not in (128, 256):
        raise ConfigError(f"{where}: datasets.train.gt_size = {tr['gt_size']!r}; network_d.type "
                          "VGGStyleDiscriminator takes 128 or 256")
    for key in ("batch_size", "batch_size_per_gpu"):
        v = tr[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{where}: datasets.train.{key} = {v!r}; expected an integer >= 1 or null")
    if tr["batch_size"] is None and tr["batch_size_per_gpu"] is None:
        raise ConfigError(f"{where}: datasets.train.batch_size is not set (the batch in total)")
    for key in ("pretrain_iter", "total_iter"):
        v = cfg["train"][key]
        if not isinstance(v, int) or v < 0:
            raise ConfigError(f"{where}: train.{key} = {v!r}; expected an integer >= 0")
    if cfg["train"]["pretrain_iter"] + cfg["train"]["total_iter"] == 0:
        raise ConfigError(f"{where}: train.pretrain_iter + train.total_iter is 0: nothing to train")
    for key in ("print_freq", "sample_freq", "save_checkpoint_freq", "keep_checkpoints", "chance_warn_iters",
                "sample_images", "sample_crops", "sample_crop_size"):
        v = cfg["logger"][key]
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}: logger.{key} = {v!r}; expected an integer >= 1")
    if not isinstance(cfg["val"]["val_freq"], int) or cfg["val"]["val_freq"] < 1:
        raise ConfigError(f"{where}: val.val_freq = {cfg['val']['val_freq']!r}; expected an integer >= 1")
    if tr["type"] == "PairedFolderDataset" and not tr["dataroot_lq"]:
        raise ConfigError(f"{where}: datasets.train.dataroot_lq is needed by PairedFolderDataset")
    try:
        GANSettings.from_config(cfg["train"])
    except SettingError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def with_process_batch(cfg: Mapping, world: int) -> dict:
    """``cfg`` with ``datasets.train.batch_size_per_gpu`` resolved for ``world`` processes.

    ``batch_size_per_gpu``, when set, is used as it is (BasicSR's meaning). Otherwise
    ``batch_size`` is the batch in total and each process takes ``batch_size / world``; a total
    that does not divide is a ConfigError naming the key.
    """
    out = copy.deepcopy(dict(cfg))
    tr = out["datasets"]["train"]
    if tr["batch_size_per_gpu"] is None:
        total = tr["batch_size"]
        if total % world:
            raise ConfigError(f"datasets.train.batch_size = {total} does not divide over {world} processes; "
                              f"choose a multiple of {world} (or set datasets.train.batch_size_per_gpu)")
        tr["batch_size_per_gpu"] = total // world
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping of a YAML file; a missing file or invalid YAML is a ConfigError."""
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
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return dict(data)


def load_config(preset: str | None = None, path: str | os.PathLike | None = None,
                overrides: Mapping | None = None) -> dict:
    """Defaults <- preset <- YAML file <- overrides, validated. Raises ConfigError.

    ``preset=None`` takes the file's ``base:`` key as the preset when it has one, else starts from
    the bare defaults (``calgan train`` starts from ``quickstart`` instead, see
    :mod:`calgan_fast.train.overrides`).
    """
    cfg = copy.deepcopy(DEFAULTS)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        cfg = merge(cfg, PRESETS[preset], f"preset {preset}")
    where = "config"
    if path is not None:
        where = str(path)
        data = read_yaml(path)
        named = data.pop("base", None)
        if named is not None and preset is None:
            if named not in PRESETS:
                raise ConfigError(f"{path}: base = {named!r}; expected one of {list(PRESETS)}")
            cfg = merge(cfg, PRESETS[named], f"preset {named}")
        elif named is not None and named != preset:
            raise ConfigError(f"{path}: base = {named!r} but the preset is {preset!r}; give one of them")
        cfg = merge(cfg, data, where)
    if overrides:
        cfg = merge(cfg, overrides, "overrides")
    validate(cfg, where)
    return cfg
