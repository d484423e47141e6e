"""Re-ID retrieval evaluation: mAP, CMC and mINP with bounded memory (open-reid ``evaluation_metrics/ranking.py``
``mean_ap``/``cmc`` as in PPLR ``pplr/evaluators.py``; TransReID ``utils/metrics.py`` ``eval_func``).

The peers (open-reid style, open-reid ``evaluation_metrics/ranking.py`` ``mean_ap``/``cmc``; TransReID style,
TransReID ``utils/metrics.py`` ``eval_func``) build the full Q×G float32 distance matrix and an int64 ``argsort`` of
every row, which needs 12–16 GB of RAM at MSMT17 size (3.8 GB of float32 distances, 7.7 GB of int64 indices, the
match matrix). Here the distances are produced and consumed in chunks of query rows (:func:`distance_chunks`), and no
row is fully sorted: for each query only its positives are sorted, and the valid negatives ranked before each positive
are counted with a binary search (:func:`evaluate_distances`). The numbers are those of the straightforward definition
below, exactly (integer ranks; only the final averaging is floating point).

Definitions (Market protocol: open-reid ``mean_ap``/``cmc``, TransReID ``eval_func``)
-------------------------------------------------------------------------------------
For a query with pid ``p`` and camid ``c``:

* **ranking**: the gallery sorted by distance with a *stable* sort, i.e. ties are broken by gallery index
  (the order of ``np.argsort(dist_row, kind='stable')``). Distances are compared as float32 values, and
  ``-0.0 == +0.0``. The peers use ``np.argsort``'s default (unstable) quicksort, so on exactly tied distances
  their order is unspecified; on untied distances the two coincide.
* **junk** (removed from the ranked list): gallery entries with the same pid AND the same camid as the query.
  Everything else stays, including distractors (pid 0) as negatives. Pids are only compared for equality;
  Market junk images (pid −1) are expected to have been dropped by the loader (open-reid
  ``evaluation_metrics/ranking.py`` ``mean_ap``/``cmc``).
* **positives**: the remaining entries with pid ``p``. A query without any positive is skipped and only
  counted (``num_query − num_valid_query``).
* **AP** (non-interpolated, TransReID ``eval_func`` style): the mean over the positives of the precision at
  the rank of each positive, ``mean_j (j+1)/(r_j+1)`` with ``r_j`` the 0-based rank of the ``j``-th positive
  in the junk-free list. Without ties this equals the open-reid/scikit-learn AP of open-reid
  ``evaluation_metrics/ranking.py`` ``mean_ap``/``cmc``.
* **CMC** (``first_match_break``): ``cmc[k]`` = fraction of valid queries whose first positive is at 0-based
  rank ≤ ``k``; ``rank1``/``rank5``/``rank10``/``rank20`` are ``cmc[0]``/``cmc[4]``/``cmc[9]``/``cmc[19]``.
* **mINP** (Ye et al. 2021, TransReID ``eval_func``): mean over valid queries of
  ``num_positives / (r_last + 1)`` with ``r_last`` the 0-based rank of the hardest positive.

CUHK03 single-gallery-shot protocol (``protocol='cuhk03'``)
-----------------------------------------------------------
The classic CUHK03 setting of open-reid/torchreid (``separate_camera_set=True, single_gallery_shot=True``,
10 repetitions). Only the CMC changes; mAP and mINP are those of the Market protocol above (as in open-reid,
whose ``mean_ap`` ignores these flags). For each valid query and each of ``sgs_repeats`` repetitions:

1. the candidate gallery is every entry whose camid differs from the query's (entries of the query's own
   camera, of any pid, are removed: ``separate_camera_set``);
2. one entry is drawn uniformly at random for every pid present among the candidates (distractor pid 0 is one
   pid like the others), so exactly one positive is drawn;
3. the rank of the repetition is the number of drawn entries ranked before the drawn positive (same stable
   order as above);

and the repetition adds ``1/sgs_repeats`` to the CMC histogram at that rank (open-reid's ``delta``).
The draws come from ``numpy.random.default_rng(seed)`` consumed in query order, so results are reproducible
and independent of the chunk size. (open-reid draws from numpy's global state with ``np.random.choice``;
the sampling law is the same, the random stream is not.)

No-camera protocol (``protocol='no-camera'``)
---------------------------------------------
For data without camera labels (camid −1, e.g. a user's own single-camera footage): the only junk entry of a
query is its own image in the gallery (given as ``q_self``, the gallery index of the query's image, −1 when
the query's image is not in the gallery). Every other same-pid entry is a positive, whatever its camera; AP,
CMC and mINP are then defined as above. :func:`choose_protocol` picks it when every camid is −1.

Verification figures (``verification=True``)
--------------------------------------------
Every (query, gallery) pair that is not junk under the protocol is a *genuine* pair (same pid) or an
*impostor* pair (different pids; distractor pid 0 included), including the pairs of queries without a
positive. A pair is declared "same person" when its distance is ``<= threshold``. Then
``FMR(t) = #{impostor d <= t} / #impostors`` and ``TPR(t) = #{genuine d <= t} / #genuine``. ``TPR at FMR f``
uses the threshold ``t_f`` = the ``k``-th smallest impostor distance with ``k = floor(f · #impostors)``
(the largest threshold of the form "just below an impostor distance" whose FMR is ≤ f; ``t_f`` is the
midpoint between that impostor distance and the one before it, or that distance minus one ulp when ``k``
is 0). Exact and in bounded memory: all genuine distances are kept (their number is the number of
positives), and of the impostors only the ``floor(max f · #impostors) + 1`` smallest.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np

from partreid.common.errors import InputError
from partreid.common.retrieval.search import l2_normalize_rows

__all__ = [
    "distance_chunks",
    "evaluate_distances",
    "evaluate_features",
    "evaluate_rank",
    "topk_per_query",
    "default_chunk_size",
    "choose_protocol",
    "self_indices",
    "split_query",
    "verification_at_threshold",
    "PROTOCOLS",
]

#: Evaluation protocols (see the module docstring).
PROTOCOLS = ("market", "cuhk03", "no-camera")
#: False-match rates at which ``verification=True`` reports the TPR.
VERIFICATION_FMRS = (1e-2, 1e-3)

#: Target size in bytes of one float32 distance chunk when ``chunk_size`` is not given.
CHUNK_BYTES = 64 * 1024 * 1024


def default_chunk_size(num_gallery: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Query rows per chunk so that one float32 (rows × ``num_gallery``) block takes about ``chunk_bytes``
    (a multiple of :data:`TILE_ROWS`, at least one tile)."""
    rows = int(chunk_bytes) // (4 * max(1, int(num_gallery)))
    return max(TILE_ROWS, rows - rows % TILE_ROWS)


# ----------------------------------------------------------------------------------------------- distances

def _as_features(x, name: str) -> np.ndarray:
    try:
        x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: not a numeric array ({exc})") from None
    if x.ndim != 2:
        raise InputError(f"{name}: expected a 2-D (N, D) feature array, got shape {x.shape}")
    if x.shape[0] == 0:
        raise InputError(f"{name}: no feature rows")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise InputError(f"{name}: expected real-valued features, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError(f"{name}: features contain NaN or infinite values")
    return x


def distance_chunks(qf, gf, metric: str = "euclidean",
                    chunk_size: Optional[int] = None) -> Iterator[Tuple[int, np.ndarray]]:
    """Query-vs-gallery distances, one block of query rows at a time (the distances of TransReID
    ``utils/metrics.py`` ``euclidean_distance`` / ``R1_mAP_eval``).

    Args:
        qf: query features, float32 (Q, D) (numpy array or CPU tensor; other real dtypes are cast to float32).
        gf: gallery features, float32 (G, D).
        metric: ``'euclidean'``: squared Euclidean distance ``‖q‖² + ‖g‖² − 2 q·g`` computed exactly like the
            peers (``(‖q‖² + ‖g‖²).addmm_(q, gᵀ, beta=1, alpha=−2)`` in float32, no square root; on
            L2-normalised features it ranks like cosine). ``'cosine'``: ``1 − q̂·ĝ`` with q̂, ĝ the
            L2-normalised features (a zero vector is left at zero, giving distance 1).
        chunk_size: query rows per block; default :func:`default_chunk_size` (≈ 64 MiB per block).

    Yields:
        ``(q_start, dist)`` with ``dist`` a fresh float32 (c, G) array for queries ``q_start … q_start+c−1``,
        in query order. The product is one float32 BLAS call per block; peak extra memory is two blocks.

    Raises:
        InputError: not 2-D, empty, different widths, NaN/inf features, unknown metric, chunk_size < 1.
    """
    return _checked_distance_iter(_as_features(qf, "query features"), _as_features(gf, "gallery features"),
                                  metric, chunk_size)


def _checked_distance_iter(q: np.ndarray, g: np.ndarray, metric: str, chunk_size: Optional[int]):
    """:func:`distance_chunks` on features already validated by :func:`_as_features`."""
    if metric not in ("euclidean", "cosine"):
        raise InputError(f"unknown metric {metric!r}; expected 'euclidean' or 'cosine'")
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query features have width {q.shape[1]} but gallery features have width {g.shape[1]}")
    if chunk_size is None:
        chunk_size = default_chunk_size(g.shape[0])
    if int(chunk_size) < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    return _distance_iter(q, g, metric, int(chunk_size))


#: query rows per BLAS call. A row's distances are always computed in the same tile of ``TILE_ROWS`` rows
#: (tiles start at multiples of ``TILE_ROWS``; the last one is zero-padded), because BLAS rounds a row
#: differently depending on the matrix shape and the row's place in it: this keeps the values, and so the
#: rankings of near-tied entries, independent of ``chunk_size``. 256 rows run at the speed of one large product.
TILE_ROWS = 256


def _distance_iter(q: np.ndarray, g: np.ndarray, metric: str, chunk_size: int):
    # float32 throughout, one sgemm per tile (numpy's multi-threaded BLAS). Euclidean entries are
    # fl((‖q‖² + ‖g‖²) + (−2)·q·g), the rounding of the peers' ``addmm_`` (the factor −2 is exact)
    if metric == "cosine":
        q = l2_normalize_rows(q, tol=0.0)
        g = l2_normalize_rows(g, tol=0.0)
    else:
        qn = np.einsum("ij,ij->i", q, q)
        gn = np.einsum("ij,ij->i", g, g)
        # −2 folded into the query rows: scaling by a power of two commutes with every rounding of the product,
        # so fl((−2q)·g) = −2·fl(q·g) bit for bit, and the separate pass over each block is saved
        q = q * np.float32(-2.0)
        norms = None  # (rows, G) buffer of ‖q‖² + ‖g‖², reused across blocks
    gt = g.T
    nq = q.shape[0]
    cached = (None, None)  # (tile start, tile product): a chunk boundary inside a tile computes it once
    for start in range(0, nq, chunk_size):
        stop = min(start + chunk_size, nq)
        out = np.empty((stop - start, g.shape[0]), np.float32)
        for t0 in range(start - start % TILE_ROWS, stop, TILE_ROWS):
            t1 = t0 + TILE_ROWS
            a, b = max(t0, start), min(t1, stop)
            if t0 >= start and t1 <= stop:
                np.matmul(q[t0:t1], gt, out=out[t0 - start:t1 - start])
                continue
            if cached[0] != t0:
                tile = q[t0:min(t1, nq)]
                if tile.shape[0] < TILE_ROWS:
                    tile = np.concatenate([tile, np.zeros((TILE_ROWS - tile.shape[0], q.shape[1]), np.float32)])
                cached = (t0, tile @ gt)
            out[a - start:b - start] = cached[1][a - t0:b - t0]
        if metric == "cosine":
            np.subtract(np.float32(1.0), out, out=out)
        else:
            if norms is None:
                norms = np.empty_like(out)
            block = norms[:stop - start]
            np.add(qn[start:stop, None], gn[None, :], out=block)
            out += block
        yield start, out


# ---------------------------------------------------------------------------------------------- rankings

def _sortable(d: np.ndarray) -> np.ndarray:
    """Map float32 values to int64 with the same order (``-0.0`` and ``+0.0`` map to 0; NaN not allowed).

    For non-negative floats the IEEE-754 bit pattern read as an integer is monotone; negative floats are
    mapped to minus their magnitude bits. The result fits in 32 bits, so ``(key << 32) | gallery_index``
    is an exact int64 sort key for "distance, then gallery index".
    """
    b = d.view(np.int32).astype(np.int64)
    return np.where(b < 0, -(b & 0x7FFFFFFF), b)


def _keys(d_values: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Exact int64 ranking keys: float32 distance first, gallery index second."""
    return (_sortable(d_values) << 32) | cols


def _check_labels(q_pids, q_camids, g_pids, g_camids):
    arrs = []
    for name, a in (("q_pids", q_pids), ("q_camids", q_camids), ("g_pids", g_pids), ("g_camids", g_camids)):
        a = np.asarray(a)
        if a.ndim != 1:
            raise InputError(f"{name}: expected a 1-D array, got shape {a.shape}")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            if not np.issubdtype(a.dtype, np.floating) or not np.all(a == np.round(a)):
                raise InputError(f"{name}: expected integer labels, got dtype {a.dtype}")
        arrs.append(a.astype(np.int64))
    qp, qc, gp, gc = arrs
    if len(qp) != len(qc):
        raise InputError(f"q_pids has {len(qp)} entries but q_camids has {len(qc)}")
    if len(gp) != len(gc):
        raise InputError(f"g_pids has {len(gp)} entries but g_camids has {len(gc)}")
    if len(qp) == 0:
        raise InputError("no queries to evaluate")
    if len(gp) == 0:
        raise InputError("the gallery is empty")
    return qp, qc, gp, gc


def _iter_checked_chunks(dist_chunks, num_query: Optional[int], num_gallery: Optional[int]):
    """Validate a (q_start, dist) stream: contiguous, in order, (c, G), no NaN, covering all queries.

    ``num_query``/``num_gallery`` None: not known in advance (taken from the blocks).
    Yields ``(q_start, dist)`` with ``dist`` C-contiguous float32.
    """
    expected = 0
    for item in dist_chunks:
        try:
            start, dist = item
        except (TypeError, ValueError):
            raise InputError("distance chunks must be (q_start, dist) pairs") from None
        if hasattr(dist, "detach"):
            dist = dist.detach().cpu().numpy()
        dist = np.asarray(dist)
        if int(start) != expected:
            raise InputError(f"distance chunk starts at query {int(start)}, expected {expected} "
                             "(chunks must cover the queries in order)")
        if num_gallery is None and dist.ndim == 2:
            num_gallery = dist.shape[1]
        if dist.ndim != 2 or dist.shape[1] != num_gallery or dist.shape[0] < 1 or num_gallery < 1:
            raise InputError(f"distance chunk at query {expected} has shape {dist.shape}; "
                             f"expected (rows, {num_gallery})")
        if num_query is not None and expected + dist.shape[0] > num_query:
            raise InputError(f"distance chunks cover more than the {num_query} queries")
        if not np.issubdtype(dist.dtype, np.floating) and not np.issubdtype(dist.dtype, np.integer):
            raise InputError(f"distance chunk at query {expected} has dtype {dist.dtype}; expected float32")
        dist = np.ascontiguousarray(dist, dtype=np.float32)
        if np.isnan(dist).any():
            raise InputError(f"distance chunk at query {expected} contains NaN")
        yield expected, dist
        expected += dist.shape[0]
    if num_query is not None and expected != num_query:
        raise InputError(f"distance chunks cover {expected} queries, expected {num_query}")
    if expected == 0:
        raise InputError("no distance chunks given")


class _GalleryIndex:
    """Gallery indices grouped by pid (ascending gallery index inside each group)."""

    def __init__(self, pids: np.ndarray, cams: np.ndarray, subset: Optional[np.ndarray] = None):
        idx = np.arange(len(pids)) if subset is None else subset
        order = idx[np.argsort(pids[idx], kind="stable")]
        self.order = order
        self.cams = cams[order]
        self.pids, self.starts, self.counts = np.unique(pids[order], return_index=True, return_counts=True)

    def group_of(self, pid: int) -> int:
        """Index of ``pid``'s group, or −1 when the pid is absent."""
        i = int(np.searchsorted(self.pids, pid))
        return i if i < len(self.pids) and self.pids[i] == pid else -1

    def members(self, group: int) -> Tuple[np.ndarray, np.ndarray]:
        s, n = self.starts[group], self.counts[group]
        return self.order[s:s + n], self.cams[s:s + n]


def same_person(dist, threshold: float) -> np.ndarray:
    """The verification decision: ``dist <= threshold``, compared in float64 (so that a float32 distance and a
    threshold stored in JSON compare the same way everywhere). Returns a bool array of ``dist``'s shape."""
    return np.asarray(dist, dtype=np.float64) <= float(threshold)


def threshold_at_fmr(impostors_sorted: np.ndarray, num_impostors: int, fmr: float) -> Tuple[float, int]:
    """The largest "just below an impostor distance" threshold whose false-match rate is ``<= fmr``.

    Args:
        impostors_sorted: float (M,) the M smallest impostor distances, ascending; M must exceed
            ``floor(fmr · num_impostors)``.
        num_impostors: total number of impostor pairs (≥ 1).
        fmr: target false-match rate in (0, 1].

    Returns:
        ``(threshold, matches)``: the threshold (float64; midpoint between the last accepted impostor distance
        and the first rejected one, or one float32 ulp below the smallest impostor distance) and the number of
        impostor distances ``<= threshold`` (so the achieved FMR is ``matches / num_impostors``).

    Raises:
        InputError: fmr outside (0, 1], no impostors, or too few values given.
    """
    if not 0 < float(fmr) <= 1:
        raise InputError(f"target FMR must be in (0, 1], got {fmr}")
    if num_impostors < 1:
        raise InputError("no impostor pairs: cannot set a threshold at a false-match rate")
    imp = np.asarray(impostors_sorted, dtype=np.float64)
    k = int(np.floor(float(fmr) * num_impostors + 1e-9))
    if k >= num_impostors:
        return float(imp[-1]) if len(imp) else float("inf"), num_impostors
    if len(imp) <= k:
        raise InputError(f"threshold_at_fmr needs the {k + 1} smallest impostor distances, got {len(imp)}")
    first_rejected = imp[k]
    j = int(np.searchsorted(imp, first_rejected, side="left"))     # impostors strictly below it
    if j == 0:
        return float(np.nextafter(np.float32(first_rejected), np.float32(-np.inf))), 0
    return float((imp[j - 1] + first_rejected) / 2.0), j


class _Verification:
    """Streaming genuine/impostor statistics of the evaluation pairs (module docstring, "Verification")."""

    def __init__(self, num_impostors: int, fmrs: Sequence[float], threshold: Optional[float]):
        self.num_impostors = int(num_impostors)
        self.fmrs = tuple(float(f) for f in fmrs)
        self.keep = int(np.floor(max(self.fmrs, default=0.0) * self.num_impostors + 1e-9)) + 1
        self.threshold = threshold
        self.genuine: list = []
        self.smallest = np.zeros(0, np.float32)
        self.pending: list = []
        self.pending_n = 0
        self.imp_seen = 0
        self.imp_below = 0

    def add(self, genuine: np.ndarray, impostors: np.ndarray) -> None:
        self.genuine.append(np.asarray(genuine, np.float32))
        self.imp_seen += len(impostors)
        if self.threshold is not None:
            self.imp_below += int(np.count_nonzero(same_person(impostors, self.threshold)))
        if len(impostors) > self.keep:
            impostors = np.partition(impostors, self.keep - 1)[:self.keep]
        self.pending.append(np.asarray(impostors, np.float32))
        self.pending_n += len(impostors)
        if self.pending_n > 4 * self.keep + 65536:
            self._compact()

    def _compact(self) -> None:
        allv = np.concatenate([self.smallest] + self.pending)
        if len(allv) > self.keep:
            allv = np.partition(allv, self.keep - 1)[:self.keep]
        self.smallest, self.pending, self.pending_n = allv, [], 0

    def result(self) -> Dict[str, object]:
        self._compact()
        gen = np.concatenate(self.genuine) if self.genuine else np.zeros(0, np.float32)
        n_imp, n_gen = self.imp_seen, len(gen)
        out: Dict[str, object] = {"num_genuine": int(n_gen), "num_impostor": int(n_imp)}
        imp = np.sort(self.smallest)
        for f in self.fmrs:
            key = f"{f:g}"
            if n_imp == 0 or n_gen == 0:
                out[f"tpr@fmr={key}"] = float("nan")
                out[f"threshold@fmr={key}"] = float("nan")
                continue
            thr, _ = threshold_at_fmr(imp, n_imp, f)
            out[f"tpr@fmr={key}"] = float(np.count_nonzero(same_person(gen, thr))) / n_gen
            out[f"threshold@fmr={key}"] = thr
        if self.threshold is not None:
            out["threshold"] = float(self.threshold)
            out["fmr@threshold"] = self.imp_below / n_imp if n_imp else float("nan")
            out["tpr@threshold"] = (float(np.count_nonzero(same_person(gen, self.threshold))) / n_gen
                                    if n_gen else float("nan"))
        return out


def evaluate_distances(dist_chunks: Iterable[Tuple[int, np.ndarray]], q_pids, q_camids, g_pids, g_camids, *,
                       max_rank: int = 50, protocol: str = "market", sgs_repeats: int = 10,
                       seed: int = 0, q_self=None, verification: bool = False,
                       threshold: Optional[float] = None,
                       fmrs: Sequence[float] = VERIFICATION_FMRS) -> Dict[str, object]:
    """mAP, CMC and mINP from a stream of query-row distance blocks (see the module docstring).

    Args:
        dist_chunks: iterable of ``(q_start, dist)``, ``dist`` (c, G) float32 (other dtypes are cast to
            float32; ranking is on the float32 values), covering queries ``0 … Q−1`` in order (the contract of
            :func:`distance_chunks`). Smaller distance = more similar. Blocks are only read.
        q_pids, q_camids: int (Q,) query pid and camid.
        g_pids, g_camids: int (G,) gallery pid and camid (pid 0 = distractor, kept as a negative).
        max_rank: length of the returned ``cmc`` curve (≥ 1). rank1…rank20 do not depend on it.
        protocol: ``'market'``, ``'cuhk03'`` (single-gallery-shot CMC) or ``'no-camera'`` (only the query's
            own image is junk); see the module docstring.
        sgs_repeats: repetitions of the CUHK03 single-gallery-shot draw (open-reid: 10).
        seed: seed of the CUHK03 draws.
        q_self: int (Q,) gallery index of each query's own image, −1 when absent (see :func:`self_indices`);
            used by ``'no-camera'`` only (default: no query image in the gallery).
        verification: also compute the verification figures (module docstring): ``verification`` holds
            ``num_genuine``, ``num_impostor``, ``tpr@fmr=F`` and ``threshold@fmr=F`` for F in ``fmrs``.
        threshold: a distance threshold (same person when ``d <= threshold``); adds ``fmr@threshold`` and
            ``tpr@threshold`` to ``verification`` (implies ``verification``).
        fmrs: the false-match rates of the ``tpr@fmr`` figures.

    Returns:
        dict with ``mAP``, ``mINP``, ``rank1``, ``rank5``, ``rank10``, ``rank20`` (floats, fractions in
        [0, 1]), ``cmc`` (float64 (max_rank,)), ``num_query``, ``num_valid_query``, ``num_gallery`` (ints),
        ``protocol`` (str) and, with ``verification``/``threshold``, ``verification`` (dict).

    Algorithm: per query, the positives are sorted by the exact int64 key ``(float32 distance bits mapped to
    an order-preserving int) << 32 | gallery index``; only the negatives at distance ≤ the hardest positive
    are keyed, and ``np.searchsorted`` + ``np.bincount`` + ``cumsum`` give, for every positive, the number
    of valid negatives ranked before it. Cost per query O(G + m log P) for m such negatives and P positives;
    memory one block plus O(G).

    Raises:
        InputError: label arrays of the wrong shape/length, malformed or NaN distance blocks, unknown
            protocol, max_rank < 1, sgs_repeats < 1, or no query with a positive in the gallery.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if int(max_rank) < 1:
        raise InputError(f"max_rank must be >= 1, got {max_rank}")
    if int(sgs_repeats) < 1:
        raise InputError(f"sgs_repeats must be >= 1, got {sgs_repeats}")
    max_rank = int(max_rank)
    qp, qc, gp, gc = _check_labels(q_pids, q_camids, g_pids, g_camids)
    num_query, num_gallery = len(qp), len(gp)
    if num_gallery >= 2 ** 31:
        raise InputError(f"gallery of {num_gallery} entries is too large (limit 2**31 - 1)")

    gallery = _GalleryIndex(gp, gc)
    q_group = np.array([gallery.group_of(p) for p in np.unique(qp)], dtype=np.int64)
    q_group = q_group[np.searchsorted(np.unique(qp), qp)]

    no_cam = protocol == "no-camera"
    if q_self is None:
        q_self = np.full(num_query, -1, np.int64)
    q_self = np.asarray(q_self, dtype=np.int64)
    if q_self.shape != (num_query,) or (q_self >= num_gallery).any():
        raise InputError(f"q_self must be {num_query} gallery indices (or -1), got shape {q_self.shape}")
    verify = None
    if verification or threshold is not None:
        same = np.where(q_group >= 0, gallery.counts[np.maximum(q_group, 0)], 0)
        verify = _Verification(int(num_gallery * num_query - same.sum()), fmrs, threshold)

    cuhk = protocol == "cuhk03"
    if cuhk:
        rng = np.random.default_rng(seed)
        by_cam: Dict[int, _GalleryIndex] = {}
        sgs_hist = np.zeros(num_gallery + 1, dtype=np.float64)

    ap_sum = 0.0
    inp_sum = 0.0
    first_ranks = []
    num_valid = 0

    for start, dist in _iter_checked_chunks(dist_chunks, num_query, num_gallery):
        for r in range(dist.shape[0]):
            i = start + r
            grp = q_group[i]
            d = dist[r]
            if grp < 0:
                members = mcams = np.zeros(0, np.int64)
            else:
                members, mcams = gallery.members(grp)
            pos = members[members != q_self[i]] if no_cam else members[mcams != qc[i]]
            if verify is not None:
                imp_mask = np.ones(num_gallery, bool)
                imp_mask[members] = False
                verify.add(d[pos], d[imp_mask])
            npos = len(pos)
            if npos == 0:
                continue
            num_valid += 1
            pd = d[pos]
            pos_keys = _keys(pd, pos)
            pos_keys.sort()
            thr = pd.max()
            mask = d <= thr
            mask[members] = False                       # positives and junk are not negatives
            neg = np.flatnonzero(mask)
            if len(neg):
                bucket = np.searchsorted(pos_keys, _keys(d[neg], neg))
                neg_before = np.cumsum(np.bincount(bucket, minlength=npos + 1)[:npos])
                ranks = np.arange(npos) + neg_before
            else:
                ranks = np.arange(npos)
            ap_sum += float(np.mean(np.arange(1, npos + 1) / (ranks + 1.0)))
            inp_sum += npos / (float(ranks[-1]) + 1.0)
            first_ranks.append(int(ranks[0]))

            if cuhk:
                cam = int(qc[i])
                idx = by_cam.get(cam)
                if idx is None:
                    idx = by_cam[cam] = _GalleryIndex(gp, gc, np.flatnonzero(gc != cam))
                own = idx.group_of(int(qp[i]))           # exists: the query has a positive in another camera
                picks = rng.integers(0, idx.counts[None, :], size=(int(sgs_repeats), len(idx.counts)))
                cols = idx.order[idx.starts[None, :] + picks]
                keys = _keys(d[cols], cols)
                rank = np.count_nonzero(keys < keys[:, own:own + 1], axis=1)
                np.add.at(sgs_hist, rank, 1.0 / int(sgs_repeats))

    if num_valid == 0:
        what = "same pid, not the query's own image" if no_cam else "same pid, other camera"
        hint = ("" if no_cam or not (np.all(qc == -1) and np.all(gc == -1)) else
                " (all camids are -1: use protocol 'no-camera')")
        raise InputError(f"none of the {num_query} queries has a positive ({what}) "
                         f"in the gallery; are query and gallery from the same dataset?{hint}")

    if cuhk:
        hist = sgs_hist
    else:
        hist = np.bincount(np.asarray(first_ranks, dtype=np.int64), minlength=num_gallery + 1).astype(np.float64)
    cum = np.cumsum(hist) / num_valid

    def at(k: int) -> float:
        return float(cum[min(k, len(cum)) - 1])

    cmc = np.array([at(k) for k in range(1, max_rank + 1)], dtype=np.float64)
    return {
        "mAP": ap_sum / num_valid,
        "mINP": inp_sum / num_valid,
        "rank1": at(1),
        "rank5": at(5),
        "rank10": at(10),
        "rank20": at(20),
        "cmc": cmc,
        "num_query": int(num_query),
        "num_valid_query": int(num_valid),
        "num_gallery": int(num_gallery),
        "protocol": protocol,
        **({"verification": verify.result()} if verify is not None else {}),
    }


def evaluate_features(qf, gf, q_pids, q_camids, g_pids, g_camids, *, metric: str = "euclidean",
                      chunk_size: Optional[int] = None, protocol: str = "market", max_rank: int = 50,
                      sgs_repeats: int = 10, seed: int = 0, q_self=None, verification: bool = False,
                      threshold: Optional[float] = None) -> Dict[str, object]:
    """Evaluate query features against gallery features (open-reid ``evaluation_metrics/ranking.py``,
    TransReID ``utils/metrics.py`` ``R1_mAP_eval``).

    Args:
        qf: float32 (Q, D) query features; gf: float32 (G, D) gallery features. The caller L2-normalises them
            when the recipe says so (TransReID ``FEAT_NORM``, PPLR ``pplr/evaluators.py``); this function does not.
        q_pids, q_camids, g_pids, g_camids: int label arrays, (Q,) and (G,).
        metric: ``'euclidean'`` (squared, the peers' convention) or ``'cosine'``; see :func:`distance_chunks`.
        chunk_size: query rows per distance block (memory bound); default :func:`default_chunk_size`.
        protocol, max_rank, sgs_repeats, seed, q_self, verification, threshold: see
            :func:`evaluate_distances` (``protocol='auto'``: see :func:`choose_protocol`).

    Re-ranking: pass the blocks of ``partreid.common.retrieval.reranking.reranked_distance_chunks`` to
    :func:`evaluate_distances` (or to :func:`evaluate_rank` as ``distmat``); this module does not depend on it.

    Returns:
        The dict of :func:`evaluate_distances`.

    Raises:
        InputError: bad features or labels (see :func:`distance_chunks`, :func:`evaluate_distances`), or
            feature/label counts that differ.
    """
    q = _as_features(qf, "query features")
    g = _as_features(gf, "gallery features")
    qp, qc, gp, gc = _check_labels(q_pids, q_camids, g_pids, g_camids)
    if len(qp) != q.shape[0]:
        raise InputError(f"{q.shape[0]} query features but {len(qp)} query labels")
    if len(gp) != g.shape[0]:
        raise InputError(f"{g.shape[0]} gallery features but {len(gp)} gallery labels")
    return evaluate_distances(_checked_distance_iter(q, g, metric, chunk_size), qp, qc, gp, gc, max_rank=max_rank,
                              protocol=choose_protocol(protocol, qc, gc), sgs_repeats=sgs_repeats, seed=seed,
                              q_self=q_self, verification=verification, threshold=threshold)


def evaluate_rank(distmat=None, q_pids=None, g_pids=None, q_camids=None, g_camids=None, *, qf=None, gf=None,
                  metric: str = "euclidean", protocol: str = "market", max_rank: int = 50,
                  chunk_size: Optional[int] = None, q_self=None, verification: bool = False,
                  threshold: Optional[float] = None) -> Dict[str, object]:
    """mAP, CMC and mINP of a retrieval on arrays: a distance matrix, or query and gallery features.

    The labels come in torchreid's ``metrics.evaluate_rank`` order (query pids, gallery pids, query camids,
    gallery camids). The numbers are those of the open-reid / TransReID evaluators (open-reid
    ``evaluation_metrics/ranking.py`` ``mean_ap``/``cmc``, TransReID ``utils/metrics.py`` ``eval_func``), see the
    module docstring; ``evaluate --query --gallery`` and every ``finetune`` evaluation call this function.

    Args:
        distmat: float (Q, G) distances, smaller = closer, or an iterable of ``(q_start, (c, G) block)`` covering
            the queries in order (e.g. ``partreid.common.retrieval.reranking.reranked_distance_chunks`` for
            k-reciprocal re-ranking); or None and give ``qf`` and ``gf``.
        q_pids, g_pids: int (Q,) and (G,) person ids (gallery pid 0 = distractor, a negative).
        q_camids, g_camids: int (Q,) and (G,) camera ids.
        qf, gf: float32 (Q, D) and (G, D) features, used when ``distmat`` is None; compared with ``metric``
            (``'euclidean'``: squared Euclidean, ``'cosine'``) one block of queries at a time, so a Q×G matrix
            is never held. Normalise them first when the recipe says so (``extract-features`` does).
        protocol: ``'market'``, ``'cuhk03'`` (single-gallery-shot CMC), ``'no-camera'`` (only the query's own
            image, ``q_self``, is junk) or ``'auto'`` (:func:`choose_protocol`).
        max_rank: length of the CMC curve. chunk_size: query rows per distance block.
        q_self, verification, threshold: see :func:`evaluate_distances` (verification figures: TPR at FMR
            1e-2/1e-3 and, with ``threshold``, the FMR/TPR it gives, under the key ``verification``).

    Returns:
        dict: ``mAP``, ``rank1``, ``rank5``, ``rank10``, ``rank20``, ``mINP`` (floats, fractions in [0, 1]),
        ``cmc`` (list of ``max_rank`` floats: ``cmc[k]`` = fraction of valid queries with a positive within the
        top k+1), ``num_query``, ``num_valid_query`` (queries with a positive in another camera),
        ``num_gallery`` (ints), ``protocol`` (str), ``verification`` (dict, when asked). JSON-serialisable.

    Raises:
        InputError: neither or both of ``distmat`` and features, shapes or lengths that disagree, NaN values,
            or no query with a positive in the gallery.
    """
    if (distmat is None) == (qf is None or gf is None):
        raise InputError("give either distmat, or both qf and gf")
    if any(x is None for x in (q_pids, g_pids, q_camids, g_camids)):
        raise InputError("q_pids, g_pids, q_camids and g_camids are all required")
    if distmat is not None:
        if hasattr(distmat, "detach"):
            distmat = distmat.detach().cpu().numpy()
        if isinstance(distmat, np.ndarray) or isinstance(distmat, (list, tuple)) and distmat \
                and not isinstance(distmat[0], tuple):
            d = np.asarray(distmat)
            if d.ndim != 2:
                raise InputError(f"distmat must be 2-D (Q, G), got shape {d.shape}")
            distmat = [(0, d)]
        metrics = evaluate_distances(distmat, q_pids, q_camids, g_pids, g_camids, max_rank=max_rank,
                                     protocol=choose_protocol(protocol, q_camids, g_camids), q_self=q_self,
                                     verification=verification, threshold=threshold)
    else:
        metrics = evaluate_features(qf, gf, q_pids, q_camids, g_pids, g_camids, metric=metric,
                                    chunk_size=chunk_size, protocol=protocol, max_rank=max_rank, q_self=q_self,
                                    verification=verification, threshold=threshold)
    out: Dict[str, object] = {k: float(metrics[k]) for k in ("mAP", "rank1", "rank5", "rank10", "rank20", "mINP")}
    out["cmc"] = [float(v) for v in metrics["cmc"]]
    out.update({k: int(metrics[k]) for k in ("num_query", "num_valid_query", "num_gallery")})
    out["protocol"] = metrics["protocol"]
    if "verification" in metrics:
        out["verification"] = metrics["verification"]
    return out


def choose_protocol(protocol: str, q_camids, g_camids) -> str:
    """``'auto'`` → ``'no-camera'`` when every query and gallery camid is −1 (unknown), else ``'market'``;
    any other value is returned unchanged."""
    if protocol != "auto":
        return protocol
    unknown = bool(np.all(np.asarray(q_camids) == -1) and np.all(np.asarray(g_camids) == -1))
    return "no-camera" if unknown else "market"


def self_indices(q_keys: Sequence[str], g_keys: Sequence[str]) -> np.ndarray:
    """For each query, the index of the gallery entry that is the same image (same key, e.g. the absolute
    path), or −1. Returns int64 (Q,). When a key occurs several times in the gallery the first is used."""
    first: Dict[str, int] = {}
    for j, key in enumerate(g_keys):
        first.setdefault(str(key), j)
    return np.array([first.get(str(key), -1) for key in q_keys], dtype=np.int64)


def split_query(pids, k: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Query/gallery split of one labelled set: ``k`` queries per identity, drawn with a seeded RNG.

    An identity with ``n`` images gives ``min(k, n − 1)`` queries, so that at least one of its images stays in
    the gallery; identities with a single image (and pid −1) go to the gallery only (as distractors).

    Args:
        pids: int (N,) person ids.
        k: queries per identity (≥ 1).
        seed: seed of ``numpy.random.default_rng``; the draw depends only on the pids and the seed.

    Returns:
        ``(query_rows, gallery_rows)``: two ascending int64 index arrays that partition ``0 … N−1``.

    Raises:
        InputError: k < 1, or no identity has two images.
    """
    if int(k) < 1:
        raise InputError(f"--split-query needs K >= 1, got {k}")
    pids = np.asarray(pids, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = []
    for pid in np.unique(pids):
        rows = np.flatnonzero(pids == pid)
        if pid == -1 or len(rows) < 2:
            continue
        chosen.append(rng.choice(rows, size=min(int(k), len(rows) - 1), replace=False))
    if not chosen:
        raise InputError("cannot split queries: no identity has two or more images")
    q = np.sort(np.concatenate(chosen))
    g = np.setdiff1d(np.arange(len(pids)), q)
    return q, g


def topk_per_query(dist_chunks: Iterable[Tuple[int, np.ndarray]], k: int, *, q_pids=None, q_camids=None,
                   g_pids=None, g_camids=None) -> Tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest gallery entries of every query, in ranking order (for the ranked-list picture).

    Args:
        dist_chunks: ``(q_start, dist (c, G) float32)`` blocks covering all queries in order (as
            :func:`distance_chunks`); the number of queries is the sum of the block heights.
        k: entries per query (≥ 1).
        q_pids, q_camids, g_pids, g_camids: optional int labels. When all four are given, junk entries
            (same pid AND same camid as the query; Market protocol, open-reid ``evaluation_metrics/ranking.py``
            ``mean_ap``/``cmc``) are left out of the list.

    Returns:
        ``(idx, dist)``: int64 (Q, k) gallery indices and float32 (Q, k) distances, ordered by the stable
        ranking (distance, then gallery index). When fewer than ``k`` entries remain (junk removal), a row is
        padded with index −1 and distance +inf.

    Raises:
        InputError: k < 1, malformed blocks, or labels of the wrong lengths.
    """
    if int(k) < 1:
        raise InputError(f"k must be >= 1, got {k}")
    k = int(k)
    labels = [q_pids, q_camids, g_pids, g_camids]
    use_junk = all(x is not None for x in labels)
    if any(x is not None for x in labels) and not use_junk:
        raise InputError("give all four of q_pids, q_camids, g_pids, g_camids, or none")
    if use_junk:
        qp, qc, gp, gc = _check_labels(*labels)
        num_query = len(qp)
    else:
        num_query = gp = None
    idx_rows, dist_rows = [], []
    for start, dist in _iter_checked_chunks(dist_chunks, num_query, None if gp is None else len(gp)):
        for r in range(dist.shape[0]):
            d = dist[r]
            if use_junk:
                i = start + r
                cand = np.flatnonzero((gp != qp[i]) | (gc != qc[i]))
                dc = d[cand]
            else:
                cand = None
                dc = d
            n = len(dc)
            kk = min(k, n)
            out_i = np.full(k, -1, dtype=np.int64)
            out_d = np.full(k, np.inf, dtype=np.float32)
            if kk:
                if kk < n:
                    kth = np.partition(dc, kk - 1)[kk - 1]
                    sel = np.flatnonzero(dc <= kth)            # every entry tied with the k-th one too
                else:
                    sel = np.arange(n)
                cols = sel if cand is None else cand[sel]
                order = np.argsort(_keys(dc[sel], cols))[:kk]
                out_i[:kk] = cols[order]
                out_d[:kk] = dc[sel][order]
            idx_rows.append(out_i)
            dist_rows.append(out_d)
    return np.stack(idx_rows), np.stack(dist_rows)


def tied_distance_fraction(qf, gf, metric: str = "euclidean", max_queries: int = 64) -> float:
    """Fraction of gallery distances that equal another gallery distance of the same query, exactly.

    Computed on up to ``max_queries`` queries spread over the query list, with the distances
    :func:`distance_chunks` gives (float32). Exact ties (e.g. identical gallery features) make the ranking,
    and so mAP/CMC, depend on the gallery's row order: the ranking breaks ties by gallery index (stable sort).

    Args:
        qf: float32 (Q, D); gf: float32 (G, D); metric: as in :func:`distance_chunks`.

    Returns:
        A fraction in [0, 1] (0 when Q or G is 0).
    """
    q = _as_features(qf, "query features")
    g = _as_features(gf, "gallery features")
    if len(q) == 0 or len(g) < 2:
        return 0.0
    rows = np.unique(np.round(np.linspace(0, len(q) - 1, min(max_queries, len(q)))).astype(np.int64))
    tied = 0
    for _, dist in distance_chunks(q[rows], g, metric=metric):
        for row in dist:
            _, counts = np.unique(row, return_counts=True)
            tied += int(counts[counts > 1].sum())
    return tied / float(len(rows) * len(g))
