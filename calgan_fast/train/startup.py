"""Checks made before a training run writes anything, and what it prints when it starts.

A file the configuration points at and that is missing stops the run with one message naming
the key, where it was set, the path it resolved to (relative paths are read from the current
directory), where such a file comes from, and what to do instead. Nothing is written to the run
folder before these checks pass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import ConfigError, with_process_batch

__all__ = ["check_files", "chance_window", "describe_changes", "estimate_step_memory", "memory_warning",
           "select_subset"]


def _where(origin: Mapping[str, str] | None, key: str) -> str:
    src = (origin or {}).get(key)
    return f" (set in {src})" if src else ""


def _resolved(value: str) -> str:
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    return f"{Path.cwd() / p} (relative to the current directory)"


def check_files(cfg: Mapping, origin: Mapping[str, str] | None = None) -> None:
    """Raises ConfigError for the first missing dataset folder, generator checkpoint or VGG19 file."""
    for split in ("train", "val"):
        spec = cfg["datasets"][split]
        for key, what in (("dataroot_gt", "a folder of HR images"), ("dataroot_lq", "a folder of LR images")):
            value = spec.get(key)
            unused = key == "dataroot_lq" and spec["type"] != "PairedFolderDataset"
            if not value or value == "samples" or unused:
                continue
            if not Path(value).expanduser().is_dir():
                dotted = f"datasets.{split}.{key}"
                alt = ("use 'samples' for the bundled sample photos" if split == "train"
                       else "set it to null to train without validation")
                raise ConfigError(f"{dotted} = {value!r}{_where(origin, dotted)}: folder not found at "
                                  f"{_resolved(value)}; it should be {what}. Fix the path, or {alt}")
    pre = cfg["path"]["pretrain_network_g"]
    if pre and not Path(pre).expanduser().is_file():
        key = "path.pretrain_network_g"
        raise ConfigError(
            f"{key} = {pre!r}{_where(origin, key)}: file not found at {_resolved(pre)}. It is the "
            f"phase-1 (PSNR-trained) {cfg['network_g']['type']} the adversarial phase starts from: "
            "BasicSR's ESRGAN release has RRDB_PSNR_x4.pth for the paper's RRDBNet 23x64, and any "
            "`calgan train` run writes one to <run>/models/net_g_final.pth. Alternative: set "
            f"{key}: null and train.pretrain_iter > 0 to pre-train the generator in this run "
            "(e.g. --set path.pretrain_network_g=null --set train.pretrain_iter=100000)")
    po = cfg["train"]["perceptual_opt"]
    if po["enabled"] is True and cfg["train"]["total_iter"] > 0:
        from ..losses import VGG19_FILE, default_vgg19_path

        path = Path(po["weights_path"]).expanduser() if po["weights_path"] else default_vgg19_path()
        if not path.is_file():
            key = "train.perceptual_opt"
            raise ConfigError(
                f"{key}.enabled = true{_where(origin, key + '.enabled')} but the VGG19 weights are not at "
                f"{_resolved(str(path))}. The file is torchvision's ImageNet VGG19 ({VGG19_FILE}); "
                "download it once where there is internet (python -c \"import torchvision; "
                "torchvision.models.vgg19(weights='IMAGENET1K_V1')\") and copy it there, or set "
                f"{key}.weights_path to it. Alternative: {key}.enabled: false (no perceptual loss) "
                "or auto (used when found)")


def chance_window(cfg: Mapping) -> int:
    """Iterations of D at chance before the warning: ``logger.chance_warn_iters``, capped at a
    fifth of the adversarial phase (at least 20) so that short runs are warned too."""
    n = cfg["logger"]["chance_warn_iters"]
    return max(1, min(n, max(20, cfg["train"]["total_iter"] // 5)))


def _saved_bytes(fn, *args) -> int:
    total = 0
    seen: dict[int, torch.Tensor] = {}  # a tensor saved by two operations counts once

    def pack(t):
        nonlocal total
        if id(t) not in seen:
            seen[id(t)] = t
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return total + out.numel() * out.element_size()


def estimate_step_memory(cfg: Mapping) -> int:
    """Bytes of activations one training step of G and D keeps for backward (an estimate).

    Measured with the real networks on the ``meta`` device (nothing is allocated); parameters,
    optimiser states and the perceptual network's own activations are added roughly.
    """
    from ..archs import build_generator
    from ..nn.baselines import build_discriminator


    cfg = with_process_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    tr = cfg["datasets"]["train"]
    b, hr, s = tr["batch_size_per_gpu"], tr["gt_size"], cfg["scale"]
    spec = dict(cfg["network_g"])
    spec.setdefault("scale", s)
    name = spec.pop("type")
    with torch.device("meta"):
        g = build_generator(name, **spec)
        d = build_discriminator(cfg["network_d"], hr)
        lq = torch.empty(b, 3, hr // s, hr // s, requires_grad=True)
        x = torch.empty(b, 3, hr, hr, requires_grad=True)
        total = _saved_bytes(g, lq)
        total += 2 * _saved_bytes(lambda t: d(t), x)  # real and fake passes
    params = sum(p.numel() for p in [*g.parameters(), *d.parameters()]) * 4 * 4  # weights, grads, Adam
    vgg = 0
    if cfg["train"]["perceptual_opt"]["enabled"] is not False and cfg["train"]["total_iter"] > 0:
        # VGG19 up to conv5_4 keeps about 2.4k channels of full-resolution floats per pixel
        # (64+64 at 1x, 128+128 at 1/2, 4x256 at 1/4, ...), for SR and HR.
        vgg = 2 * b * hr * hr * 4 * (2 * 64 * 2 + 2 * 128 * 2 // 4 + 4 * 256 * 2 // 16 + 8 * 512 * 2 // 64)
    return int(total + params + vgg)


def memory_warning(cfg: Mapping, device: torch.device | str) -> str | None:
    """A warning when one step will likely not fit: on the CPU above 8 GB, on a GPU above its memory."""
    try:
        need = estimate_step_memory(cfg)
    except Exception:  # an architecture that does not run on meta tensors: no estimate
        return None
    dev = torch.device(device)
    cfg = with_process_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    tr = cfg["datasets"]["train"]
    what = (f"about {need / 2**30:.1f} GB for one step (batch {tr['batch_size_per_gpu']} of "
            f"{tr['gt_size']}x{tr['gt_size']} crops, {cfg['network_g']['type']})")
    hint = ("lower datasets.train.batch_size_per_gpu or datasets.train.gt_size (e.g. --set "
            "datasets.train.batch_size_per_gpu=4)")
    if dev.type == "cpu" and need > 8 * 2**30:
        return (f"training on the CPU needs {what}; this is a GPU setting and will be very slow here. "
                f"To try it, {hint}")
    if dev.type == "cuda":
        try:
            free, total = torch.cuda.mem_get_info(dev)
        except Exception:
            return None
        if need > total:
            return f"the GPU has {total / 2**30:.1f} GB, and training needs {what}; {hint}, or use more GPUs"
    return None


def describe_changes(cfg: Mapping, base: str) -> list[str]:
    """Lines ``key: base value -> value`` for the settings that differ from the base preset."""
    from .overrides import base_config, changed_keys

    return [f"{k}: {a!r} -> {b!r}" for k, a, b in changed_keys(cfg, base_config(base))]



def select_subset(dataset, spec: Mapping, split: str = "train"):
    """Keeps the part of a folder dataset that ``glob``, ``file_list`` and ``max_images`` select.

    ``glob`` matches file names (``*.png``, ``0*``); ``file_list`` is a text file of names (one a
    line, with or without extension; ``#`` starts a comment; relative to the current directory);
    ``max_images`` keeps the first N of what is left, sorted by name.
    """
    import fnmatch

    attr = "pairs" if hasattr(dataset, "pairs") else "files"
    items = list(getattr(dataset, attr))
    path_of = (lambda it: it[0]) if attr == "pairs" else (lambda it: it)
    pattern, listing, limit = spec.get("glob"), spec.get("file_list"), spec.get("max_images")
    key = f"datasets.{split}"
    if pattern:
        items = [it for it in items if fnmatch.fnmatch(path_of(it).name, pattern)]
        if not items:
            raise ConfigError(f"{key}.glob = {pattern!r}: no file name in {spec['dataroot_gt']} matches")
    if listing:
        p = Path(listing).expanduser()
        if not p.is_file():
            raise ConfigError(f"{key}.file_list = {listing!r}: file not found at {_resolved(listing)}")
        names = [ln.split("#", 1)[0].strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        names = {Path(n).name for n in names if n}
        picked = [it for it in items if path_of(it).name in names or path_of(it).stem in names]
        found = {path_of(it).name for it in picked} | {path_of(it).stem for it in picked}
        absent = sorted(n for n in names if n not in found)
        if absent:
            raise ConfigError(f"{key}.file_list = {listing!r}: {len(absent)} listed name(s) not in "
                              f"{spec['dataroot_gt']}{' or excluded by glob' if pattern else ''}: "
                              f"{', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}")
        items = picked
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"{key}.max_images = {limit!r}; expected an integer >= 1 or null")
        items = items[:limit]
    setattr(dataset, attr, items)
    return dataset
