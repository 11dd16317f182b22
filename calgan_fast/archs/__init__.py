"""Super-resolution generators and a registry so that a config names them.

``build_generator("RRDBNet", num_block=23)`` builds one; ``load_generator_weights`` loads a
checkpoint (plain state_dict, or one wrapped in ``params`` / ``params_ema`` as BasicSR saves
them) and raises :class:`CheckpointError` with the mismatching keys when it belongs to another
architecture.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .compact import CompactSR
from .edsr import EDSR
from .rrdbnet import RRDBNet

__all__ = [
    "CompactSR",
    "EDSR",
    "RRDBNet",
    "CheckpointError",
    "GENERATORS",
    "build_generator",
    "extract_state_dict",
    "load_generator_weights",
    "generator_from_checkpoint",
]


def _edsr_baseline(**kw) -> EDSR:
    return EDSR.baseline(**kw)


def _edsr_paper(**kw) -> EDSR:
    return EDSR.paper(**kw)


#: name -> constructor. Keyword arguments of a config's ``network_g`` are passed through.
GENERATORS: dict[str, Callable[..., nn.Module]] = {
    "RRDBNet": RRDBNet,
    "CompactSR": CompactSR,
    "EDSR": EDSR,
    "EDSR_baseline": _edsr_baseline,
    "EDSR_paper": _edsr_paper,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""


def build_generator(name: str, **kwargs) -> nn.Module:
    """Builds the generator registered as ``name`` with ``kwargs``.

    Unknown names and unknown keyword arguments raise ``ValueError`` naming what was wrong and
    what is accepted.
    """
    if name not in GENERATORS:
        raise ValueError(f"network_g.type: unknown generator {name!r}; known: {', '.join(GENERATORS)}")
    ctor = GENERATORS[name]
    target = ctor if inspect.isclass(ctor) else (EDSR if name.startswith("EDSR") else ctor)
    params = inspect.signature(target.__init__ if inspect.isclass(target) else target).parameters
    accepted = {k for k in params if k != "self"}
    if name in ("EDSR_baseline", "EDSR_paper"):  # the preset fixes the size
        accepted -= {"num_feat", "num_block", "res_scale"}
    bad = sorted(set(kwargs) - accepted)
    if bad:
        raise ValueError(f"network_g: unknown option(s) {', '.join(bad)} for {name}; "
                         f"accepted: {', '.join(sorted(accepted))}")
    return ctor(**kwargs)


def extract_state_dict(ckpt: Mapping, param_key: str | None = None) -> dict[str, torch.Tensor]:
    """The generator's state_dict from a loaded checkpoint object.

    ``param_key`` picks a wrapper key; ``None`` prefers ``params_ema`` then ``params`` (BasicSR's
    names), else takes ``ckpt`` itself. A ``module.`` prefix left by DDP is stripped.
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(ckpt).__name__}, not a state_dict")
    if param_key is not None:
        if param_key not in ckpt:
            raise CheckpointError(f"checkpoint has no key {param_key!r} (keys: {', '.join(map(str, ckpt))})")
        sd = ckpt[param_key]
    else:
        sd = next((ckpt[k] for k in ("params_ema", "params") if k in ckpt), ckpt)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("checkpoint holds no generator state_dict (expected tensors under "
                              "'params_ema', 'params' or at the top level)")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def _load(path: str | os.PathLike) -> Mapping:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, not a torch checkpoint, ...
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc


def load_generator_weights(model: nn.Module, ckpt: str | os.PathLike | Mapping,
                           param_key: str | None = None, strict: bool = True, *,
                           name: str | None = None) -> nn.Module:
    """Loads a checkpoint (path or loaded object) into ``model`` and returns it.

    Raises :class:`CheckpointError` naming the file, the architecture and the first mismatching
    keys/shapes when the checkpoint was made for a different network (with ``strict=False`` only
    shape mismatches raise; missing and unexpected keys are tolerated).
    """
    where = name or (str(ckpt) if isinstance(ckpt, (str, os.PathLike)) else "checkpoint")
    obj = _load(ckpt) if isinstance(ckpt, (str, os.PathLike)) else ckpt
    try:
        sd = extract_state_dict(obj, param_key)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise CheckpointError(f"{where}: does not fit {type(model).__name__} "
                              f"(wrong architecture or options?); " + "; ".join(parts))
    model.load_state_dict(sd, strict=False)
    return model


def generator_from_checkpoint(path: str | os.PathLike, network_g: Mapping | None = None,
                              param_key: str | None = None) -> nn.Module:
    """Builds and loads a generator from a checkpoint.

    Checkpoints written by ``calgan train`` carry their ``network_g`` options; for others (public
    BasicSR files) pass ``network_g`` (e.g. ``{"type": "RRDBNet", "num_block": 23}``).
    """
    obj = _load(path)
    spec = dict(network_g) if network_g else (obj.get("network_g") if isinstance(obj, Mapping) else None)
    if not spec:
        raise CheckpointError(f"{path}: checkpoint does not say which generator it holds; "
                              "give the architecture (network_g type and options)")
    spec = dict(spec)
    name = spec.pop("type")
    model = build_generator(name, **spec)
    return load_generator_weights(model, obj, param_key, name=str(path)).eval()
