"""Evaluation core: exact mAP/CMC/mINP against a straightforward reference, CUHK03 SGS, top-k, pictures."""


import numpy as np
import pytest
from PIL import Image

from partreid.common.errors import InputError
from partreid.common.retrieval import evaluation
from partreid.common.retrieval.evaluation import (distance_chunks, evaluate_distances, evaluate_features, topk_per_query)
from partreid.cli._plots import (QUERY_COLOR, RIGHT_COLOR, WRONG_COLOR, ranked_list_layout, save_ranked_lists)

KEYS = ("mAP", "mINP", "rank1", "rank5", "rank10", "rank20")


# ------------------------------------------------------------------ independent straightforward reference

def reference_metrics(dist, qp, qc, gp, gc, max_rank=50):
    """Loop over queries, stable argsort, drop same-pid-same-cam, AP = mean of precision at each hit."""
    aps, inps, first = [], [], []
    for i in range(dist.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        junk = (gp[order] == qp[i]) & (gc[order] == qc[i])
        matches = (gp[order] == qp[i])[~junk]
        if not matches.any():
            continue
        hits = np.flatnonzero(matches)                        # 0-based ranks of the positives
        precision = np.arange(1, len(hits) + 1) / (hits + 1)
        aps.append(precision.mean())
        inps.append(len(hits) / (hits[-1] + 1))
        first.append(hits[0])
    first = np.array(first)
    cmc = np.array([(first <= k).mean() for k in range(max_rank)])
    return {"mAP": np.mean(aps), "mINP": np.mean(inps), "rank1": (first < 1).mean(),
            "rank5": (first < 5).mean(), "rank10": (first < 10).mean(), "rank20": (first < 20).mean(),
            "cmc": cmc, "num_valid_query": len(aps)}


def as_chunks(dist, size):
    return [(s, dist[s:s + size]) for s in range(0, dist.shape[0], size)]


def random_problem(seed, Q=40, G=150, n_pids=9, n_cams=4, levels=6):
    """Integer-valued float32 distances (many ties), distractors (pid 0), junk, queries without positives."""
    rng = np.random.default_rng(seed)
    qp = rng.integers(1, n_pids + 3, Q)                     # pids n_pids+1, n_pids+2 never in the gallery
    qc = rng.integers(0, n_cams, Q)
    gp = rng.integers(0, n_pids + 1, G)                     # pid 0 = distractor
    gc = rng.integers(0, n_cams, G)
    dist = rng.integers(0, levels, (Q, G)).astype(np.float32)
    return dist, qp, qc, gp, gc


def assert_same(got, ref):
    for key in KEYS:
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    np.testing.assert_allclose(got["cmc"], ref["cmc"][:len(got["cmc"])], atol=1e-9)
    assert got["num_valid_query"] == ref["num_valid_query"]


# ---------------------------------------------------------------------------------------------- Market

@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_with_ties_distractors_junk(seed):
    dist, qp, qc, gp, gc = random_problem(seed, levels=[3, 6, 40, 1000, 5, 2][seed])
    ref = reference_metrics(dist, qp, qc, gp, gc)
    got = evaluate_distances(as_chunks(dist, 7), qp, qc, gp, gc)
    assert_same(got, ref)
    assert got["num_query"] == 40 and got["num_gallery"] == 150
    assert 0 < got["num_valid_query"] < 40                  # some queries skipped (absent pids)
    assert got["cmc"].shape == (50,)


def test_reference_agrees_with_sklearn_ap_without_ties():
    # open-reid's AP (open-reid ``evaluation_metrics/ranking.py`` ``mean_ap``/``cmc``) is sklearn's
    # average_precision_score; equal to ours without ties
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(7)
    dist, qp, qc, gp, gc = random_problem(7)
    dist = rng.permutation(dist.size).reshape(dist.shape).astype(np.float32)   # all distinct
    got = evaluate_distances(as_chunks(dist, 11), qp, qc, gp, gc)
    aps = []
    for i in range(len(qp)):
        keep = ~((gp == qp[i]) & (gc == qc[i]))
        y = gp[keep] == qp[i]
        if y.any():
            aps.append(average_precision_score(y, -dist[i][keep]))
    assert got["mAP"] == pytest.approx(np.mean(aps), abs=1e-9)


def test_negative_zero_and_negative_distances_rank_like_argsort():
    rng = np.random.default_rng(3)
    dist, qp, qc, gp, gc = random_problem(3, levels=3)
    dist = dist - 1.0                                       # values -1, 0, 1
    dist[dist == 0] = np.where(rng.random((dist == 0).sum()) < 0.5, -0.0, 0.0)
    dist[:, ::5] = -1e-38                                   # tiny negatives (rounding of ‖q‖²+‖g‖²−2q·g)
    assert np.signbit(dist[dist == 0]).any()
    assert_same(evaluate_distances(as_chunks(dist, 40), qp, qc, gp, gc), reference_metrics(dist, qp, qc, gp, gc))


def test_chunk_size_invariance():
    dist, qp, qc, gp, gc = random_problem(11, levels=4)
    results = [evaluate_distances(as_chunks(dist, s), qp, qc, gp, gc) for s in (1, 3, 17, 40)]
    for r in results[1:]:
        for key in KEYS:
            assert r[key] == results[0][key]
        np.testing.assert_array_equal(r["cmc"], results[0]["cmc"])


def test_hand_computed_example():
    # query 0 (pid 1, cam 1); ranking by (distance, gallery index):
    #   g5 (0.2, neg) · g0 (0.5, junk: pid 1 cam 1, removed) · g1 (1.0, neg) · g2 (2.0, POS) · g3 (2.0, distractor;
    #   tie with g2, after it by index) · g4 (3.0, POS)
    #   -> positives at 0-based ranks 2 and 4: AP = (1/3 + 2/5)/2 = 11/30, INP = 2/5, first hit at rank 2.
    # query 1 (pid 3, cam 2): its one positive g5 is first: AP = 1, INP = 1.
    # query 2 (pid 9) has no gallery entry; query 3 (pid 2, cam 2) only junk: both skipped.
    gp = np.array([1, 2, 1, 0, 1, 3])
    gc = np.array([1, 2, 2, 3, 3, 1])
    qp = np.array([1, 3, 9, 2])
    qc = np.array([1, 2, 1, 2])
    dist = np.array([[0.5, 1.0, 2.0, 2.0, 3.0, 0.2],
                     [9.0, 9.0, 9.0, 9.0, 9.0, 0.1],
                     [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                     [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    r = evaluate_distances([(0, dist[:1]), (1, dist[1:])], qp, qc, gp, gc, max_rank=5)
    assert r["mAP"] == pytest.approx((11 / 30 + 1) / 2, abs=1e-12)
    assert r["mINP"] == pytest.approx((0.4 + 1) / 2, abs=1e-12)
    assert r["rank1"] == 0.5 and r["rank5"] == 1.0 and r["rank10"] == 1.0 and r["rank20"] == 1.0
    np.testing.assert_array_equal(r["cmc"], [0.5, 0.5, 1.0, 1.0, 1.0])
    assert (r["num_query"], r["num_valid_query"], r["num_gallery"]) == (4, 2, 6)


def test_no_valid_query_and_bad_chunks_raise():
    dist, qp, qc, gp, gc = random_problem(0)
    with pytest.raises(InputError, match="positive"):
        evaluate_distances(as_chunks(dist, 10), qp + 100, qc, gp, gc)
    with pytest.raises(InputError, match="expected 10"):
        evaluate_distances([(0, dist[:10]), (20, dist[20:])], qp, qc, gp, gc)
    with pytest.raises(InputError, match="cover 10 queries"):
        evaluate_distances([(0, dist[:10])], qp, qc, gp, gc)
    with pytest.raises(InputError, match="shape"):
        evaluate_distances([(0, dist[:, :-1])], qp, qc, gp, gc)
    bad = dist.copy()
    bad[3, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        evaluate_distances([(0, bad)], qp, qc, gp, gc)
    with pytest.raises(InputError, match="protocol"):
        evaluate_distances([(0, dist)], qp, qc, gp, gc, protocol="duke")
    with pytest.raises(InputError, match="q_camids"):
        evaluate_distances([(0, dist)], qp, qc[:-1], gp, gc)


# ---------------------------------------------------------------------------------------------- features

def test_distance_chunks_values_and_contract():
    rng = np.random.default_rng(0)
    qf = rng.normal(size=(13, 5)).astype(np.float32)
    gf = rng.normal(size=(21, 5)).astype(np.float32)
    blocks = list(distance_chunks(qf, gf, chunk_size=4))
    assert [s for s, _ in blocks] == [0, 4, 8, 12]
    assert all(d.dtype == np.float32 and d.shape[1] == 21 for _, d in blocks)
    d = np.concatenate([b for _, b in blocks]).astype(np.float64)
    q64, g64 = qf.astype(np.float64), gf.astype(np.float64)
    np.testing.assert_allclose(d, ((q64[:, None, :] - g64[None]) ** 2).sum(-1), rtol=1e-5, atol=1e-4)
    cos = np.concatenate([b for _, b in distance_chunks(qf, gf, metric="cosine", chunk_size=5)])
    qn = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
    gn = g64 / np.linalg.norm(g64, axis=1, keepdims=True)
    np.testing.assert_allclose(cos, 1 - qn @ gn.T, atol=1e-5)
    with pytest.raises(InputError, match="width"):
        distance_chunks(qf, gf[:, :4])
    with pytest.raises(InputError, match="NaN"):
        distance_chunks(np.full((2, 5), np.nan, np.float32), gf)
    with pytest.raises(InputError, match="metric"):
        distance_chunks(qf, gf, metric="manhattan")


def test_euclidean_blocks_round_like_the_peers_addmm():
    """Bit for bit fl((‖q‖² + ‖g‖²) + (−2)·fl(q·g)) in float32, the rounding of the peers'
    ``(‖q‖² + ‖g‖²).addmm_(q, gᵀ, beta=1, alpha=−2)``, for any chunk size (one 256-row tile here)."""
    from partreid.common.retrieval.evaluation import TILE_ROWS

    rng = np.random.default_rng(5)
    qf = rng.normal(size=(TILE_ROWS, 48)).astype(np.float32)
    gf = rng.normal(size=(300, 48)).astype(np.float32)
    qn = np.einsum("ij,ij->i", qf, qf)
    gn = np.einsum("ij,ij->i", gf, gf)
    expected = (qn[:, None] + gn[None, :]) + np.float32(-2.0) * (qf @ gf.T)
    assert expected.dtype == np.float32
    for chunk in (TILE_ROWS, 100, 7):
        got = np.concatenate([b for _, b in distance_chunks(qf, gf, chunk_size=chunk)])
        np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


def test_evaluate_features_matches_reference_on_dense_float64_distances():
    rng = np.random.default_rng(5)
    centers = rng.normal(size=(8, 16))
    qp, gp = rng.integers(0, 8, 30), rng.integers(0, 8, 90)
    qc, gc = rng.integers(0, 3, 30), rng.integers(0, 3, 90)
    qf = (centers[qp] + rng.normal(size=(30, 16))).astype(np.float32)
    gf = (centers[gp] + rng.normal(size=(90, 16))).astype(np.float32)
    dense = ((qf[:, None, :].astype(np.float64) - gf[None].astype(np.float64)) ** 2).sum(-1)
    ref = reference_metrics(dense, qp, qc, gp, gc)
    got = evaluate_features(qf, gf, qp, qc, gp, gc, chunk_size=7)
    assert_same(got, ref)
    assert 0.2 < got["mAP"] < 1.0


def test_evaluate_rerank_uses_reranking_module(monkeypatch):
    # evaluate --rerank: the re-ranked blocks, not the plain distances, are what gets ranked
    from partreid.cli import _stages
    from partreid.common.retrieval import reranking

    rng = np.random.default_rng(1)
    qf, gf = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(10, 4)).astype(np.float32)
    qp, qc, gp, gc = np.arange(6) % 3, np.zeros(6), np.arange(10) % 3, np.ones(10)
    fixed = np.tile(np.arange(10, dtype=np.float32)[::-1], (6, 1))          # reversed index order
    calls = []

    def fake(q, g, k1, k2, lambda_value, chunk_size):
        calls.append((q.shape, g.shape, k1, k2, lambda_value))
        return iter([(0, fixed[:4]), (4, fixed[4:])])

    monkeypatch.setattr(reranking, "reranked_distance_chunks", fake)
    got = _stages.evaluate_arrays(qf, gf, qp, gp, qc, gc, rerank=True, k1=7, k2=3, lambda_value=0.5)
    assert calls == [((6, 4), (10, 4), 7, 3, 0.5)]
    assert_same(got, reference_metrics(fixed, qp, qc, gp, gc))
    assert (got["rerank"], got["k1"], got["k2"], got["lambda"]) == (True, 7, 3, 0.5)
    with pytest.raises(InputError, match="euclidean"):
        _stages.evaluate_arrays(qf, gf, qp, gp, qc, gc, rerank=True, metric="cosine")


def test_evaluate_features_label_count_mismatch():
    qf, gf = np.ones((3, 2), np.float32), np.ones((4, 2), np.float32)
    with pytest.raises(InputError, match="3 query features but 2"):
        evaluate_features(qf, gf, [1, 2], [0, 0], [1, 2, 3, 4], [1, 1, 1, 1])


# ---------------------------------------------------------------------------------------------- CUHK03 SGS

def test_cuhk03_deterministic_when_one_candidate_per_pid():
    # every gallery pid has exactly one image in each of the two cameras, so the single-gallery-shot draw
    # among the other camera's images has a single outcome: the first-hit rank among other-camera entries
    rng = np.random.default_rng(2)
    n = 25
    gp, gc = np.repeat(np.arange(n), 2), np.tile([0, 1], n)
    qp, qc = rng.integers(0, n, 30), rng.integers(0, 2, 30)
    dist = rng.integers(0, 8, (30, 2 * n)).astype(np.float32)
    got = evaluate_distances(as_chunks(dist, 9), qp, qc, gp, gc, protocol="cuhk03", max_rank=20)
    first = []
    for i in range(30):
        cand = np.flatnonzero(gc != qc[i])
        order = cand[np.argsort(dist[i, cand], kind="stable")]
        first.append(np.flatnonzero(gp[order] == qp[i])[0])
    first = np.array(first)
    np.testing.assert_allclose(got["cmc"], [(first <= k).mean() for k in range(20)], atol=1e-12)
    assert got["rank1"] == pytest.approx((first == 0).mean(), abs=1e-12)
    # mAP/mINP are those of the Market protocol
    market = evaluate_distances(as_chunks(dist, 30), qp, qc, gp, gc)
    assert got["mAP"] == market["mAP"] and got["mINP"] == market["mINP"]


def expected_sgs_cmc(dist, qp, qc, gp, gc, max_rank):
    """Exact expectation of the single-gallery-shot CMC (Poisson-binomial over the other pids)."""
    curves = []
    for i in range(len(qp)):
        cand = np.flatnonzero(gc != qc[i])
        order = cand[np.argsort(dist[i, cand], kind="stable")]
        pos_rank = {int(g): r for r, g in enumerate(order)}
        positives = [g for g in order if gp[g] == qp[i]]
        if not positives:
            continue
        curve = np.zeros(max_rank)
        for p in positives:
            probs = []
            for pid in np.unique(gp[cand]):
                if pid == qp[i]:
                    continue
                members = cand[gp[cand] == pid]
                probs.append(np.mean([pos_rank[int(m)] < pos_rank[int(p)] for m in members]))
            pmf = np.zeros(len(probs) + 1)
            pmf[0] = 1.0
            for q in probs:
                pmf[1:] = pmf[1:] * (1 - q) + pmf[:-1] * q
                pmf[0] *= 1 - q
            curve += np.cumsum(np.pad(pmf, (0, max(0, max_rank - len(pmf)))))[:max_rank] / len(positives)
        curves.append(curve)
    return np.mean(curves, axis=0)


def test_cuhk03_sampling_law_matches_exact_expectation():
    rng = np.random.default_rng(4)
    G = 60
    gp, gc = rng.integers(0, 12, G), rng.integers(0, 3, G)
    qp, qc = rng.integers(0, 12, 8), rng.integers(0, 3, 8)
    dist = rng.integers(0, 20, (8, G)).astype(np.float32)
    expected = expected_sgs_cmc(dist, qp, qc, gp, gc, 12)
    got = evaluate_distances(as_chunks(dist, 3), qp, qc, gp, gc, protocol="cuhk03", max_rank=12,
                             sgs_repeats=3000, seed=1)
    assert np.abs(got["cmc"] - expected).max() < 0.02
    assert np.ptp(expected) > 0.3                          # the curve is not trivially flat
    # reproducible with the seed, independent of chunking, and the seed matters
    again = evaluate_distances(as_chunks(dist, 8), qp, qc, gp, gc, protocol="cuhk03", max_rank=12,
                               sgs_repeats=3000, seed=1)
    np.testing.assert_array_equal(got["cmc"], again["cmc"])
    other = evaluate_distances(as_chunks(dist, 8), qp, qc, gp, gc, protocol="cuhk03", max_rank=12,
                               sgs_repeats=3000, seed=2)
    assert not np.array_equal(got["cmc"], other["cmc"])


# ---------------------------------------------------------------------------------------------- top-k and pictures

def test_topk_per_query_stable_order_and_junk():
    dist, qp, qc, gp, gc = random_problem(8, levels=3)
    idx, d = topk_per_query(as_chunks(dist, 6), 12)
    for i in range(len(qp)):
        order = np.argsort(dist[i], kind="stable")[:12]
        np.testing.assert_array_equal(idx[i], order)
        np.testing.assert_array_equal(d[i], dist[i, order])
    idx, _ = topk_per_query(as_chunks(dist, 6), 12, q_pids=qp, q_camids=qc, g_pids=gp, g_camids=gc)
    for i in range(len(qp)):
        order = np.argsort(dist[i], kind="stable")
        order = order[~((gp[order] == qp[i]) & (gc[order] == qc[i]))][:12]
        np.testing.assert_array_equal(idx[i], order)
    idx, d = topk_per_query([(0, dist[:2, :5])], 8)
    assert (idx[:, 5:] == -1).all() and np.isinf(d[:, 5:]).all()


def test_ranked_list_picture_frames(tmp_path):
    colors = [(10 * i, 100, 255 - 10 * i) for i in range(8)]
    paths = []
    for i, c in enumerate(colors):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (20, 40), c).save(p)
        paths.append(str(p))
    query = [paths[0], paths[1]]
    gallery = paths[2:]                                     # 6 gallery images
    g_pids, g_camids = np.array([5, 7, 5, 5, 0, 7]), np.array([1, 2, 2, 1, 3, 1])
    q_pids, q_camids = np.array([5, 7]), np.array([1, 1])
    # query 0 ranking: g3 (pid 5 cam 1: junk, skipped), g1 (wrong), g2 (right), g0 (junk), g4 (wrong, distractor)
    topk_idx = np.array([[3, 1, 2, 0, 4, 5], [1, 5, 0, 2, 3, 4]])
    opened = []

    def open_image(key):
        opened.append(key)
        return Image.open(key)

    out = save_ranked_lists(query, gallery, topk_idx, q_pids, q_camids, g_pids, g_camids, n=2,
                            out_dir=tmp_path / "ranks", topk=3, open_image=open_image, tile_size=(32, 64),
                            border=3)
    assert [p.name for p in out] == ["query_00000.png", "query_00001.png"]
    assert not list((tmp_path / "ranks").glob(".*tmp"))
    (w, h), boxes = ranked_list_layout(4, (32, 64))
    im = np.asarray(Image.open(out[0]).convert("RGB"))
    assert im.shape == (h, w, 3)

    def frame(box):
        return tuple(im[box[1] + 1, box[0] + 1])

    def center(box):
        return tuple(im[(box[1] + box[3]) // 2, (box[0] + box[2]) // 2])

    assert frame(boxes[0]) == QUERY_COLOR and center(boxes[0]) == colors[0]
    assert frame(boxes[1]) == WRONG_COLOR and center(boxes[1]) == colors[2 + 1]
    assert frame(boxes[2]) == RIGHT_COLOR and center(boxes[2]) == colors[2 + 2]
    assert frame(boxes[3]) == WRONG_COLOR and center(boxes[3]) == colors[2 + 4]
    # query 1 (pid 7 cam 1): g1 right (cam 2), g5 junk (pid 7 cam 1) skipped, g0 wrong, g2 wrong
    im = np.asarray(Image.open(out[1]).convert("RGB"))
    assert [frame(b) for b in boxes[1:]] == [RIGHT_COLOR, WRONG_COLOR, WRONG_COLOR]
    assert center(boxes[1]) == colors[2 + 1]
    assert paths[2 + 1] in opened
    assert paths[2 + 3] not in opened and paths[2 + 5] not in opened   # junk is never opened


def test_real_cuhk03_thumbnails_both_protocols():
    # real images: 4×8 RGB thumbnails as features (a weak descriptor): numbers equal the reference, and the
    # counts are those of the split (one query id has no gallery image in the other camera)
    from tests.conftest import shared_data
    root = shared_data("cuhk03-labeled-val")

    def load(split):
        paths = sorted((root / split).glob("*.jpg"))
        pids = np.array([int(p.name[:4]) for p in paths])
        cams = np.array([int(p.name.split("_c")[1][0]) for p in paths])
        feats = np.stack([np.asarray(Image.open(p).convert("RGB").resize((4, 8)), dtype=np.float32).ravel()
                          for p in paths])
        return feats / np.linalg.norm(feats, axis=1, keepdims=True), pids, cams

    qf, qp, qc = load("query")
    gf, gp, gc = load("bounding_box_test")
    market = evaluate_features(qf, gf, qp, qc, gp, gc, chunk_size=64)
    assert (market["num_query"], market["num_gallery"]) == (200, 738)
    expected_valid = sum(((gp == p) & (gc != c)).any() for p, c in zip(qp, qc))
    assert market["num_valid_query"] == expected_valid
    dense = ((qf[:, None, :].astype(np.float64) - gf[None].astype(np.float64)) ** 2).sum(-1)
    assert_same(market, reference_metrics(dense, qp, qc, gp, gc))
    cuhk = evaluate_features(qf, gf, qp, qc, gp, gc, protocol="cuhk03", seed=3)
    assert cuhk["mAP"] == market["mAP"] and cuhk["num_valid_query"] == market["num_valid_query"]
    assert 0 < cuhk["rank1"] < 1 and np.all(np.diff(cuhk["cmc"]) >= 0)
    again = evaluate_features(qf, gf, qp, qc, gp, gc, protocol="cuhk03", seed=3, chunk_size=7)
    np.testing.assert_array_equal(cuhk["cmc"], again["cmc"])
