"""The ``calgan`` command line: ``train``, ``eval``, ``analyze``, ``plots``, ``upscale`` and ``prepare``.

Errors the user can fix (a missing folder, a corrupt image, a config typo, a checkpoint of the
wrong architecture, an output that would be overwritten) end the command with one line,
``calgan: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

__all__ = ["main"]


_default_fmt = warnings.formatwarning
_PKG = str(Path(__file__).resolve().parent)


def _fmt_warning(message, category, filename, lineno, line=None):
    # The library's own warnings read as the command's; others keep their origin.
    if str(Path(filename).resolve()).startswith(_PKG):
        return f"calgan: warning: {message}\n"
    return _default_fmt(message, category, filename, lineno, line)


def _cmd_train(args) -> int:
    from .train.command import train_command

    return train_command(args)


def _load_model(args):
    import torch

    from .archs import load_generator

    spec = None
    if args.arch:
        name, *opts = args.arch.split(",")
        spec = {"type": name}
        for o in opts:
            k, _, v = o.partition("=")
            spec[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else float(v)
        spec.setdefault("scale", args.scale)
    model, _, scale = load_generator(args.model, spec)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    if getattr(args, "fp16", False) and device == "cuda":
        model = model.half()
    return model, device, scale


def _cmd_eval(args) -> int:
    from .train.evaluate import cmd_eval

    return cmd_eval(args, _load_model)


def _cmd_analyze(args) -> int:
    from .analysis import cmd_analyze

    return cmd_analyze(args)


def _cmd_plots(args) -> int:
    from .plots import plot_run

    print(f"plot: {plot_run(args.run, args.output)}")
    return 0


def _cmd_upscale(args) -> int:
    import torch

    from .data import ImageError, img2tensor, list_images, read_image, tensor2img, write_image
    from .train.inference import upscale_tiled

    src, dst = Path(args.input), Path(args.output)
    if src.is_dir():
        inputs = list_images(src, "input folder")
        outputs = [dst / f"{p.stem}.png" for p in inputs]
    elif src.is_file():
        inputs = [src]
        outputs = [dst / f"{src.stem}.png" if dst.is_dir() else dst]
    else:
        raise ImageError(f"{src}: input not found")
    clash = [o for o in outputs if o.exists()]
    if clash and not args.overwrite:
        raise FileExistsError(f"{clash[0]}: already exists (use --overwrite to replace it)")
    model, device, scale = _load_model(args)
    dtype = next(model.parameters()).dtype
    for i, o in zip(inputs, outputs):
        lq = img2tensor(read_image(i))[None].to(device, dtype)
        with torch.no_grad():
            sr = upscale_tiled(model, lq, scale, args.tile, args.overlap)
        write_image(o, tensor2img(sr[0].float()))
        print(f"{i} -> {o}")
    return 0


def _cmd_prepare(args) -> int:
    from .data.prepare import prepare

    res = prepare(args.hr, args.out, args.scales, args.crop_size, args.step, args.thresh_size,
                  args.workers, progress=not args.quiet)
    out = Path(args.out)
    print(f"{res['images']} images ({res['skipped']} already done), {res['sub_images']} sub-images written\n"
          f"  HR  {out / 'HR_sub'}\n" + "".join(f"  LR x{s}  {out / 'LR_bicubic_sub' / f'X{s}'}\n"
                                                for s in sorted(set(args.scales))), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calgan",
                                description="CAL-GAN super-resolution: train, evaluate, upscale.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a generator with the CAL-GAN discriminator")
    t.add_argument("--preset", choices=["quickstart", "paper"],
                   help="base settings; default: the config's 'base:' key, else quickstart")
    t.add_argument("--config",
                   help="YAML file; its keys override the base's (with --resume: the saved config's)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override one key, e.g. --set train.total_iter=600 (repeatable; value read as YAML)")
    t.add_argument("--out", help="run folder (default runs/<name>)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint; "
                   "--config/--set change its saved config")
    t.set_defaults(func=_cmd_train)

    def model_args(q, required: bool):
        q.add_argument("--model", required=required,
                       help="generator checkpoint (.pth / .safetensors): one from calgan train or any "
                            "architecture spandrel detects")
        q.add_argument("--arch", help="for checkpoints whose architecture is not detected, e.g. "
                                      "'RRDBNet,num_block=23' or 'EDSR_baseline'")
        q.add_argument("--scale", type=int, default=4, help="upscaling factor (default 4)")
        q.add_argument("--tile", type=int, default=None, help="LR tile size for large images")
        q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    e = sub.add_parser("eval", help="benchmark tables: a model (and bicubic) or SR folders on test sets")
    e.add_argument("--sets", nargs="+", metavar="SET", help="test sets: names under --data-root "
                   "(<root>/<set>/HR) or folders of HR images")
    e.add_argument("--data-root", help="folder holding the test sets named by --sets")
    e.add_argument("--gt", help="one folder of HR images (instead of --sets)")
    e.add_argument("--lr", help="LR inputs for --gt (default: made from the HR images by MATLAB bicubic)")
    e.add_argument("--sr", help="folder of SR images made elsewhere, compared with --gt")
    model_args(e, required=False)
    e.add_argument("--metrics", nargs="+", metavar="M",
                   help="psnr ssim lpips lpips-vgg dists brisque niqe fid (default: psnr ssim lpips dists "
                   "brisque fid, leaving out those that cannot be built)")
    e.add_argument("--no-bicubic", action="store_true", help="leave out the bicubic baseline column")
    e.add_argument("--save-sr", help="folder for the model's SR images (one subfolder per set)")
    e.add_argument("--crop-border", type=int, default=None, help="border removed (default: the scale)")
    e.add_argument("--rgb", action="store_true", help="PSNR/SSIM on RGB instead of the Y channel")
    e.add_argument("--psnr-only", action="store_true",
                   help="only PSNR and SSIM (same as --metrics psnr ssim)")
    e.add_argument("--out",
                   help="folder for metrics.json, metrics_per_image.csv, metrics_per_set.csv, metrics.md")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=_cmd_eval)

    a = sub.add_parser("analyze",
                       help="routing maps, t-SNE of the routed features and routing quality of a D")
    a.add_argument("--d", required=True, help="discriminator weights: a run checkpoint or a state dict")
    a.add_argument("--images", required=True, nargs="+", help="HR images or folders")
    a.add_argument("--sr", help="folder of SR images of the same names (routing maps of SR)")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--max-side", type=int, default=512, help="centre crop of at most this side (default 512)")
    a.add_argument("--tsne-points", type=int, default=2000, help="feature pixels sampled per image for t-SNE")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a.add_argument("--overwrite", action="store_true")
    a.set_defaults(func=_cmd_analyze)

    pl = sub.add_parser("plots", help="PNG of losses, D accuracy, expert usage and validation over a run")
    pl.add_argument("run", help="run folder (holds train_log.jsonl)")
    pl.add_argument("--output", help="PNG path (default <run>/training.png)")
    pl.set_defaults(func=_cmd_plots)

    u = sub.add_parser("upscale", help="super-resolve an image or a folder of images")
    u.add_argument("input", help="image file or folder")
    u.add_argument("output", help="output file or folder (PNG)")
    model_args(u, required=True)
    u.add_argument("--overlap", type=int, default=16, help="LR pixels of context around each tile")
    u.add_argument("--fp16", action="store_true", help="half precision on GPU")
    u.add_argument("--overwrite", action="store_true")
    u.set_defaults(func=_cmd_upscale)

    r = sub.add_parser("prepare", help="cut HR images (DIV2K) into sub-images with bicubic LR copies")
    r.add_argument("--hr", required=True, help="folder of HR images, e.g. DIV2K_train_HR")
    r.add_argument("--out", required=True, help="output folder (HR_sub/, LR_bicubic_sub/X<s>/)")
    r.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4], help="LR scales (default 2 3 4)")
    r.add_argument("--crop-size", type=int, default=480, help="sub-image side (default 480)")
    r.add_argument("--step", type=int, default=240, help="stride between sub-images (default 240)")
    r.add_argument("--thresh-size", type=int, default=48,
                   help="a remainder wider than this gets one more sub-image at the edge (default 48)")
    r.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``calgan`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _fmt_warning
    from .archs import CheckpointError
    from .data import ImageError
    from .train import ConfigError, RunFolderError

    try:
        for opt in ("scale", "tile"):
            value = getattr(args, opt, None)
            if value is not None and value < 1:
                raise ValueError(f"--{opt}: must be at least 1, got {value}")
        return args.func(args)
    except (ConfigError, ImageError, CheckpointError, RunFolderError, OSError, ValueError) as exc:
        msg = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())  # always one line
        print(f"calgan: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("calgan: interrupted (the last checkpoint is kept; continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
