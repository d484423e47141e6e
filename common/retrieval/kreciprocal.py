"""Sparse k-reciprocal encoding, local query expansion and Jaccard distance (reference-spec §D).

This is the distance behind every DBSCAN pseudo-label in the unsupervised re-ID lineage (SpCL,
cluster-contrast, PPLR, PASS USL): ``compute_jaccard_distance`` of Zhong et al.'s k-reciprocal re-ranking,
re-implemented sparsely. The original builds three dense N×N float32 matrices in Python loops over samples
(reference-spec §D.2/§D.3: 1.3 GB at Market size, 8.5 GB at MSMT17 size); here every array grows with N·k
and every step is vectorised with numpy/scipy.sparse (no Python loop over samples).

Algorithm (reference-spec §D.1), for L2-normalised features x_i (N×D) and a kNN table ``knn`` (N×K, each row
best first, self normally in column 0):

1. forward lists F(i) = knn[i, :n_forward] and half lists F½(i) = knn[i, :n_half];
2. k-reciprocal sets R(i) = {j ∈ F(i) : i ∈ F(j)} and R½(i) = {j ∈ F½(i) : i ∈ F½(j)};
3. expansion: E(i) = R(i) ∪ ⋃ {R½(c) : c ∈ R(i), |R½(c) ∩ R(i)| > 2/3·|R½(c)|} (duplicates removed; the
   test is done in integers as 3·|∩| > 2·|R½(c)|, which is the same decision as the float one for sets this
   small);
4. encoding: V[i, j] = softmax_{j ∈ E(i)}(−(2 − 2·x_i·x_j)) (rows sum to 1), zero outside E(i);
5. local query expansion: V_qe[i] = mean of V over the rows knn[i, :k2] (skipped when k2 = 1);
6. Jaccard: m_ij = Σ_k min(V_qe[i, k], V_qe[j, k]) and d_ij = 1 − m_ij / (2 − m_ij), negatives clipped to 0.
   Pairs without shared support have d = 1.

Step 6 is where the time goes: the min-sums have Σ_k c_k(c_k − 1)/2 terms (c_k = rows sharing column k; 51M at
Market size), yet almost every pair that shares a column shares only a few small entries and is far from any
useful eps. Only the pairs with d_ij <= max_distance are wanted, i.e. m_ij >= t. The kernel first sums over each
row's heavy entries (all but the lightest ones, whose mass stays under a fraction of t), then recomputes the
few candidate pairs that bound leaves exactly (see ``_JaccardKernel``): about a quarter of the terms, the same
graph.

Neighbour-count conventions (``convention``)
-------------------------------------------
``'reference'`` (default; the behaviour behind the published numbers): the code slices ``[:k1+1]`` but its
rank table has only k1 columns, so F(i) really holds **k1 entries including self**. R½ is computed by the same
helper with k = round(k1/2), whose ``[:k+1]`` slice does fit in the table, so F½(i) holds
**round(k1/2) + 1 entries** (16 for k1 = 30). The rounding is numpy's (half to even: k1 = 25 → 12 + 1).

``'textbook'`` (Zhong et al. 2017, whose rank table is a full argsort): F(i) holds **k1 + 1 entries**
including self; F½(i) the same round(k1/2) + 1 entries.

Precision: V and V_qe are float32 like the original (which offers float16 as an option no caller sets); the
min-sums are accumulated in float32 in a different order than the original's, so distances agree with a dense
implementation to about 1e-6.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import threading
import time
import warnings
from typing import Dict, Optional, Tuple

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import reverse_cuthill_mckee

from partreid.common.errors import InputError

_log = logging.getLogger("partreid")

CONVENTIONS = ("reference", "textbook")

#: pair terms min(V_qe[i,k], V_qe[j,k]) processed per chunk by the Jaccard kernel (the chunk's arrays then
#: stay in the CPU cache)
DEFAULT_CHUNK_ELEMS = 65_536


# ---------------------------------------------------------------------------------------------------------
# small helpers


def neighbour_counts(k1: int, convention: str = "reference") -> Tuple[int, int]:
    """Forward-list lengths ``(n_forward, n_half)`` used for R and R½ (module doc, reference-spec §D.1 step 2).

    ``'reference'``: (k1, round(k1/2) + 1); ``'textbook'``: (k1 + 1, round(k1/2) + 1); self included.

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


def _check_knn(knn, n: Optional[int], width: int) -> np.ndarray:
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
    entry from kNN column c (float32 (n_cols,))."""
    n = knn.shape[0]
    cols = np.ascontiguousarray(knn[:, :n_cols]).ravel()
    indptr = np.arange(0, n * n_cols + 1, n_cols, dtype=np.int64)
    data = (np.ones(cols.size, np.float32) if column_values is None
            else np.tile(np.asarray(column_values, np.float32), n))
    a = sp.csr_matrix((data, cols, indptr), shape=(n, n))
    a.sort_indices()
    return a


def _keep_entries(a: sp.csr_matrix, keep: np.ndarray, data: Optional[np.ndarray] = None) -> sp.csr_matrix:
    """The stored entries of CSR ``a`` where ``keep`` (bool (nnz,), storage order) holds, in the same order,
    with ``data`` (float32 (nnz,), default ``a.data``) as values."""
    counts = _segment_reduce(np.add, keep.astype(np.int64), a.indptr, 0)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    values = a.data if data is None else data
    out = sp.csr_matrix((values[keep], a.indices[keep], indptr), shape=a.shape)
    out.has_sorted_indices = a.has_sorted_indices
    return out


def _row_ids(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))


def _segment_reduce(ufunc, values: np.ndarray, indptr: np.ndarray, empty_value) -> np.ndarray:
    """ufunc.reduceat over CSR rows, with ``empty_value`` for empty rows."""
    n = len(indptr) - 1
    out = np.full(n, empty_value, dtype=values.dtype)
    lens = np.diff(indptr)
    nz = lens > 0
    if nz.any():
        out[nz] = ufunc.reduceat(values, indptr[:-1][nz])
    return out


# ---------------------------------------------------------------------------------------------------------
# steps 2-5


def reciprocal_neighbours(knn: np.ndarray, n_forward: int) -> sp.csr_matrix:
    """k-reciprocal sets R(i) = {j ∈ knn[i,:n] : i ∈ knn[j,:n]} as a symmetric 0/1 CSR pattern.

    Args:
        knn: int64 (N, K) kNN table, K >= n_forward, each row best first.
        n_forward: forward-list length n (self included).

    Returns:
        float32 csr_matrix (N, N), ones at (i, j) for j ∈ R(i), sorted indices. Reference-spec §D.1 step 2.
    """
    a = _pattern_csr(knn, n_forward)
    r = a.multiply(a.T).tocsr()
    r.sort_indices()
    r.data[:] = 1.0
    return r


def reciprocal_pair(knn: np.ndarray, n_forward: int, n_half: int) -> Tuple[sp.csr_matrix, sp.csr_matrix]:
    """``(R, R½)``: :func:`reciprocal_neighbours` for both list lengths (n_half <= n_forward) from one
    sparse product. Each kNN entry carries 1 in the first n_half columns and 4 after, so the product of the
    two directions of a mutual pair is 1 exactly when both ranks fall in the half lists."""
    a = _pattern_csr(knn, n_forward, np.where(np.arange(n_forward) < n_half, 1.0, 4.0))
    prod = a.multiply(a.T).tocsr()
    prod.sort_indices()
    ones = np.ones(prod.nnz, np.float32)
    rh = _keep_entries(prod, prod.data == 1, ones)
    prod.data = ones
    return prod, rh


def _expand_block(r: sp.csr_matrix, rh: sp.csr_matrix, a: int, b: int) -> sp.csr_matrix:
    """Rows [a, b) of the expanded sets E (b − a, N) from the symmetric R and R½ patterns."""
    rb = r[a:b]
    counts = (rb @ rh).multiply(rb).tocsr()  # |R½(c) ∩ R(i)| at (i, c) for c ∈ R(i), R½ symmetric
    counts.sort_indices()
    rh_len = np.diff(rh.indptr)
    accept = 3 * counts.data.astype(np.int64) > 2 * rh_len[counts.indices]
    acc_rows = _row_ids(counts.indptr)[accept]
    acc = sp.csr_matrix((np.ones(acc_rows.size, np.float32), (acc_rows, counts.indices[accept])),
                        shape=rb.shape)
    e = (rb + acc @ rh).tocsr()
    e.sort_indices()
    e.data[:] = 1.0
    return e


def expanded_sets(knn: np.ndarray, n_forward: int, n_half: int) -> sp.csr_matrix:
    """Expanded k-reciprocal sets E(i) as a 0/1 CSR pattern (reference-spec §D.1 steps 2-3).

    E(i) = R(i) ∪ R½(c) for every c ∈ R(i) with |R½(c) ∩ R(i)| > 2/3·|R½(c)|. Computed without loops:
    since R½ is symmetric, |R½(c) ∩ R(i)| = (R·R½)[i, c]. The test is done in integers,
    3·|∩| > 2·|R½(c)|, the same decision as the original's float comparison for sets this small.

    Args:
        knn: int64 (N, K) kNN table, K >= n_forward >= n_half.
        n_forward, n_half: list lengths from :func:`neighbour_counts`.

    Returns:
        float32 csr_matrix (N, N) with ones on E, sorted column indices.
    """
    r, rh = reciprocal_pair(knn, n_forward, n_half)
    return _expand_block(r, rh, 0, knn.shape[0])


class _PairTable:
    """The (row, col) pairs of a kNN table with their values, for lookups of any pairs.

    Stored as a CSR matrix whose entries are 1 + the flat position of the pair in the table; a lookup is
    scipy's binary search within each row's K sorted columns.
    """

    def __init__(self, knn: np.ndarray, values: np.ndarray):
        n, k = knn.shape
        self.values = np.asarray(values, np.float32).ravel()
        idx = np.int32 if n < 2 ** 31 and n * k < 2 ** 31 else np.int64
        self.pos = sp.csr_matrix((np.arange(1, n * k + 1, dtype=np.int64), knn.ravel().astype(idx),
                                  np.arange(0, n * k + 1, k, dtype=idx)), shape=(n, n))
        self.pos.sort_indices()

    def lookup(self, rows: np.ndarray, cols: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if rows.size == 0:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        idx = self.pos.indices.dtype
        pos = np.asarray(self.pos[rows.astype(idx, copy=False), cols.astype(idx, copy=False)]).ravel()
        found = pos > 0
        return np.where(found, self.values[pos - 1], np.float32(0)).astype(np.float32), found


def lookup_pairs(rows: np.ndarray, cols: np.ndarray, knn: np.ndarray, values: np.ndarray,
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Values of a kNN table at arbitrary (row, col) pairs.

    Args:
        rows, cols: int64 (M,) pair indices.
        knn: int64 (N, K) table; values: float32 (N, K) the matching distances/similarities.

    Returns:
        ``(vals float32 (M,), found bool (M,))``; vals is 0 where the pair is not in the table.
    """
    return _PairTable(knn, values).lookup(rows, cols)


def pair_dots(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Inner products x[rows[m]]·x[cols[m]] for M pairs: float32 (M,).

    Computed by faiss (``fvec_inner_products_by_idx``: C++, all OpenMP threads) on row ranges of x in place,
    ``chunk`` pairs at a time, so no row of x is copied. Call it from the main process only, not from a
    forked worker (OpenMP thread pools do not survive a fork).

    Args:
        x: float32 (N, D) features; rows, cols: int64 (M,) pair indices.
    """
    from partreid.common.retrieval.search import _faiss

    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    m_total = rows.size
    out = np.empty(m_total, np.float32)
    if m_total == 0:
        return out
    order = None
    if (rows[1:] < rows[:-1]).any():
        order = np.argsort(rows, kind="stable")
        rows, cols = rows[order], cols[order]
    d = x.shape[1]
    for s in range(0, m_total, chunk):
        e = min(m_total, s + chunk)
        r, c = rows[s:e], cols[s:e]
        a = int(r[0])
        # rank of each pair within its row: a padded (rows a..r[-1]) × width table of ids, -1 = skip
        first = np.zeros(e - s, np.int64)
        new_row = np.flatnonzero(r[1:] != r[:-1]) + 1
        first[new_row] = new_row
        np.maximum.accumulate(first, out=first)
        rank = np.arange(e - s, dtype=np.int64) - first
        width = int(rank.max()) + 1
        nx = int(r[-1]) - a + 1
        slot = (r - a) * width + rank
        ids = np.full(nx * width, -1, np.int64)
        ids[slot] = c
        ip = np.empty(nx * width, np.float32)
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(ip), faiss.swig_ptr(x[a:a + nx]), faiss.swig_ptr(x),
                                         faiss.swig_ptr(ids), d, nx, width)
        out[s:e] = ip[slot]
    if order is not None:
        res = np.empty_like(out)
        res[order] = out
        out = res
    return out


def encode(pattern: sp.csr_matrix, logits: np.ndarray) -> sp.csr_matrix:
    """k-reciprocal feature V: row-wise softmax of ``logits`` over each row's stored entries.

    Args:
        pattern: csr (N, N) whose stored entries are the expanded sets E(i) (sorted indices).
        logits: float32 (nnz,) one logit per stored entry, in storage order.

    Returns:
        float32 csr (N, N), each non-empty row summing to 1 (reference-spec §D.1 step 4).
    """
    logits = np.asarray(logits, np.float32)
    mx = _segment_reduce(np.maximum, logits, pattern.indptr, np.float32(0))
    counts = np.diff(pattern.indptr)
    w = np.exp(logits - np.repeat(mx, counts))
    s = _segment_reduce(np.add, w, pattern.indptr, np.float32(1))
    w /= np.repeat(s, counts)
    v = sp.csr_matrix((w.astype(np.float32), pattern.indices.copy(), pattern.indptr.copy()),
                      shape=pattern.shape)
    v.has_sorted_indices = pattern.has_sorted_indices
    return v


def local_query_expansion(v: sp.csr_matrix, knn: np.ndarray, k2: int) -> sp.csr_matrix:
    """V_qe[i] = mean of V over rows knn[i, :k2] (reference-spec §D.1 step 5); V itself when k2 == 1.

    Args:
        v: float32 csr (N, N) encoding; knn: int64 (N, K >= k2).

    Returns:
        float32 csr (N, N) (column indices within a row not necessarily sorted).
    """
    if k2 == 1:
        return v
    q = _pattern_csr(knn, k2)
    vqe = (q @ v).tocsr()  # sum of the k2 rows in float32, then divided: numpy's mean of float32 rows
    if vqe.data.dtype != np.float32:
        vqe.data = vqe.data.astype(np.float32)
    vqe.data /= np.float32(k2)
    return vqe


# ---------------------------------------------------------------------------------------------------------
# step 6: Jaccard min-sums over an inverted index (CSC)


class InvertedIndex:
    """CSC view of a sparse encoding V (N_rows, N_cols): for each column k, the rows r with V[r, k] ≠ 0 in
    ascending order and their values; plus, for every CSR entry, its position in that column list.

    This is the "invIndex" of reference-spec §D.1 step 6, built in O(nnz) by scipy instead of N column scans.
    ``pairs`` holds (value, row) of every CSC slot as one 8-byte record, so one gather fetches both;
    ``cval`` and ``crow`` are views of its fields.
    """

    def __init__(self, v: sp.csr_matrix):
        v = v.tocsr()
        nnz = v.nnz
        if v.shape[0] >= 2 ** 31 or nnz >= 2 ** 31 - 1:  # pragma: no cover - beyond int32 indices
            raise InputError("more than 2**31 rows or stored entries are not supported")
        ids = sp.csr_matrix((np.arange(nnz, dtype=np.int32), v.indices, v.indptr), shape=v.shape)
        csc = ids.tocsc()  # counting sort: rows ascending within each column
        entry = csc.data  # CSR entry id of each CSC slot
        self.csr = v
        self.colptr = csc.indptr.astype(np.int64)
        self.pos = np.empty(nnz, np.int64)
        self.pos[entry] = np.arange(nnz, dtype=np.int64)
        rec = np.empty(nnz, dtype=[("val", np.float32), ("row", np.int32)])
        rec["val"] = v.data[entry]
        rec["row"] = csc.indices
        self.pairs = rec
        self.cval = rec["val"]
        self.crow = rec["row"]

    def first_slot_at_or_after_row(self, row0: int) -> np.ndarray:
        """Per column, the first CSC slot whose row is >= row0 (int64 (N_cols,))."""
        v = self.csr
        before = np.bincount(v.indices[: v.indptr[row0]], minlength=v.shape[1]).astype(np.int64)
        return self.colptr[:-1] + before


def _ragged_expand(starts: np.ndarray, lens: np.ndarray, total: int) -> np.ndarray:
    """Concatenation of the ranges [starts[e], starts[e] + lens[e]) (int64)."""
    offs = np.cumsum(lens) - lens
    return np.repeat(starts - offs, lens) + np.arange(total, dtype=np.int64)


def min_sum_block(inv: InvertedIndex, r0: int, r1: int, j0: int, j1: int,
                  slot_start: Optional[np.ndarray] = None) -> np.ndarray:
    """Dense block of Jaccard min-sums m[i, j] = Σ_k min(V[i,k], V[j,k]) for rows i in [r0, r1) and
    target rows j in [j0, j1) (reference-spec §D.1 step 7, the ``temp_min`` of the original).

    Args:
        inv: inverted index of V (N, N).
        r0, r1: row range; j0, j1: target-row range.
        slot_start: optional cached ``inv.first_slot_at_or_after_row(j0)``.

    Returns:
        float32 (r1-r0, j1-j0); 0 where rows share no column.
    """
    v = inv.csr
    if slot_start is None:
        slot_start = inv.first_slot_at_or_after_row(j0)
    e0, e1 = v.indptr[r0], v.indptr[r1]
    cols = v.indices[e0:e1]
    out = np.zeros((r1 - r0) * (j1 - j0), np.float32)
    starts = slot_start[cols]
    stops = inv.colptr[cols + 1]
    if j1 < v.shape[0]:
        # rows of each column are ascending: stop at the first row >= j1
        stops = np.minimum(stops, inv.first_slot_at_or_after_row(j1)[cols])
    lens = np.maximum(stops - starts, 0)
    total = int(lens.sum())
    if total:
        slots = _ragged_expand(starts, lens, total)
        j = inv.crow[slots].astype(np.int64) - j0
        m = inv.cval[slots]
        np.minimum(m, np.repeat(v.data[e0:e1], lens), out=m)
        local = _row_ids(v.indptr[r0:r1 + 1] - e0)
        key = np.repeat(local * (j1 - j0), lens) + j
        np.add.at(out, key, m)
    return out.reshape(r1 - r0, j1 - j0)


def _jaccard_from_min(m: np.ndarray) -> np.ndarray:
    """d = 1 − m/(2 − m) in float32 (reference-spec §D.1 step 7), negatives clipped to 0 (step 8)."""
    m = m.astype(np.float32, copy=False)
    d = np.float32(1) - m / (np.float32(2) - m)
    np.maximum(d, np.float32(0), out=d)
    return d


def _min_threshold(max_distance: float) -> float:
    """Smallest min-sum m whose Jaccard distance can be <= max_distance (with a safety slack); always > 0,
    since pairs without shared support (m = 0, d = 1) are never stored."""
    md = min(max(float(max_distance), 0.0), 1.0)
    return max(2.0 * (1.0 - md) / (2.0 - md) - 1e-4, 1e-30)


#: a chunk accumulates into a dense (rows × targets) buffer while its size is <= this factor × the chunk's pair
#: terms; beyond that (large N, few terms per row) the touched target rows are renumbered densely first
_DENSE_FACTOR = 10

#: light-entry budget σ of the pruned kernel, as a fraction of the min-sum threshold t (σ = fraction · t)
LIGHT_FRACTION = 0.35

#: at most this many float32 cells in the per-chunk dense copy of V_qe rows used to verify candidate pairs
_VERIFY_CELLS = 1 << 22


def light_entries(v: sp.csr_matrix, sigma: float) -> Tuple[np.ndarray, np.ndarray]:
    """Per row, the lightest stored entries whose values add up to at most ``sigma``.

    Args:
        v: csr (N, M) with non-negative float32 values.
        sigma: mass budget per row (the values' unit).

    Returns:
        ``(light bool (nnz,), mass float64 (N,))``: which stored entries (in storage order) are light, and the
        sum of each row's light values (<= sigma). An entry whose value ties with the row's first heavy value
        is heavy, so the budget is never exceeded.
    """
    n = v.shape[0]
    data = np.asarray(v.data, np.float32)
    indptr = v.indptr.astype(np.int64)
    if sigma <= 0 or data.size == 0:
        return np.zeros(data.size, bool), np.zeros(n, np.float64)
    lens = np.diff(indptr)
    row_key = np.arange(n, dtype=np.int64) << 32
    # non-negative float32 values sort like their bit patterns: one int64 sort orders every row by value
    key = np.repeat(row_key, lens)
    key |= data.view(np.uint32)
    key.sort()
    low = key.view(np.uint32)[0::2] if sys.byteorder == "little" else key.view(np.uint32)[1::2]
    cum = np.zeros(data.size + 1, np.float64)  # running mass over the sorted rows, one after the other
    np.cumsum(low.view(np.float32), dtype=np.float64, out=cum[1:])
    start, stop = indptr[:-1], indptr[1:]
    # per row, the first sorted position whose running mass exceeds sigma: the row's first heavy value
    first = np.minimum(np.searchsorted(cum, cum[start] + sigma, side="right") - 1, stop)
    first_heavy = np.full(n, np.inf, np.float32)
    has_heavy = first < stop
    first_heavy[has_heavy] = low[first[has_heavy]].view(np.float32)
    # light = strictly below it (ties with it stay heavy); their mass from the running sums
    light = data < np.repeat(first_heavy, lens)
    end = np.searchsorted(key, row_key | first_heavy.view(np.uint32), side="left")
    mass = cum[end] - cum[start]
    return light, mass


class _JaccardKernel:
    """Min-sum accumulation of :func:`jaccard_radius_graph` over ranges of rows (see its doc).

    Pruning (``light_fraction`` > 0): per row, the lightest entries of V_qe with total mass s_i <= σ are set
    aside (:func:`light_entries`, σ = light_fraction · t, where t is the smallest min-sum that can reach
    ``max_distance``). The pair terms are accumulated over the remaining heavy entries only, giving
    m'_ij <= m_ij. Every term left out involves a light entry of i or of j, so m_ij <= m'_ij + s_i + s_j:

    * a pair sharing no heavy column has m_ij <= s_i + s_j <= 2σ < t, and cannot be in the graph;
    * a pair with m'_ij < t − s_i − s_j cannot either.

    The remaining candidate pairs get their exact m_ij = Σ_k min(V_qe[i,k], V_qe[j,k]) over all entries, from
    a dense copy of the chunk's rows. The result is the same as without pruning; at Market size about three
    quarters of the terms are skipped (most pairs that share a column share only a few light ones).
    """

    def __init__(self, vp: sp.csr_matrix, max_distance: float, chunk_elems: int,
                 light_fraction: Optional[float] = None):
        self.n = vp.shape[0]
        self.full = vp = vp.tocsr()
        t = _min_threshold(max_distance)
        if light_fraction is None:
            light_fraction = LIGHT_FRACTION
        light, self.light_mass = light_entries(vp, float(light_fraction) * t if t > 1e-6 else 0.0)
        self.verify = bool(light.any())
        if self.verify:
            vh = _keep_entries(vp, ~light)
            # heavy-only sums below t − 2σ cannot lead to a pair within max_distance
            self.t_search = np.float32(max(t - 2.0 * float(self.light_mass.max(initial=0.0)) - 1e-4, 1e-30))
        else:
            vh = vp
            self.t_search = np.float32(t)
        self.inv = InvertedIndex(vh)
        v = self.inv.csr
        self.data = v.data.astype(np.float32, copy=False)
        self.indptr = v.indptr.astype(np.int64)
        self.entry_row = _row_ids(self.indptr)
        self.slot_start = self.inv.pos + 1  # only j > i: the slots after row i's own slot in column k
        self.lens = self.inv.colptr[v.indices + 1] - self.slot_start
        self.row_cum = np.concatenate([[0], np.cumsum(_segment_reduce(np.add, self.lens, self.indptr, 0))])
        self.t_min = np.float32(t)
        self.max_distance = np.float32(max_distance)
        self.chunk_elems = int(max(1, chunk_elems))
        self.records = self.inv.pairs.view(np.int64)
        self.max_verify_rows = max(1, _VERIFY_CELLS // max(self.n, 1))

    @property
    def total_terms(self) -> int:
        return int(self.row_cum[-1])

    def split_rows(self, parts: int) -> list:
        """Row boundaries cutting the work into ``parts`` contiguous ranges of terms in the proportions of
        :func:`_fork_shares`."""
        targets = self.row_cum[-1] * _fork_shares(parts)
        cuts = np.searchsorted(self.row_cum, targets).tolist()
        return [0] + cuts + [self.n]

    def _exact_min_sums(self, ii: np.ndarray, jj: np.ndarray, r0: int, r1: int, vbuf: np.ndarray) -> np.ndarray:
        """Exact m_ij over all entries for pairs with i in [r0, r1) (ii ascending): float32 (len(ii),).

        Rows r0..r1-1 are scattered into the zeroed dense buffer ``vbuf`` (>= (r1−r0)·N cells, zeroed again
        on return); each pair then reads row i's values at row j's columns (rows j gathered by scipy).
        """
        n, full = self.n, self.full
        e0, e1 = full.indptr[r0], full.indptr[r1]
        cells = _row_ids(full.indptr[r0:r1 + 1] - e0) * n + full.indices[e0:e1]
        vbuf[cells] = full.data[e0:e1]
        rows_j = full[jj.astype(full.indices.dtype)]  # same dtype: scipy then converts nothing
        key = np.repeat((ii - r0) * n, np.diff(rows_j.indptr))
        key += rows_j.indices
        terms = np.take(vbuf, key)
        np.minimum(terms, rows_j.data, out=terms)
        vbuf[cells] = 0
        if not terms.size:
            return np.zeros(ii.size, np.float32)
        return np.add.reduceat(terms, rows_j.indptr[:-1])

    def run(self, r_start: int, r_stop: int):
        """Pairs (i < j, rows in [r_start, r_stop)) with d_ij <= max_distance: (i int64, j int64, d float32)."""
        n, indptr, lens_all, row_cum = self.n, self.indptr, self.lens, self.row_cum
        out_i, out_j, out_d = [], [], []
        mark = np.zeros(n, bool)
        remap = np.zeros(n, np.int64)
        arange = np.arange(0)
        dense_buf = np.zeros(0, np.float32)
        bounds = [r_start]
        while bounds[-1] < r_stop:
            r0 = bounds[-1]
            r1 = int(np.searchsorted(row_cum, row_cum[r0] + self.chunk_elems, side="right")) - 1
            r1 = min(max(r1, r0 + 1), r_stop)
            bounds.append(min(r1, r0 + self.max_verify_rows) if self.verify else r1)
        if self.verify:  # allocated once: first touches of fresh pages are not free
            vbuf = np.zeros(max(b - a for a, b in zip(bounds[:-1], bounds[1:])) * n, np.float32)
        for r0, r1 in zip(bounds[:-1], bounds[1:]):
            total = int(row_cum[r1] - row_cum[r0])
            if total:
                e0, e1 = indptr[r0], indptr[r1]
                lens = lens_all[e0:e1]
                if arange.size < total:
                    arange = np.arange(max(total, 2 * self.chunk_elems), dtype=np.int64)
                # CSC slots of the concatenated column suffixes (ragged ranges), then (value, row) records
                slots = np.repeat(self.slot_start[e0:e1] - (np.cumsum(lens) - lens), lens)
                slots += arange[:total]
                m = np.repeat(self.data[e0:e1], lens)
                rec = np.take(self.records, slots).view(self.inv.pairs.dtype)
                j = rec["row"]
                np.minimum(m, rec["val"], out=m)
                rows_c = r1 - r0
                width = n - r0 - 1  # targets j > i >= r0: columns r0+1 .. n-1
                if rows_c * width <= _DENSE_FACTOR * total:  # dense (rows × width) buffer, reused
                    ncols, cols = width, None
                    key = np.repeat((self.entry_row[e0:e1] - r0) * width - (r0 + 1), lens)
                    key += j
                    size = rows_c * width
                    if dense_buf.size < size:
                        dense_buf = np.zeros(max(size, _DENSE_FACTOR * self.chunk_elems), np.float32)
                    buf = dense_buf[:size]
                else:  # renumber the touched target rows 0..ncols-1
                    mark[j] = True
                    cols = np.flatnonzero(mark)
                    mark[cols] = False
                    ncols = cols.size
                    remap[cols] = np.arange(ncols)
                    key = np.repeat((self.entry_row[e0:e1] - r0) * ncols, lens)
                    key += remap[j]
                    buf = np.zeros(rows_c * ncols, np.float32)
                np.add.at(buf, key, m)
                hit = np.flatnonzero(buf >= self.t_search)
                sums = buf[hit]
                if cols is None:
                    buf.fill(0)  # the dense buffer is reused by the next chunk
                if hit.size:
                    hi = hit // ncols + r0
                    hj = hit % ncols + (r0 + 1) if cols is None else cols[hit % ncols]
                    if self.verify:  # candidates by the light-mass bound, then their exact sums
                        cand = np.flatnonzero(sums + (self.light_mass[hi] + self.light_mass[hj])
                                              >= self.t_min - 1e-4)
                        hi, hj = hi[cand], hj[cand]
                        sums = self._exact_min_sums(hi, hj, r0, r1, vbuf)
                        cand = np.flatnonzero(sums >= self.t_min)
                        hi, hj, sums = hi[cand], hj[cand], sums[cand]
                    d = _jaccard_from_min(sums)
                    keep = d <= self.max_distance
                    out_i.append(hi[keep])
                    out_j.append(hj[keep])
                    out_d.append(d[keep])
        return (np.concatenate(out_i + [np.empty(0, np.int64)]).astype(np.int64),
                np.concatenate(out_j + [np.empty(0, np.int64)]).astype(np.int64),
                np.concatenate(out_d + [np.empty(0, np.float32)]).astype(np.float32))


def default_n_jobs() -> int:
    """Worker processes for the Jaccard kernel: the CPUs this process may use (at most 8), 1 off Linux."""
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


#: a forked worker's last bytes: its payload is complete
_FORK_DONE = b"PARTREID-FORK-DONE"


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # pragma: no cover - already reaped
        pass


def _fork_map(func, ranges: list) -> list:
    """``[func(a, b) for a, b in ranges]``, the first range in this process and each other one in a forked child.

    ``func`` returns a tuple of numpy arrays. The children share this process's memory copy-on-write, run
    numpy code only (no threads, BLAS or OpenMP of their own) and send their arrays back through a pipe;
    a child that fails is redone here, so the result never depends on the fork succeeding.
    """
    children = []
    for a, b in ranges[1:]:
        try:
            read_fd, write_fd = os.pipe()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # "process is multi-threaded" (3.12+)
                pid = os.fork()
        except OSError:
            children.append((None, None, a, b))
            continue
        if pid == 0:  # child: compute, write, leave without running the parent's cleanup
            status = 1
            try:
                os.close(read_fd)
                payload = io.BytesIO()
                for arr in func(a, b):
                    np.save(payload, np.ascontiguousarray(arr), allow_pickle=False)
                payload.write(_FORK_DONE)
                with os.fdopen(write_fd, "wb") as fh:
                    fh.write(payload.getbuffer())
                status = 0
            finally:
                os._exit(status)
        os.close(write_fd)
        children.append((pid, read_fd, a, b))
    try:
        first = func(*ranges[0])
    except BaseException:
        for pid, read_fd, _, _ in children:  # do not leave workers or pipes behind
            if pid is not None:
                os.close(read_fd)
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:  # pragma: no cover - already gone
                    pass
                os.waitpid(pid, 0)
        raise
    results = [first]
    for pid, read_fd, a, b in children:
        res = None
        if pid is not None:
            try:
                with os.fdopen(read_fd, "rb") as fh:
                    data = fh.read()
                if data.endswith(_FORK_DONE):  # the child got to its last write
                    payload = io.BytesIO(data)
                    res = tuple(np.load(payload, allow_pickle=False) for _ in range(len(first)))
                    if payload.tell() != len(data) - len(_FORK_DONE):
                        res = None
            except (OSError, ValueError, EOFError):
                res = None
            # the child now only exits (its teardown takes milliseconds): reap it without waiting here
            threading.Thread(target=_reap, args=(pid,), daemon=True).start()
        if res is None:
            _log.debug("forked worker for range [%d, %d) failed; computing it in the parent", a, b)
            res = func(a, b)
        results.append(res)
    return results


#: work of the calling process relative to each forked child in :func:`_fork_map`: the caller starts at once
#: and sends nothing back, a child first pays for its fork, its copy-on-write page faults and its pipe
_PARENT_SHARE = 1.15


def _fork_shares(parts: int) -> np.ndarray:
    """Cumulative cut points in (0, 1) for ``parts`` ranges, the first (this process's) _PARENT_SHARE times
    the others: float64 (parts − 1,)."""
    w = np.ones(parts)
    w[0] = _PARENT_SHARE
    return (np.cumsum(w) / w.sum())[:-1]


def _resolve_jobs(n_jobs: Optional[int]) -> int:
    jobs = default_n_jobs() if n_jobs is None else max(1, int(n_jobs))
    return jobs if hasattr(os, "fork") else 1


#: below this many pair terms (rows) the kernel (the encoding) runs in this process only: a fork costs a few ms
_FORK_MIN_TERMS = 4_000_000
_FORK_MIN_ROWS = 8192


def jaccard_radius_graph(vqe: sp.csr_matrix, max_distance: float, *, order: Optional[np.ndarray] = None,
                         chunk_elems: int = DEFAULT_CHUNK_ELEMS, n_jobs: Optional[int] = None,
                         ) -> sp.csr_matrix:
    """Sparse Jaccard radius graph: every pair (i, j) with d_ij <= max_distance, zeros stored explicitly.

    Each unordered pair is computed once (j > i, from the inverted index) and mirrored; the diagonal is
    stored as an explicit 0 (its exact value). Rows are processed in chunks of about ``chunk_elems`` pair
    terms min(V_qe[i,k], V_qe[j,k]); a chunk scatter-adds its terms into a cache-resident dense buffer of
    (chunk rows × rows after the chunk's first row), or, when N is large compared with the chunk's terms, of
    (chunk rows × touched rows) after renumbering the touched target rows. For max_distance < 1 the terms are
    summed over each row's heavy entries only and the candidate pairs are then recomputed exactly
    (``_JaccardKernel``, pruning fraction :data:`LIGHT_FRACTION`). ``order`` (a permutation of the rows, e.g.
    :func:`locality_order`) puts neighbouring rows in the same chunk, so their column suffixes are read from
    cache and they touch fewer distinct targets; it does not change the result.

    Args:
        vqe: float32 csr (N, N), the query-expanded encoding V_qe.
        max_distance: keep pairs with d <= max_distance; >= 1 keeps every pair with shared support.
        order: optional int64 permutation (N,).
        chunk_elems: pair terms per chunk (temporary memory about 40 bytes each).
        n_jobs: processes sharing the min-sum work (Linux: forked copy-on-write children, like the faiss
            search uses every core; elsewhere 1). Default :func:`default_n_jobs`; the result is identical
            for any value.

    Returns:
        float32 csr_matrix (N, N), symmetric, each row's entries sorted by increasing distance (what
        scikit-learn expects of a precomputed sparse graph). Pairs not stored have d > max_distance, or
        d = 1 (no shared support).
    """
    n = vqe.shape[0]
    vqe = vqe.tocsr()
    if order is not None:
        order = np.asarray(order, np.int64)
        inv_order = np.empty(n, np.int64)
        inv_order[order] = np.arange(n, dtype=np.int64)
        vp = vqe[order]
        vp = sp.csr_matrix((vp.data, inv_order[vp.indices], vp.indptr), shape=(n, n))
    else:
        vp = vqe
    kernel = _JaccardKernel(vp, max_distance, chunk_elems)
    jobs = _resolve_jobs(n_jobs)
    if jobs > 1 and kernel.total_terms >= _FORK_MIN_TERMS:
        bounds = kernel.split_rows(jobs)
        parts = _fork_map(kernel.run, list(zip(bounds[:-1], bounds[1:])))
        ii, jj, dd = (np.concatenate([p[k] for p in parts]) for k in range(3))
    else:
        ii, jj, dd = kernel.run(0, n)
    # diagonal: m_ii = Σ_k V_qe[i,k] = 1 exactly for every non-empty row (each V row sums to 1), so d_ii = 0,
    # stored as an explicit zero (the original's float32 sum leaves ~1e-7 there); an empty row has d_ii = 1.
    diag = np.where(np.diff(kernel.indptr) > 0, np.float32(0), np.float32(1)).astype(np.float32)
    dk = np.flatnonzero(diag <= np.float32(max_distance))
    rows = np.concatenate([ii, jj, dk])
    cols_all = np.concatenate([jj, ii, dk])
    vals = np.concatenate([dd, dd, diag[dk]])
    if order is not None:
        rows = order[rows]
        cols_all = order[cols_all]
    return _csr_sorted_by_value(rows, cols_all, vals, n)


def _csr_sorted_by_value(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int) -> sp.csr_matrix:
    """CSR (n, n) from unique (row, col, val) triplets, each row's entries by increasing value.

    ``vals`` are non-negative float32, so their bit patterns sort like the values and one int64 key
    (row, value bits) orders everything. Explicit zeros are kept (scipy's constructor from
    (data, indices, indptr) never drops them).
    """
    vals = np.asarray(vals, np.float32)
    key = (rows.astype(np.int64) << 32) | vals.view(np.uint32).astype(np.int64)
    perm = np.argsort(key, kind="stable")
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    idx_dtype = np.int32 if n < 2 ** 31 and rows.size < 2 ** 31 else np.int64
    return sp.csr_matrix((vals[perm], cols[perm].astype(idx_dtype), indptr.astype(idx_dtype)), shape=(n, n))


def locality_order(pattern: sp.csr_matrix) -> np.ndarray:
    """Reverse Cuthill-McKee order of a symmetric neighbour pattern (int64 (N,)), so that rows processed
    together by :func:`jaccard_radius_graph` touch few distinct target rows."""
    return np.asarray(reverse_cuthill_mckee(pattern.tocsr(), symmetric_mode=True), np.int64)


# ---------------------------------------------------------------------------------------------------------
# the whole distance


def _l2_check(x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        raise InputError("features contain NaN or infinite values")


def kreciprocal_jaccard(features, k1: int = 30, k2: int = 6, *, max_distance: float = 1.0,
                        convention: str = "reference", knn: Optional[np.ndarray] = None,
                        similarities: Optional[np.ndarray] = None, search: Optional[dict] = None,
                        chunk_elems: int = DEFAULT_CHUNK_ELEMS, timings: Optional[Dict[str, float]] = None,
                        check_input: bool = True, n_jobs: Optional[int] = None) -> sp.csr_matrix:
    """Sparse k-reciprocal Jaccard distance graph (reference-spec §D.1; ``compute_jaccard_distance``).

    Args:
        features: float32 (N, D) L2-normalised features (numpy or torch). The weights use the raw inner
            products x_i·x_j, as the original does, so un-normalised input gives what the original gives.
        k1: k-reciprocal neighbourhood size (30 in PPLR/cluster-contrast).
        k2: query-expansion neighbourhood (6), self included; k2 <= n_forward is required.
        max_distance: keep pairs with d <= max_distance (use DBSCAN's eps, or the largest eps of a sweep).
            With max_distance >= 1 every pair with shared support is kept.
        convention: ``'reference'`` (k1 forward entries incl. self: the published behaviour) or
            ``'textbook'`` (k1 + 1, Zhong et al.); see the module doc.
        knn: optional precomputed int64 (N, K) self-search table (best first, self included, K >=
            :func:`knn_columns_needed`); computed with :func:`partreid.common.retrieval.search.knn_search` (exact, inner
            product) when None.
        similarities: optional float32 (N, K) inner products matching ``knn``; used for the weights of the
            pairs found in the table (the others are computed from ``features``).
        search: extra keyword arguments for :func:`partreid.common.retrieval.search.knn_search` when ``knn`` is None
            (e.g. ``{'method': 'hnsw'}``).
        chunk_elems: memory/speed trade-off of the Jaccard kernel (pair contributions per chunk).
        timings: optional dict that receives the seconds spent per step.
        check_input: validate the features (finite) and the kNN table (in range, no repeated index); callers
            that produced both themselves (e.g. :func:`pplr_finetune.pseudo_labels.pseudo_labels`) skip it.
        n_jobs: processes for the min-sum kernel (see :func:`jaccard_radius_graph`); same result for any value.

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
    if check_input:
        _l2_check(x)
    n = x.shape[0]
    n_forward, n_half = neighbour_counts(k1, convention)
    k2 = int(k2)
    if k2 < 1 or k2 > n_forward:
        raise InputError(f"k2 must be in [1, {n_forward}] for k1={k1} ({convention} convention), got {k2}")
    width = max(n_forward, k2)
    if n < width:
        raise InputError(f"{n} samples are too few for k1={k1} ({convention} convention needs {width})")
    if knn is None:
        from partreid.common.retrieval.search import knn_search

        t = time.perf_counter()
        kw = dict(search or {})
        kw.setdefault("metric", "ip")
        if kw["metric"] != "ip":
            raise InputError("kreciprocal_jaccard searches with metric='ip'")
        similarities, knn = knn_search(x, width, **kw)
        tm["knn"] = time.perf_counter() - t
    if check_input:
        knn = _check_knn(knn, n, width)
    else:
        knn = np.ascontiguousarray(np.asarray(knn)[:, :width], dtype=np.int64)
    if similarities is not None:
        similarities = np.asarray(similarities, np.float32)[:, :width]
        if similarities.shape != knn.shape:
            raise InputError(f"similarities have shape {similarities.shape}, the kNN table {knn.shape}")

    t = time.perf_counter()
    r, rh = reciprocal_pair(knn, n_forward, n_half)
    tm["reciprocal"] = time.perf_counter() - t

    # steps 3-4: expanded sets and x_i·x_j for their pairs from the kNN table, per block of rows (blocks shared
    # with forked workers on large inputs); then the pairs not in the table (faiss, all threads) and the
    # softmax weights
    t = time.perf_counter()
    table = _PairTable(knn, similarities) if similarities is not None else None

    def expand_rows(a: int, b: int):
        e_blk = _expand_block(r, rh, a, b)
        if table is None:
            dots = np.zeros(e_blk.nnz, np.float32)
            found = np.zeros(e_blk.nnz, bool)
        else:
            rows = _row_ids(e_blk.indptr) + a
            cols = e_blk.indices.astype(np.int64)
            dots, found = table.lookup(rows, cols)
            miss = np.flatnonzero(~found)
            if miss.size:  # x_i·x_j = x_j·x_i: look for (j, i) too
                back, found_back = table.lookup(cols[miss], rows[miss])
                dots[miss] = back
                found[miss] = found_back
        return e_blk.indptr.astype(np.int64), e_blk.indices.astype(np.int32), dots, found

    jobs = _resolve_jobs(n_jobs)
    if jobs > 1 and n >= _FORK_MIN_ROWS:
        cuts = [0] + np.round(n * _fork_shares(jobs)).astype(np.int64).tolist() + [n]
        blocks = _fork_map(expand_rows, list(zip(cuts[:-1], cuts[1:])))
    else:
        blocks = [expand_rows(0, n)]
    offsets = np.cumsum([0] + [int(b_[0][-1]) for b_ in blocks])
    indptr = np.concatenate([blocks[0][0][:1]] + [b_[0][1:] + off for b_, off in zip(blocks, offsets[:-1])])
    e = sp.csr_matrix((np.ones(int(indptr[-1]), np.float32), np.concatenate([b_[1] for b_ in blocks]), indptr),
                      shape=(n, n))
    e.has_sorted_indices = True
    dots = np.concatenate([b_[2] for b_ in blocks])
    miss = np.flatnonzero(~np.concatenate([b_[3] for b_ in blocks]))
    del blocks, table
    if miss.size:
        dots[miss] = pair_dots(x, _row_ids(indptr)[miss], e.indices[miss].astype(np.int64))
    v = encode(e, (np.float32(2) * dots - np.float32(2)).astype(np.float32))  # logits −(2 − 2·x_i·x_j)
    del e, dots, miss
    tm["encoding"] = time.perf_counter() - t
    t = time.perf_counter()
    vqe = local_query_expansion(v, knn, k2)  # step 5
    tm["query_expansion"] = time.perf_counter() - t

    t = time.perf_counter()
    order = locality_order(r)
    graph = jaccard_radius_graph(vqe, max_distance, order=order, chunk_elems=chunk_elems, n_jobs=n_jobs)
    tm["jaccard"] = time.perf_counter() - t
    tm["total"] = time.perf_counter() - t_all
    return graph
