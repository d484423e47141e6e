"""Distributed helpers for runs under ``torchrun`` (DDP). Without torchrun everything is a single process."""

from __future__ import annotations

import os

import torch


def is_torchrun() -> bool:
    """True when launched by torchrun (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str) -> str:
    """Initialise the default process group under torchrun and return this rank's device.

    NCCL on CUDA (one GPU per local rank), gloo on CPU. A no-op returning ``device`` outside torchrun.
    """
    if not is_torchrun() or not torch.distributed.is_available():
        return device
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def world_size() -> int:
    """Number of processes (1 outside torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    """Synchronise all ranks (no-op in a single process)."""
    if world_size() > 1:
        torch.distributed.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank ``src`` to every rank; returns it on all ranks."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
