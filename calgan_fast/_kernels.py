"""Import of the Triton kernels package ``calgan_fast.kernels``.

Installed, ``kernels/`` is the subpackage ``calgan_fast.kernels`` (setup.py's ``package_dir``).
Run from a source checkout (``PYTHONPATH=.``), that mapping does not exist, so the package is
loaded from ``kernels/`` beside ``calgan_fast/`` under the same name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def load_kernels():
    try:
        return importlib.import_module("calgan_fast.kernels")
    except ModuleNotFoundError:
        src = Path(__file__).resolve().parent.parent / "kernels"
        init = src / "__init__.py"
        if not init.exists():
            raise
        spec = importlib.util.spec_from_file_location(
            "calgan_fast.kernels", init, submodule_search_locations=[str(src)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["calgan_fast.kernels"] = mod
        spec.loader.exec_module(mod)
        return mod
