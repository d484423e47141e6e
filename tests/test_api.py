"""The public API: FeatureExtractor on every input kind gives the features of the extraction pipeline;
evaluate_rank on a distance matrix and on features agree with hand-made cases."""

import glob

import numpy as np
import pytest
import torch
from PIL import Image

import partreid
from partreid.common.errors import InputError
from partreid.common.extract import FeatureOptions, compute_batch, eval_transform
from tests.conftest import REPO


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return partreid.FeatureExtractor(model_path="random:vit_tiny", device="cpu", image_size=(64, 32), batch_size=3)


@pytest.fixture(scope="module")
def crops():
    return sorted(glob.glob(str(REPO / "data" / "sample" / "vtest" / "*.jpg")))[:5]


def test_every_input_kind_gives_the_same_rows(extractor, crops):
    by_path = extractor(crops)
    assert by_path["global"].shape == (5, 384) and by_path["parts"].shape == (5, 3, 192)
    assert by_path["global"].dtype == np.float32 and by_path["parts"].dtype == np.float32
    pil = [Image.open(p) for p in crops]
    arrays = [np.asarray(im.convert("RGB")) for im in pil]
    # independent route: the test transform and one compute_batch call over the whole stack
    loaded = extractor.loaded
    tf = eval_transform(loaded.image_size, loaded.pixel_mean, loaded.pixel_std)
    stack = torch.stack([tf(im.convert("RGB")) for im in pil])
    g, p = compute_batch(loaded, stack, FeatureOptions(fusion="cat"))
    np.testing.assert_allclose(by_path["global"], g.numpy(), atol=1e-5)
    np.testing.assert_allclose(by_path["parts"], p.numpy(), atol=1e-5)
    mixed = extractor([pil[0], arrays[1], crops[2], stack[3], stack[4:5]])
    np.testing.assert_allclose(mixed["global"], by_path["global"], atol=1e-5)
    one = extractor(arrays[2])  # a single H×W×3 array
    np.testing.assert_allclose(one["global"][0], by_path["global"][2], atol=1e-5)
    same_size = np.stack([np.asarray(im.convert("RGB").resize((32, 64))) for im in pil])  # N×H×W×3
    assert extractor(same_size)["global"].shape == (5, 384)


def test_bad_inputs_raise_one_line(extractor, tmp_path):
    with pytest.raises(InputError, match="uint8"):
        extractor(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InputError, match="no images"):
        extractor([])
    with pytest.raises(InputError):
        extractor(str(tmp_path / "missing.jpg"))
    with pytest.raises(InputError, match="cannot extract"):
        extractor(3)
    with pytest.raises(InputError, match="model_path or model"):
        partreid.FeatureExtractor()


def test_evaluate_rank_distmat_and_features():
    # 2 queries, 4 gallery entries; hand-computed: query 0 (pid 1, cam 0) ranks g = [2, 0, 1, 3] with
    # positives g0 (pid 1, cam 1) at rank 1 and g3 at rank 3 → AP = (1/2 + 2/4)/2 = 0.5, first hit rank 2;
    # query 1 (pid 2, cam 0): g1 first → AP 1, rank-1 hit. mINP: q0 2/4, q1 1/1.
    dist = np.array([[0.2, 0.5, 0.1, 0.9], [0.6, 0.1, 0.3, 0.4]], np.float32)
    q_pids, g_pids = np.array([1, 2]), np.array([1, 2, 3, 1])
    q_cams, g_cams = np.array([0, 0]), np.array([1, 1, 1, 1])
    m = partreid.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
    assert m["mAP"] == pytest.approx(0.75) and m["rank1"] == pytest.approx(0.5)
    assert m["cmc"][1] == pytest.approx(1.0) and m["mINP"] == pytest.approx(0.75)
    # 1-D features, squared Euclidean: query 0 ranks g = [2, 0, 3, 1] (positives at ranks 2 and 3 → AP
    # (1/2 + 2/3)/2 = 7/12), query 1 ranks g1 first (AP 1) → mAP 19/24
    qf = np.array([[0.0], [10.0]], np.float32)
    gf = np.array([[0.4], [10.0], [0.1], [0.9]], np.float32)
    m2 = partreid.evaluate_rank(None, q_pids, g_pids, q_cams, g_cams, qf=qf, gf=gf)
    assert m2["mAP"] == pytest.approx(19 / 24) and m2["rank1"] == pytest.approx(0.5)
    with pytest.raises(InputError, match="either distmat"):
        partreid.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, qf=qf, gf=gf)
