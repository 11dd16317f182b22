"""Routing analysis of a CAL-GAN discriminator: routing quality, routing maps (the paper's Fig. 3)
and a t-SNE of the routed features (Fig. 4).

Routing-quality figures of an expert map (one expert id per feature pixel, pooled over images):

- ``usage``: the share of feature pixels routed to each expert, shape ``(num_experts,)``.
- ``usage_entropy``: the entropy of ``usage`` divided by ``log(num_experts)``; 1 when balanced,
  0 when one expert takes every pixel.
- ``experts_alive``: the number of experts whose share exceeds ``1 / (4 num_experts)``.
- ``nmi_content``: the normalised mutual information (arithmetic mean of the two entropies, as
  scikit-learn's default) between the expert and a content label: the quintile (0 flat ... 4
  textured) of the local luma variance around each feature pixel, over an 8x8 HR window centred
  on its 4x4 cell. 0 when routing ignores texture, 1 when the expert determines the quintile and
  back.

The discriminator is evaluated in eval mode (argmax routing) through its public forward; the mode
it is put in is :func:`discriminator_eval_mode`, the one place to change how a D is evaluated.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "content_labels",
    "discriminator_eval_mode",
    "load_discriminator",
    "nmi",
    "routing_quality",
    "routing_quality_of_images",
    "analyze_images",
    "tsne_embedding",
]

# BT.601 luma of RGB in [0, 1] (the Y of calgan_fast.metrics.rgb_to_y, scaled to [0, 1]).
_LUMA = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)


def discriminator_eval_mode(net_d: torch.nn.Module) -> torch.nn.Module:
    """Puts ``net_d`` in the mode a discriminator is evaluated in (argmax routing, BatchNorm as the
    discriminator defines its eval mode) and returns it."""
    return net_d.eval()


def nmi(a, b) -> float:
    """Normalised mutual information of two integer labelings (``MI / mean(H(a), H(b))``).

    1.0 when each determines the other (up to renaming), 0.0 when independent; 1.0 when both are
    constant, 0.0 when only one is (scikit-learn's conventions).
    """
    a = np.asarray(a).reshape(-1)
    b = np.asarray(b).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"nmi: labelings of {a.size} and {b.size} elements")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.float64)
    np.add.at(joint, (ai, bi), 1.0)
    joint /= a.size
    pa, pb = joint.sum(1), joint.sum(0)
    if pa.size == 1 and pb.size == 1:
        return 1.0
    if pa.size == 1 or pb.size == 1:
        return 0.0
    nz = joint > 0
    mi = float(np.sum(joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])))
    h = lambda p: float(-np.sum(p[p > 0] * np.log(p[p > 0])))
    denom = 0.5 * (h(pa) + h(pb))
    return max(0.0, min(1.0, mi / denom)) if denom > 0 else 0.0


def content_labels(images: Tensor, bins: int = 5, cell: int = 4) -> Tensor:
    """``(B, H/cell, W/cell)`` int64: the quantile bin (0 flattest ... ``bins - 1`` most textured) of
    the luma variance over a ``2 cell`` window centred on each ``cell x cell`` block.

    Bins are equal-sized ranks over all blocks of the batch, so ties (flat areas) are split evenly.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (B, 3, H, W), got {tuple(images.shape)}")
    w = torch.tensor(_LUMA, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    y = (images.float() * w).sum(1, keepdim=True)
    k, pad = 2 * cell, cell // 2
    mean = F.avg_pool2d(y, k, cell, pad, count_include_pad=False)
    var = (F.avg_pool2d(y * y, k, cell, pad, count_include_pad=False) - mean * mean).clamp_min(0)
    var = var[:, 0, : images.shape[2] // cell, : images.shape[3] // cell]
    flat = var.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(flat.numel(), device=flat.device)
    return (ranks * bins // flat.numel()).reshape(var.shape)


def routing_quality(expert, num_experts: int, content=None) -> dict:
    """The routing-quality figures (module docstring) of an expert map; with ``content`` (labels of
    the same shape, e.g. :func:`content_labels`) also ``nmi_content``."""
    e = torch.as_tensor(expert).reshape(-1).long().cpu()
    if e.numel() == 0:
        raise ValueError("expert: empty map")
    count = torch.bincount(e, minlength=num_experts).double()
    usage = count / count.sum()
    ent = float(-(usage[usage > 0] * usage[usage > 0].log()).sum()) / max(math.log(num_experts), 1e-12)
    out = {
        "num_experts": num_experts,
        "pixels": int(e.numel()),
        "usage": [round(float(u), 6) for u in usage],
        "usage_entropy": max(ent, 0.0) if num_experts > 1 else 1.0,
        "experts_alive": int((usage > 1.0 / (4 * num_experts)).sum()),
    }
    if content is not None:
        c = torch.as_tensor(content).reshape(-1).cpu()
        if c.numel() != e.numel():
            raise ValueError(f"content: {c.numel()} labels for {e.numel()} expert pixels")
        out["nmi_content"] = nmi(e.numpy(), c.numpy())
    return out


def _crop4(img: Tensor) -> Tensor:
    h, w = img.shape[-2] // 4 * 4, img.shape[-1] // 4 * 4
    return img[..., :h, :w]


@torch.no_grad()
def routing_quality_of_images(net_d, images, max_side: int | None = 512) -> dict:
    """Routing-quality figures of ``net_d`` over ``images`` (``(3, H, W)`` tensors in [0, 1], each
    centre-cropped to at most ``max_side`` and to a multiple of 4), pooled over the images. The
    discriminator's training mode is restored afterwards."""
    was = net_d.training
    discriminator_eval_mode(net_d)
    experts, labels = [], []
    try:
        dev = next(net_d.parameters()).device
        for img in images:
            x = _crop4(_centre(img, max_side))[None].to(dev)
            out = net_d(x, return_aux=True)
            experts.append(out.routing.expert.reshape(-1).cpu())
            labels.append(content_labels(x).reshape(-1).cpu())
    finally:
        net_d.train(was)
    return routing_quality(torch.cat(experts), net_d.num_experts, torch.cat(labels))


def _centre(img: Tensor, max_side: int | None) -> Tensor:
    if max_side is None:
        return img
    h, w = img.shape[-2:]
    th, tw = min(h, max_side), min(w, max_side)
    top, left = (h - th) // 2, (w - tw) // 2
    return img[..., top : top + th, left : left + tw]


# ------------------------------------------------------------------------------------- loading


def load_discriminator(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A :class:`calgan_fast.CALGANDiscriminator` from a run checkpoint (key ``net_d``) or a plain
    state dict; its architecture is read from the weights' shapes."""
    from . import CALGANDiscriminator

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: discriminator checkpoint not found")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(st, dict) and "net_d" in st:
        st = st["net_d"]
    elif isinstance(st, dict) and "params" in st and "proj" in st.get("params", {}):
        st = st["params"]
    if not isinstance(st, dict) or "proj" not in st or "features.0.weight" not in st:
        raise ValueError(
            f"{path}: not a CAL-GAN discriminator checkpoint (no net_d / proj / features weights)"
        )
    # DataParallel / SyncBN conversions keep the names; a "module." prefix is dropped.
    st = {k[7:] if k.startswith("module.") else k: v for k, v in st.items()}
    n, c, _ = st["proj"].shape
    nc, hdim, _ = st["w1"].shape
    net = CALGANDiscriminator(
        in_channels=st["features.0.weight"].shape[1],
        num_feat=c // 4,
        num_experts=n,
        hidden=hdim,
        share_classifier=nc == 1 and n > 1,
    )
    net.load_state_dict(st)
    return net.to(device)


# ------------------------------------------------------------------------------------- pictures


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (scikit-learn) of ``(P, c)`` features; ``(P, 2)``."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    p = features.shape[0]
    if p < 4:
        raise ValueError(f"t-SNE: needs at least 4 points, got {p}")
    perplexity = float(min(30.0, (p - 1) / 3.0))
    # One thread: scikit-learn's OpenMP threads next to torch's oversubscribe the cores (10x slower).
    with threadpool_limits(limits=1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            features.astype(np.float32)
        )


def _projected(net_d, feats: Tensor, expert: Tensor) -> Tensor:
    """``y = O[e] @ x`` per feature pixel (gate 1): ``(P, c)``."""
    rows = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).float()
    e = expert.reshape(-1)
    return torch.einsum("pij,pj->pi", net_d.proj.detach().float()[e], rows)


@torch.no_grad()
def _run(net_d, x: Tensor, routing=None):
    return net_d(x, routing=routing, return_aux=True), net_d.feature_map(x, routing)


def _figure_maps(path: Path, panels: list, legend_experts: list[int], num_experts: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .viz import palette

    pal = palette(num_experts) / 255.0
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, img) in zip(axes[0], panels):
        ax.imshow(img, interpolation="nearest", cmap="magma" if img.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    handles = [Patch(color=pal[i], label=f"expert {i}") for i in legend_experts]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    _save_fig(fig, path)
    plt.close(fig)


def _save_fig(fig, path: Path, dpi: int = 80) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)


def _figure_tsne(path: Path, xy: np.ndarray, expert: np.ndarray, num_experts: int, title: str) -> dict:
    """Draws the t-SNE; returns ``{expert: "#rrggbb"}``, the colour each expert's points were drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .viz import palette

    pal = palette(num_experts) / 255.0
    fig, ax = plt.subplots(figsize=(5, 5))
    from matplotlib.colors import to_hex

    colours = {}
    for i in np.unique(expert):
        m = expert == i
        pts = ax.scatter(xy[m, 0], xy[m, 1], s=4, color=pal[i], label=f"expert {i}")
        colours[str(int(i))] = to_hex(pts.get_facecolor()[0])
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=3, loc="best", frameon=False)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return colours


def _overlay(img: np.ndarray, expert: np.ndarray, num_experts: int) -> np.ndarray:
    from .viz import palette

    rmap = np.kron(palette(num_experts)[expert], np.ones((4, 4, 1), dtype=np.uint8)).astype(np.float32) / 255
    return 0.35 * img + 0.65 * rmap


def _collect_images(entries) -> list[Path]:
    from .data import IMAGE_EXTENSIONS, ImageError, list_images

    files: list[Path] = []
    for e in entries:
        p = Path(e)
        if p.is_dir():
            files += list_images(p, "--images folder")
        elif p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(p)
        else:
            raise ImageError(f"{p}: image or folder not found")
    return files


@torch.no_grad()
def analyze_images(
    net_d,
    images,
    out_dir,
    sr_dir=None,
    max_side: int | None = 512,
    tsne_points: int = 2000,
    seed: int = 0,
    scale: int = 4,
) -> dict:
    """Writes, for each HR image, ``<stem>_routing.png`` (HR, its routing; with ``sr_dir`` the SR
    image, its own routing and D's real-probability under the HR routing), ``<stem>_tsne.png`` and
    ``<stem>_tsne.csv`` (t-SNE of the projected features ``y`` of sampled feature pixels, coloured
    by expert), and ``routing_quality.json``; returns the JSON's content."""
    from .data import ImageError, img2tensor, read_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    discriminator_eval_mode(net_d)
    dev = next(net_d.parameters()).device
    n = net_d.num_experts
    sr_files = None
    if sr_dir is not None:
        from .data import list_images

        sr_files = {p.stem: p for p in list_images(sr_dir, "--sr folder")}
    rng = np.random.default_rng(seed)
    report: dict = {"num_experts": n, "images": {}}
    pooled_e, pooled_c, pooled_sr_e, pooled_sr_c = [], [], [], []
    for path in _collect_images(images):
        hr = read_image(path)
        sr = None
        if sr_files is not None:
            stem = path.stem
            sp = next(
                (
                    sr_files[c]
                    for c in (stem, f"{stem}x{scale}", f"{stem}_x{scale}", f"{stem}_SR")
                    if c in sr_files
                ),
                None,
            )
            if sp is None:
                raise ImageError(f"{sr_dir}: no SR image for {path.name}")
            sr = read_image(sp)
            h, w = min(hr.shape[0], sr.shape[0]), min(hr.shape[1], sr.shape[1])
            hr, sr = hr[:h, :w], sr[:h, :w]
        x = _crop4(_centre(img2tensor(hr), max_side))
        if min(x.shape[-2:]) < 4:
            raise ImageError(f"{path}: too small for the discriminator (needs 4x4 pixels)")
        out_hr, feats = _run(net_d, x[None].to(dev))
        e_hr = out_hr.routing.expert[0].cpu()
        labels = content_labels(x[None])[0]
        entry = {"hr": routing_quality(e_hr, n, labels)}
        pooled_e.append(e_hr.reshape(-1))
        pooled_c.append(labels.reshape(-1))
        hr_img = x.permute(1, 2, 0).numpy()
        panels = [("HR", hr_img), ("HR routing", _overlay(hr_img, e_hr.numpy(), n))]
        used = set(e_hr.unique().tolist())
        if sr is not None:
            xs = _crop4(_centre(img2tensor(sr), max_side))
            out_sr, _ = _run(net_d, xs[None].to(dev))
            under_hr, _ = _run(net_d, xs[None].to(dev), routing=out_hr.routing)
            e_sr = out_sr.routing.expert[0].cpu()
            sr_labels = content_labels(xs[None])[0]
            entry["sr"] = routing_quality(e_sr, n, sr_labels)
            entry["sr"]["agreement_with_hr_routing"] = float((e_sr == e_hr).double().mean())
            entry["sr"]["d_real_prob_under_hr_routing"] = float(torch.sigmoid(under_hr.logits).mean())
            entry["hr"]["d_real_prob"] = float(torch.sigmoid(out_hr.logits).mean())
            pooled_sr_e.append(e_sr.reshape(-1))
            pooled_sr_c.append(sr_labels.reshape(-1))
            sr_img = xs.permute(1, 2, 0).numpy()
            score = torch.sigmoid(under_hr.logits[0, 0]).cpu().numpy()
            panels += [
                ("SR", sr_img),
                ("SR, own routing", _overlay(sr_img, e_sr.numpy(), n)),
                ("D(SR) under HR routing (dark: fake)", np.kron(score, np.ones((4, 4)))),
            ]
            used |= set(e_sr.unique().tolist())
        _figure_maps(out / f"{path.stem}_routing.png", panels, sorted(used), n)
        # t-SNE of y over sampled feature pixels.
        y = _projected(net_d, feats, out_hr.routing.expert).cpu().numpy()
        e_flat = e_hr.reshape(-1).numpy()
        k = min(tsne_points, y.shape[0])
        idx = np.sort(rng.choice(y.shape[0], size=k, replace=False))
        xy = tsne_embedding(y[idx], seed)
        colours = _figure_tsne(
            out / f"{path.stem}_tsne.png", xy, e_flat[idx], n, f"{path.name}: t-SNE of y, {k} feature pixels"
        )
        rows = "".join(f"{a:.5f},{b:.5f},{int(c)}\n" for (a, b), c in zip(xy, e_flat[idx]))
        _write_text(out / f"{path.stem}_tsne.csv", "x,y,expert\n" + rows)
        entry["tsne"] = {
            "points": int(k),
            "experts": sorted(int(i) for i in np.unique(e_flat[idx])),
            "colours": colours,
        }
        report["images"][path.name] = entry
    report["hr"] = routing_quality(torch.cat(pooled_e), n, torch.cat(pooled_c))
    if pooled_sr_e:
        report["sr"] = routing_quality(torch.cat(pooled_sr_e), n, torch.cat(pooled_sr_c))
    _write_text(out / "routing_quality.json", json.dumps(report, indent=2))
    return report


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def cmd_analyze(args) -> int:
    """``calgan analyze`` (see :func:`calgan_fast.cli.build_parser`)."""
    out = Path(args.out)
    if (out / "routing_quality.json").exists() and not args.overwrite:
        raise FileExistsError(
            f"{out / 'routing_quality.json'}: already exists (use --overwrite to replace it)"
        )
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net_d = load_discriminator(args.d, device)
    if args.tsne_points < 4:
        raise ValueError(f"--tsne-points: needs at least 4, got {args.tsne_points}")
    rep = analyze_images(net_d, args.images, out, args.sr, args.max_side, args.tsne_points, args.seed)
    h = rep["hr"]
    print(
        f"HR routing: usage entropy {h['usage_entropy']:.3f}, experts alive {h['experts_alive']}/"
        f"{h['num_experts']}, NMI(expert, texture quintile) {h['nmi_content']:.3f}"
    )
    if "sr" in rep:
        s = rep["sr"]
        print(
            f"SR routing: usage entropy {s['usage_entropy']:.3f}, experts alive {s['experts_alive']}/"
            f"{s['num_experts']}, NMI(expert, texture quintile) {s['nmi_content']:.3f}"
        )
    print(f"written: {out} (routing maps, t-SNE, routing_quality.json)")
    return 0
