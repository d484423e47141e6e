"""PASS training loop (PASS ``main_pass.py`` ``train_dino``, ``utils.py``;
export as ``convert_model_dino.py``): schedules, EMA, clipping, freeze, resume, real-input run."""

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from partreid.common.errors import InputError
from partreid.common.models.vit import META_KEY, load_part_vit
from partreid.pass_pretrain.schedules import cosine_schedule, pass_schedules, scaled_lr
from partreid.pass_pretrain.train import (MultiCropDataset, PassConfig, PassTrainer, cancel_last_layer_gradients,
                                 clip_gradients, ema_update, export_backbone, param_groups, train_pass)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_config(**kw) -> PassConfig:
    base = dict(arch="vit_tiny", depth=2, image_size=(64, 32), local_size=(32, 16), out_dim=32, hidden_dim=32,
                bottleneck_dim=16, batch_size=2, epochs=2, warmup_epochs=1, num_workers=0, progress=False,
                checkpoint_every=0, export_on_finish=False)
    base.update(kw)
    return PassConfig(**base)


class NoiseImages:
    """Generated person-shaped RGB images (160x60), deterministic per index."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        return Image.fromarray((rng.random((40, 15, 3)) * 255).astype("uint8")).resize((60, 160))


def _read_metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------- schedules
def test_cosine_schedule_values():
    s = cosine_schedule(1.0, 0.0, epochs=4, niter_per_epoch=2, warmup_epochs=1)
    assert len(s) == 8
    # warm-up: linspace(0, 1, 2); cosine over 6 iterations: 0.5(1+cos(pi i/6))
    expected = [0.0, 1.0] + [0.5 * (1 + math.cos(math.pi * i / 6)) for i in range(6)]
    assert np.allclose(s, expected)
    assert s[5] == pytest.approx(0.5) and s[7] == pytest.approx(0.5 * (1 + math.cos(5 * math.pi / 6)))
    with pytest.raises(InputError):
        cosine_schedule(1.0, 0.0, epochs=1, niter_per_epoch=2, warmup_epochs=2)


def test_pass_schedules_at_chosen_iterations():
    assert scaled_lr(5e-4, 1024) == pytest.approx(0.002) and scaled_lr(5e-4, 512) == pytest.approx(0.001)
    niter, epochs = 10, 100
    s = pass_schedules(lr=5e-4, min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,
                       momentum_teacher=0.996, epochs=epochs, niter_per_epoch=niter, global_batch=1024)
    assert all(len(v) == 1000 for v in s.values())
    assert s["lr"][0] == 0.0
    assert s["lr"][50] == pytest.approx(0.002 * 50 / 99)  # linear warm-up, linspace over 100 iterations
    assert s["lr"][99] == pytest.approx(0.002) and s["lr"][100] == pytest.approx(0.002)
    assert s["lr"][550] == pytest.approx(1e-6 + 0.5 * (0.002 - 1e-6))  # half-way through the cosine
    assert s["lr"][999] == pytest.approx(1e-6 + 0.5 * (0.002 - 1e-6) * (1 + math.cos(math.pi * 899 / 900)))
    assert s["wd"][0] == pytest.approx(0.04) and s["wd"][500] == pytest.approx(0.22)
    assert s["momentum"][0] == pytest.approx(0.996) and s["momentum"][500] == pytest.approx(0.998)
    assert 0.9999 < s["momentum"][-1] < 1.0


# ----------------------------------------------------------------------------------------------- EMA / clip / freeze
def test_ema_update():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * t0[k] + 0.1 * student.state_dict()[k])
    ema_update(teacher, student, 1.0)  # momentum 1 keeps the teacher
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * t0[k] + 0.1 * student.state_dict()[k])
    with pytest.raises(InputError):
        ema_update(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2)), 0.5)


def _two_params():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([3.6, 4.8])  # norm 6
    b.grad = torch.tensor([1.0, 0.0, 0.0])  # norm 1
    return a, b


def test_per_tensor_and_global_clipping():
    a, b = _two_params()
    clip_gradients([a, b], 3.0, "per-tensor")
    assert torch.linalg.vector_norm(a.grad).item() == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(a.grad, torch.tensor([1.8, 2.4]), rtol=1e-5, atol=1e-6)
    assert torch.equal(b.grad, torch.tensor([1.0, 0.0, 0.0]))  # under the cap: untouched
    a, b = _two_params()
    clip_gradients([a, b], 3.0, "global")  # total norm sqrt(37): both scaled by 3/sqrt(37)
    scale = 3.0 / math.sqrt(37.0)
    torch.testing.assert_close(a.grad, torch.tensor([3.6, 4.8]) * scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, torch.tensor([1.0, 0.0, 0.0]) * scale, rtol=1e-5, atol=1e-6)
    a, b = _two_params()
    clip_gradients([a, b], 3.0, "none")
    assert torch.equal(a.grad, torch.tensor([3.6, 4.8]))
    with pytest.raises(InputError):
        clip_gradients([a], 3.0, "norm")


def test_param_groups_and_last_layer_freeze():
    cfg = tiny_config(lr=0.05, warmup_epochs=0, freeze_last_layer=1)
    torch.manual_seed(0)
    trainer = PassTrainer(cfg, niter_per_epoch=2)
    reg, noreg = param_groups(trainer.student)
    reg_ids, noreg_ids = {id(p) for p in reg["params"]}, {id(p) for p in noreg["params"]}
    bb = trainer.student.backbone
    assert id(bb.cls_token) in reg_ids and id(bb.pos_embed) in reg_ids and id(bb.part_token2) in reg_ids
    assert id(bb.blocks[0].attn.qkv.bias) in noreg_ids and id(bb.norm.weight) in noreg_ids
    mag = trainer.student.heads[0].last_layer.parametrizations.weight.original0
    assert not mag.requires_grad and id(mag) not in reg_ids | noreg_ids  # norm_last_layer: g frozen at 1
    assert noreg["weight_decay"] == 0.0

    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(2, 3, 64, 32, generator=gen) for _ in range(2)] + \
            [torch.randn(2, 3, 32, 16, generator=gen) for _ in range(9)]

    def last_layers():
        return {n: p.detach().clone() for n, p in trainer.student.named_parameters() if "last_layer" in n}

    before, other = last_layers(), trainer.student.backbone.cls_token.detach().clone()
    trainer.step(views, epoch=0, iteration=0)
    after0 = last_layers()
    assert all(torch.equal(before[n], after0[n]) for n in before)  # frozen during epoch 0
    assert not torch.equal(other, trainer.student.backbone.cls_token)  # the rest trains
    trainer.step(views, epoch=1, iteration=2)
    after1 = last_layers()
    changed = [n for n in before if not torch.equal(after0[n], after1[n])]
    assert changed and all("original1" in n for n in changed)  # v trains from epoch 1; g stays 1
    assert trainer.optimizer.param_groups[0]["weight_decay"] == pytest.approx(trainer.schedules["wd"][2])

    model = nn.Module()
    model.last_layer = nn.Linear(2, 2)
    model.mlp = nn.Linear(2, 2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    cancel_last_layer_gradients(model, epoch=1, freeze_epochs=1)
    assert model.last_layer.weight.grad is not None
    cancel_last_layer_gradients(model, epoch=0, freeze_epochs=1)
    assert model.last_layer.weight.grad is None and model.mlp.weight.grad is not None


# ----------------------------------------------------------------------------------------------- dataset
def test_views_are_reproducible_per_epoch_and_index():
    from partreid.pass_pretrain.augment import PassMultiCropAugment

    ds = MultiCropDataset(NoiseImages(3), PassMultiCropAugment((64, 32), (32, 16)), seed=5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = ds[1]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is not disturbed
    assert len(a) == 11 and a[0].shape == (3, 64, 32) and a[2].shape == (3, 32, 16)
    assert all(torch.equal(x, y) for x, y in zip(a, ds[1]))
    ds.set_epoch(1)
    assert not torch.equal(a[0], ds[1][0])


def test_unreadable_items_are_dropped_from_the_batch():
    from partreid.pass_pretrain.augment import PassMultiCropAugment
    from partreid.pass_pretrain.train import collate_views

    class WithHoles(NoiseImages):
        def __getitem__(self, i):
            return None if i == 1 else (super().__getitem__(i), i)  # ImageDataset-style (img, i) items

    ds = MultiCropDataset(WithHoles(3), PassMultiCropAugment((64, 32), (32, 16)))
    assert ds[1] is None
    batch = collate_views([ds[0], ds[1], ds[2]])
    assert len(batch) == 11 and batch[0].shape == (2, 3, 64, 32) and batch[10].shape == (2, 3, 32, 16)
    assert collate_views([None, None]) is None
    with pytest.raises(InputError):
        MultiCropDataset([torch.zeros(3)], lambda img: img)[0]


# ----------------------------------------------------------------------------------------------- resume
class CrashingImages(NoiseImages):
    """Raises after ``limit`` items, like a run killed mid-epoch."""

    def __init__(self, n, limit):
        super().__init__(n)
        self.limit, self.calls = limit, 0

    def __getitem__(self, i):
        self.calls += 1
        if self.calls > self.limit:
            raise KeyboardInterrupt("simulated kill")
        return super().__getitem__(i)


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path):
    cfg = tiny_config(checkpoint_every=2)
    full = train_pass(cfg, NoiseImages(6), tmp_path / "full")  # 2 epochs x 3 iterations
    # interrupted: the 11th image (iteration 5) kills it; last checkpoint after iteration 4 (epoch 1, mid-epoch)
    with pytest.raises(KeyboardInterrupt):
        train_pass(cfg, CrashingImages(6, limit=10), tmp_path / "cut")
    cut = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=False)
    assert (cut["epoch"], cut["iter_in_epoch"], cut["iteration"]) == (1, 1, 4)
    assert len(_read_metrics(tmp_path / "cut" / "metrics.csv")) == 5
    with pytest.raises(InputError):  # an existing run is not overwritten without resume
        train_pass(cfg, NoiseImages(6), tmp_path / "cut")
    with pytest.raises(InputError):  # settings that change the result refuse to resume
        train_pass(tiny_config(checkpoint_every=2, lr=1e-3), NoiseImages(6), tmp_path / "cut", resume=True)
    resumed = train_pass(cfg, NoiseImages(6), tmp_path / "cut", resume=True)

    a = torch.load(full, weights_only=False)
    b = torch.load(resumed, weights_only=False)
    for part in ("student", "teacher", "loss"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert (b["epoch"], b["iteration"]) == (2, 6)
    rows_a = _read_metrics(tmp_path / "full" / "metrics.csv")
    rows_b = _read_metrics(tmp_path / "cut" / "metrics.csv")
    assert [r["iteration"] for r in rows_b] == [str(i) for i in range(6)]  # the redone iteration 4 logged once
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


def test_export_backbone_from_run(tmp_path):
    cfg = tiny_config(epochs=1, warmup_epochs=0, export_on_finish=True, stop_after_iters=1)
    train_pass(cfg, NoiseImages(4), tmp_path / "run")  # stops after 1 of 2 iterations: no export yet
    exported = tmp_path / "run" / "teacher_backbone.pth"
    assert not exported.exists()
    ckpt = train_pass(dataclasses.replace(cfg, stop_after_iters=None), NoiseImages(4), tmp_path / "run",
                      resume=True)
    assert exported.exists()
    out = export_backbone(tmp_path / "run", tmp_path / "bb.pth")
    saved = torch.load(out, weights_only=False)
    meta = saved.pop(META_KEY)
    assert meta["arch"] == "vit_tiny" and meta["image_size"] == [64, 32] and meta["iteration"] == 2
    assert {"cls_token", "part_token3", "part1_pos", "cls_pos", "pos_embed", "patch_embed.proj.weight",
            "blocks.1.mlp.fc2.bias", "norm.weight"} <= set(saved)
    assert not any(k.startswith(("backbone.", "heads.", "module.")) for k in saved)
    teacher = torch.load(ckpt, weights_only=False)["teacher"]
    assert all(torch.equal(v, teacher["backbone." + k]) for k, v in saved.items())
    model, report = load_part_vit(out)
    assert model.image_size == (64, 32) and model.depth == 2 and report.loaded == len(saved)
    with pytest.raises(InputError):
        export_backbone(tmp_path / "nothing", tmp_path / "x.pth")


# ----------------------------------------------------------------------------------------------- real images
class FolderImages:
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return img.convert("RGB")


def test_real_input_short_run_loss_decreases(tmp_path):
    """vit_tiny (2 blocks, small heads) on 80 real CUHK01 crops for 20 iterations: the loss is finite and falls.

    The centre momentum is set to 0 here: with the paper's 0.9 the centres start at zero and take tens of
    iterations to reach the teacher's mean; while they do, the centred teacher targets sharpen and the loss
    *rises* (DINO's usual start), which would hide learning in a 20-iteration run. With momentum 0 every
    iteration after the first is centred on the previous batch, so iteration 0 (centre still zero) is left out
    of the comparison.
    """
    folder = DATA / "cuhk01" / "bounding_box_train"
    if not folder.is_dir():
        pytest.skip(f"real images not found at {folder} (../shared/data beside the repository)")
    paths = sorted(folder.glob("*.jpg"))[:80]
    cfg = PassConfig(arch="vit_tiny", depth=2, out_dim=256, hidden_dim=128, bottleneck_dim=64, batch_size=4,
                     epochs=1, warmup_epochs=0, lr=0.005, min_lr=1e-4, center_momentum=0.0, freeze_last_layer=0,
                     num_workers=0, progress=False, checkpoint_every=0, export_on_finish=False)
    train_pass(cfg, FolderImages(paths), tmp_path / "real")
    losses = [float(r["loss"]) for r in _read_metrics(tmp_path / "real" / "metrics.csv")]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < np.mean(losses[1:5]) - 0.2, losses
