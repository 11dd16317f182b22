"""``calgan train``: the configuration's layers, the start-up checks, resume and extension."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .config import ConfigError

__all__ = ["train_command"]


def _fmt(v) -> str:
    return "null" if v is None else repr(v)


def _device(cfg) -> torch.device:
    dev = cfg["device"]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(dev)


def train_command(args) -> int:
    """Runs ``calgan train`` from parsed arguments (``preset``, ``config``, ``set``, ``out``, ``resume``)."""
    from .checkpoint import list_checkpoints
    from .overrides import build_config, config_for_resume, record_changes
    from .startup import check_files, describe_changes, memory_warning
    from .trainer import train

    out = Path(args.out) if args.out else None
    sets = getattr(args, "set", None) or []
    changes: list = []
    done = 0
    if args.resume:
        if out is None:
            raise ValueError("--resume needs --out (the run folder to continue)")
        if args.preset:
            raise ConfigError("--preset cannot be given with --resume: the run's saved config.yml is the "
                              "base; give changes with --config (a partial file) or --set KEY=VALUE")
        cfg, changes = config_for_resume(out, args.config, sets)
        ckpts = list_checkpoints(out / "checkpoints")
        done = ckpts[-1][0] if ckpts else 0
        tr = cfg["train"]
        total = tr["pretrain_iter"] + tr["total_iter"]
        for key, was, now in changes:
            if key == "train.pretrain_iter" and done > min(was, now):
                raise ConfigError(f"train.pretrain_iter: cannot change from {was} to {now} at iteration "
                                  f"{done} (the run is past phase 1); change train.total_iter instead")
        if ckpts and done >= total:
            if done > total:
                raise ConfigError(f"{out}: the run is at iteration {done}, beyond train.pretrain_iter + "
                                  f"train.total_iter = {total}; set train.total_iter to more than "
                                  f"{done - tr['pretrain_iter']}")
            more = max(tr["total_iter"], 1000)
            print(f"{out}: the run is complete (iteration {done} of {total} = train.pretrain_iter "
                  f"{tr['pretrain_iter']} + train.total_iter {tr['total_iter']}); nothing to do. To train "
                  f"longer, raise train.total_iter, e.g.\n  calgan train --out {out} --resume "
                  f"--set train.total_iter={tr['total_iter'] + more}")
            return 0
        if changes:
            print(f"resuming {out} at iteration {done} with changes to its saved config:")
            for key, was, now in changes:
                print(f"  {key}: {_fmt(was)} -> {_fmt(now)}")
    else:
        cfg = build_config(args.preset, args.config, sets)
        diff = describe_changes(cfg, cfg.base)
        how = ("--preset" if args.preset else f"base: in {args.config}"
               if args.config and _names_base(args.config) else "the default base")
        print(f"settings: preset {cfg.base} ({how})" + (", with these changes:" if diff else ", unchanged"))
        for line in diff:
            print(f"  {line}")
    if out is None:
        out = Path("runs") / cfg["name"]
    msg = memory_warning(cfg, _device(cfg))
    if msg:
        warnings.warn(msg, stacklevel=1)
    check_files(cfg, cfg.origin)
    if not cfg["datasets"]["val"]["dataroot_gt"]:
        print("note: no validation set; set datasets.val.dataroot_gt to a folder of HR images (e.g. "
              "--set datasets.val.dataroot_gt=path/to/Set14/HR) for PSNR/SSIM every val.val_freq iterations")
    if changes:
        record_changes(out, cfg, changes, done)
    last = train(dict(cfg), out, resume=args.resume)
    if last and "_rank" not in last and (list_checkpoints(out / "checkpoints") or (out / "models").is_dir()):
        print(f"done: run folder {out}\n"
              f"  checkpoints  {out / 'checkpoints'}\n"
              f"  final model  {out / 'models' / 'net_g_final.pth'}\n"
              f"  samples and routing maps  {out / 'samples'}\n"
              f"  metrics  {out / 'metrics.json'} (validation), {out / 'train_log.jsonl'} (losses)\n"
              f"  TensorBoard  tensorboard --logdir {out / 'tb'}")
    return 0


def _names_base(path) -> bool:
    from .overrides import read_yaml

    return "base" in read_yaml(path)
