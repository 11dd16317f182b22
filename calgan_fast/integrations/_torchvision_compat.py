"""Import-time fix for BasicSR 1.4.2 on current torchvision.

BasicSR 1.4.2 (the latest release on PyPI) does ``from torchvision.transforms.functional_tensor
import rgb_to_grayscale`` in ``basicsr/data/degradations.py``, which every ``import basicsr`` reaches.
torchvision 0.17 removed that public module (its content lives on as the private
``torchvision.transforms._functional_tensor``), so a plain ``import basicsr`` fails with
``ModuleNotFoundError``.

:func:`install_functional_tensor_alias` registers the old name in ``sys.modules`` for the current
process only, pointing at the module that now holds the same functions. No installed file is
changed, and nothing happens where the old module still exists.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

OLD_NAME = "torchvision.transforms.functional_tensor"
# The private successor first (same functions, same tensor-only signatures), then the public module.
CANDIDATES = ("torchvision.transforms._functional_tensor", "torchvision.transforms.functional")


def install_functional_tensor_alias() -> ModuleType | None:
    """Make ``import torchvision.transforms.functional_tensor`` work in this process.

    Returns the module the old name now resolves to, or ``None`` when torchvision is not installed.
    Idempotent; a real ``functional_tensor`` module (old torchvision) is left as it is.
    """
    if OLD_NAME in sys.modules:
        return sys.modules[OLD_NAME]
    try:
        if importlib.util.find_spec(OLD_NAME) is not None:
            return importlib.import_module(OLD_NAME)
    except ModuleNotFoundError:  # torchvision itself (or torchvision.transforms) is missing
        return None
    for name in CANDIDATES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "rgb_to_grayscale"):  # the one name BasicSR 1.4.2 imports from it
            sys.modules[OLD_NAME] = module
            return module
    return None
