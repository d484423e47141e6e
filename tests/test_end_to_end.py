"""The whole PASS → PPLR chain on real labelled images (../shared/data/cuhk01), through the installed commands.

One module fixture runs, as a user would in a shell:

1. ``pass-pretrain`` vit_tiny briefly on the cuhk01 train crops (labels unused);
2. ``extract-features | cluster | refine-labels`` as one real shell pipeline;
3. ``finetune --labels refined.h5`` for a few short epochs (re-clustering every epoch after the first);
4. ``evaluate`` on the cuhk01 query/gallery: the randomly initialised vit_tiny, the PASS checkpoint before
   fine-tuning, and the fine-tuned model.

Everything runs on the CPU with a full-depth vit_tiny at 64×32 pixels to fit the CI budget. CUHK01 is hard at this scale: each query has
exactly one valid positive among 971 gallery images, so chance mAP is about 0.77% (H(971)/971), and even a
colour-histogram feature reaches only about 1.2%. The measured numbers are written to
``$PARTREID_E2E_REPORT`` (default: ``e2e_metrics.json`` in the test's temporary folder) for the record.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from partreid.common.h5io import read_features, read_labels
from tests.conftest import script, shared_data

EPOCHS = 2  # epoch 0 trains on the shell pipeline's labels, epoch 1 re-clusters


def _run(cmd, **kw):
    proc = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
    return proc


def _evaluate(ckpt, spec, out, extra=()):
    _run([script("evaluate"), "--checkpoint", str(ckpt), "--data", spec, "--device", "cpu", "--workers", "1",
          "--seed", "0", "--out", str(out), *extra])
    return json.loads(Path(out).read_text())


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    data = shared_data("cuhk01")
    spec = f"market1501:{data}"
    work = tmp_path_factory.mktemp("e2e")
    res = {"spec": spec, "work": work}

    # 1. brief PASS pre-training (the schedules span 2 epochs; it stops after a few iterations)
    _run([script("pass-pretrain"), "--data", spec, "--arch", "vit_tiny", "--epochs", "2", "--batch-size", "32",
          "--image-size", "64x32", "--out-dim", "1024", "--warmup-epochs", "1", "--stop-after-iters", "4",
          "--workers", "1", "--device", "cpu", "--quiet", "--out", str(work / "pass")])
    backbone = _run([script("pass-pretrain"), "export", str(work / "pass"), "--out",
                     str(work / "backbone.pth")]).stdout.strip()
    res["backbone"] = backbone

    # 2. the stage pipeline through real shell pipes
    pipe = (f"{script('extract-features')} --checkpoint {backbone} --data {spec} --device cpu --workers 1 "
            f"--out {work / 'features.h5'}"
            f" | {script('cluster')} --out {work / 'labels.h5'} --eps 0.5"
            f" | {script('refine-labels')} --out {work / 'refined.h5'} --plot {work / 'agreement.png'}")
    res["pipe_stdout"] = _run(pipe).stdout.strip()

    # 3. PPLR fine-tuning from the shell's labels, then re-clustering each epoch
    res["finetuned"] = _run([script("finetune"), "--checkpoint", backbone, "--data", spec, "--labels",
                             str(work / "refined.h5"), "--epochs", str(EPOCHS), "--iters", "50", "--batch-size",
                             "64", "--lr", "1e-4", "--eps", "0.5", "--aals-epoch", "1", "--eval-every", "0",
                             "--workers", "1", "--device", "cpu", "--quiet", "--out", str(work / "finetune"),
                             "--keep-intermediate", str(work / "epochs")]).stdout.strip()

    # 4. evaluation on the cuhk01 query/gallery
    res["random"] = _evaluate("random:vit_tiny", spec, work / "random.json", ("--image-size", "64x32"))
    res["before"] = _evaluate(backbone, spec, work / "before.json")
    res["after"] = _evaluate(res["finetuned"], spec, work / "after.json")
    report = Path(os.environ.get("PARTREID_E2E_REPORT", work / "e2e_metrics.json"))
    report.write_text(json.dumps({k: res[k] for k in ("random", "before", "after")}, indent=2))
    return res


def test_every_file_passes_inspect_data(chain):
    work = chain["work"]
    files = [work / "features.h5", work / "labels.h5", work / "refined.h5"]
    for epoch in range(1, EPOCHS):
        files += [work / "epochs" / f"epoch_{epoch:03d}" / name for name in ("features.h5", "labels.h5",
                                                                            "refined.h5")]
    for f in files:
        proc = _run([script("inspect-data"), str(f)])
        assert "rows (N): 1940" in proc.stdout, f
    assert chain["pipe_stdout"] == str(work / "refined.h5")
    assert (work / "agreement.png").stat().st_size > 1000


def test_pipeline_outputs_are_consistent(chain):
    work = chain["work"]
    feats = read_features(work / "features.h5")
    assert feats.global_feats.shape == (1940, 384) and feats.parts.shape == (1940, 3, 192)  # cat fusion, 3 PARTs
    assert feats.attrs["normalized"] and feats.attrs["split"] == "train"
    refined = read_labels(work / "refined.h5")
    assert refined.num_clusters >= 2 and refined.knn is not None
    assert refined.agreement.shape == (1940, 3)
    assert (refined.agreement >= 0).all() and (refined.agreement <= 1).all()
    assert refined.attrs["eps"] == 0.5


def test_finetune_improves_over_the_model_before(chain):
    before, after = chain["before"], chain["after"]
    assert after["mAP"] > before["mAP"], (before, after)


def test_final_model_beats_random_initialisation(chain):
    rnd, after = chain["random"], chain["after"]
    assert after["mAP"] > rnd["mAP"], (rnd, after)
    assert after["rank1"] > rnd["rank1"], (rnd, after)
    assert after["num_query"] == 972 and after["num_gallery"] == 972
