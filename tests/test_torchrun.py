"""``torchrun --nproc_per_node 2`` with the gloo backend on the CPU, checked against one process.

- ``extract-features``: the same file (every dataset and attribute identical);
- ``pass-pretrain`` with the same global batch: student and teacher weights equal to ~1e-5;
- one epoch of ``finetune``: identical epoch-0 pseudo-labels, the same losses, and the same weights to ~1e-5 (the loss sees the
  gathered global batch as nn.DataParallel's does, BatchNorm the same 16-image groups, the augmentation the same
  draws).

One thread per process in both cases, so that the single process runs the same kernels.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import BIN, script
from tests.test_finetune import tiny_inputs

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _launch(cmd, nproc):
    if nproc > 1:
        torchrun = str(BIN / "torchrun") if (BIN / "torchrun").exists() else shutil.which("torchrun")
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(nproc), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return root, tiny_inputs(root, ids=4, per_id=4), f"market1501:{root / 'data'}"


def _h5_dump(path):
    items = {}
    with h5py.File(path, "r") as f:
        items.update({f"@{k}": f.attrs[k] for k in f.attrs})
        f.visititems(lambda name, obj: items.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return items


def test_extract_features_same_file(setup, tmp_path):
    root, ckpt, spec = setup
    files = {}
    for n in (1, 2):
        out = tmp_path / f"f{n}.h5"
        _launch([script("extract-features"), "-c", str(ckpt), "-d", spec, "--out", str(out), "--batch-size", "4",
                 "--workers", "0", "--device", "cpu"], n)
        files[n] = _h5_dump(out)
    assert files[1].keys() == files[2].keys()
    for key in files[1]:
        a, b = files[1][key], files[2][key]
        if key.startswith("@command") or key.endswith("created"):
            continue
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), key
        else:
            assert a == b, key


def test_pass_pretrain_same_global_batch(setup, tmp_path):
    _, _, spec = setup
    common = ["-d", spec, "--arch", "vit_tiny", "--depth", "1", "--image-size", "64x32", "--local-size", "32x16",
              "--out-dim", "64", "--epochs", "1", "--drop-path", "0", "--workers", "0", "--device", "cpu",
              "--checkpoint-every", "0", "--quiet"]
    _launch([script("pass-pretrain"), *common, "--batch-size", "8", "--out", str(tmp_path / "one")], 1)
    _launch([script("pass-pretrain"), *common, "--batch-size", "4", "--out", str(tmp_path / "two")], 2)
    a = torch.load(tmp_path / "one" / "checkpoint.pth", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "two" / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert a["iteration"] == b["iteration"] == 2 and b["world_size"] == 2
    for model in ("student", "teacher"):
        sa, sb = a[model], {k.replace("module.", ""): v for k, v in b[model].items()}
        assert sa.keys() == sb.keys()
        moved = 0
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=1e-5, msg=f"{model} {key}")
        moved = sum(not torch.equal(a["student"][k], a["teacher"][k]) for k in a["student"])
    assert moved > 0  # the student did train
    torch.testing.assert_close(a["loss"]["center"], b["loss"]["center"], rtol=0, atol=1e-6)


def test_finetune_one_epoch_agrees(setup, tmp_path):
    root, ckpt, spec = setup
    common = ["-c", str(ckpt), "-d", spec, "--epochs", "1", "--iters", "2", "--batch-size", "32", "--k1", "6",
              "--k2", "2", "--eps", "0.6", "--min-samples", "2", "--k", "4", "--aals-epoch", "0", "--eval-every", "0",
              "--classifier-capacity", "16", "--workers", "0", "--device", "cpu", "--quiet",
              "--optimizer", "sgd", "--lr", "0.01"]  # SGD: Adam would turn float noise in ~0 gradients into lr-sized steps
    for n in (1, 2):
        _launch([script("finetune"), *common, "--out", str(tmp_path / f"run{n}"),
                 "--keep-intermediate", str(tmp_path / f"work{n}")], n)
    la = _h5_dump(tmp_path / "work1" / "epoch_000" / "labels.h5")["labels"]
    lb = _h5_dump(tmp_path / "work2" / "epoch_000" / "labels.h5")["labels"]
    assert np.array_equal(la, lb) and la.max() >= 1
    rows = [next(csv.DictReader(open(tmp_path / f"run{n}" / "metrics.csv"))) for n in (1, 2)]
    for key in ("loss", "pglr", "triplet", "part"):
        assert float(rows[0][key]) == pytest.approx(float(rows[1][key]), rel=1e-6), key
    a = torch.load(tmp_path / "run1" / "last.pth", map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "run2" / "last.pth", map_location="cpu", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
    from partreid.common.models.vit import PartViT

    torch.manual_seed(0)
    init = PartViT("vit_tiny", depth=1, image_size=(64, 32)).state_dict()
    moved = [k for k in init if f"backbone.{k}" in a and not torch.equal(init[k], a[f"backbone.{k}"])]
    assert len(moved) > len(init) // 2  # the backbone did train


GATHER_SCRIPT = """
import sys
import torch
from partreid.common import distributed as dist

with dist.session("cpu"):  # as the commands run: every rank leaves together, the group is freed
    rank = torch.distributed.get_rank()
    n = 3 if rank == 0 else 1  # rank 1 lost two of its three images to unreadable files
    x = (torch.arange(2 * n, dtype=torch.float32).view(n, 2) + 10 * rank).requires_grad_(True)
    sizes = dist.batch_sizes(n, "cpu")
    rows = dist.gather_rows(x, sizes, grad=True)
    owner = dist.gather_rows(torch.full((n,), rank), sizes)
    weight = torch.arange(1.0, 9.0).view(4, 2)
    (rows * weight).sum().backward()
    torch.save({"sizes": sizes, "rows": rows.detach(), "owner": owner, "grad": x.grad}, f"{sys.argv[1]}/{rank}.pt")
"""


def test_gather_rows_of_different_sizes(tmp_path):
    """Ranks whose batches differ in size (unreadable images dropped by the collate) gather the global batch in rank
    order, and the gradient flows back to each rank's own rows (summed over the ranks' identical losses)."""
    script_path = tmp_path / "gather.py"
    script_path.write_text(GATHER_SCRIPT)
    _launch([str(script_path), str(tmp_path)], 2)
    weight = torch.arange(1.0, 9.0).view(4, 2)
    for rank, mine in ((0, slice(0, 3)), (1, slice(3, 4))):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        assert got["sizes"] == [3, 1]
        assert got["rows"].tolist() == [[0, 1], [2, 3], [4, 5], [10, 11]]
        assert got["owner"].tolist() == [0, 0, 0, 1]
        torch.testing.assert_close(got["grad"], 2 * weight[mine])  # two ranks, the same loss on each


SESSION_SCRIPT = """
import gc
import json
import sys
import time
import weakref
import torch
from partreid.common import distributed as dist

done = None
with dist.session("cpu") as device:
    rank = dist.rank()
    # what torchvision's import does through torch._dynamo: a module binding group.WORLD as a default argument
    import torch.distributed.nn.functional
    world = weakref.ref(torch.distributed.group.WORLD)
    if rank == 0:
        time.sleep(1.0)  # rank 0 still writing the file the others fed
        done = time.time()
left = time.time()
gc.collect()
json.dump({"device": device, "done": done, "left": left, "up": torch.distributed.is_initialized(),
           "freed": world() is None}, open(f"{sys.argv[1]}/{rank}.json", "w"))
"""


def test_session_ranks_leave_together_and_tear_gloo_down(tmp_path):
    """``session``: no rank leaves before every rank is done, and the group it created is destroyed and freed, also
    when a module imported during the run bound it as a default argument. A rank whose process ended with gloo's
    threads still running (group not destroyed, or destroyed but still referenced) aborted now and then with signal 6
    ("terminate called without an active exception"), and torchrun then failed the whole run."""
    script_path = tmp_path / "session.py"
    script_path.write_text(SESSION_SCRIPT)
    _launch([str(script_path), str(tmp_path)], 2)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert [r["device"] for r in ranks] == ["cpu", "cpu"]
    assert [r["up"] for r in ranks] == [False, False]
    assert [r["freed"] for r in ranks] == [True, True]
    assert ranks[1]["left"] >= ranks[0]["done"]  # rank 1 waited for rank 0's second of work
