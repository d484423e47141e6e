"""Sparse k-reciprocal Jaccard (partreid.common.retrieval.kreciprocal) against a plain dense implementation of reference-spec §D.1."""

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import DBSCAN

from partreid.common.errors import InputError
from partreid.common.retrieval.kreciprocal import (expanded_sets, jaccard_radius_graph, knn_columns_needed, kreciprocal_jaccard,
                                local_query_expansion, neighbour_counts, reciprocal_neighbours)
from partreid.pplr_finetune.pseudo_labels import dbscan_labels


# ------------------------------------------------------------------------------------------------------------
# The dense reference: §D.1 written the way the original code does it (Python loops, three N×N arrays).
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


def test_chunking_and_order_do_not_change_the_graph(data):
    x, full_rank, _ = data
    width = knn_columns_needed(K1, K2)
    knn = full_rank[:, :width]
    e = expanded_sets(knn, *neighbour_counts(K1))
    sims = np.take_along_axis(x @ x.T, knn, axis=1)
    base = kreciprocal_jaccard(x, K1, K2, max_distance=0.7, knn=knn, similarities=sims)
    small = kreciprocal_jaccard(x, K1, K2, max_distance=0.7, knn=knn, chunk_elems=997)
    assert (abs(base - small) > 1e-6).nnz == 0 and base.nnz == small.nnz
    # the kernel alone, with and without a row order
    from partreid.common.retrieval.kreciprocal import encode, lookup_pairs, _row_ids
    rows = _row_ids(e.indptr)
    vals, found = lookup_pairs(rows, e.indices.astype(np.int64), knn, sims)
    assert found.mean() > 0.5
    v = local_query_expansion(encode(e, 2 * np.einsum("ij,ij->i", x[rows], x[e.indices]) - 2), knn, K2)
    g1 = jaccard_radius_graph(v, 0.7)
    g2 = jaccard_radius_graph(v, 0.7, order=np.random.default_rng(0).permutation(x.shape[0]))
    assert g1.nnz == g2.nnz == base.nnz and (abs(g1 - g2) > 1e-6).nnz == 0
    # rows sorted by distance, symmetric
    for r in (0, 5, 100):
        seg = g1.data[g1.indptr[r]:g1.indptr[r + 1]]
        assert (np.diff(seg) >= 0).all()
    assert (abs(g1 - g1.T) > 1e-6).nnz == 0


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


def test_forked_workers_give_the_same_graph(data, monkeypatch, caplog):
    import logging

    import partreid.common.retrieval.kreciprocal as kr

    x, full_rank, _ = data
    knn = full_rank[:, :knn_columns_needed(K1, K2)]
    single = kreciprocal_jaccard(x, K1, K2, max_distance=0.7, knn=knn, n_jobs=1)
    monkeypatch.setattr(kr, "_FORK_MIN_TERMS", 0)
    monkeypatch.setattr(kr, "_FORK_MIN_ROWS", 0)
    with caplog.at_level(logging.DEBUG, logger="partreid"):
        forked = kreciprocal_jaccard(x, K1, K2, max_distance=0.7, knn=knn, n_jobs=3)
    assert not [r for r in caplog.records if "failed" in r.getMessage()]  # the children did the work
    assert forked.nnz == single.nnz
    np.testing.assert_array_equal(forked.indptr, single.indptr)
    np.testing.assert_array_equal(forked.indices, single.indices)
    np.testing.assert_array_equal(forked.data, single.data)


def test_fork_map_redoes_a_failed_child():
    import os

    from partreid.common.retrieval.kreciprocal import _fork_map

    parent = os.getpid()

    def work(a, b):
        if os.getpid() != parent and a == 10:
            raise RuntimeError("child failure")
        return (np.arange(a, b),)

    parts = _fork_map(work, [(0, 10), (10, 20), (20, 30)])
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), np.arange(30))


def test_fork_map_cleans_up_when_the_parent_fails(monkeypatch):
    import os

    import partreid.common.retrieval.kreciprocal as kr

    parent = os.getpid()
    forked = []
    real_fork = os.fork

    def recording_fork():
        pid = real_fork()
        if pid:
            forked.append(pid)
        return pid

    monkeypatch.setattr(kr.os, "fork", recording_fork)

    def work(a, b):
        if os.getpid() == parent:
            raise ValueError("parent failure")
        return (np.arange(a, b),)

    with pytest.raises(ValueError):
        kr._fork_map(work, [(0, 10), (10, 20)])
    assert len(forked) == 1
    with pytest.raises(ChildProcessError):
        os.waitpid(forked[0], os.WNOHANG)  # already reaped: no zombie left behind


# ------------------------------------------------------------------------------------------------------------
# The pruned min-sum kernel: light entries, candidate pairs, exact verification


def test_light_entries_are_the_lightest_within_the_budget():
    from partreid.common.retrieval.kreciprocal import light_entries

    rows = [
        [0.5, 0.1, 0.2, 0.05, 0.15],  # sorted: .05 .1 .15 .2 .5 → budget .31 holds .05+.1+.15
        [0.15, 0.15, 0.15, 0.55],  # .15+.15 fits, the third does not and ties with them: all three heavy
        [0.4, 0.6],  # nothing fits
        [0.1, 0.05],  # everything fits
        [],  # empty row
    ]
    data = np.concatenate([np.asarray(r, np.float32) for r in rows])
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    v = sp.csr_matrix((data, np.concatenate([np.arange(len(r)) for r in rows]).astype(np.int32), indptr),
                      shape=(5, 6))
    light, mass = light_entries(v, 0.31)
    expected = [[False, True, False, True, True], [False, False, False, False], [False, False], [True, True], []]
    np.testing.assert_array_equal(light, np.concatenate([np.asarray(e, bool) for e in expected]))
    np.testing.assert_allclose(mass, [0.3, 0.0, 0.0, 0.15, 0.0], atol=1e-7)
    light0, mass0 = light_entries(v, 0.0)
    assert not light0.any() and (mass0 == 0).all()


def test_light_entries_invariants_on_random_rows():
    from partreid.common.retrieval.kreciprocal import light_entries

    rng = np.random.default_rng(4)
    v = sp.random(300, 400, density=0.08, format="csr", random_state=5, dtype=np.float32)
    v.data = rng.gamma(0.7, 1.0, v.nnz).astype(np.float32)
    v.data[::17] = v.data[1::17][: v.data[::17].size]  # some ties
    sigma = 0.8
    light, mass = light_entries(v, sigma)
    for i in range(v.shape[0]):
        seg = slice(v.indptr[i], v.indptr[i + 1])
        vals, lt = v.data[seg], light[seg]
        assert abs(vals[lt].astype(np.float64).sum() - mass[i]) < 1e-5
        assert mass[i] <= sigma + 1e-6
        if lt.any() and (~lt).any():
            assert vals[lt].max() < vals[~lt].min()  # light = strictly lighter than every heavy entry
        if (~lt).any():  # maximal: the lightest heavy value (and its ties) would break the budget
            smallest = vals[~lt].min()
            assert mass[i] + smallest * (vals == smallest).sum() > sigma - 1e-6


@pytest.mark.parametrize("max_distance", [0.3, 0.6, 0.9, 1.0])
def test_pruned_kernel_equals_the_full_kernel(max_distance):
    import partreid.common.retrieval.kreciprocal as kr

    x = clustered_features(n=2500, d=24, ids=120, noise=0.9, seed=11)
    full_rank = np.argsort(-(x.astype(np.float64) @ x.T.astype(np.float64)), axis=1, kind="stable")
    knn = full_rank[:, :knn_columns_needed(K1, K2)]
    v = local_query_expansion(kr.encode(expanded_sets(knn, *neighbour_counts(K1)),
                                        2 * _dots_for(x, expanded_sets(knn, *neighbour_counts(K1))) - 2), knn, K2)
    full = kr._JaccardKernel(v.tocsr(), max_distance, 4096, light_fraction=0.0)
    assert not full.verify
    ref = full.run(0, x.shape[0])
    for fraction, chunk in [(0.3, 4096), (0.45, 300), (0.3, 50)]:  # small chunks: the renumbered-target path
        pruned = kr._JaccardKernel(v.tocsr(), max_distance, chunk, light_fraction=fraction)
        assert pruned.verify == (max_distance < 1.0)
        if pruned.verify:
            assert pruned.total_terms < 0.8 * full.total_terms  # it does skip work
        got = pruned.run(0, x.shape[0])
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_allclose(got[2], ref[2], atol=2e-6, rtol=0)
    assert ref[0].size > 1000  # a meaningful number of pairs within max_distance


def _dots_for(x, pattern):
    from partreid.common.retrieval.kreciprocal import _row_ids

    rows = _row_ids(pattern.indptr)
    return np.einsum("ij,ij->i", x[rows], x[pattern.indices]).astype(np.float32)


def test_reciprocal_pair_equals_two_separate_computations():
    from partreid.common.retrieval.kreciprocal import reciprocal_pair

    x = clustered_features(n=500, d=16, ids=40, noise=0.8, seed=2)
    rank = np.argsort(-(x @ x.T), axis=1, kind="stable")[:, :30]
    for n_forward, n_half in [(30, 16), (20, 11), (5, 5), (1, 1)]:
        r, rh = reciprocal_pair(rank, n_forward, n_half)
        for got, length in [(r, n_forward), (rh, n_half)]:
            want = reciprocal_neighbours(rank, length)
            assert got.has_sorted_indices and (got != want).nnz == 0 and (got.data == 1).all()


def test_pair_dots_match_numpy_in_any_row_order_and_chunking():
    from partreid.common.retrieval.kreciprocal import pair_dots

    rng = np.random.default_rng(9)
    x = rng.standard_normal((300, 40)).astype(np.float32)
    rows = rng.integers(0, 300, 5000)
    cols = rng.integers(0, 300, 5000)
    want = np.einsum("ij,ij->i", x[rows].astype(np.float64), x[cols].astype(np.float64))
    for chunk in (1 << 16, 777, 1):  # chunks that split a row's pairs, down to one pair per call
        np.testing.assert_allclose(pair_dots(x, rows, cols, chunk=chunk), want, atol=1e-4, rtol=1e-5)
    srt = np.argsort(rows, kind="stable")
    np.testing.assert_allclose(pair_dots(x, rows[srt], cols[srt]), want[srt], atol=1e-4, rtol=1e-5)
    assert pair_dots(x, rows[:0], cols[:0]).shape == (0,)


def test_lookup_pairs_hand_example():
    from partreid.common.retrieval.kreciprocal import lookup_pairs

    knn = np.array([[0, 2, 1], [1, 0, 2], [2, 1, 0]])
    vals = np.array([[1.0, 0.5, 0.25], [1.0, 0.75, 0.125], [1.0, 0.0, 0.375]], np.float32)
    got, found = lookup_pairs(np.array([0, 0, 1, 2, 2, 1]), np.array([1, 2, 2, 1, 0, 1]), knn, vals)
    np.testing.assert_array_equal(found, [True, True, True, True, True, True])
    np.testing.assert_array_equal(got, [0.25, 0.5, 0.125, 0.0, 0.375, 1.0])  # a stored 0.0 is still found
    got, found = lookup_pairs(np.array([0, 1]), np.array([1, 2]), knn[:, :2], vals[:, :2])
    np.testing.assert_array_equal(found, [False, False])
    np.testing.assert_array_equal(got, [0.0, 0.0])
