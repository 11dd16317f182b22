"""``python -m calgan_fast.info``: versions, what was built, and which backends run here."""

from __future__ import annotations

import importlib
import importlib.util
import platform


def collect() -> dict:
    import torch

    import calgan_fast
    from calgan_fast.ops.backends import BACKENDS, extension

    ext = extension()
    info = {
        "calgan_fast": calgan_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "extension _C": "not built" if ext is None else ext.build_info(),
        "_C CUDA arch list": getattr(ext, "CUDA_ARCH_LIST", "-") if ext is not None else "-",
        "CUDA device": _cuda_device(),
        "OpenMP threads": torch.get_num_threads(),
    }
    rows = []
    devices = ["cpu"] + (["cuda"] if _cuda_ok() else [])
    for name, b in BACKENDS.items():
        ok, how = b.available()
        runs = [d for d in devices if ok and b.runs_on(torch.device(d))]
        rows.append((name, ", ".join(runs) if runs else "-", how if not ok else b.description))
    info["backends"] = rows
    return info


def _version(mod: str) -> str:
    if importlib.util.find_spec(mod) is None:
        return "not installed"
    try:
        return importlib.import_module(mod).__version__
    except Exception as exc:  # pragma: no cover - broken installs
        return f"broken ({exc})"


def _cuda_ok() -> bool:
    import torch

    try:
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _cuda_device() -> str:
    import torch

    if not _cuda_ok():
        return "none"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"


def main() -> None:
    info = collect()
    rows = info.pop("backends")
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    print("\nbackend    runs on here   notes")
    for name, runs, note in rows:
        print(f"{name:<10} {runs:<14} {note}")


if __name__ == "__main__":
    main()
