"""The community's super-resolution architectures, through spandrel.

spandrel (the library chaiNNer and traiNNer-redux load models with) holds the architectures as
plain ``nn.Module`` classes and detects the architecture, its options and its scale from a
state_dict. This module

* lists the spandrel architectures that upscale (``spandrel_generators``), under spandrel's
  architecture id (``SwinIR``, ``HAT``, ``DAT``, ``SPAN``, ``Compact``, ``ESRGAN``...) or, where
  one id covers several classes, the class name (``PLKSR``, ``RealPLKSR``);
* names their scale argument (``upscale``, ``up_scale``, ``upscaling_factor``...) ``scale`` as
  everywhere else in calgan_fast;
* detects a state_dict (``detect``) with spandrel's registry plus this project's EDSR, which
  spandrel does not have, and builds the project's own ``RRDBNet`` for RRDB files in BasicSR's
  key layout, so that such a file trains and saves in the layout BasicSR reads.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["spandrel_generators", "scale_argument", "detect", "plain_options", "SWINIR_PRESETS"]

# Names of the upscaling factor in spandrel's constructors.
_SCALE_NAMES = ("scale", "upscale", "up_scale", "upscaling_factor")

#: SwinIR's classical x4 SR generator as the paper trains it ("SwinIR-M": embed_dim 180, six
#: stages of six layers with six heads, window 8, 64x64 training patches, pixel-shuffle upsampler),
#: and a tiny one for tests. A config's ``network_g`` options update these.
SWINIR_PRESETS: dict[str, dict[str, Any]] = {
    "SwinIR_M": {"img_size": 64, "window_size": 8, "embed_dim": 180, "depths": [6] * 6,
                 "num_heads": [6] * 6, "mlp_ratio": 2.0, "img_range": 1.0,
                 "upsampler": "pixelshuffle", "resi_connection": "1conv"},
    "SwinIR_tiny": {"img_size": 16, "window_size": 4, "embed_dim": 12, "depths": [1, 1],
                    "num_heads": [2, 2], "mlp_ratio": 2.0, "img_range": 1.0,
                    "upsampler": "pixelshuffle", "resi_connection": "1conv"},
}


def scale_argument(cls: type) -> str | None:
    """The name of ``cls``'s upscaling-factor argument, or None when it has none."""
    params = inspect.signature(cls.__init__).parameters
    return next((n for n in _SCALE_NAMES if n in params), None)


@functools.lru_cache(maxsize=1)
def spandrel_generators() -> dict[str, type[nn.Module]]:
    """name -> class of every spandrel architecture that takes an upscaling factor."""
    from spandrel import MAIN_REGISTRY

    out: dict[str, type[nn.Module]] = {}
    for support in MAIN_REGISTRY.architectures():
        arch = support.architecture
        mod = importlib.import_module(type(arch).__module__)
        classes = [c for c in (getattr(mod, n) for n in getattr(mod, "__all__", ()))
                   if isinstance(c, type) and issubclass(c, nn.Module)]
        for cls in classes:
            if scale_argument(cls) is not None:
                out[arch.id if len(classes) == 1 else cls.__name__] = cls
    return out


def _name_of(cls: type, arch_id: str) -> str:
    gens = spandrel_generators()
    if gens.get(arch_id) is cls:
        return arch_id
    return next((n for n, c in gens.items() if c is cls), arch_id)


def _plain(v) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def plain_options(model: nn.Module) -> dict[str, Any]:
    """The constructor options spandrel recorded on ``model`` that differ from the defaults.

    Only YAML-writable values are kept (a layer class such as ``norm_layer`` is left at its
    default); the scale argument is returned as ``scale``.
    """
    hp = dict(getattr(model, "hyperparameters", {}) or {})
    params = inspect.signature(type(model).__init__).parameters
    sname = scale_argument(type(model))
    out: dict[str, Any] = {}
    for k, v in hp.items():
        if k == sname:
            out["scale"] = int(v)
            continue
        if not _plain(v) or k not in params:
            continue
        default = params[k].default
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(default, tuple):
            default = list(default)
        if default is inspect.Parameter.empty or v != default:
            out[k] = v
    return out


def _edsr_support():
    """EDSR in BasicSR's key layout as a spandrel architecture (spandrel has no EDSR)."""
    from spandrel import Architecture, ArchSupport, ImageModelDescriptor
    from spandrel.util import KeyCondition, get_seq_len

    from .edsr import EDSR

    class EDSRArch(Architecture[EDSR]):
        def __init__(self) -> None:
            super().__init__(id="EDSR", detect=KeyCondition.has_all(
                "conv_first.weight", "body.0.conv1.weight", "body.0.conv2.weight",
                "conv_after_body.weight", "upsample.0.weight", "conv_last.weight"))

        def load(self, state_dict):
            num_feat, in_ch = state_dict["conv_first.weight"].shape[:2]
            convs = [k for k in state_dict if k.startswith("upsample.") and k.endswith(".weight")]
            first_up = state_dict["upsample.0.weight"].shape[0] // num_feat
            scale = 3 if first_up == 9 else 2 ** len(convs)
            num_block = get_seq_len(state_dict, "body")
            # The weights do not record the residual scaling: EDSR's paper size uses 0.1.
            res_scale = 0.1 if (num_feat, num_block) == (256, 32) else 1.0
            model = EDSR(num_in_ch=in_ch, num_out_ch=state_dict["conv_last.weight"].shape[0], scale=scale,
                         num_feat=num_feat, num_block=num_block, res_scale=res_scale)
            model.load_state_dict(state_dict)
            return ImageModelDescriptor(model, state_dict, architecture=self, purpose="SR",
                                        tags=[f"{num_feat}nf"], supports_half=True,
                                        supports_bfloat16=True, scale=scale, input_channels=in_ch,
                                        output_channels=model.conv_last.out_channels)

    return ArchSupport.from_architecture(EDSRArch())


@functools.lru_cache(maxsize=1)
def _registry():
    from spandrel import MAIN_REGISTRY

    reg = MAIN_REGISTRY.copy()
    reg.add(_edsr_support())
    return reg


def _basicsr_rrdb(sd: Mapping[str, torch.Tensor]):
    """(the project's RRDBNet, spec, scale) for an RRDB state_dict in BasicSR's layout, or None.

    BasicSR's RRDBNet folds the input with ``pixel_unshuffle`` for x2 and x1, so the scale is
    read from ``conv_first``'s input channels against ``conv_last``'s output channels.
    """
    from .rrdbnet import RRDBNet

    need = ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_up1.weight",
            "conv_up2.weight", "conv_hr.weight", "conv_last.weight")
    if not all(k in sd for k in need) or "conv_up3.weight" in sd:
        return None
    num_feat, in_folded = sd["conv_first.weight"].shape[:2]
    out_ch = sd["conv_last.weight"].shape[0]
    scale = {1: 4, 4: 2, 16: 1}.get(in_folded // out_ch if in_folded % out_ch == 0 else 0)
    if scale is None:
        return None
    opts = {"num_in_ch": out_ch, "num_out_ch": out_ch, "scale": scale, "num_feat": num_feat,
            "num_block": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body.")),
            "num_grow_ch": sd["body.0.rdb1.conv1.weight"].shape[0]}
    model = RRDBNet(**opts)
    try:
        model.load_state_dict(sd)
    except RuntimeError:
        return None
    if out_ch == 3:
        del opts["num_in_ch"], opts["num_out_ch"]
    return model, {"type": "RRDBNet", **opts}, scale


def detect(sd: Mapping[str, torch.Tensor], where: str) -> tuple[nn.Module, dict, int]:
    """(model with ``sd`` loaded, its ``network_g`` spec, its scale) for a state_dict.

    Raises ``ValueError`` naming ``where`` when no known architecture matches.
    """
    from spandrel import UnsupportedModelError, canonicalize_state_dict

    sd = canonicalize_state_dict(dict(sd))
    own = _basicsr_rrdb(sd)
    if own is not None:
        return own
    try:
        desc = _registry().load(sd)
    except UnsupportedModelError:
        raise ValueError(f"{where}: spandrel does not recognise the architecture of this state_dict "
                         f"(first keys: {', '.join(list(sd)[:3])}); give network_g (or --arch)") from None
    except Exception as exc:  # a recognised architecture whose weights do not load
        first = str(exc).strip().split("\n")[0]
        raise ValueError(f"{where}: spandrel recognises the keys but cannot load the weights "
                         f"({type(exc).__name__}: {first})") from None
    scale = int(desc.scale)
    arch_id = desc.architecture.id
    model = desc.model
    if arch_id == "EDSR":
        spec = {"type": "EDSR", "scale": scale, "num_feat": model.conv_first.out_channels,
                "num_block": len(model.body), "res_scale": model.body[0].res_scale}
    else:
        spec = {"type": _name_of(type(model), arch_id), **plain_options(model)}
    spec["scale"] = scale
    return model, spec, scale
