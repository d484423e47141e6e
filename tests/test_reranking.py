"""partreid.common.retrieval.reranking against a dense k-reciprocal re-ranking written the way the original code does it."""

import numpy as np
import pytest

from partreid.common.errors import InputError
from partreid.common.retrieval.reranking import reranked_distance, reranked_distance_chunks


# Dense reference (Zhong et al. 2017 as in TransReID's re_ranking, float32 instead of float16): full (Q+G)²
# squared distances, column-max normalisation + transpose, argsort ranks, Python loops over samples.
def dense_rerank(qf, gf, k1=20, k2=6, lambda_value=0.3):
    nq = qf.shape[0]
    feat = np.concatenate([qf, gf]).astype(np.float32)
    n = feat.shape[0]
    sq = (feat ** 2).sum(1, keepdims=True)
    original = sq + sq.T - 2 * feat @ feat.T
    original = np.transpose(original / np.max(original, axis=0)).astype(np.float32)
    v = np.zeros_like(original)
    rank = np.argsort(original, axis=1, kind="stable")
    half = int(np.around(k1 / 2))
    for i in range(n):
        forward = rank[i, :k1 + 1]
        backward = rank[forward, :k1 + 1]
        r = forward[np.where(backward == i)[0]]
        expansion = r
        for c in r:
            c_forward = rank[c, :half + 1]
            c_backward = rank[c_forward, :half + 1]
            r_c = c_forward[np.where(c_backward == c)[0]]
            if len(np.intersect1d(r_c, r)) > 2 / 3 * len(r_c):
                expansion = np.append(expansion, r_c)
        expansion = np.unique(expansion)
        w = np.exp(-original[i, expansion])
        v[i, expansion] = w / np.sum(w)
    original = original[:nq]
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = np.mean(v[rank[i, :k2]], axis=0)
        v = v_qe
    inv_index = [np.where(v[:, c] != 0)[0] for c in range(n)]
    jaccard = np.zeros_like(original)
    for i in range(nq):
        temp_min = np.zeros(n, np.float32)
        for c in np.where(v[i] != 0)[0]:
            temp_min[inv_index[c]] += np.minimum(v[i, c], v[inv_index[c], c])
        jaccard[i] = 1 - temp_min / (2 - temp_min)
    final = jaccard * (1 - lambda_value) + original * lambda_value
    return final[:, nq:]


def features(n=1000, d=32, ids=50, noise=0.8, seed=1):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((ids, d))
    x = centers[rng.integers(0, ids, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (10, 1, 0.5)])
def test_equals_dense_reference(k1, k2, lam):
    x = features()
    qf, gf = x[:150], x[150:]
    ref = dense_rerank(qf, gf, k1, k2, lam)
    got = reranked_distance(qf, gf, k1, k2, lam, chunk_size=37)
    assert got.shape == (150, 850) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # re-ranking changes the ranking compared with the plain distance (it is not a no-op)
    plain = ((qf[:, None] - gf[None]) ** 2).sum(-1)
    assert (np.argsort(got, axis=1)[:, :5] != np.argsort(plain, axis=1)[:, :5]).any()


def test_chunks_cover_all_queries_in_order():
    x = features(n=400, seed=2)
    qf, gf = x[:45], x[45:]
    starts, blocks = [], []
    for q0, block in reranked_distance_chunks(qf, gf, chunk_size=10):
        starts.append(q0)
        blocks.append(block)
    assert starts == [0, 10, 20, 30, 40] and blocks[-1].shape == (5, 355)
    np.testing.assert_allclose(np.concatenate(blocks), reranked_distance(qf, gf, chunk_size=1000), atol=1e-7)


def test_lambda_one_is_row_normalised_distance():
    x = features(n=300, seed=3)
    qf, gf = x[:20], x[20:]
    got = reranked_distance(qf, gf, lambda_value=1.0)
    d_all = ((qf[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    expected = d_all[:, 20:] / d_all.max(axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_errors():
    x = features(n=50, seed=4)
    with pytest.raises(InputError):
        list(reranked_distance_chunks(x[:5], x[5:, :10]))
    with pytest.raises(InputError):
        list(reranked_distance_chunks(x[:5], x[5:10]))  # 10 samples < k1 + 1
    with pytest.raises(InputError):
        list(reranked_distance_chunks(x[:5], x[5:], lambda_value=1.5))
