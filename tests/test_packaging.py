"""Packaging: the sdist ships every source, the pure-Python path falls back with one warning, and
a build against an isolated torch stops with the way out."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, env_extra: dict | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    env.pop("CALGAN_FAST_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


_FALLBACK = """
import warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    {setup}
    import calgan_fast
    from calgan_fast.ops import resolve_backend
    x = torch.randn(20, 8)
    args = (x, torch.randint(0, 3, (20,)), torch.ones(20), torch.randn(3, 8, 8), torch.randn(3, 2, 8),
            torch.randn(3, 2), torch.randn(3, 2), torch.randn(3))
    out = calgan_fast.routed_head(*args)
    again = calgan_fast.routed_head(*args)
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"
    assert "cpu" not in calgan_fast.available_backends("cpu")
    ref = calgan_fast.routed_head(*args, backend="reference")
    torch.testing.assert_close(out.logits, ref.logits)
mine = [w for w in caught if type(w.message).__name__ == "ExtensionWarning"]
assert len(mine) == 1, [str(w.message) for w in caught]
print(mine[0].message)
"""


def test_skip_ext_falls_back_with_one_warning():
    proc = _run(_FALLBACK.format(setup="pass"), {"CALGAN_FAST_SKIP_EXT": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CALGAN_FAST_SKIP_EXT=1 is set" in proc.stdout and "'torch'" in proc.stdout


def test_extension_that_fails_to_load_falls_back_with_one_warning():
    # None in sys.modules makes `import calgan_fast._C` raise, as a build against another torch
    # does (undefined symbols), while the compiled file is there.
    if not any(p.name.startswith("_C.") for p in (ROOT / "calgan_fast").iterdir()):
        pytest.skip("calgan_fast._C is not built here")
    proc = _run(_FALLBACK.format(setup="import sys; sys.modules['calgan_fast._C'] = None"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "it fails to load (" in proc.stdout and "--no-build-isolation" in proc.stdout


def test_isolated_build_against_another_torch_stops(tmp_path):
    fake = tmp_path / "pip-build-env-test" / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.0.0+isolated'\n")
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    env.pop("CALGAN_FAST_SKIP_EXT", None)
    proc = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "isolated build" in proc.stderr and "pip install --no-build-isolation" in proc.stderr


def test_sdist_ships_every_source(tmp_path):
    env = dict(os.environ, CALGAN_FAST_SKIP_EXT="1")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = tmp_path.glob("calgan_fast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = [
        p
        for d in ("csrc", "kernels", "calgan_fast")
        for p in (ROOT / d).rglob("*")
        if p.is_file()
        and p.suffix in (".h", ".cuh", ".cpp", ".cu", ".py", ".typed")
        and "__pycache__" not in p.parts
    ]
    missing = sorted(str(p.relative_to(ROOT)) for p in wanted if str(p.relative_to(ROOT)) not in names)
    assert not missing, f"not in the sdist: {missing}"
    assert {"setup.py", "pyproject.toml", "CMakeLists.txt", "README.md"} <= names
    assert not [n for n in names if n.endswith((".so", ".o"))]
