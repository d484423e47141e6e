"""Reading a checkpoint file: the one ``torch.load`` of the package.

Every reader (:func:`partreid.common.models.loader.load_model`, the PartViT, ResNet-50 and fine-tuned model
readers, ``pass-pretrain --resume`` / ``export`` and ``finetune --resume``) goes through :func:`read_checkpoint`,
so a missing or unreadable file gives the same one-line :class:`~partreid.common.errors.InputError` everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import torch

from partreid.common.errors import InputError


def read_checkpoint(path: Union[str, os.PathLike], *, weights_only: bool = False,
                    map_location: Union[str, torch.device] = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load`` a checkpoint file (tensors on ``map_location``, the CPU by default).

    Args:
        path: the file.
        weights_only: ``True`` reads only tensors and plain Python containers (torch's safe unpickler); use it
            for files meant to hold weights alone (torchvision state dicts, ``finetune`` models). ``False``
            also reads training states that hold other objects (optimizer states, NumPy RNG states); only for
            files the user trusts, as with any pickle.
        map_location: device for the tensors.
        what: what the file should be, for the error message (e.g. ``"ResNet-50 weights file"``).

    Returns:
        whatever the file holds (usually a dict).

    Raises:
        InputError: the file is missing, or torch cannot read it (one line naming the file and the cause).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such {what}")
    try:
        return torch.load(p, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip failure is bad input
        first = (str(exc).strip().splitlines() or [""])[0]
        raise InputError(f"{p}: not a readable torch {what} ({type(exc).__name__}: {first})"[:400]) from None
