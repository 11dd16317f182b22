"""Import of the Triton kernels package ``calgan_fast.kernels``.

Installed, ``kernels/`` is the subpackage ``calgan_fast.kernels`` (setup.py's ``package_dir``).
Run from a source checkout (``PYTHONPATH=.``, or an editable install), the ``kernels/`` directory
beside the imported ``calgan_fast/`` is loaded under that name, so the kernels always come from the
same tree as the package (an editable install of another checkout must not shadow them).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def load_kernels():
    """The ``calgan_fast.kernels`` package (imports Triton)."""
    mod = sys.modules.get("calgan_fast.kernels")
    if mod is not None:
        return mod
    pkg_dir = Path(__file__).resolve().parent
    src = pkg_dir.parent / "kernels"
    init = src / "__init__.py"
    if (pkg_dir / "kernels").is_dir() or not init.exists():
        return importlib.import_module("calgan_fast.kernels")
    spec = importlib.util.spec_from_file_location(
        "calgan_fast.kernels", init, submodule_search_locations=[str(src)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["calgan_fast.kernels"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules["calgan_fast.kernels"]
        raise
    return mod
