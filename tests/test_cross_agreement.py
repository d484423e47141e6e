"""pplr_finetune.cross_agreement: PPLR Eq. 1 against per-sample Python sets, self handling, files."""

import numpy as np
import pytest

from partreid.common.errors import InputError
from partreid.pplr_finetune.cross_agreement import (agreement_statistics, cross_agreement, cross_agreement_from_features,
                                           refine_labels_file)


def python_sets(global_knn, part_knn):
    n, n_parts = part_knn.shape[:2]
    out = np.zeros((n, n_parts))
    for i in range(n):
        a = set(global_knn[i].tolist())
        for p in range(n_parts):
            b = set(part_knn[i, p].tolist())
            out[i, p] = len(a & b) / len(a | b)
    return out


def brute_force_sets(feats, k):
    """Top-k most similar other samples (cosine), self excluded by index."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sim = f.astype(np.float64) @ f.T.astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def test_hand_example():
    g = np.array([[1, 2, 3], [0, 2, 3]])
    parts = np.array([[[2, 3, 4], [1, 2, 3], [5, 6, 7]],
                      [[0, 2, 3], [4, 5, 2], [3, 0, 6]]])
    expected = [[2 / 4, 1.0, 0.0], [1.0, 1 / 5, 2 / 4]]
    got = cross_agreement(g, parts)
    assert got.dtype == np.float32 and got.shape == (2, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_equals_per_sample_sets():
    rng = np.random.default_rng(0)
    n, n_parts, k = 300, 3, 8
    g = np.stack([rng.choice(40, k, replace=False) for _ in range(n)])
    parts = np.stack([[rng.choice(40, k, replace=False) for _ in range(n_parts)] for _ in range(n)])
    np.testing.assert_allclose(cross_agreement(g, parts), python_sets(g, parts), rtol=1e-6)
    # sets of different sizes
    np.testing.assert_allclose(cross_agreement(g[:, :5], parts), python_sets(g[:, :5], parts), rtol=1e-6)


def _part_features(n=400, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 20, n)
    centers = rng.standard_normal((20, 3, 16))
    parts = centers[ids] + rng.normal(0, [0.5, 1.0, 2.0], (n, 3))[:, :, None] * rng.standard_normal((n, 3, 16))
    g = rng.standard_normal((20, 48))[ids] + 0.6 * rng.standard_normal((n, 48))
    return g.astype(np.float32), parts.astype(np.float32)


def test_from_features_equals_bruteforce_sets():
    g, parts = _part_features()
    k = 10
    got = cross_agreement_from_features(g, parts, k)
    g_sets = brute_force_sets(g, k)
    p_sets = np.stack([brute_force_sets(parts[:, p], k) for p in range(3)], axis=1)
    np.testing.assert_allclose(got, python_sets(g_sets, p_sets), atol=1e-6)
    # noisier parts agree less with the global feature
    means = got.mean(axis=0)
    assert means[0] > means[1] > means[2]


def test_reuses_global_lists_and_excludes_self_by_index():
    g, parts = _part_features(n=200, seed=2)
    g[7] = g[3]
    parts[7] = parts[3]  # an exact duplicate image
    from partreid.common.retrieval.search import knn_search
    _, table = knn_search(g / np.linalg.norm(g, axis=1, keepdims=True), 15)  # self included, like `cluster`
    with_lists = cross_agreement_from_features(g, parts, 10, global_knn=table)
    without = cross_agreement_from_features(g, parts, 10)
    np.testing.assert_allclose(with_lists, without)
    short = cross_agreement_from_features(g, parts, 10, global_knn=table[:, :5])  # too short: searched again
    np.testing.assert_allclose(short, without)
    # the duplicate stays in the other's sets, self never does
    assert with_lists[3, 0] == with_lists[7, 0] == pytest.approx(
        python_sets(brute_force_sets(g, 10)[[3]], brute_force_sets(parts[:, 0], 10)[[3]][:, None])[0, 0])


def test_errors():
    g = np.array([[1, 2], [0, 2], [0, 1]])
    with pytest.raises(InputError):
        cross_agreement(g, np.zeros((2, 3, 2), np.int64))
    with pytest.raises(InputError):
        cross_agreement(np.array([[1, 1], [0, 2], [0, 1]]), np.ones((3, 1, 2), np.int64) * [[[0, 1]]])
    with pytest.raises(InputError):
        cross_agreement(g - 1, np.zeros((3, 1, 2), np.int64))
    with pytest.raises(InputError):
        cross_agreement_from_features(np.zeros((5, 4)), np.zeros((5, 2, 4)), k=5)


def test_statistics_table():
    a = np.array([[0.0, 1.0], [0.5, 1.0], [1.0, 1.0]], np.float32)
    stats = agreement_statistics(a)
    assert list(stats["mean"]) == pytest.approx([0.5, 1.0])
    assert list(stats["median"]) == pytest.approx([0.5, 1.0])


def test_refine_labels_file(tmp_path):
    from partreid.cli._plots import plot_agreement
    from partreid.common.h5io import read_labels, write_features
    from partreid.pplr_finetune.pseudo_labels import cluster_features_file

    g, parts = _part_features(n=300, seed=3)
    feats = tmp_path / "f.h5"
    write_features(feats, g / np.linalg.norm(g, axis=1, keepdims=True), parts, [f"{i}.jpg" for i in range(300)],
                   np.arange(300) % 20, np.zeros(300, np.int64), {"normalized": True, "command": "t"})
    labels_path, _ = cluster_features_file(feats, tmp_path / "l.h5", k1=30, k2=6, eps=0.6, min_samples=4)
    out, report = refine_labels_file(labels_path, tmp_path / "r.h5", k=20, command="refine-labels l.h5")
    refined = read_labels(out)
    base = read_labels(labels_path)
    np.testing.assert_array_equal(refined.labels, base.labels)
    np.testing.assert_array_equal(refined.knn, base.knn)
    assert refined.agreement.shape == (300, 3)
    np.testing.assert_allclose(refined.agreement, cross_agreement_from_features(g, parts, 20), atol=1e-6)
    assert refined.attrs["agreement_k"] == 20 and refined.attrs["k1"] == 30
    assert "reused" in report and "part" in report
    assert plot_agreement(refined.agreement, tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the features changed after clustering: the hash check refuses
    write_features(feats, g[::-1].copy(), parts, [f"{i}.jpg" for i in range(300)], np.arange(300) % 20,
                   np.zeros(300, np.int64), {"normalized": False, "command": "t"})
    with pytest.raises(InputError):
        refine_labels_file(labels_path, tmp_path / "r2.h5")
