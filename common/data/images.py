"""The torch ``Dataset`` over a :class:`partreid.common.data.base.ReIDDataset`'s rows, and its collate helpers.

Unreadable images (missing, truncated, not an image) are reported with their path. By default
:class:`ImageDataset` warns on stderr, counts the image and returns None for it, and :func:`collate_skip_none`
drops those items from the batch; with ``strict=True`` it raises :class:`common.errors.InputError` instead
(the CLI's ``--strict``).

Counting across DataLoader workers: workers are separate processes, so a plain attribute incremented in a
worker would never reach the main process. :attr:`ImageDataset.skipped` is therefore backed by a small
shared-memory tensor created in the main process, one slot per process (main, worker 0, worker 1...),
summed when read; it reaches the workers under the fork, spawn and forkserver start methods alike. The
main process can also tell exactly which rows were skipped: each batch carries the row numbers of the
images it holds, and the rows that never arrive are the skipped ones (:func:`missing_rows`).
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from partreid.common.data.base import ReIDDataset
from partreid.common.data.luperson import PathTable
from partreid.common.errors import InputError

#: ImageNet pixel mean and std (RGB, 0-1 scale): PASS pre-training (PASS ``main_pass.py``
#: ``DataAugmentationDINO``) and PPLR (``examples/train_pplr.py``) normalise with these; the downstream PASS
#: recipes (TransReID ``configs/*.yml``) use 0.5/0.5 instead.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SKIP_SLOTS = 1024


class ImageDataset(torch.utils.data.Dataset):
    """Map-style torch Dataset over the rows of a dataset frame.

    Item ``i`` is ``(transform(image), i)``, where ``i`` is the row's position in ``frame`` (0..len-1) and
    ``image`` what ``opener(ds, path)`` returns, by default the RGB ``PIL.Image.Image`` of
    :meth:`ReIDDataset.open_image`; or None when the image is unreadable and ``strict`` is False (then a
    warning naming the image goes to stderr and :attr:`skipped` is incremented). Use :func:`collate_skip_none`
    as the DataLoader's ``collate_fn``.

    Paths are held in a :class:`~partreid.common.data.luperson.PathTable` (a byte blob + offsets, no Python
    str per row); with ``frame`` None the dataset's own table is used when it has one (LUPerson), memory-mapped
    from the index cache, so DataLoader workers share it instead of each holding a copy of millions of paths.

    Args:
        ds: the loaded dataset (images are opened through it).
        frame: rows to serve (a ``ds.split(...)`` result; only column ``path`` is used); None: every row of
            ``ds``.
        transform: callable image → tensor (C×H×W float32), e.g. a torchvision transform; None returns
            the image itself (then use your own collate).
        strict: raise :class:`InputError` naming the image instead of skipping it; None takes ``ds.strict``.
        opener: callable ``(ds, path) -> image`` raising ``OSError`` for an unreadable image; default
            ``ds.open_image(path)``.
    """

    def __init__(self, ds: ReIDDataset, frame: Optional[pd.DataFrame] = None,
                 transform: Optional[Callable] = None, strict: Optional[bool] = None,
                 opener: Optional[Callable[[ReIDDataset, str], Any]] = None):
        if frame is not None and "path" not in getattr(frame, "columns", ()):
            raise InputError("ImageDataset needs a frame with a 'path' column (ds.frame or ds.split(name))")
        self.ds = ds
        self.transform = transform
        self.opener = opener
        self.strict = bool(ds.strict if strict is None else strict)
        if frame is None:
            own = getattr(ds, "paths", None)
            self._paths = own if isinstance(own, PathTable) else PathTable.from_strings(ds.frame["path"].tolist())
        else:
            self._paths = PathTable.from_strings(frame["path"].tolist())
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
        return self._paths[i]

    def with_opener(self, opener: Optional[Callable[[ReIDDataset, str], Any]],
                    transform: Optional[Callable] = None) -> "ImageDataset":
        """A view of the same rows (sharing paths and the skip counter) that opens images with ``opener``
        and applies ``transform`` (e.g. a decoder handing uint8 arrays to device-side augmentation)."""
        view = copy.copy(self)
        view.opener, view.transform = opener, transform
        return view

    def __getitem__(self, i: int) -> Optional[Tuple[object, int]]:
        i = int(i)
        rel = self.path(i)
        try:
            img = self.ds.open_image(rel) if self.opener is None else self.opener(self.ds, rel)
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
