"""Training plots of a run folder: losses, D's accuracy on real and fake pixels, expert usage and
validation metrics over iterations, as one PNG (``<run>/training.png``) next to the TensorBoard logs.

Reads ``train_log.jsonl`` (one line of losses per ``logger.print_freq`` iterations) and, when
present, ``metrics.json`` (validation history).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["plot_run", "read_log"]

# D's accuracy on real and on fake pixels.
_ACC = ("acc_d_real", "acc_d_fake")


def read_log(run: str | os.PathLike) -> list[dict]:
    """The lines of ``<run>/train_log.jsonl`` (a line that does not parse is an error naming it)."""
    path = Path(run) / "train_log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log (is {run} a run folder?)")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not a JSON line ({exc.msg})") from None
    if not rows:
        raise ValueError(f"{path}: the training log is empty")
    return rows


def _series(rows: list[dict], key: str):
    pts = [(r["iter"], r[key]) for r in rows if key in r and isinstance(r[key], (int, float))]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)) if pts else None


def plot_run(run: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Writes the training plot of ``run`` (default ``<run>/training.png``) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .viz import palette

    run = Path(run)
    rows = read_log(run)
    out = Path(output) if output else run / "training.png"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    # Losses.
    ax = axes[0, 0]
    for k in sorted({k for r in rows for k in r if k.startswith(("l_", "d_"))}):
        s = _series(rows, k)
        if s is not None:
            ax.plot(*s, label=k, lw=1)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title("losses")
    ax.set_xlabel("iteration")
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    # D accuracy.
    ax = axes[0, 1]
    for k, label in zip(_ACC, ("real", "fake")):
        s = _series(rows, k)
        if s is not None:
            ax.plot(*s, label=f"D accuracy on {label} pixels", lw=1)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1)
    ax.set_title("discriminator accuracy (0.5 = chance)")
    ax.set_xlabel("iteration")
    if len(ax.lines) > 1:
        ax.legend(fontsize=8)
    # Expert usage.
    ax = axes[1, 0]
    use = [(r["iter"], r["expert_usage"]) for r in rows if isinstance(r.get("expert_usage"), list)]
    if use:
        its = np.array([u[0] for u in use])
        u = np.array([u[1] for u in use], dtype=float).T
        pal = palette(u.shape[0]) / 255.0
        ax.stackplot(its, u, colors=pal, labels=[f"expert {i}" for i in range(u.shape[0])])
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6, ncol=2, loc="upper right")
    else:
        ax.text(
            0.5,
            0.5,
            "no expert usage logged (phase 1 only)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_title("expert usage (share of pixels)")
    ax.set_xlabel("iteration")
    # Validation.
    ax = axes[1, 1]
    mpath = run / "metrics.json"
    hist = json.loads(mpath.read_text(encoding="utf-8")).get("history", []) if mpath.is_file() else []
    if hist:
        its = [h["iter"] for h in hist]
        ax.plot(its, [h["psnr"] for h in hist], "o-", color="C0", label="PSNR (dB)")
        if any("bicubic_psnr" in h for h in hist):
            ax.axhline(
                next(h["bicubic_psnr"] for h in hist if "bicubic_psnr" in h),
                color="C0",
                ls=":",
                label="bicubic PSNR",
            )
        ax.set_ylabel("PSNR (dB)")
        ax2 = ax.twinx()
        ax2.plot(its, [h["ssim"] for h in hist], "s-", color="C1", label="SSIM")
        rq = [(h["iter"], h["routing"]) for h in hist if isinstance(h.get("routing"), dict)]
        if rq:
            ax2.plot(
                [r[0] for r in rq],
                [r[1]["nmi_content"] for r in rq],
                "^-",
                color="C2",
                label="NMI(expert, texture)",
            )
            ax2.plot(
                [r[0] for r in rq],
                [r[1]["usage_entropy"] for r in rq],
                "v-",
                color="C3",
                label="usage entropy",
            )
        ax2.set_ylim(0, 1)
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no validation metrics", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("validation")
    ax.set_xlabel("iteration")
    fig.suptitle(str(run.name))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}{out.suffix}")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)
    return out
