"""The ``calgan`` command line: ``train``, ``eval``, ``upscale`` and ``prepare``.

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


def _fmt_warning(message, category, filename, lineno, line=None):
    return f"calgan: warning: {message}\n"


def _cmd_train(args) -> int:
    from .train import load_config, train
    from .train.trainer import list_checkpoints

    out = Path(args.out) if args.out else None
    if args.resume and args.config is None and args.preset is None:
        if out is None:
            raise ValueError("--resume needs --out (the run folder to continue)")
        saved = out / "config.yml"
        if not saved.is_file():
            raise FileNotFoundError(f"{saved}: no saved config in the run folder to resume")
        cfg = load_config(None, saved)
    else:
        cfg = load_config(args.preset if args.preset or args.config else "quickstart", args.config)
    if out is None:
        out = Path("runs") / cfg["name"]
    last = train(cfg, out, resume=args.resume)
    if last and "_rank" not in last and (list_checkpoints(out / "checkpoints") or (out / "models").is_dir()):
        print(f"done: run folder {out}\n"
              f"  checkpoints  {out / 'checkpoints'}\n"
              f"  final model  {out / 'models' / 'net_g_final.pth'}\n"
              f"  samples and routing maps  {out / 'samples'}\n"
              f"  metrics  {out / 'metrics.json'} (validation), {out / 'train_log.jsonl'} (losses)\n"
              f"  TensorBoard  tensorboard --logdir {out / 'tb'}")
    return 0


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
    from .train.evaluate import (
        evaluate_folders,
        evaluate_model,
        learned_metrics,
        markdown_table,
        write_results,
    )

    if args.sr and (args.model or args.lr):
        raise ValueError("give either --sr DIR or --model CKPT --lr DIR, not both")
    if not args.sr and not (args.model and args.lr):
        raise ValueError("give --sr DIR, or --model CKPT with --lr DIR")
    learned, fid_ext = {}, None
    if not args.psnr_only:
        notes: list[str] = []
        learned, fid_ext = learned_metrics(args.vgg16, args.lpips_weights, args.dists_weights,
                                           args.inception, notes)
        for n in notes:
            print(f"calgan: note: {n}", file=sys.stderr)
    if args.sr:
        res = evaluate_folders(args.sr, args.gt, args.scale, args.crop_border, not args.rgb, learned, fid_ext)
    else:
        model, device, scale = _load_model(args)
        res = evaluate_model(model, args.lr, args.gt, scale, args.crop_border, not args.rgb,
                             args.tile, device, learned, fid_ext)
    print(markdown_table(res), end="")
    if args.out:
        paths = write_results(res, args.out, args.overwrite)
        print("results: " + ", ".join(map(str, paths)))
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
    p = argparse.ArgumentParser(prog="calgan", description="CAL-GAN super-resolution: train, evaluate, upscale.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a generator with the CAL-GAN discriminator")
    t.add_argument("--preset", choices=["quickstart", "paper"], help="built-in settings (default quickstart)")
    t.add_argument("--config", help="YAML file; its keys override the preset's")
    t.add_argument("--out", help="run folder (default runs/<name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
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

    e = sub.add_parser("eval", help="PSNR/SSIM of SR images (or of a model's outputs) against GT")
    e.add_argument("--sr", help="folder of SR images")
    e.add_argument("--gt", required=True, help="folder of ground-truth HR images")
    e.add_argument("--lr", help="folder of LR images (with --model)")
    model_args(e, required=False)
    e.add_argument("--crop-border", type=int, default=None, help="border removed (default: the scale)")
    e.add_argument("--rgb", action="store_true", help="measure on RGB instead of the Y channel")
    e.add_argument("--psnr-only", action="store_true", help="skip LPIPS, DISTS and FID")
    e.add_argument("--vgg16", help="torchvision VGG16 weights for LPIPS/DISTS (default: torch hub cache)")
    e.add_argument("--lpips-weights", help="LPIPS linear layers (default: lpips_vgg_v0.1.pth in the hub cache)")
    e.add_argument("--dists-weights", help="DISTS alpha/beta (default: dists_weights.pt in the hub cache)")
    e.add_argument("--inception", help="Inception-v3 weights for FID (default: torchvision's, hub cache)")
    e.add_argument("--out", help="folder for metrics.csv / .json / .md")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=_cmd_eval)

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
        return args.func(args)
    except (ConfigError, ImageError, CheckpointError, RunFolderError, FileNotFoundError,
            FileExistsError, ValueError) as exc:
        print(f"calgan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("calgan: interrupted (the last checkpoint is kept; continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
