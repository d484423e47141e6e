"""export (ONNX, TorchScript) of a fine-tuned vit_tiny, its verification, and the onnxruntime backend of
extract-features / evaluate / search, on real CUHK03 crops (including a folder without cameras)."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from partreid.common.fileio import sha256_file
from tests.conftest import script, shared_data

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A vit_tiny fine-tuned by `finetune` (1 epoch x 1 iteration at 64x32 on synthetic crops): a real last.pth."""
    import torch

    from partreid.common.models.vit import PartViT, save_backbone
    from partreid.pplr_finetune.train import FinetuneConfig, finetune
    from tests.test_finetune import _make_dataset

    root = tmp_path_factory.mktemp("ft")
    _make_dataset(root / "data", ids=8, per_id=4)
    torch.manual_seed(0)
    ckpt = save_backbone(PartViT("vit_tiny", image_size=(64, 32)), root / "backbone.pth")
    cfg = FinetuneConfig.from_preset("pplr", checkpoint=str(ckpt), data=f"market1501:{root / 'data'}", epochs=1,
                                     iters=1, batch_size=16, num_instances=4, k1=6, k2=2, eps=0.6, min_samples=2,
                                     k=4, aals_epoch=1, eval_every=0, workers=0, seed=3, progress=False)
    return finetune(cfg, root / "run")


@pytest.fixture(scope="module")
def onnx_model(finetuned, tmp_path_factory):
    from partreid.common.export import export_model

    out = tmp_path_factory.mktemp("onnx") / "reid.onnx"
    result = export_model(str(finetuned), out, "onnx", verify_data=f"market1501:{shared_data('cuhk03-labeled-val')}",
                          verify_images=16)
    return result


def test_onnx_export_verifies_and_records_metadata(onnx_model, finetuned):
    import onnxruntime as ort

    from partreid.common.models.onnx_backend import read_onnx_metadata

    rep = onnx_model.report
    assert onnx_model.path is not None and onnx_model.path.exists()
    assert rep.passed and len(rep.names) == 16 and rep.row_min.min() >= 0.9999
    meta = read_onnx_metadata(onnx_model.path)
    assert meta["arch"] == "vit_tiny" and meta["image_size"] == [64, 32] and meta["kind"] == "reid"
    assert meta["source_sha256"] == sha256_file(finetuned)
    assert meta["fusion"] == "cat" and meta["neck"] == "after" and meta["normalized"] is True
    assert meta["outputs"] == {"global": [384], "parts": [3, 192]}
    assert len(meta["pixel_mean"]) == 3 and meta["package_version"]
    # dynamic batch: 5 rows in, 5 unit-norm rows out, named global and parts
    sess = ort.InferenceSession(str(onnx_model.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["global", "parts"]
    g, p = sess.run(None, {"images": np.random.default_rng(0).normal(size=(5, 3, 64, 32)).astype(np.float32)})
    assert g.shape == (5, 384) and p.shape == (5, 3, 192)
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1, atol=1e-5)


def test_torchscript_export_and_failed_verification(finetuned, tmp_path):
    from partreid.common.export import export_model, read_torchscript_metadata

    data = f"market1501:{shared_data('cuhk03-labeled-val')}"
    res = export_model(str(finetuned), tmp_path / "reid.pt", "torchscript", verify_data=data, verify_images=8)
    assert res.report.passed and res.report.row_min.min() >= 0.9999
    assert read_torchscript_metadata(tmp_path / "reid.pt")["source_sha256"] == sha256_file(finetuned)
    # an unreachable pass mark: verification fails and nothing is installed
    bad = export_model(str(finetuned), tmp_path / "bad.pt", "torchscript", verify_data=data, verify_images=2,
                       min_cosine=1.5)
    assert bad.path is None and not bad.report.passed and not (tmp_path / "bad.pt").exists()
    assert not list(tmp_path.glob(".bad.pt*"))


def test_onnx_features_give_the_torch_map(onnx_model, finetuned, tmp_path):
    """extract-features with the ONNX file (onnxruntime) gives the torch checkpoint's mAP to 1e-4."""
    from partreid.common.h5io import read_features
    from partreid.cli._stages import evaluate_files, extract_features

    spec = f"market1501:{shared_data('cuhk03-labeled-val')}"
    files = {}
    for name, model in (("torch", str(finetuned)), ("onnx", str(onnx_model.path))):
        for split in ("query", "gallery"):
            out = tmp_path / f"{name}_{split}.h5"
            if name == "onnx" and split == "query":      # one run through the command line
                proc = subprocess.run([script("partreid"), "extract-features", "-c", model, "-d", spec, "--split",
                                       split, "--out", str(out), "--workers", "0", "--device", "cpu"],
                                      capture_output=True, text=True)
                assert proc.returncode == 0, proc.stderr[-2000:]
                assert proc.stdout.strip() == str(out)
            else:
                extract_features(model, spec, out, split=split, workers=0, device="cpu", parts=False, verbose=False)
            files[name, split] = out
    a = evaluate_files(files["torch", "query"], files["torch", "gallery"])
    b = evaluate_files(files["onnx", "query"], files["onnx", "gallery"])
    assert a["protocol"] == b["protocol"] == "market" and a["num_valid_query"] == b["num_valid_query"] >= 190
    assert abs(a["mAP"] - b["mAP"]) <= 1e-4 and abs(a["rank1"] - b["rank1"]) <= 1e-9
    fq = read_features(files["onnx", "query"])
    assert fq.attrs["fusion"] == "cat" and fq.attrs["neck"] == "after"
    tq = read_features(files["torch", "query"])
    cos = (fq.global_feats * tq.global_feats).sum(1)
    assert cos.min() >= 0.9999
    # the Python API takes the ONNX file as a model too
    import partreid

    crops = [str(Path(fq.attrs["dataset_root"]) / p) for p in fq.path[:4]]
    a = partreid.FeatureExtractor(model_path=str(onnx_model.path), device="cpu")(crops)
    b = partreid.FeatureExtractor(model_path=str(finetuned), device="cpu")(crops)
    assert a["global"].shape == b["global"].shape == (4, 384)
    assert (a["global"] * b["global"]).sum(1).min() >= 0.9999


@pytest.fixture(scope="module")
def no_camera_folder(tmp_path_factory):
    """12 CUHK03 identities copied as `folder:` layout, one sub-folder per id, names without a camera."""
    src = shared_data("cuhk03-labeled-val")
    root = tmp_path_factory.mktemp("nocam") / "crops"
    files = sorted((src / "bounding_box_test").glob("*.jpg")) + sorted((src / "query").glob("*.jpg"))
    by_id = {}
    for f in files:
        by_id.setdefault(f.name[:4], []).append(f)
    for pid in sorted(by_id)[:12]:
        (root / f"person{pid}").mkdir(parents=True)
        for k, f in enumerate(by_id[pid]):
            shutil.copy(f, root / f"person{pid}" / f"img{k:02d}.jpg")
    return root


def test_evaluate_and_search_without_cameras(onnx_model, no_camera_folder, tmp_path):
    from partreid.common.data import load_dataset
    from partreid.common.h5io import read_features
    from partreid.cli._stages import evaluate_files

    ds = load_dataset(f"folder:{no_camera_folder}", verbose=False)
    assert (ds.frame["camid"] == -1).all() and ds.frame["pid"].nunique() == 12
    model = str(onnx_model.path)
    proc = subprocess.run([script("partreid"), "evaluate", "--checkpoint", model, "--data",
                           f"folder:{no_camera_folder}", "--split-query", "2", "--out-dir", str(tmp_path / "ev"),
                           "--workers", "0", "--device", "cpu", "--seed", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "protocol: no-camera" in proc.stdout and "queries: 24 (24 with a positive" in proc.stdout
    assert "TPR" in proc.stdout
    # the same file as query and gallery: only each query's own image is left out
    allf = tmp_path / "ev" / "all.h5"
    m = evaluate_files(allf, allf)
    f = read_features(allf)
    d = ((f.global_feats[:, None] - f.global_feats[None]) ** 2).sum(-1)
    aps = []
    for i in range(len(f)):
        others = np.delete(np.arange(len(f)), i)
        order = others[np.argsort(d[i, others], kind="stable")]
        hits = f.pid[order] == f.pid[i]
        aps.append(np.mean(np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)))
    assert m["protocol"] == "no-camera" and m["num_valid_query"] == len(f)
    assert m["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)
    # search: a folder of query crops against that gallery, no pids or cameras needed
    qdir = tmp_path / "q"
    qdir.mkdir()
    crops = sorted(no_camera_folder.glob("*/img00.jpg"))[:3]
    for k, c in enumerate(crops):
        shutil.copy(c, qdir / f"q{k}.jpg")
    out = tmp_path / "m.csv"
    proc = subprocess.run([script("partreid"), "search", str(qdir), "-g", str(allf), "-c", model, "--topk", "4",
                           "--threshold", "0.5", "--out", str(out), "--show", str(tmp_path / "sheet.png"),
                           "--workers", "0", "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 12 and [r["rank"] for r in rows[:4]] == ["1", "2", "3", "4"]
    # each query crop is a copy of a gallery image: it comes first at distance ~0, same person
    names = {Path(r["query"]).name: r for r in rows if r["rank"] == "1"}
    for k, c in enumerate(crops):
        top = names[f"q{k}.jpg"]
        assert Path(top["gallery"]) == c and float(top["distance"]) < 1e-4 and top["same_person"] == "1"
    assert all(r["same_person"] == str(int(float(r["distance"]) <= 0.5)) for r in rows)
    assert (tmp_path / "sheet.png").stat().st_size > 1000


def test_export_cli_embeds_a_threshold(tmp_path):
    """The command: random vit_tiny → ONNX with preprocessing and a threshold; search --threshold auto uses it."""
    thr = tmp_path / "threshold.json"
    thr.write_text(json.dumps({"threshold": 0.75, "metric": "euclidean", "target_fmr": 1e-3}))
    out = tmp_path / "m.onnx"
    proc = subprocess.run([script("partreid"), "export", "random:vit_tiny", "--image-size", "64x32",
                           "--with-preprocessing", "--threshold-file", str(thr), "--out", str(out),
                           "--verify-images", "4", "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(out) and "minimum cosine per row" in proc.stderr
    from partreid.common.models.onnx_backend import read_onnx_metadata
    from partreid.common.retrieval.gallery_search import resolve_threshold

    meta = read_onnx_metadata(out)
    assert meta["with_preprocessing"] is True and meta["threshold"]["threshold"] == 0.75
    assert resolve_threshold("auto", None, str(out)) == 0.75
    bad = subprocess.run([script("partreid"), "export", str(tmp_path / "missing.pth"), "--out",
                          str(tmp_path / "x.onnx")], capture_output=True, text=True)
    assert bad.returncode == 2 and "no such checkpoint" in bad.stderr and "Traceback" not in bad.stderr
