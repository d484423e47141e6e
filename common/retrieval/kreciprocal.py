"""Sparse k-reciprocal encoding, local query expansion and Jaccard distance.

Source: Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017 (Eqs. 4, 5,
8, 10 and 11), in the form used to cluster unlabelled images by cluster-contrast
(``clustercontrast/utils/faiss_rerank.py`` ``compute_jaccard_distance``; the same function is in PPLR,
``pplr/utils/faiss_rerank.py``): PPLR (Cho et al., CVPR 2022) and cluster-contrast (Dai et al., ACCV 2022)
feed that distance to DBSCAN for their pseudo-labels. The upstream function builds three dense N×N float32
matrices in Python loops over samples (0.67 GB each at Market-1501 size, 4.3 GB at MSMT17 size); here every
array grows with N·k, the set operations are sparse matrix products (scipy) and the two loops over pairs are
compiled (numba, parallel over rows).

Algorithm, for L2-normalised features x_i (N×D) and a kNN table ``knn`` (N×K, each row best first, self
normally in column 0):

1. forward lists F(i) = knn[i, :n_forward] and half lists F½(i) = knn[i, :n_half];
2. k-reciprocal sets (Eq. 4) R(i) = {j ∈ F(i) : i ∈ F(j)} and R½(i) = {j ∈ F½(i) : i ∈ F½(j)};
3. expansion (Eq. 5): E(i) = R(i) ∪ ⋃ {R½(c) : c ∈ R(i), |R½(c) ∩ R(i)| > 2/3·|R½(c)|} (duplicates removed;
   the test is done in integers as 3·|∩| > 2·|R½(c)|, the same decision as the float one for sets this small);
4. encoding (Eq. 8, as a softmax like upstream): V[i, j] = softmax_{j ∈ E(i)}(−(2 − 2·x_i·x_j)), rows summing
   to 1, zero outside E(i);
5. local query expansion (Eq. 11): V_qe[i] = mean of V over the rows knn[i, :k2] (skipped when k2 = 1);
6. Jaccard distance (Eq. 10): m_ij = Σ_k min(V_qe[i, k], V_qe[j, k]); since every row sums to 1,
   Σ_k max(·) = 2 − m_ij and d_ij = 1 − m_ij / (2 − m_ij), negatives clipped to 0. Pairs without shared
   support have d = 1.

Step 6 is :func:`min_sum_row`, the one compiled min-sum kernel: the loop of upstream's ``temp_min`` over an
inverted index (column k → the rows with V_qe[·, k] ≠ 0), row i's columns taken in ascending order as upstream
does. Clustering (:func:`jaccard_radius_graph`) runs it over the pairs j > i and keeps d_ij <= max_distance;
re-ranking (:mod:`partreid.common.retrieval.reranking`) runs it for query rows against gallery rows
(:func:`min_sum_block`).

Neighbour-count conventions (``convention``)
-------------------------------------------
``'reference'`` (default; the behaviour behind the published numbers): upstream slices ``[:k1+1]`` but its
rank table has only k1 columns, so F(i) really holds **k1 entries including self**. R½ is computed by the same
helper with k = round(k1/2), whose ``[:k+1]`` slice does fit in the table, so F½(i) holds
**round(k1/2) + 1 entries** (16 for k1 = 30). The rounding is numpy's (half to even: k1 = 25 → 12 + 1).

``'textbook'`` (Zhong et al. 2017, whose rank table is a full argsort): F(i) holds **k1 + 1 entries**
including self; F½(i) the same round(k1/2) + 1 entries.

Precision: V and V_qe are float32 like upstream's (which offers float16 as an option no caller sets); the
min-sums are accumulated in float32 in upstream's order, so distances agree with a dense float32
implementation to about 1e-6.

Compiled code and its cache
---------------------------
The numba functions are compiled on their first call (a few seconds) and cached on disk; where the cache lives
is decided in :mod:`partreid.common.compiled`. The threads are numba's (``NUMBA_NUM_THREADS``, default: all
CPUs); the result does not depend on their number.
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import numpy as np
import scipy.sparse as sp

from partreid.common.compiled import numba
from partreid.common.errors import InputError
from partreid.common.retrieval.search import knn_search

CONVENTIONS = ("reference", "textbook")


# ---------------------------------------------------------------------------------------------------------
# neighbour counts and input checks


def neighbour_counts(k1: int, convention: str = "reference") -> Tuple[int, int]:
    """Forward-list lengths ``(n_forward, n_half)`` used for R and R½ (module doc, steps 1-2).

    ``'reference'``: (k1, round(k1/2) + 1), as upstream ``compute_jaccard_distance`` behaves;
    ``'textbook'``: (k1 + 1, round(k1/2) + 1), Zhong et al. 2017 Eq. 4; self included.

    Raises:
        InputError: k1 < 1 or unknown convention.
    """
    if convention not in CONVENTIONS:
        raise InputError(f"unknown k-reciprocal convention {convention!r}; choose one of "
                         f"{', '.join(CONVENTIONS)}")
    k1 = int(k1)
    if k1 < 1:
        raise InputError(f"k1 must be >= 1, got {k1}")
    n_forward = k1 if convention == "reference" else k1 + 1
    n_half = min(int(np.round(k1 / 2.0)) + 1, n_forward)
    return n_forward, n_half


def knn_columns_needed(k1: int, k2: int, convention: str = "reference") -> int:
    """Columns of the kNN table (self included) that :func:`kreciprocal_jaccard` needs: max(n_forward, k2)."""
    n_forward, _ = neighbour_counts(k1, convention)
    return max(n_forward, int(k2))


def check_knn(knn, n: Optional[int], width: int) -> np.ndarray:
    """Validate a kNN table and return its first ``width`` columns as C-contiguous int64 (N, width).

    Raises:
        InputError: not 2-D integer, wrong number of rows, fewer than ``width`` columns, an index outside
            [0, N), or an index repeated within a row.
    """
    knn = np.asarray(knn)
    if knn.ndim != 2:
        raise InputError(f"the kNN table must be 2-D (N, k), got shape {knn.shape}")
    if not np.issubdtype(knn.dtype, np.integer):
        raise InputError(f"the kNN table must hold integer indices, got dtype {knn.dtype}")
    if n is not None and knn.shape[0] != n:
        raise InputError(f"the kNN table has {knn.shape[0]} rows but there are {n} samples")
    if knn.shape[1] < width:
        raise InputError(f"the kNN table has {knn.shape[1]} columns but {width} are needed")
    knn = np.ascontiguousarray(knn[:, :width], dtype=np.int64)
    if knn.size and (knn.min() < 0 or knn.max() >= knn.shape[0]):
        raise InputError("the kNN table holds indices outside [0, N)")
    if width > 1:
        srt = np.sort(knn, axis=1)
        if (srt[:, 1:] == srt[:, :-1]).any():
            raise InputError("the kNN table repeats an index within a row")
    return knn


def _pattern_csr(knn: np.ndarray, n_cols: int, column_values: Optional[np.ndarray] = None) -> sp.csr_matrix:
    """float32 CSR matrix (N, N) with entries at (i, knn[i, :n_cols]): ones, or ``column_values[c]`` for the
    entry from kNN column c (float32 (n_cols,)); sorted indices."""
    n = knn.shape[0]
    cols = np.ascontiguousarray(knn[:, :n_cols]).ravel()
    indptr = np.arange(0, n * n_cols + 1, n_cols, dtype=np.int64)
    data = (np.ones(cols.size, np.float32) if column_values is None
            else np.tile(np.asarray(column_values, np.float32), n))
    a = sp.csr_matrix((data, cols, indptr), shape=(n, n))
    a.sort_indices()
    return a


def row_ids(indptr: np.ndarray) -> np.ndarray:
    """Row index of every stored entry of a CSR matrix: int64 (nnz,)."""
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))


# ---------------------------------------------------------------------------------------------------------
# steps 2-5: reciprocal sets, expansion, encoding, query expansion (sparse matrix algebra)


def reciprocal_neighbours(knn: np.ndarray, n_forward: int) -> sp.csr_matrix:
    """k-reciprocal sets R(i) = {j ∈ knn[i,:n] : i ∈ knn[j,:n]} (Zhong et al. Eq. 4) as a symmetric 0/1 CSR.

    Args:
        knn: int64 (N, K) kNN table, K >= n_forward, each row best first.
        n_forward: forward-list length n (self included).

    Returns:
        float32 csr_matrix (N, N), ones at (i, j) for j ∈ R(i), sorted indices.
    """
    return reciprocal_pair(knn, n_forward, n_forward)[0]


def reciprocal_pair(knn: np.ndarray, n_forward: int, n_half: int) -> Tuple[sp.csr_matrix, sp.csr_matrix]:
    """``(R, R½)``: :func:`reciprocal_neighbours` for both list lengths (n_half <= n_forward) from one
    sparse product. Each kNN entry carries 1 in the first n_half columns and 4 after, so the product of the
    two directions of a mutual pair is 1 exactly when both ranks fall in the half lists."""
    a = _pattern_csr(knn, n_forward, np.where(np.arange(n_forward) < n_half, 1.0, 4.0))
    prod = a.multiply(a.T).tocsr()
    prod.sort_indices()
    rh = prod.copy()
    rh.data = (prod.data == 1).astype(np.float32)
    rh.eliminate_zeros()  # keeps the order: sorted indices
    prod.data = np.ones(prod.nnz, np.float32)
    return prod, rh


def expanded_sets(knn: np.ndarray, n_forward: int, n_half: int) -> sp.csr_matrix:
    """Expanded k-reciprocal sets E(i) (Zhong et al. Eq. 5) as a 0/1 CSR pattern.

    E(i) = R(i) ∪ R½(c) for every c ∈ R(i) with |R½(c) ∩ R(i)| > 2/3·|R½(c)|, as upstream
    ``compute_jaccard_distance`` tests it. Computed without loops: since R½ is symmetric,
    |R½(c) ∩ R(i)| = (R·R½)[i, c]. The test is done in integers, 3·|∩| > 2·|R½(c)|, the same decision as
    upstream's float comparison for sets this small.

    Args:
        knn: int64 (N, K) kNN table, K >= n_forward >= n_half.
        n_forward, n_half: list lengths from :func:`neighbour_counts`.

    Returns:
        float32 csr_matrix (N, N) with ones on E, sorted column indices.
    """
    r, rh = reciprocal_pair(knn, n_forward, n_half)
    counts = (r @ rh).multiply(r).tocsr()  # |R½(c) ∩ R(i)| at (i, c) for c ∈ R(i)
    counts.sort_indices()
    accept = 3 * counts.data.astype(np.int64) > 2 * np.diff(rh.indptr)[counts.indices]
    acc_rows = row_ids(counts.indptr)[accept]
    acc = sp.csr_matrix((np.ones(acc_rows.size, np.float32), (acc_rows, counts.indices[accept])),
                        shape=r.shape)
    e = (r + acc @ rh).tocsr()
    e.sort_indices()
    e.data[:] = 1.0
    return e


def encode(pattern: sp.csr_matrix, logits: np.ndarray) -> sp.csr_matrix:
    """k-reciprocal feature V (Zhong et al. Eq. 8): row-wise softmax of ``logits`` over each row's entries.

    Args:
        pattern: csr (N, N) whose stored entries are the expanded sets E(i) (sorted indices).
        logits: float32 (nnz,) one logit per stored entry, in storage order.

    Returns:
        float32 csr (N, N) with the pattern's indices, each non-empty row summing to 1.
    """
    logits = np.asarray(logits, np.float32)
    counts = np.diff(pattern.indptr)
    starts = pattern.indptr[:-1][counts > 0]
    mx = np.zeros(len(counts), np.float32)
    mx[counts > 0] = np.maximum.reduceat(logits, starts)
    w = np.exp(logits - np.repeat(mx, counts))
    s = np.ones(len(counts), np.float32)
    s[counts > 0] = np.add.reduceat(w, starts)
    w /= np.repeat(s, counts)
    v = sp.csr_matrix((w.astype(np.float32), pattern.indices.copy(), pattern.indptr.copy()),
                      shape=pattern.shape)
    v.has_sorted_indices = pattern.has_sorted_indices
    return v


def local_query_expansion(v: sp.csr_matrix, knn: np.ndarray, k2: int) -> sp.csr_matrix:
    """V_qe[i] = mean of V over rows knn[i, :k2] (Zhong et al. Eq. 11); V itself when k2 == 1.

    Args:
        v: float32 csr (N, N) encoding; knn: int64 (N, K >= k2).

    Returns:
        float32 csr (N, N) with sorted column indices.
    """
    if k2 == 1:
        return v
    q = _pattern_csr(knn, k2)
    vqe = (q @ v).tocsr()  # sum of the k2 rows in float32, then divided: numpy's mean of float32 rows
    vqe.data = vqe.data.astype(np.float32, copy=False) / np.float32(k2)
    vqe.sort_indices()
    return vqe


# ---------------------------------------------------------------------------------------------------------
# compiled loops: the weights' inner products, and the one Jaccard min-sum kernel


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _table_or_dot(x, knn, table, i, j):
    """x_i·x_j from the kNN table (row i, else row j), else computed (the sum in any order: vectorised)."""
    for c in range(knn.shape[1]):
        if knn[i, c] == j:
            return table[i, c]
    for c in range(knn.shape[1]):
        if knn[j, c] == i:
            return table[j, c]
    dot = np.float32(0)
    for t in range(x.shape[1]):
        dot += x[i, t] * x[j, t]
    return dot


@numba.njit(parallel=True, cache=True)
def _pattern_dots_kernel(x, indptr, indices, knn, table, out):
    for i in numba.prange(indptr.size - 1):
        for e in range(indptr[i], indptr[i + 1]):
            out[e] = _table_or_dot(x, knn, table, i, indices[e])


def pattern_dots(x: np.ndarray, pattern: sp.csr_matrix, knn: Optional[np.ndarray] = None,
                 similarities: Optional[np.ndarray] = None) -> np.ndarray:
    """Inner products x_i·x_j for every stored entry (i, j) of a CSR pattern, in storage order.

    Upstream computes them as one matmul per row (``compute_jaccard_distance``); here the value is read from
    the kNN table when it holds the pair as (i, j) or (j, i), and computed otherwise (compiled, parallel over
    rows; float32, summed in any order, so ~1e-7 from a BLAS product).

    Args:
        x: float32 (N, D) features; pattern: csr (N, N).
        knn: optional int64 (N, K) kNN table; similarities: float32 (N, K) its inner products.

    Returns:
        float32 (nnz,).
    """
    n = x.shape[0]
    if knn is None or similarities is None:
        knn, similarities = np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    out = np.empty(pattern.nnz, np.float32)
    _pattern_dots_kernel(np.ascontiguousarray(x, np.float32), pattern.indptr.astype(np.int64),
                         pattern.indices.astype(np.int64), np.ascontiguousarray(knn, np.int64),
                         np.ascontiguousarray(similarities, np.float32), out)
    return out


class InvertedIndex:
    """Inverted index of a sparse matrix V (N, M) with non-negative values: for each column k, the rows r
    with V[r, k] ≠ 0 in ascending order and their values (upstream's ``invIndex``, built by scipy in O(nnz)).

    Attributes:
        indptr int64 (N+1,), indices int32 (nnz,), data float32 (nnz,): V itself.
        colptr int64 (M+1,), rows int32 (nnz,), values float32 (nnz,): V by columns (CSC).
        slot int64 (nnz,): position of each CSR entry in the CSC arrays.
    """

    def __init__(self, v: sp.csr_matrix):
        v = sp.csr_matrix(v, dtype=np.float32, copy=True)
        v.eliminate_zeros()  # upstream indexes V != 0; the kernel needs every stored value > 0
        v.sort_indices()
        ids = sp.csr_matrix((np.arange(v.nnz, dtype=np.int64), v.indices, v.indptr), shape=v.shape).tocsc()
        self.shape = v.shape
        self.indptr = v.indptr.astype(np.int64)
        self.indices = v.indices.astype(np.int32)
        self.data = v.data.astype(np.float32)
        self.colptr = ids.indptr.astype(np.int64)
        self.rows = ids.indices.astype(np.int32)  # ascending within each column (counting sort)
        self.values = self.data[ids.data]
        self.slot = np.empty(v.nnz, np.int64)
        self.slot[ids.data] = np.arange(v.nnz, dtype=np.int64)

    def first_slots(self, row0: int) -> np.ndarray:
        """For every CSR entry (i, k), the first CSC slot of column k whose row is >= row0: int64 (nnz,)."""
        before = np.bincount(self.indices[: self.indptr[row0]], minlength=self.shape[1])
        return (self.colptr[:-1] + before)[self.indices]


@numba.njit(cache=True, nogil=True)
def min_sum_row(i, indptr, indices, data, start, colptr, rows, values, j0, acc, touched):
    """The Jaccard min-sum kernel: acc[j − j0] += Σ_k min(V[i, k], V[j, k]) for the rows j that share a column
    k with row i (Zhong et al. Eq. 10's numerator; the ``temp_min`` loop of upstream
    ``compute_jaccard_distance``), over row i's columns in ascending order.

    For column k of row i's CSR entry e, only the CSC slots start[e] .. colptr[k+1] − 1 are visited (rows
    ascending), so ``start`` picks the targets (e.g. j > i, or gallery rows only). Every V value is > 0, so
    a target is new when its sum is still 0: its offset j − j0 is then appended to ``touched``.

    Args:
        i: row; indptr, indices, data, colptr, rows, values: :class:`InvertedIndex` arrays; start: int64
            (nnz,) first slot per CSR entry; j0: offset of acc; acc: float32 accumulator (zero where not
            touched); touched: int64 scratch, one longer than acc.

    Returns:
        the number of new targets written to ``touched``.
    """
    n_new = 0
    for e in range(indptr[i], indptr[i + 1]):
        v = data[e]
        for s in range(start[e], colptr[indices[e] + 1]):
            j = rows[s] - j0
            a = acc[j]
            touched[n_new] = j  # kept only when j is new (no branch: the loop stays fast)
            n_new += a == 0
            acc[j] = a + min(v, values[s])
    return n_new


@numba.njit(parallel=True, cache=True)
def _radius_pairs_kernel(indptr, indices, data, start, colptr, rows, values, max_distance, n_blocks, offsets,
                         out_j, out_d):
    """Pairs j > i with d_ij <= max_distance per row: counts int64 (N,); (j, d) written at ``offsets[i]``
    when ``offsets`` is not empty (run once to count, once to write)."""
    n = indptr.size - 1
    counts = np.zeros(n, np.int64)
    for b in numba.prange(n_blocks):  # rows b, b + n_blocks, ...: blocks of equal work although j > i
        acc = np.zeros(n, np.float32)
        touched = np.empty(n + 1, np.int64)
        for i in range(b, n, n_blocks):
            n_new = min_sum_row(i, indptr, indices, data, start, colptr, rows, values, 0, acc, touched)
            kept = 0
            for t in range(n_new):
                j = touched[t]
                m = acc[j]
                acc[j] = 0
                d = max(np.float32(1) - m / (np.float32(2) - m), np.float32(0))
                if d <= max_distance:
                    if offsets.size:
                        out_j[offsets[i] + kept] = j
                        out_d[offsets[i] + kept] = d
                    kept += 1
            counts[i] = kept
    return counts


@numba.njit(parallel=True, cache=True)
def _min_sum_block_kernel(r0, indptr, indices, data, start, colptr, rows, values, j0, out):
    for r in numba.prange(out.shape[0]):
        touched = np.empty(out.shape[1] + 1, np.int64)
        min_sum_row(r0 + r, indptr, indices, data, start, colptr, rows, values, j0, out[r], touched)


def min_sum_block(inv: InvertedIndex, r0: int, r1: int, j0: int,
                  start: Optional[np.ndarray] = None) -> np.ndarray:
    """Dense block of Jaccard min-sums m[i, j] = Σ_k min(V[i,k], V[j,k]) (Zhong et al. Eq. 10's numerator)
    for rows i in [r0, r1) and target rows j in [j0, N), by :func:`min_sum_row`.

    Args:
        inv: inverted index of V (N, N).
        r0, r1: row range; j0: first target row.
        start: optional cached ``inv.first_slots(j0)``.

    Returns:
        float32 (r1 − r0, N − j0); 0 where rows share no column.
    """
    if start is None:
        start = inv.first_slots(j0)
    out = np.zeros((r1 - r0, inv.shape[0] - j0), np.float32)
    _min_sum_block_kernel(r0, inv.indptr, inv.indices, inv.data, start, inv.colptr, inv.rows, inv.values, j0,
                          out)
    return out


def jaccard_radius_graph(vqe: sp.csr_matrix, max_distance: float) -> sp.csr_matrix:
    """Sparse Jaccard radius graph (Zhong et al. Eq. 10): every pair (i, j) with d_ij <= max_distance.

    Each unordered pair is computed once (j > i, :func:`min_sum_row` over the inverted index) and mirrored,
    so the graph is exactly symmetric; the diagonal is stored as an explicit 0 (its exact value: every
    non-empty row of V_qe sums to 1; upstream's float32 sum leaves ~1e-7 there), 1 for an empty row.

    Args:
        vqe: float32 csr (N, N), the query-expanded encoding V_qe.
        max_distance: keep pairs with d <= max_distance; >= 1 keeps every pair with shared support.

    Returns:
        float32 csr_matrix (N, N), symmetric, each row's entries sorted by increasing distance, ties by column
        (what scikit-learn expects of a precomputed sparse graph), **explicit zeros kept**. Pairs not stored
        have d > max_distance, or d = 1 (no shared support).
    """
    n = vqe.shape[0]
    inv = InvertedIndex(vqe)
    args = (inv.indptr, inv.indices, inv.data, inv.slot + 1, inv.colptr, inv.rows, inv.values,
            np.float32(max_distance), min(n, 8 * numba.get_num_threads()))
    none_i, none_f = np.zeros(0, np.int64), np.zeros(0, np.float32)
    counts = _radius_pairs_kernel(*args, none_i, none_i, none_f)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    jj = np.empty(offsets[-1], np.int64)
    dd = np.empty(offsets[-1], np.float32)
    _radius_pairs_kernel(*args, offsets, jj, dd)
    ii = np.repeat(np.arange(n, dtype=np.int64), counts)
    diag = np.where(np.diff(inv.indptr) > 0, np.float32(0), np.float32(1))
    dk = np.flatnonzero(diag <= np.float32(max_distance))
    rows = np.concatenate([ii, jj, dk])
    cols = np.concatenate([jj, ii, dk])
    vals = np.concatenate([dd, dd, diag[dk]])
    order = np.lexsort((cols, vals, rows))
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    idx = np.int32 if n < 2 ** 31 and rows.size < 2 ** 31 else np.int64
    return sp.csr_matrix((vals[order], cols[order].astype(idx), indptr.astype(idx)), shape=(n, n))


# ---------------------------------------------------------------------------------------------------------
# the whole distance


def kreciprocal_jaccard(features, k1: int = 30, k2: int = 6, *, max_distance: float = 1.0,
                        convention: str = "reference", knn: Optional[np.ndarray] = None,
                        similarities: Optional[np.ndarray] = None, search: Optional[dict] = None,
                        timings: Optional[Dict[str, float]] = None, check_input: bool = True) -> sp.csr_matrix:
    """Sparse k-reciprocal Jaccard distance graph (Zhong et al. CVPR 2017 Eqs. 4-11; cluster-contrast
    ``clustercontrast/utils/faiss_rerank.py`` ``compute_jaccard_distance``), the input of PPLR's and
    cluster-contrast's DBSCAN.

    Args:
        features: float32 (N, D) L2-normalised features (numpy or torch). The weights use the raw inner
            products x_i·x_j, as upstream does, so un-normalised input gives what upstream gives.
        k1: k-reciprocal neighbourhood size (30 in PPLR/cluster-contrast).
        k2: query-expansion neighbourhood (6), self included; k2 <= n_forward is required.
        max_distance: keep pairs with d <= max_distance (use DBSCAN's eps, or the largest eps of a sweep).
            With max_distance >= 1 every pair with shared support is kept.
        convention: ``'reference'`` (k1 forward entries incl. self: the published behaviour) or
            ``'textbook'`` (k1 + 1, Zhong et al.); see the module doc.
        knn: optional precomputed int64 (N, K) self-search table (best first, self included, K >=
            :func:`knn_columns_needed`); computed with :func:`partreid.common.retrieval.search.knn_search`
            (exact, inner product) when None.
        similarities: optional float32 (N, K) inner products matching ``knn``; used for the weights of the
            pairs found in the table (the others are computed from ``features``).
        search: extra keyword arguments for :func:`partreid.common.retrieval.search.knn_search` when ``knn``
            is None (e.g. ``{'method': 'hnsw'}``).
        timings: optional dict that receives the seconds spent per step.
        check_input: validate the features (finite) and the kNN table (in range, no repeated index); callers
            that produced both themselves (e.g. :func:`partreid.pplr_finetune.pseudo_labels.pseudo_labels`)
            skip it.

    Returns:
        float32 ``scipy.sparse.csr_matrix`` (N, N), symmetric, holding every pair with d <= max_distance,
        **including explicit zeros** (self, duplicate images); rows sorted by increasing distance. A pair that
        is not stored has d > max_distance (or d = 1). Memory grows with N·k, never N².

    Raises:
        InputError: bad shapes/values, k2 > n_forward, a kNN table too narrow or with invalid indices.
    """
    t_all = time.perf_counter()
    tm = timings if timings is not None else {}
    if hasattr(features, "detach"):
        features = features.detach().cpu().numpy()
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"features must be a 2-D (N, D) array, got shape {x.shape}")
    if check_input and not np.isfinite(x).all():
        raise InputError("features contain NaN or infinite values")
    n = x.shape[0]
    n_forward, n_half = neighbour_counts(k1, convention)
    k2 = int(k2)
    if k2 < 1 or k2 > n_forward:
        raise InputError(f"k2 must be in [1, {n_forward}] for k1={k1} ({convention} convention), got {k2}")
    width = max(n_forward, k2)
    if n < width:
        raise InputError(f"{n} samples are too few for k1={k1} ({convention} convention needs {width})")
    if knn is None:
        t = time.perf_counter()
        kw = dict(search or {})
        kw.setdefault("metric", "ip")
        if kw["metric"] != "ip":
            raise InputError("kreciprocal_jaccard searches with metric='ip'")
        similarities, knn = knn_search(x, width, **kw)
        tm["knn"] = time.perf_counter() - t
    if check_input:
        knn = check_knn(knn, n, width)
    else:
        knn = np.ascontiguousarray(np.asarray(knn)[:, :width], dtype=np.int64)
    if similarities is not None:
        similarities = np.asarray(similarities, np.float32)[:, :width]
        if similarities.shape != knn.shape:
            raise InputError(f"similarities have shape {similarities.shape}, the kNN table {knn.shape}")

    t = time.perf_counter()
    e = expanded_sets(knn, n_forward, n_half)  # steps 2-3
    tm["reciprocal"] = time.perf_counter() - t
    t = time.perf_counter()
    dots = pattern_dots(x, e, knn, similarities)
    v = encode(e, np.float32(2) * dots - np.float32(2))  # step 4, logits −(2 − 2·x_i·x_j)
    del e, dots
    tm["encoding"] = time.perf_counter() - t
    t = time.perf_counter()
    vqe = local_query_expansion(v, knn, k2)  # step 5
    del v
    tm["query_expansion"] = time.perf_counter() - t
    t = time.perf_counter()
    graph = jaccard_radius_graph(vqe, max_distance)  # step 6
    tm["jaccard"] = time.perf_counter() - t
    tm["total"] = time.perf_counter() - t_all
    return graph
