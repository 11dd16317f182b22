"""The CAL-GAN training loop: phase 1 L1 pre-training, phase 2 adversarial fine-tuning.

Run folder layout (``--out``)::

    config.yml            the resolved configuration
    checkpoints/          iter_XXXXXXX.pth, the last ``logger.keep_checkpoints`` (full state)
    models/net_g_final.pth  {"params", "params_ema", "network_g", "scale"} for eval/upscale
    samples/              iter_XXXXXXX_sr.png (LR | SR | HR) and iter_XXXXXXX_routing.png
    train_log.jsonl       one line of losses per ``logger.print_freq`` iterations
    metrics.json          validation PSNR/SSIM (Y, border ``scale``) of the EMA generator and, in
                          phase 2, D's routing quality on the validation HR images (calgan_fast.analysis)
    training.png          losses, D accuracy, expert usage and validation over iterations
    tb/                   TensorBoard scalars

Reproducibility: the data stream is a function of (seed, position) and every random state is
saved in the checkpoint, so a run interrupted and resumed logs the same losses as one that was
not (on the same device and thread count).

The pieces it puts together: the adversarial losses of an iteration (:mod:`.step`, shared with the
BasicSR integration), the log files and console (:mod:`.logs`), checkpoints and random states
(:mod:`.checkpoint`), process groups and averaging (:mod:`.distributed`), the configuration
(:mod:`.config`) and the start-up checks (:mod:`.startup`).
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader

from .._env import data_home
from ..analysis import routing_quality_of_images
from ..archs import CheckpointError, training_generator
from ..data import HRFolderDataset, PairedFolderDataset, TrainSampler, sample_images, tensor2img, write_image
from ..losses import PerceptualLoss, default_vgg19_path
from ..metrics import psnr, ssim
from ..nn.baselines import build_discriminator
from .checkpoint import (
    CorruptCheckpointError,
    atomic_save,
    checkpoint_name,
    list_checkpoints,
    load_module_state,
    load_newest_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
)
from .config import ConfigError, with_process_batch
from .distributed import allreduce_grads, average_scalars, dist_info, init_distributed, shutdown
from .evaluate import json_safe
from .inference import EMA
from .logs import ChanceWatch, RunLog
from .samples import bicubic_baseline, crops, routing_panel, sr_panel
from .startup import chance_window, select_subset
from .step import GANSettings, GANStep

__all__ = ["Trainer", "train", "RunFolderError"]


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked (it holds a run, or has none to resume)."""


# --------------------------------------------------------------------------------------------
# building blocks


def _make_optim(spec: dict, params) -> torch.optim.Optimizer:
    cls = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[spec["type"]]
    return cls(params, lr=float(spec["lr"]), betas=tuple(spec["betas"]),
               weight_decay=float(spec["weight_decay"]))


def _make_sched(spec: dict, opt) -> torch.optim.lr_scheduler.MultiStepLR:
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(spec["milestones"]),
                                                gamma=float(spec["gamma"]))


def _resolve_root(root: str | None, split: str, cache_dir: Path) -> str | None:
    if root == "samples":
        return str(sample_images(cache_dir, split))
    return root


def build_dataset(spec: dict, scale: int, train: bool, cache_dir: Path):
    """The train or validation dataset described by a ``datasets.*`` section."""
    split = "train" if train else "val"
    gt = _resolve_root(spec["dataroot_gt"], split, cache_dir)
    common = dict(skip_bad=spec["skip_bad_images"], max_pixels=spec["max_pixels"])
    if train:
        common.update(gt_size=spec["gt_size"], use_hflip=spec["use_hflip"], use_rot=spec["use_rot"],
                      cache=spec["cache"])
    else:
        common.update(gt_size=None, use_hflip=False, use_rot=False)
    if spec["type"] == "PairedFolderDataset":
        ds = PairedFolderDataset(gt, spec["dataroot_lq"], scale=scale, **common)
    else:
        ds = HRFolderDataset(gt, scale=scale, **common)
    return select_subset(ds, spec, split)


def sample_dir() -> Path:
    """Where the bundled sample photos are written (``CALGAN_FAST_HOME`` or ~/.cache/calgan_fast)."""
    return data_home() / "sample_images"


# --------------------------------------------------------------------------------------------


class Trainer:
    """Builds everything from a validated config and runs both phases.

    Args:
        cfg: a config from :func:`calgan_fast.train.config.load_config`.
        out: the run folder. resume: continue from its newest checkpoint.
        stop_after: stop (after checkpointing) once this iteration is done, as an interruption would.
        progress: show a tqdm bar (rank 0 only).
    """

    def __init__(self, cfg: dict, out: str | os.PathLike, resume: bool = False,
                 stop_after: int | None = None, progress: bool = True):
        self.cfg, self.out, self.stop_after = cfg, Path(out), stop_after
        dev = cfg["device"]
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device = 'cuda' but no GPU is available")
        self.distributed = init_distributed(dev)
        self.rank, self.world, local = dist_info()
        self.cfg = cfg = with_process_batch(cfg, self.world)
        self.device = torch.device(f"cuda:{local}" if dev == "cuda" else "cpu")
        if dev == "cuda":
            torch.cuda.set_device(self.device)
        if cfg["num_threads"] and dev == "cpu":
            torch.set_num_threads(int(cfg["num_threads"]))
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.scale = cfg["scale"]
        self.log = RunLog(self.out, self.is_main, cfg["logger"]["use_tb_logger"])
        # Data first: a missing folder or a bad image fails before anything is written.
        cache = sample_dir()
        self.train_set = build_dataset(cfg["datasets"]["train"], self.scale, True, cache)
        val = cfg["datasets"]["val"]
        self.val_set = build_dataset(val, self.scale, False, cache) if val["dataroot_gt"] else None
        self.notes: list[str] = [f"train: {len(self.train_set)} image(s) from {self.train_set_root()}"]
        if self.val_set is not None:
            self.notes.append(f"validation: {len(self.val_set)} image(s) from {self.train_set_root(False)}")
        self._check_folder(resume)
        self._build()  # loads weights: a missing file fails before the run folder is made
        self._prepare_folder(resume)
        self.it = 0
        if resume:
            self._load_checkpoint()

    # ---------------------------------------------------------------- setup
    def train_set_root(self, train: bool = True) -> str:
        ds = self.train_set if train else self.val_set
        first = ds.pairs[0][0] if hasattr(ds, "pairs") else ds.files[0]
        return str(first.parent)

    def _check_folder(self, resume: bool) -> None:
        ckpts = list_checkpoints(self.out / "checkpoints")
        if resume and not ckpts:
            raise RunFolderError(f"{self.out}: --resume given but the folder holds no checkpoint")
        if not resume and (ckpts or (self.out / "train_log.jsonl").exists()):
            raise RunFolderError(f"{self.out}: already holds a run; add --resume to continue it, or "
                                 "choose another --out (nothing was changed)")

    def _prepare_folder(self, resume: bool) -> None:
        if self.is_main:
            for sub in ("checkpoints", "models", "samples"):
                (self.out / sub).mkdir(parents=True, exist_ok=True)
            if resume:
                remove_stale_temporaries(self.out / "checkpoints")
            if not resume:
                with open(self.out / "config.yml", "w", encoding="utf-8") as f:
                    yaml.safe_dump(self.cfg, f, sort_keys=False)
        if self.distributed:
            dist.barrier()

    def _build(self) -> None:
        cfg, tr = self.cfg, self.cfg["train"]
        torch.manual_seed(cfg["manual_seed"])
        np.random.seed(cfg["manual_seed"] % 2**32)
        random.seed(cfg["manual_seed"])
        self.scale = cfg["scale"]
        # g_spec is saved with the weights so that eval/upscale can rebuild G; with
        # path.pretrain_network_g the architecture comes from the file when it is known.
        try:
            net_g, self.g_spec = training_generator(cfg["network_g"], self.scale, *(
                cfg["path"][k] for k in ("pretrain_network_g", "param_key_g", "strict_load_g")))
        except CheckpointError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.net_g = net_g.to(self.device)
        if cfg["path"]["pretrain_network_g"]:
            self.notes.append(f"generator: weights loaded from {cfg['path']['pretrain_network_g']} "
                              "(path.pretrain_network_g)")
        try:
            net_d = build_discriminator(cfg["network_d"], cfg["datasets"]["train"]["gt_size"])
            self.net_d = net_d.to(self.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if tr["sync_bn"] and self.distributed and self.device.type == "cpu":
            warnings.warn("train.sync_bn needs GPUs (torch's SyncBatchNorm does not run on CPU): "
                          "each process keeps its own BatchNorm statistics", stacklevel=2)
        elif self.distributed and tr["sync_bn"]:
            self.net_d = nn.SyncBatchNorm.convert_sync_batchnorm(self.net_d)
        if self.distributed:
            # Same initial weights everywhere.
            for t in [*self.net_g.state_dict().values(), *self.net_d.state_dict().values()]:
                dist.broadcast(t, 0)
            self.g_train = nn.parallel.DistributedDataParallel(
                self.net_g, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.g_train = self.net_g
        self.ema = EMA(self.net_g, tr["ema_decay"])
        self.opt_g = self.sched_g = None
        self.opt_d = _make_optim(tr["optim_d"], self.net_d.parameters())
        self.sched_d = _make_sched(tr["scheduler"], self.opt_d)
        self.perceptual = self._build_perceptual()
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[tr["amp"]]
        if self.amp_dtype is not None and self.device.type != "cuda":
            warnings.warn("train.amp is set but training runs on the CPU: AMP is off", stacklevel=2)
            self.amp_dtype = None
        use_scaler = self.amp_dtype == torch.float16
        self.scaler_g = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.scaler_d = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.total = tr["pretrain_iter"] + tr["total_iter"]
        # N = 1 trains without routing losses, and the plain-GAN baselines (VGG-style, U-Net) with
        # the standard GAN losses only (GANStep decides both).
        self.gan = GANStep(self.net_d, GANSettings.from_config(tr), tr["total_iter"], cfg["manual_seed"])
        self.d_routed = self.gan.routed
        self.chance = ChanceWatch(chance_window(cfg), cfg["logger"]["chance_margin"])

    def _build_perceptual(self):
        po = self.cfg["train"]["perceptual_opt"]
        if po["enabled"] is False or self.cfg["train"]["total_iter"] == 0:
            return None
        try:
            # enabled: true fetches torchvision's file into the torch hub cache when it is missing.
            loss = PerceptualLoss(po["weights_path"] or "imagenet", download=po["enabled"] is True)
            loss = loss.to(self.device)
            self.notes.append("perceptual loss: VGG19 weights from "
                              f"{po['weights_path'] or default_vgg19_path()}")
            return loss
        except FileNotFoundError as exc:
            if po["enabled"] is True:
                raise ConfigError(f"train.perceptual_opt: {exc}") from None
            warnings.warn(f"training without the perceptual loss: {exc} "
                          "(set train.perceptual_opt.enabled: false to silence this)", stacklevel=2)
            return None

    def _phase_optimizer(self, phase: int) -> None:
        tr = self.cfg["train"]
        spec = tr["optim_pretrain"] if phase == 1 else tr["optim_g"]
        sched = tr["scheduler_pretrain"] if phase == 1 else tr["scheduler"]
        self.opt_g = _make_optim(spec, self.net_g.parameters())
        self.sched_g = _make_sched(sched, self.opt_g)
        self.phase_g = phase

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        return {
            "iter": self.it,
            "phase_g": self.phase_g,
            "network_g": self.g_spec,
            "scale": self.scale,
            "params": self.net_g.state_dict(),
            "params_ema": self.ema.model.state_dict(),
            "net_d": self.net_d.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
            "acc_window": list(self.chance.window),
            "gan_step": self.gan.state_dict(),
            "rng": rng_state(),
        }

    def save_checkpoint(self) -> None:
        # Every rank's RNG is the same stream shifted by its data; rank 0's file serves all.
        if not self.is_main:
            return
        folder = self.out / "checkpoints"
        atomic_save(self._state(), folder / checkpoint_name(self.it))
        prune_checkpoints(folder, self.cfg["logger"]["keep_checkpoints"])

    def _load_checkpoint(self) -> None:
        required = ("iter", "phase_g", "params", "params_ema", "net_d", "opt_g", "sched_g", "opt_d",
                    "sched_d", "scaler_g", "scaler_d", "acc_window", "rng")
        try:
            path, st = load_newest_checkpoint(self.out / "checkpoints", required)
            load_module_state(self.net_g, st["params"], "params (generator)", path)
            load_module_state(self.ema.model, st["params_ema"], "params_ema (generator)", path)
            load_module_state(self.net_d, st["net_d"], "net_d (discriminator)", path)
        except CorruptCheckpointError as exc:
            raise RunFolderError(str(exc)) from None
        self._phase_optimizer(st["phase_g"])
        self.opt_g.load_state_dict(st["opt_g"])
        self.sched_g.load_state_dict(st["sched_g"])
        self.opt_d.load_state_dict(st["opt_d"])
        self.sched_d.load_state_dict(st["sched_d"])
        self.scaler_g.load_state_dict(st["scaler_g"])
        self.scaler_d.load_state_dict(st["scaler_d"])
        self.chance.window.extend(st["acc_window"])
        if "gan_step" in st:
            self.gan.load_state_dict(st["gan_step"])
        set_rng_state(st["rng"])
        self.it = st["iter"]
        self.notes.append(f"resumed: full training state from {path} (iteration {self.it})")
        self.log.truncate(self.it)

    # ---------------------------------------------------------------- steps
    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _clip(self, params) -> None:
        clip = self.cfg["train"]["grad_clip"]
        if clip:
            torch.nn.utils.clip_grad_norm_(params, float(clip))

    def _step_pretrain(self, lq, gt) -> dict:
        self.opt_g.zero_grad(set_to_none=True)
        with self._autocast():
            sr = self.g_train(lq)
        loss = F.l1_loss(sr.float(), gt)
        self._update_g(loss)
        return {"l_pix": loss.detach()}

    def _update_g(self, loss: torch.Tensor) -> None:
        """Backward of the generator's loss, then its optimizer, scheduler and EMA steps."""
        self.scaler_g.scale(loss).backward()
        self.scaler_g.unscale_(self.opt_g)
        self._clip(self.net_g.parameters())
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        self.sched_g.step()
        self.ema.update(self.net_g)

    def _step_gan(self, lq, gt) -> dict:
        tr = self.cfg["train"]
        gan = self.gan
        i = self.it - tr["pretrain_iter"]  # adversarial iteration, from 1
        gan.start_iteration(i)
        logs = {}
        # Generator: λ_r L1 + λ_p L_per + λ_g L_gen (D frozen, HR routing reused).
        self.opt_g.zero_grad(set_to_none=True)
        with self._autocast():
            sr = self.g_train(lq)
            # The real pass runs once per step, with gradient: L_gen reads its logits and routing
            # (detached), and the discriminator step below backpropagates through it. D's
            # parameters do not change in between, so this equals running it twice.
            real = gan.real_pass(gt)
            l_pix = F.l1_loss(sr.float(), gt)
            l_g = tr["pixel_opt"]["loss_weight"] * l_pix
            if self.perceptual is not None:
                l_per = self.perceptual(sr.float(), gt)
                l_g = l_g + tr["perceptual_opt"]["loss_weight"] * l_per
                logs["l_per"] = l_per.detach()
            l_gen = gan.generator_loss(gt, sr, real=real)
            l_g = l_g + gan.settings.lambda_g * l_gen
        self._update_g(l_g)
        logs.update(l_pix=l_pix.detach(), l_gen=l_gen.detach(), l_g_total=l_g.detach())
        # Discriminator.
        self.opt_d.zero_grad(set_to_none=True)
        with self._autocast():
            d = gan.discriminator_loss(gt, sr, real=real)
        self.scaler_d.scale(d["total"]).backward()
        allreduce_grads(list(self.net_d.parameters()), self.world)
        self.scaler_d.unscale_(self.opt_d)
        self._clip(self.net_d.parameters())
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        self.sched_d.step()
        for k in ("balance", "ortho", "dist", "z", "adv", "total"):
            if k in d:
                logs[f"d_{k}"] = d[k].detach()
        logs["acc_d_real"], logs["acc_d_fake"] = d["acc_d_real"].detach(), d["acc_d_fake"].detach()
        logs.update(gan.routing_usage(d))
        revived = gan.end_iteration(i, d, self.opt_d, shares=logs.get("usage"))
        if revived:
            self.log.say(f"iteration {self.it}: revived silent expert(s) {revived} "
                         "(train.d_opt.revive_every)")
        if gan.settings.tau_end is not None and self.d_routed:
            logs["tau"] = torch.tensor(gan.tau_at(i))
        return logs

    # ---------------------------------------------------------------- outputs
    def _phase(self) -> int:
        return 1 if self.it <= self.cfg["train"]["pretrain_iter"] else 2

    def _lrs(self) -> tuple[float, float]:
        return self.opt_g.param_groups[0]["lr"], self.opt_d.param_groups[0]["lr"]

    def _sample_pairs(self) -> list:
        if getattr(self, "_pairs", None) is None:
            ds = self.val_set if self.val_set is not None else self.train_set
            lg = self.cfg["logger"]
            items = []
            for i in range(min(len(ds), lg["sample_images"])):
                item = ds[i]
                if ds is self.train_set:  # a training crop: take it whole, as seen in training
                    item = {"lq": item["lq"], "gt": item["gt"]}
                items.append(item)
            self._pairs = crops(items, lg["sample_crops"], lg["sample_crop_size"], self.scale)
        return self._pairs

    @torch.no_grad()
    def write_samples(self) -> None:
        """``iter_N_sr.png`` (labelled LR | SR | HR crops) and, once D trains, ``iter_N_routing.png``."""
        if not self.is_main:
            return
        pairs = self._sample_pairs()
        if not pairs:
            return
        panel, _ = sr_panel(self.ema.model, pairs, self.scale, self.device, self.it)
        write_image(self.out / "samples" / f"iter_{self.it:07d}_sr.png", panel)
        if self.log.tb is not None:
            self.log.tb.add_image("samples/sr", panel, self.it, dataformats="HWC")
        if self.it <= self.cfg["train"]["pretrain_iter"] or not self.d_routed:
            return  # phase 1: D has not trained, its routing means nothing yet; baselines do not route
        rmap, usage = routing_panel(self.net_d, pairs, self.device, self.it)
        write_image(self.out / "samples" / f"iter_{self.it:07d}_routing.png", rmap)
        if self.log.tb is not None:
            self.log.tb.add_image("samples/routing", rmap, self.it, dataformats="HWC")
            for i, x in enumerate(usage.tolist()):
                self.log.tb.add_scalar(f"routing_map/expert_{i:02d}_usage", x, self.it)

    @torch.no_grad()
    def validate(self) -> dict | None:
        if self.val_set is None or not self.is_main:
            return None
        v = self.cfg["val"]
        border = self.scale if v["crop_border"] is None else v["crop_border"]
        n = len(self.val_set)
        if self.cfg["datasets"]["val"]["max_images"]:
            n = min(n, self.cfg["datasets"]["val"]["max_images"])
        p_sum = s_sum = 0.0
        model = self.ema.model
        for i in range(n):
            item = self.val_set[i]
            sr = model(item["lq"][None].to(self.device))[0]
            a, b = tensor2img(sr), tensor2img(item["gt"])
            p_sum += psnr(a, b, border, v["test_y_channel"])
            s_sum += ssim(a, b, border, v["test_y_channel"])
        if getattr(self, "_bicubic", None) is None:
            self._bicubic = bicubic_baseline(self.val_set, n, border, v["test_y_channel"])
        res = {"iter": self.it, "psnr": p_sum / n, "ssim": s_sum / n, "images": n,
               "bicubic_psnr": self._bicubic["psnr"], "bicubic_ssim": self._bicubic["ssim"]}
        chan = "Y" if v["test_y_channel"] else "RGB"
        self.log.say(f"validation, iteration {self.it} (phase {self._phase()}, "
                  f"EMA generator, {n} image{'s' * (n > 1)}): PSNR-{chan} {res['psnr']:.2f} dB, "
                  f"SSIM {res['ssim']:.4f}; bicubic: {res['bicubic_psnr']:.2f} dB, {res['bicubic_ssim']:.4f}")
        if self.it > self.cfg["train"]["pretrain_iter"] and self.d_routed:  # D is trained: its routing
            res["routing"] = routing_quality_of_images(self.net_d, [self.val_set[i]["gt"] for i in range(n)])
        path = self.out / "metrics.json"
        hist = json.loads(path.read_text()) if path.exists() else {"history": []}
        hist["history"] = [h for h in hist["history"] if h["iter"] < self.it] + [res]
        hist["final"] = res
        tmp = path.with_name(f".metrics.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(json_safe(hist), indent=2, allow_nan=False))
        os.replace(tmp, path)
        if self.log.tb is not None:
            self.log.tb.add_scalar("val/psnr", res["psnr"], self.it)
            self.log.tb.add_scalar("val/ssim", res["ssim"], self.it)
            self.log.tb.add_scalar("val/bicubic_psnr", res["bicubic_psnr"], self.it)
            for k in ("usage_entropy", "experts_alive", "nmi_content"):
                if "routing" in res:
                    self.log.tb.add_scalar(f"val_routing/{k}", res["routing"][k], self.it)
        return res

    def _plot(self) -> None:
        if not self.is_main:
            return
        try:
            from ..plots import plot_run

            plot_run(self.out)
        except ImportError as exc:
            warnings.warn(f"no training plot: {exc} (pip install matplotlib)", stacklevel=2)

    def save_final(self) -> Path:
        path = self.out / "models" / "net_g_final.pth"
        if self.is_main:
            atomic_save({"params": self.net_g.state_dict(), "params_ema": self.ema.model.state_dict(),
                          "network_g": self.g_spec, "scale": self.scale}, path)
        return path

    # ---------------------------------------------------------------- loop
    def run(self) -> dict:
        """Trains to ``pretrain_iter + total_iter`` (or ``stop_after``); returns the last log line."""
        cfg, lg = self.cfg, self.cfg["logger"]
        pre = cfg["train"]["pretrain_iter"]
        dcfg = cfg["datasets"]["train"]
        bs = dcfg["batch_size_per_gpu"]
        if self.opt_g is None:
            self._phase_optimizer(1 if pre > 0 else 2)
        sampler = TrainSampler(len(self.train_set), cfg["manual_seed"], self.rank, self.world,
                               start=self.it * bs)
        loader = DataLoader(self.train_set, batch_size=bs, sampler=sampler,
                            num_workers=dcfg["num_worker_per_gpu"], pin_memory=self.device.type == "cuda",
                            persistent_workers=False,
                            # Its own generator: creating the iterator must not draw from the global
                            # RNG, or a resumed run's gumbel noise would be shifted by one draw.
                            generator=torch.Generator().manual_seed(cfg["manual_seed"]))
        self.net_g.train()
        self.net_d.train()
        if self.progress:
            self.log.open_bar(self.total, self.it, cfg["name"])
        for note in self.notes:
            self.log.say(note)
        phases = [f"phase 1 (L1 pre-training): iterations 1-{pre}"] if pre else []
        if self.total > pre:
            phases.append(f"phase 2 (CAL-GAN): iterations {pre + 1}-{self.total}")
        self.log.say("; ".join(phases))
        if dcfg["cache"] and self.it < end_of_first_pass(len(self.train_set), bs):
            self.log.say(f"datasets.train.cache: the first pass decodes the {len(self.train_set)} training "
                         "images and keeps them in memory; iterations speed up once it is done")
        last: dict = {}
        t0, n0 = time.perf_counter(), self.it
        data = iter(loader)
        end = self.total if self.stop_after is None else min(self.total, self.stop_after)
        while self.it < end:
            batch = next(data)
            lq = batch["lq"].to(self.device, non_blocking=True)
            gt = batch["gt"].to(self.device, non_blocking=True)
            if self.it == pre and self.phase_g == 1:
                # Phase 2 starts: fresh optimiser, the EMA restarts from the pre-trained weights.
                self._phase_optimizer(2)
                self.ema.reset(self.net_g)
                self.log.say(f"iteration {self.it}: phase 1 done; phase 2 (CAL-GAN) starts with a fresh "
                          "optimiser (train.optim_g) and the EMA restarted from the phase-1 weights")
            self.it += 1
            logs = self._step_pretrain(lq, gt) if self.it <= pre else self._step_gan(lq, gt)
            self.chance.update(self.it, logs, warn=self.is_main)
            line = None
            if self.it % lg["print_freq"] == 0 or self.it == end:
                rate = (self.it - n0) / max(time.perf_counter() - t0, 1e-9)
                logs = average_scalars(logs, self.world, self.device)
                line = last = self.log.write(self.it, self._phase(), logs, *self._lrs(), rate)
                self.log.scalars(self.it, logs, *self._lrs())
            self.log.advance(line)
            if self.it % lg["sample_freq"] == 0 or self.it == self.total:
                self.write_samples()
            if self.it % cfg["val"]["val_freq"] == 0 or self.it == self.total or self.it == pre:
                self.validate()
            if self.it % lg["save_checkpoint_freq"] == 0 or self.it == end:
                self.save_checkpoint()
        self.log.close_bar()
        if self.it == self.total:
            self.save_final()
            self._plot()
        self.log.flush()
        return last


def end_of_first_pass(n_images: int, batch_size: int) -> int:
    """Iterations it takes to see every image once."""
    return -(-n_images // max(batch_size, 1))


def train(cfg: dict, out: str | os.PathLike, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict:
    """Runs a whole training (see :class:`Trainer`); returns the last logged losses."""
    trainer = Trainer(cfg, out, resume=resume, stop_after=stop_after, progress=progress)
    try:
        return trainer.run() if trainer.is_main else {**trainer.run(), "_rank": trainer.rank}
    finally:
        if trainer.distributed:
            shutdown()
