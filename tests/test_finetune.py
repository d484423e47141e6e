"""finetune: the epoch loop on a tiny synthetic dataset (resume, labels from the shell, files written)."""

import csv
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from partreid.common.h5io import read_labels
from tests.conftest import script


def _make_dataset(root, ids=12, per_id=4, seed=0):
    """Market-style crops: each id is a two-colour person (top/bottom) with a little noise; 2 cameras."""
    rng = np.random.default_rng(seed)
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (root / split).mkdir(parents=True)
    for pid in range(1, ids + 1):
        top, bottom = rng.integers(0, 256, size=(2, 3))
        for k in range(per_id + 2):
            img = np.empty((64, 32, 3), np.float32)
            img[:32], img[32:] = top, bottom
            img += rng.normal(0, 12, img.shape)
            split = "bounding_box_train" if k < per_id else ("query" if k == per_id else "bounding_box_test")
            name = f"{pid:04d}_c{k % 2 + 1}s1_{k:06d}_00.jpg"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / name, quality=95)


def tiny_inputs(root, ids, per_id):
    """A Market-style crop folder under ``root/data`` and a seeded depth-1 vit_tiny backbone (64×32) beside it."""
    from partreid.common.models.vit import PartViT, save_backbone

    _make_dataset(root / "data", ids=ids, per_id=per_id)
    torch.manual_seed(0)
    return save_backbone(PartViT("vit_tiny", depth=1, image_size=(64, 32)), root / "backbone.pth")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from partreid.common.models.vit import PartViT, save_backbone

    root = tmp_path_factory.mktemp("synth")
    _make_dataset(root / "data")
    torch.manual_seed(0)
    model = PartViT("vit_tiny", depth=1, image_size=(64, 32))
    ckpt = save_backbone(model, root / "backbone.pth")
    return root, ckpt


def _config(root, ckpt, epochs, **kw):
    from partreid.pplr_finetune.train import FinetuneConfig

    base = dict(checkpoint=str(ckpt), data=f"market1501:{root / 'data'}", epochs=epochs, iters=2, batch_size=16,
                num_instances=4, k1=6, k2=2, eps=0.6, min_samples=2, k=4, aals_epoch=1, eval_every=1, workers=0,
                seed=3, progress=False)
    base.update(kw)
    return FinetuneConfig.from_preset("pplr", **base)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_resume_equals_uninterrupted(tiny_setup, tmp_path):
    from partreid.pplr_finetune.train import finetune

    root, ckpt = tiny_setup
    finetune(_config(root, ckpt, 2), tmp_path / "full")
    finetune(_config(root, ckpt, 1), tmp_path / "cut")  # "interrupted" after epoch 1 of 2
    finetune(_config(root, ckpt, 2, resume=True), tmp_path / "cut")
    a, b = _state(tmp_path / "full" / "last.pth"), _state(tmp_path / "cut" / "last.pth")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = list(csv.DictReader(open(tmp_path / "cut" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    for r in rows:
        assert np.isfinite(float(r["loss"])) and int(r["clusters"]) >= 2 and 0 <= float(r["agreement_mean"]) <= 1
        assert 0 <= float(r["mAP"]) <= 1


def test_refuses_to_overwrite_a_run_without_resume(tiny_setup, tmp_path):
    from partreid.common.errors import InputError
    from partreid.pplr_finetune.train import finetune

    root, ckpt = tiny_setup
    finetune(_config(root, ckpt, 1, eval_every=0), tmp_path / "run")
    with pytest.raises(InputError, match="--resume"):
        finetune(_config(root, ckpt, 1, eval_every=0), tmp_path / "run")


def test_one_round_from_shell_labels(tiny_setup, tmp_path):
    """extract-features | cluster | refine-labels made outside, then finetune --labels ... --epochs 1."""
    root, ckpt = tiny_setup
    spec = f"market1501:{root / 'data'}"
    cmd = (f"{script('extract-features')} -c {ckpt} -d {spec} --out {tmp_path / 'f.h5'} --workers 0 --device cpu"
           f" | {script('cluster')} --out {tmp_path / 'l.h5'} --k1 6 --k2 2 --eps 0.6 --min-samples 2"
           f" | {script('refine-labels')} --out {tmp_path / 'r.h5'} --k 4")
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    refined = read_labels(tmp_path / "r.h5")
    assert refined.agreement.shape == (48, 3) and refined.num_clusters >= 2
    out = subprocess.run([script("finetune"), "--labels", str(tmp_path / "r.h5"), "--checkpoint", str(ckpt),
                          "--epochs", "1", "--iters", "2", "--batch-size", "16", "--eval-every", "0", "--workers",
                          "0", "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet", "--plot",
                          "--keep-intermediate", str(tmp_path / "inter")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(tmp_path / "run" / "last.pth")
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert int(rows[0]["clusters"]) == refined.num_clusters  # trained on the given labels, not re-clustered
    assert not (tmp_path / "inter" / "epoch_000").exists()   # epoch 0 used the shell's files
    # the fine-tuned checkpoint is a model extract-features accepts
    f = subprocess.run([script("extract-features"), "-c", str(tmp_path / "run" / "last.pth"), "-d", spec,
                        "--split", "query", "--out", str(tmp_path / "q.h5"), "--workers", "0", "--device", "cpu"],
                       capture_output=True, text=True)
    assert f.returncode == 0, f.stderr[-2000:]
