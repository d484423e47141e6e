"""Device and process helpers: which device and mixed-precision type to use, and runs under ``torchrun``
(DDP). Without torchrun everything is a single process."""

from __future__ import annotations

import os
from typing import Optional

import torch

from partreid.common.errors import InputError


def resolve_device(device: str) -> str:
    """Map ``auto|cpu|cuda[:i]`` to a torch device string (``auto``: CUDA when available, else CPU).

    Raises:
        InputError: CUDA requested but no CUDA device is available.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA device is available")
    return device


def amp_dtype(device) -> Optional[torch.dtype]:
    """The autocast dtype for ``device``: bf16 on CUDA where supported, else fp16 (then a GradScaler is needed);
    None (full precision) on the CPU."""
    if not str(device).startswith("cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device):
    """``torch.autocast`` context for :func:`amp_dtype` (disabled on the CPU)."""
    dtype = amp_dtype(device)
    return torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)


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
