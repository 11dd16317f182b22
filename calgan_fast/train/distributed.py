"""Distributed training: the process group from torchrun's environment, ranks, and the averaging
of the discriminator's gradients and of the logged losses over the processes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["allreduce_grads", "average_scalars", "dist_info", "init_distributed", "shutdown"]


def dist_info() -> tuple[int, int, int]:
    """``(rank, world size, local rank)``; ``(0, 1, 0)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def init_distributed(device: str) -> bool:
    """Initialises torch.distributed from torchrun's environment; True when running distributed.

    NCCL on GPUs, gloo on CPUs. A process group that exists already is used as it is.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend)
    return True


def allreduce_grads(params: list[torch.Tensor], world: int) -> None:
    """Averages the gradients of ``params`` over the ``world`` processes, in one flat all-reduce.

    D is run several times per step (real, fake, and inside G's loss) with frozen parameters in
    between, which DistributedDataParallel does not allow; its gradients are averaged here.
    """
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


def average_scalars(logs: dict, world: int, device: torch.device) -> dict:
    """``logs`` with its one-element tensors averaged over the ``world`` processes.

    Values whose key starts with ``usage`` (shares of the whole batch, already summed over the
    processes) and anything that is not a one-element tensor are left as they are.
    """
    if world <= 1:
        return logs
    keys = [k for k, v in logs.items() if not k.startswith("usage") and torch.is_tensor(v) and v.numel() == 1]
    vals = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).to(device)
    dist.all_reduce(vals)
    vals /= world
    return {**logs, **{k: vals[i] for i, k in enumerate(keys)}}


def shutdown() -> None:
    """Waits for every process, then destroys the process group (when there is one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
