"""Every environment variable calgan_fast reads, read in this one place.

The compiled extension reads two more itself, per call, since its raw ops can be called without
this package: ``CALGAN_FAST_CUDA_BWD=aten`` (the ``cuda`` backend's earlier ATen backward) and
``CALGAN_FAST_DEBUG_CHECKS=1`` (routing-metadata checks of the raw CUDA ops); see the README.
"""

from __future__ import annotations

import os

#: Overrides ``backend="auto"`` of :func:`calgan_fast.routed_head` (and every module using it).
BACKEND_ENV = "CALGAN_FAST_BACKEND"


def backend_override() -> str | None:
    """The backend named by ``CALGAN_FAST_BACKEND``, or ``None`` when unset or empty."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    return value or None


def triton_interpret() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter.

    Reads ``TRITON_INTERPRET`` the way Triton does (1/true/yes/on/y, any case), so that this
    package and Triton never disagree about it.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


#: Set to 1 to build (setup.py) or run without the compiled extension ``calgan_fast._C``.
SKIP_EXT_ENV = "CALGAN_FAST_SKIP_EXT"


def skip_extension() -> bool:
    """True when ``CALGAN_FAST_SKIP_EXT`` asks for the pure-Python path."""
    return os.environ.get(SKIP_EXT_ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")


#: Folder for data calgan_fast writes for the user (the quick start's sample photos).
HOME_ENV = "CALGAN_FAST_HOME"


def data_home():
    """``$CALGAN_FAST_HOME`` or ``~/.cache/calgan_fast`` as a ``pathlib.Path``."""
    from pathlib import Path

    value = os.environ.get(HOME_ENV, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "calgan_fast"
