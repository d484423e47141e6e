"""Nearest-neighbour search with faiss (exact or approximate, CPU or GPU), in bounded memory.

Every stage that needs neighbour lists (the k-reciprocal Jaccard distance of ``cluster``, PPLR's cross-agreement,
re-ranking) goes through :func:`knn_search`, so the faiss version drift that breaks the peers' clustering code (their
``faiss_utils.py`` calls ``bruteForceKnn`` and ``cast_integer_to_*_ptr``, gone from recent faiss) is handled in one
place. Only the stable public faiss API is used: ``IndexFlatIP`` / ``IndexFlatL2``, ``IndexHNSWFlat``,
``IndexIVFFlat`` and, when the installed faiss is a GPU build and a GPU is visible, ``index_cpu_to_gpu``.

Ordering and ties
-----------------
faiss returns each row sorted by distance but leaves the order of equal distances unspecified (it depends
on the heap and on the BLAS blocking). :func:`knn_search` re-sorts every returned row with a stable key so
the output is deterministic: by distance (descending similarity for ``metric='ip'``, ascending squared L2
for ``metric='l2'``), then, in a self-search (``queries=None``), the query's own index first among equal
distances, then ascending database index. Which of two points tied exactly at the k-th place is kept is
still decided by faiss.
"""

from __future__ import annotations

import math
import sys
from typing import Optional, Tuple

import faiss
import numpy as np
from tqdm import tqdm

from partreid.common.errors import InputError

METRICS = ("ip", "l2")
METHODS = ("exact", "hnsw", "ivf")
DEVICES = ("auto", "cpu", "cuda")


def _faiss():
    """The faiss module (for ``common/retrieval/kreciprocal.py``, which takes it from here)."""
    return faiss


def faiss_gpu_available() -> bool:
    """True when the installed faiss is a GPU build and sees at least one GPU."""
    get = getattr(faiss, "get_num_gpus", None)
    return bool(get is not None and get() > 0 and hasattr(faiss, "StandardGpuResources")
                and hasattr(faiss, "index_cpu_to_gpu"))


def l2_normalize_rows(x, *, tol: float = 1e-4) -> np.ndarray:
    """L2-normalise the rows of a feature matrix: the one normalisation of clustering, cross-agreement and
    cosine evaluation.

    Args:
        x: (N, D) real array (float32 or any real dtype; a CPU torch tensor is accepted).
        tol: when every row norm is already within ``tol`` of 1, ``x`` is returned unchanged (as float32), so
            normalised features (``extract-features`` writes them) stay bit-identical. ``0`` always divides.

    Returns:
        float32 (N, D) C-contiguous array; each row divided by its L2 norm (computed in float64). An all-zero
        row stays all zero (as ``torch.nn.functional.normalize`` leaves it): it is similar to nothing.

    Raises:
        InputError: not 2-D, or NaN/infinite values.
    """
    x = _as_float32_matrix(x, "features")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    if x.shape[0] and np.abs(norms - 1.0).max() <= tol:
        return x
    norms[norms == 0] = 1.0
    return (x / norms[:, None]).astype(np.float32)


def _as_float32_matrix(a, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 2:
        raise InputError(f"{name} must be a 2-D (N, D) array, got shape {a.shape}")
    if a.shape[0] and not np.isfinite(a).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return a


def _metric_type(metric: str):
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _build_index(x: np.ndarray, metric: str, method: str, device: str, *, hnsw_m: int,
                 ef_construction: int, ef_search: int, nlist: Optional[int], nprobe: Optional[int],
                 seed: int, k: int):
    d = x.shape[1]
    mt = _metric_type(metric)
    if method == "exact":
        index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        index.add(x)
    elif method == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, mt)
        index.hnsw.efConstruction = ef_construction
        index.add(x)
        index.hnsw.efSearch = max(ef_search, k)
        return index, None  # faiss has no GPU HNSW: always searched on the CPU
    else:  # ivf
        n = x.shape[0]
        if nlist is None:
            nlist = int(min(max(1, round(4 * math.sqrt(n))), max(1, n // 39)))
        quantizer = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, mt)
        # Train the coarse quantizer on a deterministic sample (faiss wants >= 39 points per list).
        n_train = min(n, 64 * nlist)
        rng = np.random.default_rng(seed)
        train = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
        index.cp.seed = seed
        index.train(train)
        index.add(x)
        index.nprobe = int(nprobe if nprobe is not None else min(nlist, max(16, nlist // 32)))
    use_gpu = device == "cuda" or (device == "auto" and faiss_gpu_available())
    if use_gpu:
        if not faiss_gpu_available():
            raise InputError("device='cuda' was requested but faiss has no GPU support here "
                             "(install faiss-gpu-cu12 instead of faiss-cpu, and check the GPU is visible)")
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, 0, index), res  # the caller keeps `res` alive during the search
    return index, None


def _sort_rows(dist: np.ndarray, idx: np.ndarray, metric: str, self_ids: Optional[np.ndarray]):
    """Deterministic row order: distance, then self first (self-search), then ascending index."""
    primary = -dist if metric == "ip" else dist
    keys = [idx]
    if self_ids is not None:
        keys.append(idx != self_ids[:, None])
    keys.append(primary)
    order = np.lexsort(tuple(keys), axis=-1)
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(idx, order, axis=1)


def knn_search(x, k: int, *, queries=None, metric: str = "ip", method: str = "exact",
               device: str = "auto", chunk_size: int = 65536, exclude_self: bool = False,
               hnsw_m: int = 32, ef_construction: int = 64, ef_search: int = 128,
               nlist: Optional[int] = None, nprobe: Optional[int] = None, seed: int = 0,
               progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of ``queries`` (default: of ``x`` itself) among the rows of ``x``.

    Args:
        x: database, float32 (N, D) (numpy or torch; converted to contiguous float32).
        k: neighbours per query, 1 <= k <= N (k + 1 <= N with ``exclude_self``).
        queries: float32 (Nq, D), or None for a self-search (queries = x, so each point is usually its own
            first neighbour).
        metric: ``'ip'`` inner product (cosine similarity for L2-normalised features; larger is closer) or
            ``'l2'`` squared Euclidean distance (smaller is closer).
        method: ``'exact'`` (``IndexFlatIP``/``IndexFlatL2``, brute force, BLAS), ``'hnsw'``
            (``IndexHNSWFlat``, graph index, CPU only) or ``'ivf'`` (``IndexIVFFlat`` with about 4·sqrt(N)
            lists, trained on a deterministic sample). The approximate methods are for hundreds of
            thousands of points; rows they could not fill are redone exactly, so no -1 is returned.
        device: ``'auto'`` (GPU if the installed faiss is a GPU build and ``faiss.get_num_gpus() > 0``,
            else CPU), ``'cpu'`` or ``'cuda'`` (raises :class:`InputError` if impossible).
        chunk_size: queries per faiss call; bounds the temporary memory to about chunk_size·k entries
            besides faiss's own fixed-size BLAS blocks.
        exclude_self: self-search only: drop each query's own index (by index, so an exact duplicate of
            the query is kept as a neighbour); k neighbours other than self are returned.
        hnsw_m, ef_construction, ef_search: HNSW graph degree and build/search beam widths.
        nlist, nprobe: IVF lists and lists probed per query (defaults: ~4·sqrt(N) and max(16, nlist/32)).
        seed: seed of the IVF training sample and k-means.
        progress: show a tqdm bar on stderr.

    Returns:
        ``(dist, idx)``: dist float32 (Nq, k) (similarities for ``'ip'``, squared distances for ``'l2'``)
        and idx int64 (Nq, k), each row ordered best first, ties broken deterministically (module doc).

    Raises:
        InputError: bad shapes, NaN/inf values, k out of range, unknown metric/method/device, or
            ``device='cuda'`` without a faiss GPU build.
    """
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if method not in METHODS:
        raise InputError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    x = _as_float32_matrix(x, "database features")
    self_search = queries is None
    q = x if self_search else _as_float32_matrix(queries, "query features")
    if q.shape[1] != x.shape[1]:
        raise InputError(f"query features have dimension {q.shape[1]} but the database has {x.shape[1]}")
    if exclude_self and not self_search:
        raise InputError("exclude_self needs a self-search (queries=None)")
    n = x.shape[0]
    k = int(k)
    kk = k + 1 if exclude_self else k
    if k < 1 or kk > n:
        raise InputError(f"cannot return k={k} neighbours{' besides self' if exclude_self else ''} "
                         f"from {n} database points")
    chunk_size = max(1, int(chunk_size))
    index, gpu_resources = _build_index(x, metric, method, device, hnsw_m=hnsw_m,
                                        ef_construction=ef_construction, ef_search=ef_search, nlist=nlist,
                                        nprobe=nprobe, seed=seed, k=kk)
    nq = q.shape[0]
    dist = np.empty((nq, k), dtype=np.float32)
    idx = np.empty((nq, k), dtype=np.int64)
    exact_index = None
    starts = range(0, nq, chunk_size)
    if progress:
        starts = tqdm(starts, desc=f"kNN ({method})", unit="chunk", file=sys.stderr)
    for s in starts:
        e = min(s + chunk_size, nq)
        d_c, i_c = index.search(q[s:e], kk)
        bad = (i_c < 0).any(axis=1)
        if bad.any():  # approximate index could not fill these rows: redo them exactly
            if exact_index is None:
                exact_index, _ = _build_index(x, metric, "exact", "cpu", hnsw_m=0, ef_construction=0,
                                              ef_search=0, nlist=None, nprobe=None, seed=seed, k=kk)
            d_c[bad], i_c[bad] = exact_index.search(q[s:e][bad], kk)
        self_ids = np.arange(s, e, dtype=np.int64) if self_search else None
        i_c = i_c.astype(np.int64, copy=False)
        tied = np.flatnonzero((d_c[:, 1:] == d_c[:, :-1]).any(axis=1)) if kk > 1 else np.empty(0, np.int64)
        if tied.size:  # only rows with equal distances need the deterministic re-sort
            d_c[tied], i_c[tied] = _sort_rows(d_c[tied], i_c[tied], metric,
                                              None if self_ids is None else self_ids[tied])
        if exclude_self:
            keep = _non_self_mask(i_c, self_ids, k)
            i_c = i_c[keep].reshape(e - s, k)
            d_c = d_c[keep].reshape(e - s, k)
        dist[s:e] = d_c
        idx[s:e] = i_c
    del index, gpu_resources  # GPU resources must outlive the GPU index
    return dist, idx


def _non_self_mask(idx: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Mask of the first k entries of each row that are not the row's own index."""
    not_self = idx != self_ids[:, None]
    return not_self & (np.cumsum(not_self, axis=1) <= k)


def exclude_self_columns(idx: np.ndarray, k: int, *, offset: int = 0) -> np.ndarray:
    """Drop each row's own index from a self-search table and keep its first ``k`` other neighbours.

    Self is removed **by index**, so an exact duplicate of the query (same distance) stays a neighbour; a row
    whose own index is not in the table keeps its first k entries.

    Args:
        idx: int64 (N, K) neighbour table of a self-search, row r belonging to sample ``offset + r``.
        k: neighbours to keep; needs K >= k + 1 (or K >= k for rows without self).
        offset: index of the first row's sample.

    Returns:
        int64 (N, k).

    Raises:
        InputError: some row has fewer than k non-self entries.
    """
    idx = np.asarray(idx, np.int64)
    if idx.ndim != 2:
        raise InputError(f"neighbour table must be 2-D (N, K), got shape {idx.shape}")
    n = idx.shape[0]
    self_ids = np.arange(offset, offset + n, dtype=np.int64)
    keep = _non_self_mask(idx, self_ids, k)
    if n and int(keep.sum(axis=1).min()) < k:
        raise InputError(f"the neighbour table has {idx.shape[1]} columns: fewer than k={k} neighbours "
                         f"besides self")
    return idx[keep].reshape(n, k)
