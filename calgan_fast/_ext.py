"""Loading of the compiled extension ``calgan_fast._C``, with one warning when it is not there.

Without the extension (built with ``CALGAN_FAST_SKIP_EXT=1``, not built at all, built against
another torch so that it fails to load, or skipped at run time with ``CALGAN_FAST_SKIP_EXT=1``)
the package still works: the ``cpu`` and ``cuda`` backends are unavailable and ``auto`` picks
``torch`` (or ``triton`` on a GPU). The first time that happens in a process, one
:class:`ExtensionWarning` says why and how to build it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import warnings
from pathlib import Path
from types import ModuleType

from . import _env


class ExtensionWarning(UserWarning):
    """``calgan_fast._C`` is absent or fails to load; the pure-Python backends run instead."""


_state: dict[str, object] = {}

BUILD_HINT = (
    "to build it, reinstall from the source tree with `bash install.sh` (or "
    "`pip install --no-build-isolation .` inside the environment that has the torch to build against)"
)


def _built() -> bool:
    """Whether a compiled ``_C`` file lies in the package (then a failed import is a failed load)."""
    here = Path(__file__).resolve().parent
    return any((here / f"_C{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def load_extension() -> ModuleType | None:
    """``calgan_fast._C``, or ``None`` (and one warning per process) when it cannot be used."""
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    module: ModuleType | None = None
    if _env.skip_extension():
        why = f"{_env.SKIP_EXT_ENV}=1 is set"
    else:
        try:
            module = importlib.import_module("calgan_fast._C")
            why = ""
        except (ImportError, OSError) as e:  # e.g. built against another torch: undefined symbols
            if isinstance(e, ModuleNotFoundError) and e.name != "calgan_fast._C":
                raise
            if _built():
                why = f"it fails to load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r})"
            else:
                why = "it is not built"
    _state["module"] = module
    if module is None:
        warnings.warn(
            f"calgan_fast._C is not used: {why}. The 'cpu' and 'cuda' backends are unavailable; "
            f"backend='auto' runs 'torch' (or 'triton' on a GPU). {BUILD_HINT}.",
            ExtensionWarning,
            stacklevel=3,
        )
    return module
