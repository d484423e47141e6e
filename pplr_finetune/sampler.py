"""PK sampler with camera preference (PPLR / cluster-contrast
``pplr/utils/data/sampler.py`` ``RandomMultipleGallerySampler``).

One *pass* visits every pseudo-id once, in random order. For each id it draws a random anchor image, then
K − 1 more images of the id, preferring images from cameras other than the anchor's:

- if the id has images from other cameras, the K − 1 are drawn among those only: without replacement when
  there are at least K of them, with replacement otherwise (reference quirk reproduced: the threshold is
  ``>= K``, not ``>= K − 1``, so exactly K − 1 other-camera images are sampled with replacement);
- otherwise they are drawn among the id's other images (same camera), with the same rule;
- an id with a single image contributes only that image.

The pass is a flat list of indices (K per id, 1 for single-image ids). Batches are consecutive chunks of
``batch_size`` (64 = 16 ids × 4 when no id is a singleton), the tail of a pass is dropped and a new pass
starts (the reference's ``IterLoader`` over a ``drop_last`` DataLoader). An epoch is ``num_iters`` batches
(400 in PPLR).

Determinism: pass p of epoch e draws from ``numpy.random.Generator(PCG64(SeedSequence([seed, e, p])))``, so
the batches depend only on (seed, epoch, labels, camids), never on global RNG state; resuming mid-epoch uses
``start_iter`` (:meth:`PKSampler.set_epoch`).
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import numpy as np
from torch.utils.data import Sampler

from partreid.common.errors import InputError

__all__ = ["PKSampler", "pk_pass"]


def _group(labels: np.ndarray, camids: np.ndarray):
    """pid → (indices, camids) for labels ≥ 0, pids in increasing order."""
    keep = np.flatnonzero(labels >= 0)
    order = keep[np.argsort(labels[keep], kind="stable")]
    pids, starts = np.unique(labels[order], return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    groups = []
    for s, e in zip(starts, bounds):
        idx = order[s:e]
        groups.append((idx, camids[idx]))
    return pids, groups


def pk_pass(groups, num_instances: int, rng: np.random.Generator) -> np.ndarray:
    """One pass of the camera-preferring PK sampling over ``groups`` (list of (indices, camids) per pid).

    Returns int64 indices, ``num_instances`` per multi-image id (1 for single-image ids), ids in random order.
    Pure given ``rng``. Source: PPLR ``pplr/utils/data/sampler.py`` ``RandomMultipleGallerySampler``.
    """
    k = num_instances
    out: List[int] = []
    for g in rng.permutation(len(groups)):
        idx, cams = groups[g]
        a = int(rng.integers(len(idx)))
        out.append(int(idx[a]))
        if k <= 1:
            continue
        pool = np.flatnonzero(cams != cams[a])
        if pool.size == 0:
            pool = np.delete(np.arange(len(idx)), a)
            if pool.size == 0:
                continue  # a single-image id contributes only itself
        pick = rng.choice(pool, size=k - 1, replace=pool.size < k)
        out.extend(int(i) for i in idx[pick])
    return np.asarray(out, dtype=np.int64)


class PKSampler(Sampler):
    """Batch sampler yielding ``num_iters`` batches of dataset indices per epoch (PK sampling, PPLR
    ``pplr/utils/data/sampler.py`` ``RandomMultipleGallerySampler``).

    Use as ``DataLoader(dataset, batch_sampler=PKSampler(...))``; call :meth:`set_epoch` before each epoch.

    Args:
        labels: int (N,) pseudo-labels of the dataset rows; rows with −1 are never sampled.
        camids: int (N,) camera ids (used even without camera-aware losses, as the reference does).
        num_instances: K, images per id (4).
        batch_size: images per (global) batch (64 = 16 × 4).
        num_iters: batches per epoch (400); None = the batches of one pass.
        seed: base seed.
        rank, world_size: under DDP each rank gets its contiguous 1/world_size slice of every global batch
            (the same split nn.DataParallel makes); ``batch_size`` must be divisible by ``world_size``.

    Raises:
        InputError: length mismatch, no label ≥ 0, K < 1, batch_size < 1, num_iters < 1, bad rank/world_size,
            or a pass too short to fill one batch.
    """

    def __init__(self, labels, camids, num_instances: int = 4, batch_size: int = 64,
                 num_iters: Optional[int] = 400, seed: int = 0, rank: int = 0, world_size: int = 1):
        labels = np.asarray(labels).astype(np.int64).ravel()
        camids = np.asarray(camids).astype(np.int64).ravel()
        if labels.shape != camids.shape:
            raise InputError(f"labels ({labels.size}) and camids ({camids.size}) differ in length")
        if not (labels >= 0).any():
            raise InputError("no sample to draw: every pseudo-label is -1")
        if num_instances < 1 or batch_size < 1 or (num_iters is not None and num_iters < 1):
            raise InputError(f"num_instances, batch_size, num_iters must be >= 1, got {num_instances}, "
                             f"{batch_size}, {num_iters}")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise InputError(f"bad rank {rank} / world_size {world_size} for batch size {batch_size}")
        self.num_instances = int(num_instances)
        self.batch_size = int(batch_size)
        self.num_iters = None if num_iters is None else int(num_iters)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.pids, self._groups = _group(labels, camids)
        self.epoch = 0
        self.start_iter = 0
        # a pass holds exactly K indices per multi-image id and 1 per single-image id
        n_multi = sum(len(ix) > 1 for ix, _ in self._groups)
        min_pass = n_multi * self.num_instances + (len(self._groups) - n_multi)
        if min_pass < self.batch_size and self.num_iters is None:
            raise InputError(f"{len(self._groups)} pseudo-ids give {min_pass} images per pass, fewer than one "
                             f"batch of {self.batch_size}; lower the batch size or cluster more images")
        # With fewer images per pass than one batch (few clusters, e.g. small data or an early epoch), the
        # reference's IterLoader would never yield a batch; here successive passes are concatenated until a batch
        # fills, so an id may then appear twice in one batch.
        self._passes_per_chunk = max(1, -(-self.batch_size // max(min_pass, 1)))
        self._pass_len = min_pass

    @property
    def num_pids(self) -> int:
        """Number of pseudo-ids (clusters) sampled."""
        return len(self._groups)

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        """Select the epoch's RNG stream; ``start_iter`` skips that many batches (fast-forward for resume)."""
        if start_iter < 0:
            raise InputError(f"start_iter must be >= 0, got {start_iter}")
        self.epoch = int(epoch)
        self.start_iter = int(start_iter)

    def pass_indices(self, epoch: int, pass_idx: int) -> np.ndarray:
        """Indices of pass ``pass_idx`` of epoch ``epoch``, int64 (L,), deterministic."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch), int(pass_idx)])))
        return pk_pass(self._groups, self.num_instances, rng)

    def global_batches(self, epoch: Optional[int] = None) -> Iterator[np.ndarray]:
        """All global batches (int64 (batch_size,)) of an epoch from iteration 0 (``num_iters`` of them, or one
        pass when num_iters is None)."""
        epoch = self.epoch if epoch is None else int(epoch)
        done, p = 0, 0
        while True:
            idx = np.concatenate([self.pass_indices(epoch, p + j) for j in range(self._passes_per_chunk)])
            for s in range(0, len(idx) - self.batch_size + 1, self.batch_size):
                if self.num_iters is not None and done >= self.num_iters:
                    return
                yield idx[s:s + self.batch_size]
                done += 1
            p += self._passes_per_chunk
            if self.num_iters is None:
                return

    def __iter__(self) -> Iterator[List[int]]:
        per = self.batch_size // self.world_size
        lo = self.rank * per
        for i, batch in enumerate(self.global_batches()):
            if i < self.start_iter:
                continue
            yield batch[lo:lo + per].tolist()

    def __len__(self) -> int:
        total = self.num_iters if self.num_iters is not None else self._pass_len // self.batch_size
        return max(total - self.start_iter, 0)
