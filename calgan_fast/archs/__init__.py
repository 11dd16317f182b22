"""Super-resolution generators and the one registry through which a config names them.

The registry holds the project's ``RRDBNet`` (BasicSR's key layout, so BasicSR, spandrel and
chaiNNer read its files) and ``EDSR`` (spandrel has no EDSR) with their named sizes, SwinIR's
named sizes (``SwinIR_M``, ``SwinIR_tiny``), and every upscaling architecture of spandrel under
its name (``SwinIR``, ``HAT``, ``DAT``, ``SPAN``, ``Compact``, ...; see
:func:`generator_names`). The upscaling factor is always the option ``scale``.

``build_generator("RRDBNet", num_block=23)`` builds one; ``load_generator`` opens any
checkpoint whose architecture is known (one written by ``calgan train``, which names its
generator, or any file spandrel detects); ``load_generator_weights`` loads a checkpoint (plain
state_dict, or one wrapped in ``params`` / ``params_ema`` as BasicSR saves them) into a built
model and raises :class:`CheckpointError` with the mismatching keys when it belongs to another
architecture.
"""

from __future__ import annotations

import inspect
import os
import warnings
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
    "generator_names",
    "load_generator",
    "resolve_generator",
    "training_generator",
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


def generator_names() -> list[str]:
    """Every name ``network_g.type`` accepts: the project's, SwinIR's named sizes, spandrel's."""
    from .community import SWINIR_PRESETS, spandrel_generators

    return [*GENERATORS, *SWINIR_PRESETS, *(n for n in spandrel_generators() if n not in GENERATORS)]


_CHANNEL_ARGS = {"num_in_ch", "num_out_ch", "in_nc", "out_nc", "in_ch", "out_ch", "in_chans",
                 "in_channels", "out_channels"}


def _resolve_community(name: str, kwargs: dict) -> tuple[Callable[..., nn.Module], dict]:
    from .community import SWINIR_PRESETS, scale_argument, spandrel_generators

    gens = spandrel_generators()
    if name in SWINIR_PRESETS:
        cls, kwargs = gens["SwinIR"], {**SWINIR_PRESETS[name], **kwargs}
    else:
        cls = gens[name]
    params = inspect.signature(cls.__init__).parameters
    sname = scale_argument(cls)
    kwargs = dict(kwargs)
    if "scale" in kwargs and sname != "scale":
        kwargs[sname] = kwargs.pop("scale")
    accepted = {k for k, p in params.items() if k != "self" and p.kind is not p.VAR_KEYWORD}
    for k in accepted & _CHANNEL_ARGS:  # RGB unless given (some constructors have no default)
        if params[k].default is inspect.Parameter.empty:
            kwargs.setdefault(k, 3)
    bad = sorted(set(kwargs) - accepted)
    if bad:
        shown = sorted("scale" if k == sname else k for k in accepted)
        raise ValueError(f"network_g: unknown option(s) {', '.join(bad)} for {name}; "
                         f"accepted: {', '.join(shown)}")
    return cls, kwargs


def resolve_generator(name: str, kwargs: Mapping) -> tuple[Callable[..., nn.Module], dict]:
    """(constructor, its keyword arguments) for ``network_g`` = ``{type: name, **kwargs}``.

    Unknown names and unknown options raise ``ValueError`` naming what was wrong and what is
    accepted; nothing is built.
    """
    kwargs = dict(kwargs)
    if name not in GENERATORS:
        names = generator_names()
        if name not in names:
            raise ValueError(f"network_g.type: unknown generator {name!r}; known: {', '.join(names)}")
        return _resolve_community(name, kwargs)
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
    return ctor, kwargs


def build_generator(name: str, **kwargs) -> nn.Module:
    """Builds the generator registered as ``name`` with ``kwargs`` (errors as :func:`resolve_generator`)."""
    ctor, kwargs = resolve_generator(name, kwargs)
    with warnings.catch_warnings():  # spandrel's SwinIR-family constructors call meshgrid without indexing
        warnings.filterwarnings("ignore", message="torch.meshgrid")
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
        if str(path).lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, not a torch checkpoint, ...
        from ..train.checkpoint import one_line

        raise CheckpointError(f"{path}: cannot read checkpoint ({one_line(exc)})") from exc


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


def load_generator(path: str | os.PathLike, network_g: Mapping | None = None,
                   param_key: str | None = None) -> tuple[nn.Module, dict, int]:
    """(generator with the file's weights, its ``network_g`` spec, its scale) for a checkpoint.

    The architecture comes from ``network_g`` when given, else from the ``network_g`` that
    ``calgan train`` stores in its files, else from spandrel's detection (``.pth`` or
    ``.safetensors`` of any architecture spandrel knows, OpenModelDB's files among them).
    """
    from .community import detect

    obj = _load(path)
    spec = dict(network_g) if network_g else (obj.get("network_g") if isinstance(obj, Mapping) else None)
    if spec:
        spec = dict(spec)
        name = spec.pop("type")
        model = build_generator(name, **spec)
        load_generator_weights(model, obj, param_key, name=str(path))
        from .community import plain_options

        scale = spec.get("scale") or plain_options(model).get("scale") or getattr(model, "scale", None)
        return model.eval(), {"type": name, **spec}, int(scale or 4)
    if param_key is not None:
        sd = extract_state_dict(obj, param_key) if isinstance(obj, Mapping) else obj
    else:
        sd = obj
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: checkpoint holds a {type(sd).__name__}, not a state_dict")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.meshgrid")
            model, spec, scale = detect(sd, str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return model.eval(), spec, scale


def training_generator(network_g: Mapping, scale: int, pretrain: str | os.PathLike | None = None,
                       param_key: str | None = None, strict: bool = True) -> tuple[nn.Module, dict]:
    """(generator, its ``network_g`` spec) for a training run at ``scale``.

    Without ``pretrain`` the generator is built from ``network_g``. With it, the architecture and
    its options come from the file when it names or spandrel detects them (``network_g`` is then
    replaced); a file of another scale is an error. A file that neither names nor matches a
    known architecture is loaded into the ``network_g`` generator (``strict`` as configured).
    """
    spec = dict(network_g)
    if spec.setdefault("scale", scale) != scale:
        raise ValueError(f"network_g.scale = {spec['scale']} differs from scale = {scale}")
    if pretrain:
        try:
            model, found, file_scale = load_generator(pretrain, None, param_key)
        except CheckpointError as exc:
            if "not recognise" not in str(exc):
                raise
        else:
            if file_scale != scale:
                raise ValueError(f"path.pretrain_network_g: {pretrain} is a x{file_scale} "
                                 f"{found['type']}, but scale = {scale}")
            return model.train(), found
    name = spec.pop("type")
    model = build_generator(name, **spec)
    if pretrain:
        load_generator_weights(model, pretrain, param_key, strict)
    return model, {"type": name, **spec}


def generator_from_checkpoint(path: str | os.PathLike, network_g: Mapping | None = None,
                              param_key: str | None = None) -> nn.Module:
    """Builds and loads a generator from a checkpoint (see :func:`load_generator`)."""
    return load_generator(path, network_g, param_key)[0]
