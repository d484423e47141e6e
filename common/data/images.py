"""Image loading for :class:`partreid.common.data.datasets.ReIDDataset`: files, LUPerson's LMDB, and a torch Dataset.

Unreadable images (missing, truncated, not an image) are reported with their path. By default
:class:`ImageDataset` warns on stderr, counts the image and returns None for it, and :func:`collate_skip_none`
drops those items from the batch; with ``strict=True`` it raises :class:`common.errors.InputError` instead
(issue §2: ``--strict``).

Counting across DataLoader workers: workers are separate processes, so a plain attribute incremented in a
worker would never reach the main process. :attr:`ImageDataset.skipped` is therefore backed by a small
shared-memory tensor created in the main process, one slot per process (main, worker 0, worker 1...),
summed when read; it reaches the workers under the fork, spawn and forkserver start methods alike. The
main process can also tell exactly which rows were skipped: each batch carries the row numbers of the
images it holds, and the rows that never arrive are the skipped ones (:func:`missing_rows`).
"""

from __future__ import annotations

import io
import os
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from partreid.common.errors import InputError

#: ImageNet pixel mean and std (RGB, 0-1 scale): PASS pre-training and PPLR normalise with these
#: (reference-spec §A.3, §C.5); the downstream PASS recipes use 0.5/0.5 instead.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from partreid.common.data.datasets import ReIDDataset

# What Pillow raises on damaged data besides OSError: broken PNG chunks raise SyntaxError, some truncated
# headers struct.error or EOFError, absurd sizes DecompressionBombError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
_SKIP_SLOTS = 1024


def _load_rgb(source, name: str) -> Image.Image:
    try:
        with Image.open(source) as im:
            return im.convert("RGB")  # forces the full decode while the file is open
    except FileNotFoundError:
        raise OSError(f"{name}: image file not found") from None
    except _DECODE_ERRORS as exc:
        raise OSError(f"{name}: unreadable image ({type(exc).__name__}: {exc})") from exc


def open_image_file(path: Union[str, os.PathLike]) -> Image.Image:
    """Read an image file fully into an RGB ``PIL.Image.Image`` (W×H, uint8, 3 channels).

    Raises:
        OSError: missing, truncated or undecodable file; the message starts with the path.
    """
    return _load_rgb(path, str(path))


def decode_image_bytes(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes (e.g. the JPEG stored in LUPerson's LMDB) into an RGB ``PIL.Image.Image``.

    Args:
        data: the encoded file content.
        name: how to name the image in error messages.

    Raises:
        OSError: the bytes are not a decodable image.
    """
    return _load_rgb(io.BytesIO(data), name)


class LmdbReader:
    """Read-only access to an LMDB of encoded images, keyed by UTF-8 strings (LUPerson, reference-spec §A.8).

    The reader holds only the path; the environment comes from :func:`partreid.common.data.datasets.lmdb_environment`,
    opened lazily once per process. A reader created in the main process and copied into DataLoader workers
    (by fork or by pickling) thus gets a fresh environment in each worker, as LMDB requires (an environment
    must not be used across ``fork()``).
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``.

        Raises:
            OSError: the key is absent or the LMDB cannot be read.
        """
        from partreid.common.data.datasets import import_lmdb, lmdb_environment
        env = lmdb_environment(self.path)  # per process, shared with other readers of the same LMDB
        try:
            with env.begin(write=False) as txn:
                data = txn.get(key.encode("utf-8"))
        except import_lmdb().Error as exc:
            raise OSError(f"{self.path}[{key}]: LMDB read failed ({exc})") from None
        if data is None:
            raise OSError(f"{self.path}[{key}]: key not in the LMDB")
        return data


class ImageDataset(torch.utils.data.Dataset):
    """Map-style torch Dataset over the rows of a dataset frame.

    Item ``i`` is ``(transform(image), i)``, where ``i`` is the row's position in ``frame`` (0..len-1) and
    ``image`` the RGB ``PIL.Image.Image`` from :meth:`ReIDDataset.open_image`; or None when the image is
    unreadable and ``strict`` is False (then a warning naming the image goes to stderr and :attr:`skipped`
    is incremented). Use :func:`collate_skip_none` as the DataLoader's ``collate_fn``.

    Paths are held in one numpy bytes array (not a list of Python str), so DataLoader workers forked from a
    process holding millions of paths do not copy them page by page as reference counts change.

    Args:
        ds: the loaded dataset (images are opened through it).
        frame: rows to serve (a ``ds.split(...)`` result or ``ds.frame``; only column ``path`` is used);
            default ``ds.frame``.
        transform: callable PIL image → tensor (C×H×W float32), e.g. a torchvision transform; None returns
            the PIL image (then use your own collate).
        strict: raise :class:`InputError` naming the image instead of skipping it; None takes ``ds.strict``.
    """

    def __init__(self, ds: "ReIDDataset", frame: "Optional[pd.DataFrame]" = None,
                 transform: Optional[Callable] = None, strict: Optional[bool] = None):
        frame = ds.frame if frame is None else frame
        if "path" not in getattr(frame, "columns", ()):
            raise InputError("ImageDataset needs a frame with a 'path' column (ds.frame or ds.split(name))")
        self.ds = ds
        self.transform = transform
        self.strict = bool(ds.strict if strict is None else strict)
        encoded = [p.encode("utf-8") for p in frame["path"].tolist()]
        self._paths = np.array(encoded, dtype=np.bytes_) if encoded else np.array([], dtype="S1")
        # One counter slot per process (main = slot 0, DataLoader worker w = slot 1 + w), in shared memory:
        # every slot has a single writer, so no lock is needed, and a shared tensor travels to workers
        # started by fork, spawn or forkserver alike.
        self._skip_slots = torch.zeros(_SKIP_SLOTS, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def skipped(self) -> int:
        """Number of unreadable images skipped so far, summed over the main process and all workers."""
        return int(self._skip_slots.sum())

    def path(self, i: int) -> str:
        """The ``path`` value (relative path or LMDB key) of row ``i``."""
        return self._paths[i].decode("utf-8")

    def __getitem__(self, i: int) -> Optional[Tuple[object, int]]:
        i = int(i)
        rel = self.path(i)
        try:
            img = self.ds.open_image(rel)
        except OSError as exc:
            if self.strict:
                raise InputError(f"{exc} (--strict; without it such images are skipped)") from None
            info = torch.utils.data.get_worker_info()
            self._skip_slots[0 if info is None else 1 + info.id % (_SKIP_SLOTS - 1)] += 1
            print(f"warning: skipping {exc}", file=sys.stderr)
            return None
        return (self.transform(img) if self.transform is not None else img), i


def collate_skip_none(batch: Sequence[Optional[Tuple[torch.Tensor, int]]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Collate :class:`ImageDataset` items, dropping the None ones (skipped images).

    Returns:
        (images, indices): images float tensor (B'×C×H×W) stacked from the kept items, indices int64 (B',)
        their row numbers in the frame. When every item was None: ``torch.empty(0)`` and an empty int64
        tensor (check ``len(indices)``).
    """
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    images = torch.stack([b[0] for b in kept])
    indices = torch.as_tensor([b[1] for b in kept], dtype=torch.long)
    return images, indices


def missing_rows(n: int, received: Sequence[torch.Tensor]) -> List[int]:
    """Row numbers in ``range(n)`` that never arrived in any batch's ``indices`` (the skipped images), sorted.

    Args:
        n: number of rows served (``len(image_dataset)``).
        received: the ``indices`` tensors of the batches (int64, any length).
    """
    seen = np.zeros(n, dtype=bool)
    for idx in received:
        seen[np.asarray(idx, dtype=np.int64)] = True
    return np.flatnonzero(~seen).tolist()
