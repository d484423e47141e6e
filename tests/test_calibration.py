"""calibrate (threshold from pseudo-labels), the verification figures of evaluate, the no-camera protocol and
--split-query: checked against straightforward implementations and on synthetic identities."""

import json
import subprocess
import sys

import numpy as np
import pytest

from partreid.common.errors import InputError
from partreid.common.retrieval.evaluation import (evaluate_distances, same_person, split_query,
                                                  threshold_at_fmr)
from tests.conftest import script


def test_threshold_at_fmr_hand_computed():
    imp = np.array([0.1, 0.2, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    # FMR 0.3 of 10 impostors: 3 may match; the 3rd and 4th smallest differ -> midpoint of 0.2 and 0.4
    assert threshold_at_fmr(imp, 10, 0.3) == (pytest.approx(0.3), 3)
    # FMR 0.2: 2 may match, but 0.2 is tied at ranks 2 and 3 -> only the 0.1 can match
    assert threshold_at_fmr(imp, 10, 0.2) == (pytest.approx(0.15), 1)
    thr, n = threshold_at_fmr(imp, 10, 0.05)        # none may match: one ulp below the smallest
    assert n == 0 and thr < 0.1 and thr == pytest.approx(0.1, abs=1e-7)
    assert not same_person(np.float32(0.1), thr)
    with pytest.raises(InputError):
        threshold_at_fmr(imp, 10, 0)


def _brute_verification(d, qp, gp, fmr, threshold):
    gen = d[qp[:, None] == gp[None, :]]
    imp = np.sort(d[qp[:, None] != gp[None, :]])
    best = None
    for t in np.concatenate([[-1.0], imp]):          # every "accept up to this impostor" threshold
        f = (imp <= t).mean()
        if f <= fmr + 1e-12:
            best = t
    tpr = (gen <= best).mean() if best >= 0 else (gen < imp[0]).mean()
    return tpr, (imp <= threshold).mean(), (gen <= threshold).mean()


def test_verification_figures_match_a_straightforward_count():
    rng = np.random.default_rng(3)
    qp = rng.integers(0, 15, size=40)
    gp = rng.integers(0, 15, size=300)
    d = rng.random((40, 300)).astype(np.float32)
    d[qp[:, None] == gp[None, :]] *= 0.5            # genuine pairs closer
    m = evaluate_distances([(0, d[:17]), (17, d[17:])], qp, np.zeros(40, int), gp, np.ones(300, int),
                           verification=True, threshold=0.2)
    v = m["verification"]
    assert v["num_genuine"] + v["num_impostor"] == 40 * 300
    for f in (1e-2, 1e-3):
        tpr, _, _ = _brute_verification(d, qp, gp, f, 0.2)
        assert v[f"tpr@fmr={f:g}"] == pytest.approx(tpr)
    _, fmr_t, tpr_t = _brute_verification(d, qp, gp, 1e-2, 0.2)
    assert v["fmr@threshold"] == pytest.approx(fmr_t) and v["tpr@threshold"] == pytest.approx(tpr_t)


def test_no_camera_protocol_excludes_only_the_query_itself():
    rng = np.random.default_rng(0)
    pids = np.repeat(np.arange(6), 4)
    feats = rng.normal(size=(24, 5)).astype(np.float32) + 2 * np.eye(6, 5)[pids]
    d = ((feats[:, None] - feats[None]) ** 2).sum(-1).astype(np.float32)
    cams = np.full(24, -1)
    with pytest.raises(InputError, match="no-camera"):
        evaluate_distances([(0, d)], pids, cams, pids, cams)
    m = evaluate_distances([(0, d)], pids, cams, pids, cams, protocol="no-camera", q_self=np.arange(24))
    aps, r1 = [], []
    for i in range(24):
        others = np.delete(np.arange(24), i)
        order = others[np.argsort(d[i, others], kind="stable")]
        hits = pids[order] == pids[i]
        aps.append(np.mean(np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)))
        r1.append(hits[0])
    assert m["protocol"] == "no-camera" and m["num_valid_query"] == 24
    assert m["mAP"] == pytest.approx(np.mean(aps)) and m["rank1"] == pytest.approx(np.mean(r1))


def test_split_query_is_seeded_and_keeps_a_gallery_image():
    pids = np.array([1] * 5 + [2] * 2 + [3] + [4] * 3)
    q, g = split_query(pids, 2, seed=7)
    assert np.array_equal(np.sort(np.concatenate([q, g])), np.arange(len(pids)))
    counts = {p: int((pids[q] == p).sum()) for p in (1, 2, 3, 4)}
    assert counts == {1: 2, 2: 1, 3: 0, 4: 2}
    assert np.array_equal(split_query(pids, 2, seed=7)[0], q)
    with pytest.raises(InputError):
        split_query(np.arange(4), 1)


def _identities(out, ids, seed, noise, with_parts=True):
    """Features of synthetic identities: unit vectors around a random centre per id (2-11 images each)."""
    from partreid.common.h5io import write_features

    rng = np.random.default_rng(seed)
    n_img = rng.integers(2, 12, size=ids)
    pid = np.repeat(np.arange(ids), n_img)
    g = rng.normal(size=(ids, 32))[pid] + noise * rng.normal(size=(len(pid), 32))
    p = rng.normal(size=(ids, 3, 16))[pid] + noise * rng.normal(size=(len(pid), 3, 16))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    p /= np.linalg.norm(p, axis=2, keepdims=True)
    write_features(out, g, p, [f"{i:05d}.jpg" for i in range(len(pid))], pid, np.full(len(pid), -1),
                   {"normalized": True, "dataset_root": "/synthetic", "model_sha256": "synthetic"})
    return out


def test_calibrated_threshold_against_the_truth(tmp_path, capsys):
    """cluster + refine-labels on an unlabelled set -> calibrate -> evaluate on labelled identities of the same
    distribution reports the real FMR of that threshold. Estimated vs real FMR are printed (pytest -s)."""
    from partreid.common.calibration import calibrate_threshold, write_threshold
    from partreid.cli._stages import evaluate_files
    from partreid.pplr_finetune.cross_agreement import refine_labels_file
    from partreid.pplr_finetune.pseudo_labels import cluster_features_file

    train = _identities(tmp_path / "target.h5", 150, 0, 0.8)
    cluster_features_file(train, tmp_path / "labels.h5", k1=10, k2=3, eps=0.5, min_samples=3, device="cpu")
    refine_labels_file(tmp_path / "labels.h5", tmp_path / "refined.h5", k=10, device="cpu")
    test = _identities(tmp_path / "test.h5", 150, 1, 0.8)
    for fmr in (1e-2, 1e-3):
        rec = calibrate_threshold(tmp_path / "refined.h5", fmr=fmr)
        assert rec["estimated_fmr"] <= fmr and rec["clusters_used"] >= 2 and rec["num_impostor_pairs"] > 10 / fmr
        thr = write_threshold(tmp_path / f"thr{fmr:g}.json", rec)
        m = evaluate_files(test, None, split_query=1, threshold_file=thr)
        v = m["verification"]
        assert m["protocol"] == "no-camera"
        with capsys.disabled():
            print(f"\nsynthetic, target FMR {fmr:g}: estimated FMR {rec['estimated_fmr']:.5f}, real FMR "
                  f"{v['fmr@threshold']:.5f}; estimated TPR {rec['estimated_tpr']:.3f}, real TPR "
                  f"{v['tpr@threshold']:.3f}")
        # the estimate is close to the truth on this well-separated synthetic set
        assert fmr / 3 <= v["fmr@threshold"] <= 3 * fmr
        assert abs(v["tpr@threshold"] - v[f"tpr@fmr={fmr:g}"]) < 0.1
    # the command line: exit 0, the JSON path on stdout; then evaluate --threshold-file prints the real figures
    out = tmp_path / "cli.json"
    proc = subprocess.run([script("partreid"), "calibrate", str(tmp_path / "refined.h5"), "--fmr", "1e-2", "--out",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(out) and json.loads(out.read_text())["target_fmr"] == 1e-2
    ev = subprocess.run([script("partreid"), "evaluate", "--query", str(test), "--split-query", "1",
                         "--threshold-file", str(out)], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "protocol: no-camera" in ev.stdout and "at threshold" in ev.stdout and "FMR" in ev.stdout
    bad = subprocess.run([script("partreid"), "evaluate", "--query", str(test), "--split-query", "1",
                          "--threshold-file", str(out), "--metric", "cosine"], capture_output=True, text=True)
    assert bad.returncode == 2 and "euclidean" in bad.stderr


def test_calibrate_evaluate_and_search_on_files_do_not_import_torch(tmp_path):
    from partreid.common.h5io import read_features, write_labels
    from tests.test_startup import _run

    feats = _identities(tmp_path / "t.h5", 30, 0, 0.3)
    f = read_features(feats)
    write_labels(tmp_path / "l.h5", f.pid, features_file=feats, path=f.path, pid=f.pid, camid=f.camid,
                 attrs={"command": "test"}, agreement=np.full((len(f), 3), 0.5, np.float32))
    proc, torch_loaded = _run("partreid.cli.calibrate", tmp_path / "l.h5", "--fmr", "1e-2", "--out", tmp_path / "t.json")
    assert proc.returncode == 0 and not torch_loaded, proc.stderr[-2000:]
    assert json.loads((tmp_path / "t.json").read_text())["threshold"] > 0
    proc, torch_loaded = _run("partreid.cli.evaluate", "--query", feats, "--split-query", 1, "--threshold-file",
                              tmp_path / "t.json")
    assert proc.returncode == 0 and not torch_loaded, proc.stderr[-2000:]
    assert "at threshold" in proc.stdout
    proc, torch_loaded = _run("partreid.cli.search", feats, "-g", feats, "--threshold", "auto", "--threshold-file",
                              tmp_path / "t.json", "--out", tmp_path / "m.csv", "--topk", 2)
    assert proc.returncode == 0 and not torch_loaded, proc.stderr[-2000:]
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * len(f) and rows[1].endswith(",1")    # each row finds itself first, same person
