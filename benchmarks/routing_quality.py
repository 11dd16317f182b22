"""Routing quality of the CAL-GAN discriminator trained alone: real crops against degraded copies.

    python -m benchmarks.routing_quality --data ../shared/data/SunHays80 --steps 2000 \\
        --setting paper --setting usage --seeds 0 1 --out benchmarks/results/routing

The discriminator learns to tell real photo crops from copies of the same crops degraded by x4
bicubic down- and up-scaling (optionally after blur, and with noise or JPEG compression). The
images of the folder are split once into training and held-out images (every fifth image, in name
order, is held out). Every ``--eval-every`` steps the held-out crops (fixed, seeded) are scored:

- ``acc_train``: D's accuracy (real and fake pixels, relativistic rule) as trained: training
  mode, Gumbel routing, the batch's own BatchNorm statistics (running statistics untouched);
- ``acc_eval``: the same in eval mode (argmax routing);
- ``usage_entropy``, ``experts_alive``, ``nmi_content``: the routing-quality figures of
  :mod:`calgan_fast.analysis` over the held-out real crops in eval mode;
- ``ms_per_step``: the mean wall time of the training steps since the last evaluation.

A setting is a named set of options (:data:`SETTINGS`, changed with ``--set key=value``). Each
(setting, seed) writes ``<out>/<setting>_s<seed>.json``; ``--report`` renders the JSON of a
folder as Markdown tables (``<out>/README.md``) and a plot of the four figures over steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from calgan_fast import CALGANDiscriminator
from calgan_fast.analysis import content_labels, routing_quality
from calgan_fast.data.imresize import imresize
from calgan_fast.data.io import list_images, read_image
from calgan_fast.losses import _accuracy, discriminator_loss
from calgan_fast.nn.discriminator import Routing, real_statistics_only


@dataclass(frozen=True)
class Setting:
    """Options of one run of the benchmark (defaults: the measured setting of the paper's
    formulation at a λ_d at which D learns)."""

    num_experts: int = 12
    num_feat: int = 32
    batch: int = 8
    crop: int = 64
    lr: float = 1e-4
    balance: str = "paper"
    lambda_b: float = 0.05
    lambda_o: float = 10.0
    lambda_d: float = 0.1
    lambda_dis: float = 1.0
    lambda_z: float = 0.0
    tau: float = 1.0
    tau_end: float | None = None  # anneal tau linearly to this value over the run
    routing: str = "gumbel"
    revive_every: int = 0  # steps between revivals of silent experts (0: never)
    usage_decay: float = 0.99  # EMA of the training usage that revival reads
    degrade: str = "bicubic"  # bicubic | blur | noise | jpeg
    capacity: float = 0.0  # training routing: at most capacity * M / N pixels an expert (0: off)


SETTINGS: dict[str, dict] = {
    "paper": {},
    "paper_ld10": {"lambda_d": 10.0},
    "switch": {"balance": "switch"},
    "usage": {"balance": "usage"},
    "entropy": {"balance": "entropy"},
    "mi": {"balance": "mi"},
}


def parse_value(field_type, text: str):
    if text.lower() in ("none", "null"):
        return None
    if "int" in str(field_type) and "." not in text and "e" not in text.lower():
        return int(text)
    if "float" in str(field_type):
        return float(text)
    return text


def make_setting(name: str, overrides: list[str]) -> Setting:
    if name not in SETTINGS:
        raise SystemExit(f"--setting: unknown {name!r}; choose from {sorted(SETTINGS)}")
    s = replace(Setting(), **SETTINGS[name])
    types = {f.name: f.type for f in fields(Setting)}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--set: unknown option {key!r}; choose from {sorted(types)}")
        s = replace(s, **{key: parse_value(types[key], value)})
    return s


# ------------------------------------------------------------------------------------------ data


def degrade(img: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    """``img`` (H, W, 3) uint8 with H, W multiples of 4 -> its x4 down- and up-scaled copy."""
    x = img
    if how == "blur":
        import cv2

        x = cv2.GaussianBlur(x, (0, 0), 1.2)
    lr = imresize(x, 0.25)
    if how == "noise":
        lr = np.clip(lr.astype(np.float32) + rng.normal(0, 5.0, lr.shape), 0, 255).astype(np.uint8)
    if how == "jpeg":
        import cv2

        ok, enc = cv2.imencode(".jpg", lr[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 60])
        lr = cv2.imdecode(enc, cv2.IMREAD_COLOR)[:, :, ::-1]
    return imresize(lr, 4.0)


class CropData:
    """Training and held-out crops of a folder of photos and of their degraded copies."""

    def __init__(self, folder: str | os.PathLike, crop: int, how: str, held_out_crops: int = 4,
                 max_side: int = 512):
        paths = list_images(folder)
        if len(paths) < 5:
            raise SystemExit(f"{folder}: {len(paths)} images; the split needs at least 5")
        rng = np.random.default_rng(0)
        self.train, self.held = [], []
        for i, p in enumerate(paths):
            img = read_image(p)
            h, w = img.shape[:2]
            s = min(max_side, h, w) // 4 * 4
            if s < crop:
                continue
            top, left = (h - s) // 2 // 4 * 4, (w - s) // 2 // 4 * 4
            img = np.ascontiguousarray(img[top : top + s, left : left + s])
            pair = (self._t(img), self._t(degrade(img, how, rng)))
            (self.held if i % 5 == 4 else self.train).append(pair)
        self.crop = crop
        pos = np.random.default_rng(1)
        reals, fakes = [], []
        for hr, lq in self.held:
            for _ in range(held_out_crops):
                y, x = self._corner(hr, pos)
                reals.append(hr[:, y : y + crop, x : x + crop])
                fakes.append(lq[:, y : y + crop, x : x + crop])
        self.held_real, self.held_fake = torch.stack(reals), torch.stack(fakes)

    @staticmethod
    def _t(img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)

    def _corner(self, img: torch.Tensor, rng: np.random.Generator) -> tuple[int, int]:
        h, w = img.shape[-2:]
        return (int(rng.integers(0, (h - self.crop) // 4 + 1)) * 4,
                int(rng.integers(0, (w - self.crop) // 4 + 1)) * 4)

    def batch(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        reals, fakes = [], []
        for _ in range(n):
            hr, lq = self.train[int(rng.integers(len(self.train)))]
            y, x = self._corner(hr, rng)
            r, f = hr[:, y : y + self.crop, x : x + self.crop], lq[:, y : y + self.crop, x : x + self.crop]
            if rng.random() < 0.5:
                r, f = r.flip(-1), f.flip(-1)
            reals.append(r)
            fakes.append(f)
        return torch.stack(reals), torch.stack(fakes)


# ------------------------------------------------------------------------------------ one run


@torch.no_grad()
def evaluate(net: CALGANDiscriminator, data: CropData, batch: int, seed: int) -> dict:
    """Held-out accuracy as trained and in eval mode, and the eval-mode routing quality."""
    was = net.training
    out = {}
    experts, labels = [], []
    try:
        for mode in ("train", "eval"):
            net.train(mode == "train")
            hits, total = 0.0, 0
            with torch.random.fork_rng(), real_statistics_only(net):
                torch.manual_seed(seed)
                for i in range(0, len(data.held_real), batch):
                    r, f = data.held_real[i : i + batch], data.held_fake[i : i + batch]
                    real = net(r, return_aux=True)
                    fake = net(f, routing=real.routing)
                    ar, af = _accuracy(real.logits, fake, "relativistic")
                    hits += float(ar + af) * len(r)
                    total += 2 * len(r)
                    if mode == "eval":
                        experts.append(real.routing.expert.reshape(-1))
                        labels.append(content_labels(r, cell=net.patch_size).reshape(-1))
            out[f"acc_{mode}"] = hits / total
    finally:
        net.train(was)
    q = routing_quality(torch.cat(experts), net.num_experts, torch.cat(labels))
    out.update(usage_entropy=q["usage_entropy"], experts_alive=q["experts_alive"],
               nmi_content=q["nmi_content"], usage=q["usage"])
    return out


def capacity_routing(net: CALGANDiscriminator, factor: float):
    """A training routing with a capacity: the Gumbel-perturbed choice of each pixel, except that an
    expert keeps at most ``ceil(factor * M / N)`` pixels (those it scores highest); the others
    move to their next choice, for up to N rounds. Eval mode routes by argmax as usual."""
    plain = net.route

    def route(logits: torch.Tensor) -> Routing:
        if not net.training:
            return plain(logits)
        logits = logits.float()
        probs = torch.softmax(logits, dim=1)
        n = logits.shape[1]
        g = -torch.empty_like(logits).exponential_().log()
        score = (logits / net.config.tau + g).permute(0, 2, 3, 1).reshape(-1, n)
        cap = math.ceil(factor * score.shape[0] / n)
        expert = score.argmax(1)
        for _ in range(n):
            top = score.gather(1, expert[:, None]).squeeze(1)
            # Rank of each pixel among the pixels of its expert, best first: by score, then by expert
            # (stable, so each expert's pixels stay in score order).
            order = torch.argsort(-top, stable=True)
            order = order[torch.argsort(expert[order], stable=True)]
            sorted_e = expert[order]
            first = torch.searchsorted(sorted_e, sorted_e, right=False)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order)) - first
            over = rank >= cap
            if not over.any():
                break
            score[over, expert[over]] = -float("inf")
            expert = torch.where(over, score.argmax(1), expert)
        soft = torch.softmax(logits / net.config.tau + g, dim=1).permute(0, 2, 3, 1).reshape(-1, n)
        p = soft.gather(1, expert[:, None]).squeeze(1)
        gate = (p - p.detach()) + 1.0
        b, _, h, w = logits.shape
        return Routing(expert.reshape(b, h, w), gate.reshape(b, h, w), probs, logits)

    return route


def run(setting: Setting, data: CropData, steps: int, seed: int, eval_every: int,
        log=print) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = CALGANDiscriminator(num_feat=setting.num_feat, num_experts=setting.num_experts,
                              routing=setting.routing, tau=setting.tau)
    if setting.capacity:
        net.route = capacity_routing(net, setting.capacity)
    opt = torch.optim.Adam(net.parameters(), lr=setting.lr, betas=(0.9, 0.99))
    weights = {k: getattr(setting, k) for k in ("lambda_b", "lambda_o", "lambda_d", "lambda_dis", "lambda_z")}
    n = setting.num_experts
    usage_ema = torch.full((n,), 1.0 / n, dtype=torch.float64)
    curve, revived, spent, timed = [], [], 0.0, 0

    def record(step):
        nonlocal spent, timed
        row = {"step": step, **evaluate(net, data, setting.batch, seed + 1000),
               "ms_per_step": 1000 * spent / timed if timed else None,
               "train_usage_entropy": _entropy(usage_ema)}
        curve.append(row)
        spent, timed = 0.0, 0
        log(f"  step {step:5d}  acc {row['acc_train']:.3f}/{row['acc_eval']:.3f}  "
            f"entropy {row['usage_entropy']:.3f}  alive {row['experts_alive']:2d}  "
            f"nmi {row['nmi_content']:.3f}"
            + (f"  {row['ms_per_step']:.0f} ms/step" if row["ms_per_step"] else ""))

    net.train()
    record(0)
    for step in range(1, steps + 1):
        if setting.tau_end is not None:
            # Linear from tau to tau_end over the run, as the trainer's schedule (GANStep.tau_at).
            net.set_tau(setting.tau + (setting.tau_end - setting.tau) * (step - 1) / max(steps - 1, 1))
        real, fake = data.batch(setting.batch, rng)
        t0 = time.perf_counter()
        d = discriminator_loss(net, real, fake, weights, setting.balance, "relativistic")
        opt.zero_grad(set_to_none=True)
        d["total"].backward()
        opt.step()
        spent += time.perf_counter() - t0
        timed += 1
        # Revival reads the routing the network uses in eval mode (the argmax of the router), not
        # the Gumbel samples: sampling spreads pixels over experts that the argmax never picks.
        share = torch.bincount(d["routing"].logits.argmax(1).reshape(-1), minlength=n).double()
        usage_ema.mul_(setting.usage_decay).add_(share / share.sum(), alpha=1 - setting.usage_decay)
        if setting.revive_every and step % setting.revive_every == 0:
            ids = net.revive_experts(usage_ema, optimizer=opt)
            if ids:
                revived.append({"step": step, "experts": ids})
                for i in ids:
                    usage_ema[i] = 1.0 / n  # counted as alive until its own usage says otherwise
        if step % eval_every == 0 or step == steps:
            record(step)
    return {"setting": asdict(setting), "seed": seed, "steps": steps, "curve": curve, "revived": revived,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _entropy(usage: torch.Tensor) -> float:
    u = usage[usage > 0]
    return float(-(u * u.log()).sum() / math.log(len(usage))) if len(usage) > 1 else 1.0


# ------------------------------------------------------------------------------------- report


def summary(result: dict, last: int = 3) -> dict:
    """Figures of one run: the mean of the last ``last`` evaluations, the fewest experts alive
    at any evaluation after step 0, and the mean time per step."""
    curve = [r for r in result["curve"] if r["step"] > 0]
    tail = curve[-last:]
    mean = lambda k: float(np.mean([r[k] for r in tail]))
    return {
        "acc_train": mean("acc_train"), "acc_eval": mean("acc_eval"),
        "usage_entropy": mean("usage_entropy"), "experts_alive": mean("experts_alive"),
        "min_alive": min(r["experts_alive"] for r in curve), "nmi_content": mean("nmi_content"),
        "ms_per_step": float(np.mean([r["ms_per_step"] for r in curve if r["ms_per_step"]])),
    }


def target_met(s: dict, n: int) -> bool:
    return (s["acc_train"] >= 0.95 and s["acc_eval"] >= 0.95 and s["usage_entropy"] >= 0.85
            and s["min_alive"] >= n - 1 and s["nmi_content"] >= 0.12)


def load_results(folder: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for p in sorted(folder.glob("*_s*.json")):
        r = json.loads(p.read_text())
        runs.setdefault(p.stem.rsplit("_s", 1)[0], []).append(r)
    return runs


def _diff(setting: dict) -> str:
    base = asdict(Setting())
    return ", ".join(f"{k}={v}" for k, v in setting.items() if base.get(k) != v) or "defaults"


def render(folder: Path, command: str | None = None) -> str:
    runs = load_results(folder)
    if not runs:
        raise SystemExit(f"{folder}: no *_s<seed>.json results")
    any_run = next(iter(runs.values()))[0]
    lines = ["# Routing quality of the discriminator trained alone", ""]
    lines += [f"Generated by `python -m benchmarks.routing_quality --report {folder.as_posix()}` "
              "from the JSON files beside this page.", ""]
    if command:
        lines += ["Runs made with:", "", "```", command, "```", ""]
    lines += [f"{any_run['steps']} steps; torch {any_run['torch']}, {any_run['threads']} thread(s). Figures: "
              "the mean over seeds of the mean of the last three evaluations (held-out crops); "
              "`min alive`: the fewest experts alive at any evaluation; ± the spread (max − min) "
              "over seeds. Target: accuracy ≥ 0.95 (both), entropy ≥ 0.85, min alive ≥ N − 1, "
              "NMI ≥ 0.12. `ms/step` is the wall time per step of runs that shared a 2-core machine; it "
              "is not a timing benchmark.", ""]
    lines += ["| setting | options | seeds | acc (trained) | acc (eval) | usage entropy | alive | min alive "
              "| NMI | ms/step | target |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in sorted(runs.items()):
        ss = [summary(r) for r in rs]
        n = rs[0]["setting"]["num_experts"]

        def cell(k, fmt="{:.3f}", ss=ss):
            v = [s[k] for s in ss]
            spread = " ± " + fmt.format(max(v) - min(v)) if len(v) > 1 else ""
            return fmt.format(float(np.mean(v))) + spread

        met = sum(target_met(s, n) for s in ss)
        lines.append(f"| {name} | {_diff(rs[0]['setting'])} | {len(rs)} | {cell('acc_train')} | "
                     f"{cell('acc_eval')} | {cell('usage_entropy')} | {cell('experts_alive', '{:.1f}')} | "
                     f"{min(s['min_alive'] for s in ss)} | {cell('nmi_content')} | "
                     f"{cell('ms_per_step', '{:.0f}')} | {met}/{len(ss)} |")
    lines += ["", "![the four figures over training](routing_quality.png)", "",
              "![balance against content-awareness, one point per run](routing_tradeoff.png)", ""]
    return "\n".join(lines)


def plot(folder: Path, names: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_results(folder)
    names = [n for n in (names or sorted(runs)) if n in runs]
    keys = [("acc_eval", "held-out accuracy (eval mode)"), ("usage_entropy", "usage entropy"),
            ("experts_alive", "experts alive"), ("nmi_content", "NMI (expert, variance quintile)")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for name in names:
        for ax, (k, title) in zip(axes, keys):
            curves = [[r[k] for r in run["curve"]] for run in runs[name]]
            steps = [r["step"] for r in runs[name][0]["curve"]]
            m = min(len(c) for c in curves)
            y = np.mean([c[:m] for c in curves], axis=0)
            ax.plot(steps[:m], y, label=name)
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = folder / "routing_quality.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_tradeoff(folder: Path) -> Path:
    """One point per run: the usage entropy against the NMI (mean of the last evaluations),
    marked by the fewest experts alive; the target's corner shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_results(folder)
    fig, ax = plt.subplots(figsize=(8, 6))
    for i, (name, rs) in enumerate(sorted(runs.items())):
        ss = [summary(r) for r in rs]
        n = rs[0]["setting"]["num_experts"]
        colour = plt.cm.tab20(i % 20)
        for s in ss:
            marker = "o" if s["min_alive"] >= n - 1 else "x"
            ax.scatter(s["nmi_content"], s["usage_entropy"], color=colour, marker=marker, s=40)
        ax.annotate(name, (float(np.mean([s["nmi_content"] for s in ss])),
                           float(np.mean([s["usage_entropy"] for s in ss]))), fontsize=7,
                    xytext=(3, 3), textcoords="offset points", color=colour)
    ax.fill_between([0.12, max(0.16, ax.get_xlim()[1])], 0.85, 1.0, color="green", alpha=0.1,
                    label="target (NMI >= 0.12, entropy >= 0.85)")
    ax.set_xlabel("NMI (expert, variance quintile): content-awareness")
    ax.set_ylabel("usage entropy: balance")
    ax.set_title("Balance against content-awareness, one point per run "
                 "(x: fewer than N - 1 alive at some step)", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    out = folder / "routing_tradeoff.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/SunHays80", help="folder of photos")
    ap.add_argument("--setting", action="append", default=None,
                    help=f"one of {sorted(SETTINGS)} (repeatable)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a Setting option")
    ap.add_argument("--name", default=None, help="result name (default: the setting's)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/routing")
    ap.add_argument("--report", default=None, metavar="FOLDER", help="render FOLDER's results and stop")
    ap.add_argument("--plot", nargs="*", default=None, help="settings to plot with --report")
    ap.add_argument("--command", default=None, help="the command line quoted in the report")
    args = ap.parse_args(argv)
    if args.report:
        folder = Path(args.report)
        (folder / "README.md").write_text(render(folder, args.command))
        print(f"wrote {folder / 'README.md'}, {plot(folder, args.plot)} and {plot_tradeoff(folder)}")
        return 0
    torch.set_num_threads(args.threads)
    names = args.setting or ["paper"]
    settings = [(args.name or n, make_setting(n, args.set)) for n in names]
    data = CropData(args.data, settings[0][1].crop, settings[0][1].degrade)
    print(f"{len(data.train)} training and {len(data.held)} held-out images, "
          f"{len(data.held_real)} held-out crops")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, s in settings:
        for seed in args.seeds:
            print(f"{name} seed {seed}: {_diff(asdict(s))}")
            result = run(s, data, args.steps, seed, args.eval_every)
            path = out / f"{name}_s{seed}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, path)
            print(f"  {summary(result)}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
