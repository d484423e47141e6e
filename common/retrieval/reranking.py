"""k-reciprocal re-ranking for retrieval evaluation (Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017, Eqs. 4-12).

Upstream: TransReID ``utils/reranking.py`` ``re_ranking`` (inherited by PASS), evaluated with k1 = 20, k2 = 6,
λ = 0.3. It concatenates query and gallery, builds the full (Q+G)×(Q+G) distance matrix, and then dense V,
V_qe and Jaccard matrices of the same size in Python loops. This module computes the same final query×gallery
distances from the sparse k-reciprocal machinery of :mod:`partreid.common.retrieval.kreciprocal`, streaming
the Q×G result in query chunks; no (Q+G)×(Q+G) buffer is ever allocated. The min-sums are the same compiled
kernel as clustering's (:func:`partreid.common.retrieval.kreciprocal.min_sum_row`).

Steps, with all = [query; gallery] (N = Q + G rows):

1. d(i, j) = ‖x_i‖² + ‖x_j‖² − 2·x_i·x_j (squared Euclidean), and d̂(i, j) = d(i, j) / max_j' d(i, j'): each
   row divided by its maximum over query + gallery (upstream divides column-wise and transposes, which is
   the same on a symmetric matrix);
2. the rank table is the ascending order of each row (self first): the **textbook** convention, k1 + 1
   forward entries including self, round(k1/2) + 1 for the half sets
   (:func:`partreid.common.retrieval.kreciprocal.neighbour_counts`);
3. expanded k-reciprocal sets E(i) (Eqs. 4-5); V[i, j] = exp(−d̂(i, j)) / Σ_{j'∈E(i)} exp(−d̂(i, j')) (Eq. 8,
   normalised per row as upstream does);
4. V_qe[i] = mean of V over the rows of the k2 nearest neighbours of i, self included (Eq. 11);
5. for query i and gallery j: m = Σ_k min(V_qe[i,k], V_qe[j,k]) over all N columns, jaccard = 1 − m/(2 − m)
   (Eq. 10), final = (1 − λ)·jaccard + λ·d̂(i, j) (Eq. 12). Not clipped, as upstream.

Differences from upstream, on purpose: V and the Jaccard distance are float32 (upstream stores V, V_qe and
the Jaccard matrix in float16), so values differ from it by float16 rounding (~1e-3) and agree with a float32
dense implementation to ~1e-6. The neighbour search is faiss's exact L2 search; ties between exactly equal
distances are ordered deterministically (:mod:`partreid.common.retrieval.search`) where upstream's
``np.argsort`` leaves them unspecified.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

from partreid.common.errors import InputError
from partreid.common.retrieval.kreciprocal import (InvertedIndex, check_knn, encode, expanded_sets,
                                                   local_query_expansion, min_sum_block, neighbour_counts,
                                                   pattern_dots, row_ids)
from partreid.common.retrieval.search import knn_search

#: default cap on the float32 entries of one streamed (chunk, G) block
_BLOCK_ENTRIES = 4_000_000


def _row_max_sqdist(x: np.ndarray, sq: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """max_j ‖x_i − x_j‖² for every row, float32 (N,), with one exact faiss inner-product index.

    max_j (‖x_j‖² − 2·x_i·x_j) is the best inner product of the query [−2·x_i, 1] with the database row
    [x_j, ‖x_j‖²]; database and queries are built in chunks, so the extra memory is one (N, D+1) index.
    """
    import faiss

    n, d = x.shape
    index = faiss.IndexFlatIP(d + 1)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        index.add(np.concatenate([x[s:e], sq[s:e, None]], axis=1))
    best = np.empty(n, np.float32)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        q = np.concatenate([np.float32(-2) * x[s:e], np.ones((e - s, 1), np.float32)], axis=1)
        best[s:e] = index.search(q, 1)[0][:, 0]
    return np.maximum(sq + best, np.float32(0)).astype(np.float32)


def reranked_distance_chunks(qf, gf, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                             chunk_size: Optional[int] = None, *, device: str = "auto",
                             ) -> Iterator[Tuple[int, np.ndarray]]:
    """Stream the k-reciprocal re-ranked query×gallery distance in query chunks (Zhong et al. 2017 Eq. 12;
    TransReID ``utils/reranking.py`` ``re_ranking``).

    Args:
        qf: float32 (Q, D) query features; gf: float32 (G, D) gallery features (usually L2-normalised; the
            distance is squared Euclidean either way, as in the original).
        k1: k-reciprocal neighbourhood (20), textbook convention (k1 + 1 forward entries incl. self).
        k2: query-expansion neighbourhood (6), self included.
        lambda_value: weight λ of the original distance (0.3).
        chunk_size: queries per yielded block; default keeps each block at about 4 M float32 entries.
        device: device of the faiss neighbour search (``'auto'``, ``'cpu'``, ``'cuda'``); the pass that finds
            each row's largest distance runs on the CPU.

    Memory: the (Q+G, D) features, one faiss index of them, and sparse arrays of (Q+G)·k entries; the output
    is produced chunk by chunk. Validation happens when the first block is requested (this is a generator).

    Yields:
        ``(q_start, dist)``: dist float32 (c, G), the final distances of queries q_start .. q_start + c − 1
        (smaller is closer). Blocks come in order and cover all Q queries.

    Raises:
        InputError: shape mismatch, NaN/inf, fewer than k1 + 1 samples in query + gallery, bad k1/k2/λ.
    """
    qf = np.ascontiguousarray(qf.detach().cpu().numpy() if hasattr(qf, "detach") else qf, np.float32)
    gf = np.ascontiguousarray(gf.detach().cpu().numpy() if hasattr(gf, "detach") else gf, np.float32)
    if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
        raise InputError(f"query features {qf.shape} and gallery features {gf.shape} must be (Q, D) and (G, D)")
    if not (np.isfinite(qf).all() and np.isfinite(gf).all()):
        raise InputError("query or gallery features contain NaN or infinite values")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise InputError(f"lambda_value must be in [0, 1], got {lambda_value}")
    n_forward, n_half = neighbour_counts(k1, "textbook")
    k2 = int(k2)
    if k2 < 1:
        raise InputError(f"k2 must be >= 1, got {k2}")
    nq, ng = qf.shape[0], gf.shape[0]
    n = nq + ng
    width = max(n_forward, k2)
    if n < width:
        raise InputError(f"re-ranking with k1={k1}, k2={k2} needs at least {width} query + gallery samples, "
                         f"got {n}")
    if nq == 0 or ng == 0:
        return
    x = np.concatenate([qf, gf], axis=0)
    sq = np.einsum("ij,ij->i", x, x).astype(np.float32)
    search = {"device": device}

    # step 1-2: rank table (squared L2, ascending, self first) and the per-row normaliser
    _, knn = knn_search(x, width, metric="l2", method="exact", **search)
    knn = check_knn(knn, n, width)
    row_max = _row_max_sqdist(x, sq)
    row_max[row_max <= 0] = 1.0  # all points identical: d is 0 everywhere, any positive normaliser works

    # step 3: expanded sets and weights exp(-d̂) normalised per row
    e = expanded_sets(knn, n_forward, n_half)
    rows = row_ids(e.indptr)
    d_pairs = np.maximum(sq[rows] + sq[e.indices] - np.float32(2) * pattern_dots(x, e), np.float32(0))
    v = encode(e, -(d_pairs / row_max[rows]).astype(np.float32))
    del rows, d_pairs, e
    # step 4
    vqe = local_query_expansion(v, knn, k2)
    del v, knn
    # step 5, streamed over query chunks
    inv = InvertedIndex(vqe)
    start = inv.first_slots(nq)
    if chunk_size is None:
        chunk_size = max(1, _BLOCK_ENTRIES // max(ng, 1))
    chunk_size = max(1, int(chunk_size))
    lam = np.float32(lambda_value)
    gsq = sq[nq:]
    for q0 in range(0, nq, chunk_size):
        q1 = min(q0 + chunk_size, nq)
        m = min_sum_block(inv, q0, q1, nq, start)
        jac = np.float32(1) - m / (np.float32(2) - m)
        d = sq[q0:q1, None] + gsq[None, :] - np.float32(2) * (qf[q0:q1] @ gf.T)
        np.maximum(d, np.float32(0), out=d)
        d /= row_max[q0:q1, None]
        out = (np.float32(1) - lam) * jac + lam * d
        yield q0, out.astype(np.float32, copy=False)


def reranked_distance(qf, gf, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                      chunk_size: Optional[int] = None) -> np.ndarray:
    """Whole re-ranked distance matrix, float32 (Q, G); convenience wrapper of
    :func:`reranked_distance_chunks` for small sets (it allocates the Q×G result)."""
    qf = np.asarray(qf, np.float32)
    gf = np.asarray(gf, np.float32)
    out = np.empty((qf.shape[0], gf.shape[0]), np.float32)
    for q0, block in reranked_distance_chunks(qf, gf, k1, k2, lambda_value, chunk_size):
        out[q0:q0 + block.shape[0]] = block
    return out
