"""partreid.common.retrieval.search: faiss kNN against numpy brute force, tie order, self exclusion, approximate recall, errors."""

import numpy as np
import pytest

from partreid.common.errors import InputError
from partreid.common.retrieval.search import exclude_self_columns, faiss_gpu_available, knn_search


def _clustered(n=600, d=16, ids=30, noise=0.6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((ids, d))
    x = centers[rng.integers(0, ids, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_ip_matches_bruteforce():
    x = _clustered()
    sims, idx = knn_search(x, 10, metric="ip", chunk_size=128)
    full = x.astype(np.float64) @ x.T.astype(np.float64)
    ref = np.argsort(-full, axis=1, kind="stable")[:, :10]
    assert idx.dtype == np.int64 and sims.dtype == np.float32 and idx.shape == (600, 10)
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(full, ref, axis=1), atol=1e-5)
    np.testing.assert_array_equal(idx[:, 0], np.arange(600))  # self first


def test_exact_l2_with_separate_queries():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    q = rng.standard_normal((77, 8)).astype(np.float32)
    dist, idx = knn_search(x, 7, queries=q, metric="l2", chunk_size=10)
    full = ((q[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    ref = np.argsort(full, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(dist, np.take_along_axis(full, ref, axis=1), rtol=1e-4, atol=1e-4)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_chunk_size_does_not_change_result():
    x = _clustered(n=400)
    a = knn_search(x, 12, chunk_size=7)
    b = knn_search(x, 12, chunk_size=10_000)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)


def test_ties_self_first_then_ascending_index():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 6)).astype(np.float32)
    x[[3, 7, 11]] = x[5]  # four identical rows: 3, 5, 7, 11
    _, idx = knn_search(x, 4, metric="l2")
    assert list(idx[5]) == [5, 3, 7, 11]
    assert list(idx[7]) == [7, 3, 5, 11]
    assert list(idx[11]) == [11, 3, 5, 7]


def test_exclude_self_keeps_duplicates():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 5)).astype(np.float32)
    x[10] = x[4]
    _, idx = knn_search(x, 3, metric="l2", exclude_self=True)
    assert idx.shape == (50, 3)
    assert not (idx == np.arange(50)[:, None]).any()
    assert idx[4, 0] == 10 and idx[10, 0] == 4
    full = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_array_equal(np.sort(idx[:4], axis=1), np.sort(np.argsort(full[:4], axis=1)[:, :3], axis=1))


def test_exclude_self_columns_by_index():
    table = np.array([[0, 5, 6, 7],   # self first
                      [2, 1, 8, 9],   # self second (a duplicate ranked before it)
                      [3, 4, 5, 6]])  # self absent: first k kept
    np.testing.assert_array_equal(exclude_self_columns(table, 2), [[5, 6], [2, 8], [3, 4]])
    with pytest.raises(InputError):
        exclude_self_columns(table, 4)


@pytest.mark.parametrize("method", ["hnsw", "ivf"])
def test_approximate_recall(method):
    x = _clustered(n=3000, d=16, ids=60, noise=0.5, seed=4)
    _, exact = knn_search(x, 10)
    _, approx = knn_search(x, 10, method=method)
    assert approx.shape == (3000, 10) and approx.min() >= 0
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(exact, approx)])
    assert recall > 0.9
    again = knn_search(x, 10, method=method)[1]
    np.testing.assert_array_equal(approx, again)  # deterministic


def test_errors():
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(InputError):
        knn_search(x, 6)
    with pytest.raises(InputError):
        knn_search(x, 5, exclude_self=True)
    with pytest.raises(InputError):
        knn_search(x, 2, metric="cosine")
    with pytest.raises(InputError):
        knn_search(x, 2, method="lsh")
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(InputError):
        knn_search(bad, 2)
    with pytest.raises(InputError):
        knn_search(x, 2, queries=np.zeros((2, 4), np.float32))
    if not faiss_gpu_available():
        with pytest.raises(InputError):
            knn_search(x, 2, device="cuda")
