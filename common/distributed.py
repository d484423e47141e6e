"""Device and process helpers: which device and mixed-precision type to use, and runs under ``torchrun``
(DDP). Without torchrun everything is a single process."""

from __future__ import annotations

import importlib
import os
from contextlib import contextmanager, nullcontext
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from partreid.common.errors import InputError
from partreid.common.precision import AMP_MODES


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


def resolve_amp(amp: Optional[str], device) -> Tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None, whether training needs a GradScaler) for the mode ``amp`` on ``device``.

    Modes (:data:`partreid.common.precision.AMP_MODES`): 'none'/None → float32; 'bf16' → bfloat16 (CPU or
    CUDA, no scaler); 'fp16' → float16 with a GradScaler on CUDA, float32 on the CPU (CPU float16 autocast is
    neither what the published runs did nor fast); 'auto' → bf16 on a CUDA device that supports it, else fp16
    with a scaler; float32 on the CPU.

    Raises:
        InputError: unknown mode.
    """
    if amp is None or amp == "none":
        return None, False
    if amp not in AMP_MODES:
        raise InputError(f"amp {amp!r} not in {', '.join(AMP_MODES)}")
    cuda = str(device).startswith("cuda")
    if amp == "bf16":
        return torch.bfloat16, False
    if not cuda:
        return None, False
    if amp == "auto" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def autocast(device, amp: Optional[str] = "none"):
    """``torch.autocast`` context for mode ``amp`` on ``device`` (:func:`resolve_amp`); by default full float32."""
    dtype, _ = resolve_amp(amp, device)
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return torch.autocast(kind, dtype=dtype) if dtype is not None else nullcontext()


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
        # torch.distributed.nn.functional binds ``group=group.WORLD`` as default arguments when first imported;
        # imported after the group exists (torchvision pulls it in through torch._dynamo) it would hold the default
        # group forever, destroy_process_group() could not free it, and gloo's threads would still run while the
        # interpreter shuts down, where they abort the process now and then ("terminate called without an active
        # exception"). Imported first, the defaults are None, which means the default group at call time.
        importlib.import_module("torch.distributed.nn.functional")

        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


@contextmanager
def session(device: str) -> Iterator[str]:
    """:func:`init_distributed` for the length of a run; yields this rank's device.

    On leaving, every rank waits for the others (:func:`barrier`) and the process group this call created is
    destroyed. A rank that ends its process while gloo is still up and another rank is still working (rank 0
    writing the file the others fed) aborts in gloo's C++ teardown ("terminate called without an active
    exception", signal 6), and torchrun then kills the other ranks. After an exception the group is destroyed
    without the barrier (the ranks still running are stopped by torchrun). A no-op outside torchrun.
    """
    created = is_torchrun() and torch.distributed.is_available() and not torch.distributed.is_initialized()
    device = init_distributed(device)
    try:
        yield device
        barrier()
    finally:
        if created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


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


def batch_sizes(n: int, device) -> List[int]:
    """Every rank's local batch size, in rank order (one all_gather of an int64); ``[n]`` in one process.

    A rank's batch can be smaller than the others' when some of its images turned unreadable (the collate drops
    them); the training loop uses these sizes to skip an iteration on every rank at once and to gather batches of
    different sizes (:func:`gather_rows`)."""
    if world_size() == 1:
        return [int(n)]
    mine = torch.tensor([int(n)], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world_size())]
    torch.distributed.all_gather(every, mine)
    return [int(t.item()) for t in every]


def gather_rows(t: torch.Tensor, sizes: Sequence[int], grad: bool = False) -> torch.Tensor:
    """Every rank's rows of ``t`` concatenated in rank order, ranks holding ``sizes[r]`` rows each.

    Rows are padded to ``max(sizes)`` for the collective and trimmed afterwards, so ranks may hold different
    numbers of rows. With ``grad=True`` the result keeps the autograd graph
    (``torch.distributed.nn.functional.all_gather``: its backward sums the gradients of all ranks, as
    ``nn.DataParallel``'s gather does once DDP averages them). ``t`` itself in one process.

    Args:
        t: (sizes[rank], ...) tensor on this rank's device. sizes: from :func:`batch_sizes`.

    Returns:
        (sum(sizes), ...) tensor.
    """
    if world_size() == 1:
        return t
    most = max(sizes)
    padded = t.contiguous()
    if t.shape[0] < most:
        padded = torch.cat([padded, padded.new_zeros((most - t.shape[0], *t.shape[1:]))])
    if grad:
        from torch.distributed.nn.functional import all_gather as all_gather_grad

        parts = all_gather_grad(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])
