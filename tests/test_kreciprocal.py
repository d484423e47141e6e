"""Sparse k-reciprocal Jaccard (partreid.common.retrieval.kreciprocal) against a plain dense implementation of
cluster-contrast's ``compute_jaccard_distance`` (``clustercontrast/utils/faiss_rerank.py``), and its compiled
kernels against straightforward numpy."""

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import DBSCAN

from partreid.common.errors import InputError
from partreid.common.retrieval.kreciprocal import (InvertedIndex, encode, expanded_sets, jaccard_radius_graph,
                                                   knn_columns_needed, kreciprocal_jaccard, local_query_expansion,
                                                   min_sum_block, neighbour_counts, pattern_dots,
                                                   reciprocal_neighbours, reciprocal_pair, row_ids)
from partreid.common.compiled import numba_cache_dir
from partreid.pplr_finetune.pseudo_labels import dbscan_labels


# ------------------------------------------------------------------------------------------------------------
# The dense reference: compute_jaccard_distance written the way upstream does it (Python loops, three N×N arrays).
# `rank` is the rank table the original sees: k1 columns for the 'reference' convention (its `[:k1+1]` slice
# then yields k1 entries), the full argsort for the textbook convention.
def dense_jaccard(x, rank, k1, k2):
    n = x.shape[0]

    def k_reciprocal(i, k):
        forward = rank[i, :k + 1]
        backward = rank[forward, :k + 1]
        return forward[np.where(backward == i)[0]]

    r_full = [k_reciprocal(i, k1) for i in range(n)]
    r_half = [k_reciprocal(i, int(np.around(k1 / 2))) for i in range(n)]
    v = np.zeros((n, n), np.float32)
    for i in range(n):
        expansion = r_full[i]
        for c in r_full[i]:
            if len(np.intersect1d(r_half[c], r_full[i])) > 2 / 3 * len(r_half[c]):
                expansion = np.append(expansion, r_half[c])
        expansion = np.unique(expansion)
        logits = -(2 - 2 * (x[i:i + 1] @ x[expansion].T))[0]
        w = np.exp(logits - logits.max())
        v[i, expansion] = w / w.sum()
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = np.mean(v[rank[i, :k2]], axis=0)
        v = v_qe
    inv_index = [np.where(v[:, c] != 0)[0] for c in range(n)]
    jac = np.zeros((n, n), np.float32)
    for i in range(n):
        temp_min = np.zeros(n, np.float32)
        for c in np.where(v[i] != 0)[0]:
            temp_min[inv_index[c]] += np.minimum(v[i, c], v[inv_index[c], c])
        jac[i] = 1 - temp_min / (2 - temp_min)
    jac[jac < 0] = 0
    return jac


def clustered_features(n=1500, d=32, ids=80, noise=0.8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((ids, d))
    x = centers[rng.integers(0, ids, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


K1, K2, EPS, MIN_SAMPLES = 20, 6, 0.6, 4


@pytest.fixture(scope="module")
def data():
    x = clustered_features()
    full_rank = np.argsort(-(x.astype(np.float64) @ x.T.astype(np.float64)), axis=1, kind="stable")
    dense = {"reference": dense_jaccard(x, full_rank[:, :K1], K1, K2),
             "textbook": dense_jaccard(x, full_rank, K1, K2)}
    return x, full_rank, dense


def _stored_mask(graph):
    coo = graph.tocoo()
    mask = np.zeros(graph.shape, bool)
    mask[coo.row, coo.col] = True
    return coo, mask


@pytest.mark.parametrize("convention", ["reference", "textbook"])
def test_sparse_equals_dense_reference(data, convention):
    x, full_rank, dense = data
    ref = dense[convention]
    width = knn_columns_needed(K1, K2, convention)
    graph = kreciprocal_jaccard(x, K1, K2, max_distance=EPS, convention=convention, knn=full_rank[:, :width])
    assert isinstance(graph, sp.csr_matrix) and graph.dtype == np.float32 and graph.shape == ref.shape
    coo, stored = _stored_mask(graph)
    # every stored pair equals the dense distance
    np.testing.assert_allclose(coo.data, ref[coo.row, coo.col], atol=1e-5, rtol=0)
    assert (coo.data <= EPS).all()
    # every pair not stored is farther than eps (or 1)
    assert (ref[~stored] > EPS - 1e-6).all()
    # ... so the graph holds exactly the pairs within eps, and DBSCAN agrees label for label
    assert stored.sum() == (ref <= EPS).sum()
    dense_labels = DBSCAN(eps=EPS, min_samples=MIN_SAMPLES, metric="precomputed").fit_predict(ref)
    sparse_labels = dbscan_labels(graph, EPS, MIN_SAMPLES)
    np.testing.assert_array_equal(sparse_labels, dense_labels)
    assert 20 < dense_labels.max() + 1 < 200 and (dense_labels == -1).any()  # a meaningful clustering


def test_conventions_differ_and_use_documented_counts(data):
    _, _, dense = data
    assert neighbour_counts(30, "reference") == (30, 16)
    assert neighbour_counts(30, "textbook") == (31, 16)
    assert neighbour_counts(25, "reference") == (25, 13)  # numpy rounds 12.5 to 12
    assert neighbour_counts(20, "textbook") == (21, 11)
    assert np.abs(dense["reference"] - dense["textbook"]).max() > 1e-3


def test_own_faiss_search_gives_the_same_graph(data):
    x, full_rank, dense = data
    graph = kreciprocal_jaccard(x, K1, K2, max_distance=EPS)  # searches with faiss itself
    coo, stored = _stored_mask(graph)
    np.testing.assert_allclose(coo.data, dense["reference"][coo.row, coo.col], atol=1e-5, rtol=0)
    assert stored.sum() == (dense["reference"] <= EPS).sum()


def test_all_shared_support_pairs_with_max_distance_one(data):
    x, full_rank, dense = data
    y = x[:600]
    rank = np.argsort(-(y.astype(np.float64) @ y.T.astype(np.float64)), axis=1, kind="stable")[:, :K1]
    graph = kreciprocal_jaccard(y, K1, K2, max_distance=1.0, knn=rank)
    ref = dense_jaccard(y, rank, K1, K2)
    coo, stored = _stored_mask(graph)
    np.testing.assert_allclose(coo.data, ref[coo.row, coo.col], atol=1e-5, rtol=0)
    assert (ref[~stored] == 1).all()
    assert stored.sum() == (ref < 1).sum()


def test_table_lookups_and_the_kernel_alone_give_the_same_graph(data):
    x, full_rank, _ = data
    width = knn_columns_needed(K1, K2)
    knn = full_rank[:, :width]
    e = expanded_sets(knn, *neighbour_counts(K1))
    sims = np.take_along_axis(x @ x.T, knn, axis=1)
    base = kreciprocal_jaccard(x, K1, K2, max_distance=0.7, knn=knn, similarities=sims)
    computed = kreciprocal_jaccard(x, K1, K2, max_distance=0.7, knn=knn)  # every x_i·x_j computed
    assert (abs(base - computed) > 1e-6).nnz == 0 and base.nnz == computed.nnz
    # the kernel alone on V_qe
    rows = row_ids(e.indptr)
    v = local_query_expansion(encode(e, 2 * np.einsum("ij,ij->i", x[rows], x[e.indices]) - 2), knn, K2)
    g1 = jaccard_radius_graph(v, 0.7)
    assert g1.nnz == base.nnz and (abs(g1 - base) > 1e-6).nnz == 0
    # rows sorted by distance, symmetric
    for r in (0, 5, 100):
        seg = g1.data[g1.indptr[r]:g1.indptr[r + 1]]
        assert (np.diff(seg) >= 0).all()
    assert (g1 != g1.T).nnz == 0


def test_reciprocal_sets_hand_example():
    # 4 points; forward lists of length 2 (self included)
    knn = np.array([[0, 1], [1, 0], [2, 1], [3, 2]])
    r = reciprocal_neighbours(knn, 2).toarray()
    expected = np.array([[1, 1, 0, 0],   # 0<->1 mutual
                         [1, 1, 0, 0],   # 1 does not list 2
                         [0, 0, 1, 0],   # 2 lists 1 but 1 does not list 2; 3 lists 2 but 2 does not list 3
                         [0, 0, 0, 1]], np.float32)
    np.testing.assert_array_equal(r, expected)


def test_duplicates_get_zero_distance_and_are_neighbours():
    x = clustered_features(n=400, d=16, ids=30, noise=0.7, seed=3)
    x[[11, 12]] = x[10]  # three identical images
    graph = kreciprocal_jaccard(x, 10, 4, max_distance=0.5)
    for a, b in [(10, 11), (10, 12), (11, 12), (12, 10)]:
        assert graph[a, b] <= 1e-6
        assert b in graph.indices[graph.indptr[a]:graph.indptr[a + 1]]  # stored even when exactly 0
    for a in range(400):
        assert a in graph.indices[graph.indptr[a]:graph.indptr[a + 1]]  # diagonal stored
    assert (graph.data == 0).sum() >= 400  # explicit zeros are kept (the diagonal at least)
    labels = dbscan_labels(graph, eps=1e-5, min_samples=3)
    assert labels[10] >= 0 and labels[10] == labels[11] == labels[12]
    dense = graph.toarray()
    dense[~_stored_mask(graph)[1]] = 1.0
    np.testing.assert_array_equal(labels, DBSCAN(eps=1e-5, min_samples=3, metric="precomputed").fit_predict(dense))


def test_memory_grows_with_n_times_k_not_n_squared():
    n = 8000
    x = clustered_features(n=n, d=16, ids=400, noise=0.5, seed=5)
    tracemalloc.start()
    graph = kreciprocal_jaccard(x, 20, 6, max_distance=0.6)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert graph.nnz < 100 * n
    assert peak < n * n * 4 / 4  # well under a single dense float32 N×N matrix (256 MB)


def test_input_errors():
    x = clustered_features(n=100, d=8, ids=5)
    with pytest.raises(InputError):
        kreciprocal_jaccard(x, 10, 11)  # k2 > k1
    with pytest.raises(InputError):
        kreciprocal_jaccard(x, 10, 4, convention="zhong")
    knn = np.tile(np.arange(10), (100, 1))
    with pytest.raises(InputError):
        kreciprocal_jaccard(x, 10, 4, knn=knn[:, :5])  # too narrow
    bad = knn.copy()
    bad[:, 1] = bad[:, 0]
    with pytest.raises(InputError):
        kreciprocal_jaccard(x, 10, 4, knn=bad)  # repeated index
    with pytest.raises(InputError):
        kreciprocal_jaccard(x[:5], 10, 4)  # too few samples
    x_nan = x.copy()
    x_nan[0, 0] = np.nan
    with pytest.raises(InputError):
        kreciprocal_jaccard(x_nan, 10, 4)


def test_reciprocal_pair_equals_two_separate_computations():
    x = clustered_features(n=500, d=16, ids=40, noise=0.8, seed=2)
    rank = np.argsort(-(x @ x.T), axis=1, kind="stable")[:, :30]
    for n_forward, n_half in [(30, 16), (20, 11), (5, 5), (1, 1)]:
        r, rh = reciprocal_pair(rank, n_forward, n_half)
        for got, length in [(r, n_forward), (rh, n_half)]:
            want = reciprocal_neighbours(rank, length)
            assert got.has_sorted_indices and (got != want).nnz == 0 and (got.data == 1).all()




# ------------------------------------------------------------------------------------------------------------
# The compiled kernels against straightforward numpy


def numpy_min_sums(v):
    """m[i, j] = Σ_k min(V[i,k], V[j,k]) for a small dense float32 V, accumulated in float64."""
    return np.minimum(v[:, None, :].astype(np.float64), v[None, :, :]).sum(axis=2)


def random_encoding(n=300, m=300, groups=30, seed=6):
    """A sparse V like an encoding: positive float32 values, rows summing to 1, rows of a group sharing most
    of their support, two empty rows."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.7, 1.0, (groups, m)) * (rng.random((groups, m)) < 0.06)
    v = base[rng.integers(0, groups, n)] * rng.uniform(0.5, 1.5, (n, m))  # same support, other values
    v *= rng.random((n, m)) < 0.8  # drop a fifth of it
    v += rng.gamma(0.7, 0.3, (n, m)) * (rng.random((n, m)) < 0.01)  # a few entries of its own
    v[[7, 150]] = 0
    v /= np.maximum(v.sum(axis=1, keepdims=True), 1e-12)
    return sp.csr_matrix(v.astype(np.float32))


@pytest.mark.parametrize("max_distance", [0.3, 0.8, 1.0])
def test_radius_graph_equals_numpy_min_sums(max_distance):
    v = random_encoding()
    m = numpy_min_sums(v.toarray())
    d = np.maximum(1 - m / (2 - m), 0)
    np.fill_diagonal(d, 0)
    empty = np.diff(v.indptr) == 0
    d[empty, empty] = 1
    want = (d <= max_distance) & ((m > 0) | np.eye(len(d), dtype=bool))
    graph = jaccard_radius_graph(v, max_distance)
    coo, stored = _stored_mask(graph)
    np.testing.assert_array_equal(stored, want)
    np.testing.assert_allclose(coo.data, d[coo.row, coo.col], atol=1e-6, rtol=0)
    assert (graph != graph.T).nnz == 0
    off_diagonal = want & ~np.eye(len(d), dtype=bool)
    assert off_diagonal.sum() > 50 and (~want).sum() > len(d)  # pairs off the diagonal are found, not all


def test_stored_zeros_of_v_are_not_shared_support():
    v = random_encoding(n=200, m=200, seed=3)
    graph = jaccard_radius_graph(v, 1.0)
    # the same values with explicit zeros stored in every row (e.g. an underflowed softmax weight)
    dense = v.toarray()
    zeros = (dense == 0) & (np.random.default_rng(4).random(dense.shape) < 0.1)
    coo = v.tocoo()
    rows = np.concatenate([coo.row, np.nonzero(zeros)[0]])
    cols = np.concatenate([coo.col, np.nonzero(zeros)[1]])
    vals = np.concatenate([coo.data, np.zeros(int(zeros.sum()), np.float32)])
    with_zeros = sp.csr_matrix((vals, (rows, cols)), shape=v.shape)
    assert with_zeros.nnz == v.nnz + zeros.sum()
    other = jaccard_radius_graph(with_zeros, 1.0)
    assert other.nnz == graph.nnz
    np.testing.assert_array_equal(other.indices, graph.indices)
    np.testing.assert_array_equal(other.data, graph.data)


def test_min_sum_block_equals_numpy_min_sums():
    v = random_encoding(n=250, m=250, seed=8)  # square, like V_qe (N, N)
    m = numpy_min_sums(v.toarray())
    inv = InvertedIndex(v)
    for r0, r1, j0 in [(0, 250, 0), (0, 40, 40), (13, 17, 200), (249, 250, 249)]:
        got = min_sum_block(inv, r0, r1, j0)
        assert got.shape == (r1 - r0, 250 - j0) and got.dtype == np.float32
        np.testing.assert_allclose(got, m[r0:r1, j0:], atol=1e-6, rtol=0)
    assert (m[:40, 40:] > 0).mean() > 0.3  # rows do share columns


def test_pattern_dots_read_the_table_or_compute():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((60, 24)).astype(np.float32)
    pattern = sp.random(60, 60, density=0.2, format="csr", random_state=10, dtype=np.float32)
    pattern.sort_indices()
    rows = row_ids(pattern.indptr)
    want = np.einsum("ij,ij->i", x[rows].astype(np.float64), x[pattern.indices].astype(np.float64))
    np.testing.assert_allclose(pattern_dots(x, pattern), want, atol=1e-4, rtol=1e-5)
    # a table holding some pairs with marker values: (i, j) first, else (j, i), else computed
    knn = np.stack([np.arange(60), (np.arange(60) + 1) % 60], axis=1)
    table = np.stack([np.full(60, 100.0), np.full(60, 200.0)], axis=1).astype(np.float32)
    got = pattern_dots(x, pattern, knn, table)
    cols = pattern.indices
    expect = np.where(cols == rows, 100.0, np.where(cols == (rows + 1) % 60, 200.0,
                                                    np.where(rows == (cols + 1) % 60, 200.0, want)))
    np.testing.assert_allclose(got, expect, atol=1e-4, rtol=1e-5)
    assert (cols == (rows + 1) % 60).any() and (rows == (cols + 1) % 60).any()


def test_numba_cache_dir_only_for_a_read_only_package(tmp_path):
    read_only = str(tmp_path / "not-writable")  # missing: cannot be written, even by root
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert numba_cache_dir(env, read_only, False) == str(tmp_path / "xdg" / "partreid" / "numba")
    assert numba_cache_dir({}, read_only, False).endswith("/.cache/partreid/numba")
    assert numba_cache_dir(env, str(tmp_path), False) is None  # writable: numba's __pycache__ beside the module
    assert numba_cache_dir({**env, "NUMBA_CACHE_DIR": "/mine"}, read_only, False) is None  # the user's choice
    assert numba_cache_dir(env, read_only, True) is None  # numba already imported: too late to change it
