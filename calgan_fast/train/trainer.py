"""The CAL-GAN training loop: phase 1 L1 pre-training, phase 2 adversarial fine-tuning.

Run folder layout (``--out``)::

    config.yml            the resolved configuration
    checkpoints/          iter_XXXXXXX.pth, the last ``logger.keep_checkpoints`` (full state)
    models/net_g_final.pth  {"params", "params_ema", "network_g", "scale"} for eval/upscale
    samples/              iter_XXXXXXX_sr.png (LR | SR | HR) and iter_XXXXXXX_routing.png
    train_log.jsonl       one line of losses per ``logger.print_freq`` iterations
    metrics.json          validation PSNR/SSIM (Y, border ``scale``) of the EMA generator
    tb/                   TensorBoard scalars

Reproducibility: the data stream is a function of (seed, position) and every random state is
saved in the checkpoint, so a run interrupted and resumed logs the same losses as one that was
not (on the same device and thread count).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader

from ..archs import build_generator, load_generator_weights
from ..data import HRFolderDataset, PairedFolderDataset, TrainSampler, sample_images, tensor2img, write_image
from ..metrics import psnr, ssim
from .config import ConfigError
from .inference import EMA

__all__ = ["Trainer", "train", "RunFolderError"]

_CKPT_RE = re.compile(r"iter_(\d{7,})\.pth$")


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked (it holds a run, or has none to resume)."""


# --------------------------------------------------------------------------------------------
# small utilities


def _dist_info() -> tuple[int, int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def init_distributed(device: str) -> bool:
    """Initialises torch.distributed from torchrun's environment; True when running distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend)
    return True


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _py_state_to_list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state_to_list(s):
    return [s[0], list(s[1]), s[2]]


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``[(iteration, path)]`` of the run's checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.search(p.name))]
    return sorted(found)


def _allreduce_grads(params: list[torch.Tensor], world: int) -> None:
    # D is run several times per step (real, fake, and inside G's loss) with frozen parameters
    # in between, which DistributedDataParallel does not allow; its gradients are averaged here.
    grads = [p.grad for p in params if p.grad is not None]
    if world <= 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _make_optim(spec: dict, params) -> torch.optim.Optimizer:
    cls = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[spec["type"]]
    return cls(params, lr=float(spec["lr"]), betas=tuple(spec["betas"]), weight_decay=float(spec["weight_decay"]))


def _make_sched(spec: dict, opt) -> torch.optim.lr_scheduler.MultiStepLR:
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(spec["milestones"]), gamma=float(spec["gamma"]))


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
        return PairedFolderDataset(gt, spec["dataroot_lq"], scale=scale, **common)
    return HRFolderDataset(gt, scale=scale, **common)


def sample_dir() -> Path:
    """Where the bundled sample photos are written (``CALGAN_FAST_HOME`` or ~/.cache/calgan_fast)."""
    from .._env import data_home

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
        self.rank, self.world, local = _dist_info()
        self.device = torch.device(f"cuda:{local}" if dev == "cuda" else "cpu")
        if dev == "cuda":
            torch.cuda.set_device(self.device)
        if cfg["num_threads"] and dev == "cpu":
            torch.set_num_threads(int(cfg["num_threads"]))
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.scale = cfg["scale"]
        # Data first: a missing folder or a bad image fails before anything is written.
        cache = sample_dir()
        self.train_set = build_dataset(cfg["datasets"]["train"], self.scale, True, cache)
        val = cfg["datasets"]["val"]
        self.val_set = build_dataset(val, self.scale, False, cache) if val["dataroot_gt"] else None
        self._prepare_folder(resume)
        self._build()
        self.it = 0
        if resume:
            self._load_checkpoint()

    # ---------------------------------------------------------------- setup
    def _prepare_folder(self, resume: bool) -> None:
        ckpts = list_checkpoints(self.out / "checkpoints")
        if resume and not ckpts:
            raise RunFolderError(f"{self.out}: --resume given but the folder holds no checkpoint")
        if not resume and (ckpts or (self.out / "train_log.jsonl").exists()):
            raise RunFolderError(f"{self.out}: already holds a run; add --resume to continue it, or "
                                 "choose another --out (nothing was changed)")
        if self.is_main:
            for sub in ("checkpoints", "models", "samples"):
                (self.out / sub).mkdir(parents=True, exist_ok=True)
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
        spec = dict(cfg["network_g"])
        if spec.setdefault("scale", self.scale) != self.scale:
            raise ConfigError(f"network_g.scale = {spec['scale']} differs from scale = {self.scale}")
        self.g_spec = dict(spec)  # saved with the weights so that eval/upscale can rebuild G
        name = spec.pop("type")
        self.net_g = build_generator(name, **spec).to(self.device)
        pre = cfg["path"]["pretrain_network_g"]
        if pre:
            load_generator_weights(self.net_g, pre, cfg["path"]["param_key_g"], cfg["path"]["strict_load_g"])
        from .. import CALGANDiscriminator

        self.net_d = CALGANDiscriminator(**cfg["network_d"]).to(self.device)
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
        self.acc_window: deque = deque(maxlen=cfg["logger"]["chance_warn_iters"])
        self.tb = None
        if self.is_main and cfg["logger"]["use_tb_logger"]:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tb"))
            except ImportError:
                warnings.warn("tensorboard is not installed: no TensorBoard scalars "
                              "(pip install tensorboard)", stacklevel=2)

    def _build_perceptual(self):
        po = self.cfg["train"]["perceptual_opt"]
        if po["enabled"] is False or self.cfg["train"]["total_iter"] == 0:
            return None
        from ..losses import PerceptualLoss

        try:
            return PerceptualLoss(po["weights_path"] or "imagenet").to(self.device)
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
            "acc_window": list(self.acc_window),
            "rng": _rng_state(),
        }

    def save_checkpoint(self) -> None:
        # Every rank's RNG is the same stream shifted by its data; rank 0's file serves all.
        if not self.is_main:
            return
        folder = self.out / "checkpoints"
        _atomic_save(self._state(), folder / f"iter_{self.it:07d}.pth")
        keep = self.cfg["logger"]["keep_checkpoints"]
        for _, old in list_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)

    def _load_checkpoint(self) -> None:
        it, path = list_checkpoints(self.out / "checkpoints")[-1]
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RunFolderError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
        self.net_g.load_state_dict(st["params"])
        self.ema.model.load_state_dict(st["params_ema"])
        self.net_d.load_state_dict(st["net_d"])
        self._phase_optimizer(st["phase_g"])
        self.opt_g.load_state_dict(st["opt_g"])
        self.sched_g.load_state_dict(st["sched_g"])
        self.opt_d.load_state_dict(st["opt_d"])
        self.sched_d.load_state_dict(st["sched_d"])
        self.scaler_g.load_state_dict(st["scaler_g"])
        self.scaler_d.load_state_dict(st["scaler_d"])
        self.acc_window.extend(st["acc_window"])
        _set_rng_state(st["rng"])
        self.it = st["iter"]
        if self.is_main:
            self._truncate_log()

    def _truncate_log(self) -> None:
        # A run killed between checkpoints logged iterations that will now be redone.
        path = self.out / "train_log.jsonl"
        if not path.exists():
            return
        keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln)["iter"] <= self.it]
        tmp = path.with_name(f".train_log.jsonl.tmp{os.getpid()}")
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        os.replace(tmp, path)

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
        from ..losses import discriminator_loss, generator_adversarial_loss

        tr = self.cfg["train"]
        logs = {}
        # Generator: λ_r L1 + λ_p L_per + λ_g L_gen (D frozen, HR routing reused).
        self.opt_g.zero_grad(set_to_none=True)
        with self._autocast():
            sr = self.g_train(lq)
            # The real pass runs once per step, with gradient: L_gen reads its logits and routing
            # (detached), and the discriminator step below backpropagates through it. D's
            # parameters do not change in between, so this equals running it twice.
            real = self.net_d(gt, return_aux=True)
            l_pix = F.l1_loss(sr.float(), gt)
            l_g = tr["pixel_opt"]["loss_weight"] * l_pix
            if self.perceptual is not None:
                l_per = self.perceptual(sr.float(), gt)
                l_g = l_g + tr["perceptual_opt"]["loss_weight"] * l_per
                logs["l_per"] = l_per.detach()
            l_gen = generator_adversarial_loss(self.net_d, gt, sr, tr["gan_opt"]["gan_type"], real=real)
            l_g = l_g + tr["gan_opt"]["loss_weight"] * l_gen
        self._update_g(l_g)
        logs.update(l_pix=l_pix.detach(), l_gen=l_gen.detach(), l_g_total=l_g.detach())
        # Discriminator.
        do = tr["d_opt"]
        weights = {k: do[k] for k in ("lambda_b", "lambda_o", "lambda_d", "lambda_dis")}
        self.opt_d.zero_grad(set_to_none=True)
        with self._autocast():
            d = discriminator_loss(self.net_d, gt, sr.detach(), weights, do["balance"], tr["gan_opt"]["gan_type"],
                                   real=real)
        self.scaler_d.scale(d["total"]).backward()
        _allreduce_grads(list(self.net_d.parameters()), self.world)
        self.scaler_d.unscale_(self.opt_d)
        self._clip(self.net_d.parameters())
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        self.sched_d.step()
        for k in ("balance", "ortho", "dist", "adv", "total"):
            logs[f"d_{k}"] = d[k].detach()
        logs["d_acc_real"], logs["d_acc_fake"] = d["acc_d_real"].detach(), d["acc_d_fake"].detach()
        count = d["stats"].count.float()
        if self.distributed:
            dist.all_reduce(count)
        usage = count / count.sum().clamp_min(1)
        logs["usage"] = usage
        n = usage.numel()
        ent = -(usage * usage.clamp_min(1e-12).log()).sum() / max(math.log(n), 1e-12)
        probs = d["routing"].probs.float()
        pix_ent = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean() / max(math.log(n), 1e-12)
        logs["routing_entropy"] = ent
        logs["routing_pixel_entropy"] = pix_ent
        return logs

    # ---------------------------------------------------------------- outputs
    def _reduce_logs(self, logs: dict) -> dict:
        """Losses and accuracies averaged over the ranks (usage is already global)."""
        if not self.distributed:
            return logs
        keys = [k for k, v in logs.items() if k != "usage" and torch.is_tensor(v) and v.numel() == 1]
        vals = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).to(self.device)
        dist.all_reduce(vals)
        vals /= self.world
        return {**logs, **{k: vals[i] for i, k in enumerate(keys)}}

    def _log(self, logs: dict, it_per_s: float) -> dict:
        flat = {"iter": self.it, "phase": 1 if self.it <= self.cfg["train"]["pretrain_iter"] else 2}
        for k, v in logs.items():
            if k == "usage":
                flat["expert_usage"] = [round(float(x), 6) for x in v]
            else:
                flat[k] = float(v)
        flat["lr_g"] = self.opt_g.param_groups[0]["lr"]
        flat["it_per_s"] = round(it_per_s, 3)
        if self.is_main:
            with open(self.out / "train_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(flat) + "\n")
        return flat

    def _tb(self, logs: dict) -> None:
        if self.tb is None:
            return
        for k, v in logs.items():
            if k == "usage":
                for i, x in enumerate(v.tolist()):
                    self.tb.add_scalar(f"routing/expert_{i:02d}_usage", x, self.it)
            elif k.startswith("routing"):
                self.tb.add_scalar(f"routing/{k[8:]}", float(v), self.it)
            elif k.startswith("d_acc"):
                self.tb.add_scalar(f"accuracy/{k[2:]}", float(v), self.it)
            else:
                self.tb.add_scalar(f"loss/{k}", float(v), self.it)

    def _check_chance(self, logs: dict) -> None:
        if "d_acc_real" not in logs:
            return
        self.acc_window.append(0.5 * (float(logs["d_acc_real"]) + float(logs["d_acc_fake"])))
        lg = self.cfg["logger"]
        if len(self.acc_window) == self.acc_window.maxlen and self.is_main:
            mean = sum(self.acc_window) / len(self.acc_window)
            if mean < 0.5 + lg["chance_margin"] and self.it % lg["chance_warn_iters"] == 0:
                warnings.warn(f"iteration {self.it}: the discriminator's accuracy on real/fake pixels has "
                              f"stayed at chance ({mean:.3f}) for {lg['chance_warn_iters']} iterations; "
                              "consider a smaller train.d_opt.lambda_d", stacklevel=2)

    def _sample_batch(self):
        ds = self.val_set if self.val_set is not None else self.train_set
        item = ds[0]
        gt = item["gt"]
        # A centred crop keeps samples cheap and a multiple of 4 for the discriminator.
        size = min(gt.shape[1], gt.shape[2], 256) // (4 * self.scale) * (4 * self.scale)
        top, left = (gt.shape[1] - size) // 2 // self.scale, (gt.shape[2] - size) // 2 // self.scale
        s = self.scale
        lq = item["lq"][:, top:top + size // s, left:left + size // s]
        gt = gt[:, top * s:top * s + size, left * s:left * s + size]
        return lq[None].to(self.device), gt[None].to(self.device)

    @torch.no_grad()
    def write_samples(self) -> None:
        if not self.is_main:
            return
        lq, gt = self._sample_batch()
        sr = self.ema.model(lq).clamp(0, 1)
        up = F.interpolate(lq, scale_factor=self.scale, mode="nearest")
        strip = torch.cat([up, sr, gt], dim=3)[0]
        write_image(self.out / "samples" / f"iter_{self.it:07d}_sr.png", tensor2img(strip))
        from ..viz import routing_image

        was = self.net_d.training
        self.net_d.eval()
        out = self.net_d(gt, return_aux=True)
        self.net_d.train(was)
        rmap = routing_image(out.routing)
        rmap = np.kron(rmap, np.ones((4, 4, 1), dtype=np.uint8))  # one feature pixel = 4x4 patch
        hr = tensor2img(gt[0])
        blend = (0.5 * hr.astype(np.float32) + 0.5 * rmap.astype(np.float32)).round().astype(np.uint8)
        write_image(self.out / "samples" / f"iter_{self.it:07d}_routing.png", np.concatenate([hr, blend], 1))

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
        res = {"iter": self.it, "psnr": p_sum / n, "ssim": s_sum / n, "images": n}
        path = self.out / "metrics.json"
        hist = json.loads(path.read_text()) if path.exists() else {"history": []}
        hist["history"] = [h for h in hist["history"] if h["iter"] < self.it] + [res]
        hist["final"] = res
        tmp = path.with_name(f".metrics.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(hist, indent=2))
        os.replace(tmp, path)
        if self.tb is not None:
            self.tb.add_scalar("val/psnr", res["psnr"], self.it)
            self.tb.add_scalar("val/ssim", res["ssim"], self.it)
        return res

    def save_final(self) -> Path:
        path = self.out / "models" / "net_g_final.pth"
        if self.is_main:
            _atomic_save({"params": self.net_g.state_dict(), "params_ema": self.ema.model.state_dict(),
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
        sampler = TrainSampler(len(self.train_set), cfg["manual_seed"], self.rank, self.world, start=self.it * bs)
        loader = DataLoader(self.train_set, batch_size=bs, sampler=sampler,
                            num_workers=dcfg["num_worker_per_gpu"], pin_memory=self.device.type == "cuda",
                            persistent_workers=False,
                            # Its own generator: creating the iterator must not draw from the global
                            # RNG, or a resumed run's gumbel noise would be shifted by one draw.
                            generator=torch.Generator().manual_seed(cfg["manual_seed"]))
        self.net_g.train()
        self.net_d.train()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total, initial=self.it, desc=cfg["name"], unit="it", dynamic_ncols=True)
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
            self.it += 1
            logs = self._step_pretrain(lq, gt) if self.it <= pre else self._step_gan(lq, gt)
            self._check_chance(logs)
            if self.it % lg["print_freq"] == 0 or self.it == end:
                rate = (self.it - n0) / max(time.perf_counter() - t0, 1e-9)
                logs = self._reduce_logs(logs)
                last = self._log(logs, rate)
                self._tb(logs)
                if bar is not None:
                    keys = ("l_pix", "l_gen", "d_adv", "d_acc_real", "d_acc_fake")
                    bar.set_postfix({k: f"{last[k]:.3g}" for k in keys if k in last}, refresh=False)
            if bar is not None:
                bar.update(1)
            if self.it % lg["sample_freq"] == 0 or self.it == self.total:
                self.write_samples()
            if self.it % cfg["val"]["val_freq"] == 0 or self.it == self.total or self.it == pre:
                self.validate()
            if self.it % lg["save_checkpoint_freq"] == 0 or self.it == end:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.it == self.total:
            self.save_final()
        if self.tb is not None:
            self.tb.flush()
        return last


def train(cfg: dict, out: str | os.PathLike, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict:
    """Runs a whole training (see :class:`Trainer`); returns the last logged losses."""
    trainer = Trainer(cfg, out, resume=resume, stop_after=stop_after, progress=progress)
    try:
        return trainer.run() if trainer.is_main else {**trainer.run(), "_rank": trainer.rank}
    finally:
        if trainer.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
