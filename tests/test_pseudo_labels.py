"""pplr_finetune.pseudo_labels: DBSCAN on sparse graphs (explicit zeros), quality metrics, eps sweep, files."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import DBSCAN

from partreid.common.errors import InputError
from partreid.pplr_finetune.pseudo_labels import (ClusterResult, cluster_features_file, cluster_quality, dbscan_labels,
                                         pseudo_labels, size_histogram, sweep_eps)


def clustered(n=1200, d=32, ids=60, noise=0.7, seed=0, outliers=40):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((ids, d))
    pids = rng.integers(0, ids, n)
    x = centers[pids] + noise * rng.standard_normal((n, d))
    x[:outliers] = 2.0 * rng.standard_normal((outliers, d))  # background images
    pids[:outliers] = -1
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), pids


@pytest.fixture(scope="module")
def clustering():
    x, pids = clustered()
    return x, pids, pseudo_labels(x, k1=20, k2=6, eps=0.6, min_samples=4, max_distance=0.7)


# ------------------------------------------------------------------------------------------------ DBSCAN


def _graph(n, entries):
    rows, cols, vals = zip(*entries)
    return sp.csr_matrix((np.array(vals, np.float32), (np.array(rows), np.array(cols))), shape=(n, n))


def test_explicit_zero_distances_count_as_neighbours():
    # points 0,1,2 are duplicates of each other (distance exactly 0, stored explicitly); 3-4 are 0.3 apart
    entries = [(a, b, 0.0) for a in range(3) for b in range(3) if a != b] + [(3, 4, 0.3), (4, 3, 0.3)]
    g = _graph(5, entries)
    assert g.nnz == 8 and (g.data == 0).sum() == 6  # the zeros really are stored
    labels = dbscan_labels(g, eps=0.5, min_samples=3)
    np.testing.assert_array_equal(labels, [0, 0, 0, -1, -1])
    # the test can fail: without the explicit zeros, 0-2 have no neighbours and become outliers
    dropped = g.copy()
    dropped.eliminate_zeros()
    np.testing.assert_array_equal(dbscan_labels(dropped, eps=0.5, min_samples=3), [-1] * 5)


def test_sparse_dbscan_equals_dense_dbscan():
    rng = np.random.default_rng(1)
    n = 300
    group = np.arange(n) // 10
    same = group[:, None] == group[None]
    dense = rng.uniform(0.1, 1, (n, n)).astype(np.float32)  # other groups: beyond eps
    near = same & (rng.uniform(size=(n, n)) < 0.4)
    dense[near] = rng.uniform(0, 0.1, near.sum())  # within a group: some pairs close
    dense[same & (rng.uniform(size=(n, n)) < 0.05)] = 0.0  # and some exact duplicates
    dense = np.minimum(dense, dense.T)
    np.fill_diagonal(dense, 0)
    eps = 0.05
    mask = dense <= eps
    g = sp.csr_matrix((dense[mask], np.nonzero(mask)), shape=(n, n))
    dense_far = np.where(mask, dense, 1.0)
    expected = DBSCAN(eps=eps, min_samples=3, metric="precomputed").fit_predict(dense_far)
    np.testing.assert_array_equal(dbscan_labels(g, eps, 3), expected)
    assert expected.max() >= 1 and (expected == -1).any()


def _random_graph(rng, n, density, symmetric, diag):
    dense = rng.uniform(0, 1, (n, n)).astype(np.float32)
    stored = rng.uniform(size=(n, n)) < density
    dense[rng.uniform(size=(n, n)) < 0.02] = 0.0  # exact duplicates
    if symmetric:
        dense, stored = np.minimum(dense, dense.T), stored | stored.T
    np.fill_diagonal(stored, False)
    if diag == "stored zero":
        np.fill_diagonal(stored, True)
        np.fill_diagonal(dense, 0.0)
    elif diag == "stored far":  # a self-distance above eps: the point is not its own neighbour
        np.fill_diagonal(stored, True)
        np.fill_diagonal(dense, 0.9)
    return sp.csr_matrix((dense[stored], np.nonzero(stored)), shape=(n, n))


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "directed"])
@pytest.mark.parametrize("diag", ["absent", "stored zero", "stored far"])
def test_dbscan_labels_equal_scikit_learn(symmetric, diag):
    """Label for label what scikit-learn's DBSCAN gives on the same sparse graph, over graphs whose border points
    touch several clusters (the symmetric fast path and the directed fall-back)."""
    rng = np.random.default_rng(7)
    checked = 0
    for trial in range(40):
        n = int(rng.integers(1, 120))
        g = _random_graph(rng, n, density=float(rng.uniform(0.01, 0.15)), symmetric=symmetric, diag=diag)
        for eps in (0.1, 0.3, 0.6):
            for min_samples in (1, 2, 3, 5):
                expected = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(g)
                np.testing.assert_array_equal(dbscan_labels(g, eps, min_samples), expected,
                                              err_msg=f"trial {trial} eps {eps} min_samples {min_samples}")
                checked += int(expected.max() >= 1 and (expected == -1).any())
    assert checked > 50  # several clusters and outliers, not only trivial labelings


def test_dbscan_errors():
    g = sp.csr_matrix((3, 3), dtype=np.float32)
    with pytest.raises(InputError):
        dbscan_labels(g, 0.0, 4)
    with pytest.raises(InputError):
        dbscan_labels(g, 0.5, 0)
    with pytest.raises(InputError):
        dbscan_labels(np.zeros((3, 3)), 0.5, 4)
    with pytest.raises(InputError):
        dbscan_labels(sp.csr_matrix(np.array([[0, -1.0], [-1.0, 0]])), 0.5, 1)


# ------------------------------------------------------------------------------------------------ quality


def test_cluster_quality_hand_computed():
    labels = np.array([0, 0, 0, 1, 1, -1, 1])
    pids = np.array([0, 0, 1, 1, 1, 1, -1])  # the last sample has no pid: not scored
    q = cluster_quality(labels, pids)
    # outlier -> singleton; clusters {0,1,2}: pids 0,0,1; {3,4}: 1,1; {5}: 1
    # TP = C(2,2) + C(2,2) = 2; predicted pairs = 3 + 1 = 4; true pairs = C(2,2) + C(4,2) = 7
    assert q["precision"] == pytest.approx(0.5)
    assert q["recall"] == pytest.approx(2 / 7)
    assert q["f_score"] == pytest.approx(4 / 11)
    # ARI = (2 - 4*7/15) / ((4+7)/2 - 4*7/15)
    assert q["ari"] == pytest.approx((2 - 28 / 15) / (5.5 - 28 / 15))
    # NMI (arithmetic mean) from the entropies
    def h(counts):
        p = np.asarray(counts, float) / sum(counts)
        return -(p * np.log(p)).sum()
    joint = [2, 1, 2, 1]  # (c0,p0) (c0,p1) (c1,p1) (c2,p1)
    mi = h([3, 2, 1]) + h([2, 4]) - h(joint)
    assert q["nmi"] == pytest.approx(mi / ((h([3, 2, 1]) + h([2, 4])) / 2))
    assert q["num_scored"] == 6 and q["outlier_fraction"] == pytest.approx(1 / 6)


def test_pairwise_scores_match_bruteforce():
    rng = np.random.default_rng(2)
    labels = rng.integers(-1, 8, 150)
    pids = rng.integers(0, 6, 150)
    q = cluster_quality(labels, pids)
    same_cluster = (labels[:, None] == labels[None]) & (labels[:, None] >= 0)
    same_pid = pids[:, None] == pids[None]
    iu = np.triu_indices(150, 1)
    tp = (same_cluster & same_pid)[iu].sum()
    assert q["precision"] == pytest.approx(tp / same_cluster[iu].sum())
    assert q["recall"] == pytest.approx(tp / same_pid[iu].sum())


def test_nmi_and_ari_equal_scikit_learn():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(3)
    cases = [(np.zeros(5, int), np.zeros(5, int)), (np.arange(6), np.arange(6)), (np.zeros(6, int), np.arange(6)),
             (np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0])), (np.array([4]), np.array([9]))]
    for _ in range(60):
        n = int(rng.integers(2, 300))
        cases.append((rng.integers(0, int(rng.integers(1, 30)), n), rng.integers(0, int(rng.integers(1, 30)), n)))
    for labels, pids in cases:
        q = cluster_quality(labels, pids)
        assert q["nmi"] == pytest.approx(normalized_mutual_info_score(pids, labels), abs=1e-12)
        assert q["ari"] == pytest.approx(adjusted_rand_score(pids, labels), abs=1e-12)


def test_size_histogram():
    labels = np.array([0] * 4 + [1] * 5 + [2] * 12 + [-1] * 3)
    text = size_histogram(labels)
    lines = {ln.split("|")[0].strip(): ln for ln in text.splitlines()[1:]}
    assert lines["4-5"].endswith(" 2") and lines["11-20"].endswith(" 1")
    assert "3 samples" in lines["outliers"]
    assert "6-10" not in lines


# ------------------------------------------------------------------------------------------------ pipeline


def test_pseudo_labels_end_to_end(clustering):
    x, pids, res = clustering
    assert isinstance(res, ClusterResult)
    assert res.labels.dtype == np.int64 and res.labels.shape == (1200,)
    assert res.knn.shape == (1200, 20) and res.knn.dtype == np.int64
    np.testing.assert_array_equal(res.knn[:, 0], np.arange(1200))
    assert res.max_distance == 0.7 and res.graph.data.max() <= 0.7
    assert (abs(res.graph - res.graph.T) > 1e-6).nnz == 0
    assert {"knn", "reciprocal", "encoding", "query_expansion", "jaccard", "dbscan", "total"} <= set(res.timings)
    q = cluster_quality(res.labels, pids)
    assert q["ari"] > 0.9 and 40 <= res.num_clusters <= 80
    assert (res.labels[:40] == -1).mean() > 0.5  # most background images are outliers
    # unnormalised input: rows are normalised first, same labels
    scaled = pseudo_labels(x * np.linspace(0.5, 3, 1200, dtype=np.float32)[:, None], k1=20, eps=0.6)
    np.testing.assert_array_equal(scaled.labels, res.labels)


def test_approximate_knn_gives_the_same_labels(clustering):
    x, _, res = clustering
    approx = pseudo_labels(x, k1=20, k2=6, eps=0.6, knn="approximate")
    np.testing.assert_array_equal(approx.labels, res.labels)


def test_sweep_eps(clustering):
    x, pids, res = clustering
    eps_values = [0.4, 0.5, 0.6, 0.7]
    table = sweep_eps(res.graph, eps_values, 4, pids=pids, max_distance=res.max_distance)
    assert list(table["eps"]) == eps_values
    assert {"clusters", "outliers", "largest", "nmi", "ari", "precision", "recall", "f_score"} <= set(table)
    for eps, row in zip(eps_values, table.itertuples()):
        labels = dbscan_labels(res.graph, eps, 4)
        assert row.clusters == labels.max() + 1 and row.outliers == (labels == -1).sum()
        assert row.ari == pytest.approx(cluster_quality(labels, pids)["ari"])
    assert (np.diff(table["outliers"]) <= 0).all()  # a larger radius never creates outliers
    np.testing.assert_array_equal(dbscan_labels(res.graph, 0.6, 4), res.labels)
    assert "nmi" not in sweep_eps(res.graph, [0.5], 4)
    with pytest.raises(InputError):
        sweep_eps(res.graph, [0.8], 4, max_distance=res.max_distance)


def test_pseudo_labels_errors():
    x, _ = clustered(n=100)
    with pytest.raises(InputError):
        pseudo_labels(x[:10], k1=20)
    with pytest.raises(InputError):
        pseudo_labels(x, k1=20, knn="fast")
    with pytest.raises(InputError):
        pseudo_labels(x, k1=20, convention="zhong")
    with pytest.raises(InputError):
        pseudo_labels(x[:, :, None], k1=20)


def test_cluster_features_file(tmp_path):
    from partreid.common.h5io import read_labels, write_features

    x, pids = clustered(n=500, ids=25, seed=5)
    feats = tmp_path / "f.h5"
    write_features(feats, x, None, [f"img{i:04d}.jpg" for i in range(500)], pids, np.zeros(500, np.int64),
                   {"normalized": True, "command": "test"})
    out, report = cluster_features_file(feats, tmp_path / "labels.h5", k1=20, k2=6, eps=0.6, min_samples=4,
                                        convention="reference", knn="exact", sweep=[0.5, 0.6, 0.7],
                                        command="cluster f.h5")
    lab = read_labels(out)
    expected = pseudo_labels(x, k1=20, k2=6, eps=0.6, min_samples=4)
    np.testing.assert_array_equal(lab.labels, expected.labels)
    np.testing.assert_array_equal(lab.knn, expected.knn)
    np.testing.assert_array_equal(lab.pid, pids)
    assert lab.attrs["k1"] == 20 and lab.attrs["eps"] == 0.6 and lab.attrs["convention"] == "reference"
    assert lab.attrs["num_clusters"] == expected.num_clusters
    assert "NMI" in report and "eps sweep" in report and "outliers" in report
    assert math.isclose(float(report.count("\n")), report.count("\n"))  # plain text
