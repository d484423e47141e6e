"""PASS teacher-student pre-training loop (PASS ``main_pass.py`` ``train_dino`` /
``train_one_epoch``, a DINO derivative; export as PASS ``convert_model_dino.py``).

Entry points: :func:`train_pass` (train or resume a run in a folder) and :func:`export_backbone` (write the
teacher backbone alone, official PASS key layout). :class:`PassTrainer` holds the models, optimiser and one
training step; the benchmark in ``benchmarks/bench_pretrain_step.py`` reuses it.

Reproducibility and resume
--------------------------
* Data order: a ``DistributedSampler`` (also with one process) shuffles with seed ``config.seed + epoch``; a
  resumed run fast-forwards it past the iterations already done in the epoch (:class:`SkipSampler`).
* Augmentation: item i of epoch e is augmented under torch's CPU RNG seeded from (seed, e, i) and the caller's
  RNG state is restored afterwards (:func:`pass_pretrain.augment.seeded_call`), so the views do not depend on the
  number of data-loader workers, on the order they run in, or on where a run was interrupted.
  With ``augment_on='device'`` (:class:`pass_pretrain.augment.DeviceMultiCrop`) the workers only decode, and the
  views of iteration i of epoch e are drawn on the training device from a generator seeded from (seed, rank, e, i):
  just as reproducible, though not the same views as the PIL path's.
* Training RNG (stochastic depth): the python, numpy, torch and CUDA RNG states are stored in every checkpoint
  and restored on resume (rank 0's; other ranks are reseeded from (seed, rank, iteration)).
* A checkpoint (``checkpoint.pth``, written atomically every ``checkpoint_every`` iterations, at every epoch end
  and when stopping) holds student, teacher, optimiser, grad scaler, the loss centres, epoch, iteration, the
  position inside the epoch, RNG states, the config and the backbone metadata. On the CPU with the same seed and
  thread count, a run interrupted after k iterations and resumed ends with exactly the parameters of an
  uninterrupted run (tested).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

import partreid.common.distributed as cdist
from partreid.common.errors import InputError
from partreid.common.rng import rng_state, seed_everything, set_rng_state
from partreid.common.fileio import atomic_path
from partreid.common.models.archs import ARCHS
from partreid.common.models.checkpoint import read_checkpoint
from partreid.common.models.vit import IMAGENET_MEAN, IMAGENET_STD, META_KEY, build_part_vit, save_backbone
from partreid.pass_pretrain.augment import (CropLayout, DecodedImages, DeviceMultiCrop, PassMultiCropAugment,
                                           collate_uint8, device_views, resolve_augment_on, seeded_call)
from partreid.pass_pretrain.heads import PASSMultiCrop
from partreid.pass_pretrain.loss import PASSLoss
from partreid.pass_pretrain.config import CLIP_MODES, PassConfig  # noqa: F401 - re-exported
from partreid.common.precision import AMP_MODES  # noqa: F401 - re-exported
from partreid.pass_pretrain.schedules import pass_schedules, scaled_lr

_log = logging.getLogger("partreid.pass")

CHECKPOINT_NAME = "checkpoint.pth"
METRICS_NAME = "metrics.csv"
BACKBONE_NAME = "teacher_backbone.pth"
#: config fields that may change between an interrupted run and its resumption (they do not affect results).
_RESUME_FREE = {"num_workers", "device", "checkpoint_every", "snapshot_every", "stop_after_iters",
                "export_on_finish", "progress", "augment_on"}


# ------------------------------------------------------------------------------------------------------- data
def item_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of dataset item ``index`` in ``epoch`` (a 63-bit int from numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class MultiCropDataset(Dataset):
    """Wrap an image dataset so that item i yields the PASS views of image i, reproducibly.

    Args:
        images: indexable of length N whose items are a PIL image, a tuple/list starting with one (e.g. the
            ``(img, i)`` items of ``partreid.common.data.images.ImageDataset`` built with an identity transform), or ``None``
            for an unreadable image (the item is then skipped).
        augment: callable PIL → list of view tensors (:class:`PassMultiCropAugment`).
        seed: base seed; item i of epoch e is augmented with :func:`item_seed` (seed, e, i).

    Item i → list of ``layout.n_views`` float tensors (3, h, w), or ``None``.
    """

    def __init__(self, images: Any, augment: Any, seed: int = 0):
        self.images = images
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation seeds are used (call before iterating a DataLoader)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Optional[List[torch.Tensor]]:
        item = self.images[index]
        if isinstance(item, (tuple, list)):
            item = item[0] if item else None
        if item is None:
            return None
        if not hasattr(item, "convert") or not hasattr(item, "crop"):
            raise InputError(f"dataset item {index} is a {type(item).__name__}, expected a PIL image")
        return seeded_call(self.augment, item, item_seed(self.seed, self.epoch, index))


def collate_views(batch: Sequence[Optional[List[torch.Tensor]]]) -> Optional[List[torch.Tensor]]:
    """Stack per-item view lists into per-view batches [(B, 3, h, w), …]; ``None`` items are dropped; returns
    ``None`` when nothing is left."""
    items = [b for b in batch if b is not None]
    if not items:
        return None
    return [torch.stack([it[v] for it in items]) for v in range(len(items[0]))]


class SkipSampler(Sampler):
    """Yield the indices of ``sampler`` after skipping the first ``skip`` (fast-forward on resume)."""

    def __init__(self, sampler: Sampler, skip: int = 0):
        self.sampler, self.skip = sampler, int(skip)

    def __iter__(self) -> Iterator[int]:
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


# ------------------------------------------------------------------------------------------------ model parts
def build_pass_models(config: PassConfig) -> Tuple[PASSMultiCrop, PASSMultiCrop]:
    """Student (drop_path ``config.drop_path_rate``) and teacher (no drop_path, no gradients), with identical
    initial weights (PASS ``main_pass.py`` ``train_dino``). Returns (student, teacher)."""
    layout = CropLayout(n_global=2, n_bands=3, local_per_band=config.local_crops_per_band)

    def make(drop_path: float) -> PASSMultiCrop:
        backbone = build_part_vit(config.arch, depth=config.depth, image_size=tuple(config.image_size),
                                  patch_size=config.patch_size, drop_path_rate=drop_path,
                                  pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD,
                                  pass_scale_quirk=config.pass_scale_quirk)
        return PASSMultiCrop(backbone, layout, out_dim=config.out_dim, hidden_dim=config.hidden_dim,
                             bottleneck_dim=config.bottleneck_dim, use_bn=config.use_bn_in_head,
                             norm_last_layer=config.norm_last_layer)

    student = make(config.drop_path_rate)
    teacher = make(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def param_groups(model: nn.Module) -> List[Dict[str, Any]]:
    """AdamW groups of PASS (PASS ``utils.py`` ``get_params_groups``): ``regularized`` = trainable tensors with ≥ 2
    dims that are not biases (incl. the (1,1,D) tokens and the position table); ``not regularized`` = biases and 1-D
    tensors (LayerNorm), weight decay 0. Frozen tensors are left out. Each group carries a ``regularized`` flag."""
    reg, noreg = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (noreg if name.endswith(".bias") or p.ndim == 1 else reg).append(p)
    return [{"params": reg, "regularized": True}, {"params": noreg, "regularized": False, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients(parameters: Sequence[nn.Parameter], max_norm: float, mode: str = "per-tensor") -> None:
    """Clip gradients in place (PASS ``utils.py`` ``clip_gradients``, ``--clip_grad 3.0``).

    * ``'per-tensor'`` (the reference): each tensor's gradient g with L2 norm ‖g‖ is scaled by
      min(1, max_norm/(‖g‖ + 1e-6)) on its own;
    * ``'global'``: ``torch.nn.utils.clip_grad_norm_`` over all tensors together;
    * ``'none'``: nothing (also when ``max_norm`` <= 0).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if mode not in CLIP_MODES:
        raise InputError(f"clip_mode {mode!r} not in {CLIP_MODES}")
    if not grads or mode == "none" or max_norm <= 0:
        return
    if mode == "global":
        torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_norm)
        return
    for g in grads:  # no host sync: the scale is a device tensor
        norm = torch.linalg.vector_norm(g.float())
        g.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0).to(g.dtype))


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_epochs: int) -> None:
    """Drop (set to None) the gradients of every parameter whose name contains ``last_layer`` while
    ``epoch < freeze_epochs`` (PASS ``utils.py`` ``cancel_gradients_last_layer``, ``--freeze_last_layer 1``); AdamW
    then skips them."""
    if epoch >= freeze_epochs:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Teacher ← m·teacher + (1−m)·student over all parameters, matched by name (PASS ``main_pass.py``
    ``train_one_epoch``).

    Raises InputError when the two models' parameter names differ."""
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise InputError("teacher and student parameters differ")
    names = list(t_params)
    t_list = [t_params[n].data for n in names]
    s_list = [s_params[n].detach().data for n in names]
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)


class PassTrainer:
    """Student, teacher, loss, optimiser, scaler and schedules of one PASS run, with :meth:`step`.

    Args:
        config: :class:`PassConfig`.
        niter_per_epoch: iterations per epoch (for the per-iteration schedules).
        device: where the models live.
        world_size: number of processes (global batch = batch_size × world_size).
        ddp: wrap the student in DistributedDataParallel (torch.distributed must be initialised).
    """

    def __init__(self, config: PassConfig, niter_per_epoch: int, device: Union[str, torch.device] = "cpu",
                 world_size: int = 1, ddp: bool = False):
        self.config = config.validate()
        self.device = torch.device(device)
        self.niter_per_epoch = int(niter_per_epoch)
        student, teacher = build_pass_models(config)
        self.student = student.to(self.device)
        self.teacher = teacher.to(self.device)
        self.layout = self.student.layout
        if ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.student_ddp: nn.Module = nn.parallel.DistributedDataParallel(self.student, device_ids=ids)
        else:
            self.student_ddp = self.student
        self.loss_fn = PASSLoss(config.out_dim, self.layout, config.epochs, config.warmup_teacher_temp,
                                config.teacher_temp, config.warmup_teacher_temp_epochs, config.student_temp,
                                config.center_momentum).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.student))
        self.amp_dtype, use_scaler = cdist.resolve_amp(config.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        if cdist.rank() == 0:
            if self.amp_dtype is None and config.amp not in ("none", "auto"):
                why = f"--amp {config.amp} autocast runs on CUDA only; float32 on the CPU"
            else:
                why = "float32" if self.amp_dtype is None else (
                    str(self.amp_dtype).replace("torch.", "") + " autocast" + (" with a GradScaler" if use_scaler
                                                                               else ""))
            _log.info("precision: %s", why)
        self.global_batch = config.batch_size * int(world_size)
        self.schedules = pass_schedules(lr=config.lr, min_lr=config.min_lr, warmup_epochs=config.warmup_epochs,
                                        weight_decay=config.weight_decay, weight_decay_end=config.weight_decay_end,
                                        momentum_teacher=config.momentum_teacher, epochs=config.epochs,
                                        niter_per_epoch=self.niter_per_epoch, global_batch=self.global_batch)
        self.peak_lr = scaled_lr(config.lr, self.global_batch)
        self._trainable = [p for p in self.student.parameters() if p.requires_grad]

    def autocast(self):
        """Autocast context for the configured precision (a no-op context in full precision)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def step(self, views: Sequence[torch.Tensor], epoch: int, iteration: int) -> Dict[str, float]:
        """One PASS iteration (PASS ``main_pass.py`` ``train_one_epoch``): set lr/wd from the schedules at global
        ``iteration``, teacher on the global views and student on all views, loss (+ centre update), backward,
        unscale, clip, epoch-0 last-layer freeze, AdamW step, teacher EMA.

        Args:
            views: ``layout.n_views`` batches (B, 3, h, w) in crop order (any device).
            epoch: 0-based epoch (teacher temperature, last-layer freeze).
            iteration: global 0-based iteration (schedules).

        Returns:
            dict loss, lr, wd, momentum, teacher_temp (floats).

        Raises:
            FloatingPointError: the loss is not finite (training stops, as in DINO).
        """
        cfg = self.config
        it = min(int(iteration), len(self.schedules["lr"]) - 1)
        lr, wd, mom = (float(self.schedules[k][it]) for k in ("lr", "wd", "momentum"))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group.get("regularized"):
                group["weight_decay"] = wd
        views = [v.to(self.device, non_blocking=True) for v in views]
        with self.autocast():
            with torch.no_grad():
                teacher_out = self.teacher(views[:self.layout.n_global])
            student_out = self.student_ddp(views)
            loss = self.loss_fn(student_out, teacher_out, epoch)
        loss_value = float(loss.item())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"PASS loss is {loss_value} at epoch {epoch}, iteration {iteration}; stopping")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        clip_gradients(self._trainable, cfg.clip_grad, cfg.clip_mode)
        cancel_last_layer_gradients(self.student, epoch, cfg.freeze_last_layer)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        ema_update(self.teacher, self.student, mom)
        return {"loss": loss_value, "lr": lr, "wd": wd, "momentum": mom,
                "teacher_temp": self.loss_fn.teacher_temp(epoch)}

    def state_dict(self) -> Dict[str, Any]:
        """Student, teacher, optimizer, scaler and loss (centres) states."""
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "loss": self.loss_fn.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loss_fn.load_state_dict(state["loss"])


# ------------------------------------------------------------------------------------------------ run helpers
def _backbone_meta(config: PassConfig) -> Dict[str, Any]:
    return {"arch": config.arch, "embed_dim": ARCHS[config.arch]["embed_dim"],
            "num_heads": ARCHS[config.arch]["num_heads"], "depth": config.depth,
            "num_parts": 3, "patch_size": config.patch_size, "image_size": list(config.image_size),
            "pixel_mean": list(IMAGENET_MEAN), "pixel_std": list(IMAGENET_STD)}


def _save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _truncate_metrics(path: Path, keep_below: int) -> None:
    """Drop metric rows of iterations ≥ ``keep_below`` (logged after the checkpoint we resume from)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    col = header.index("iteration") if "iteration" in header else None
    kept = [r for r in body if col is None or (len(r) > col and int(r[col]) < keep_below)]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header] + kept)


def _check_resume_config(saved: Dict[str, Any], config: PassConfig) -> None:
    ours = asdict(config)
    diff = []
    for key, value in ours.items():
        if key in _RESUME_FREE:
            continue
        old = saved.get(key)
        norm = (lambda v: tuple(v) if isinstance(v, (list, tuple)) else v)
        if norm(old) != norm(value):
            diff.append(f"{key} {old!r} -> {value!r}")
    if diff:
        raise InputError("cannot resume: the run was started with other settings: " + "; ".join(diff))


def _make_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency
    except Exception:  # noqa: BLE001 - tensorboard not installed
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def train_pass(config: PassConfig, dataset: Any, out_dir: Union[str, os.PathLike],
               resume: Union[bool, str, os.PathLike] = False) -> Path:
    """Run (or resume) PASS pre-training (PASS ``main_pass.py``) and return the path of the final checkpoint.

    Args:
        config: :class:`PassConfig` (paper defaults).
        dataset: indexable of PIL images (see :class:`MultiCropDataset` for accepted item forms); labels unused.
        out_dir: run folder; receives ``checkpoint.pth`` (student, teacher, optimizer, scaler, centres, epoch,
            iteration, RNG states, config), ``metrics.csv`` (one row per iteration: epoch, iteration, loss, lr,
            wd, momentum, teacher_temp, images_per_s), ``config.json``, TensorBoard logs when ``tensorboard`` is
            installed, optional ``checkpoint{epoch:04d}.pth`` snapshots and, when training completes and
            ``config.export_on_finish``, ``teacher_backbone.pth`` (:func:`export_backbone`).
        resume: ``False`` (a fresh run; the folder must not hold a checkpoint), ``True`` (continue from
            ``out_dir/checkpoint.pth``, mid-epoch if it was written mid-epoch) or the path of a checkpoint.

    Under ``torchrun`` (WORLD_SIZE > 1) each process trains on its shard (DistributedSampler), the student is
    wrapped in DDP, centres are all-reduced and rank 0 writes the files. Progress (loss, lr, images/s) goes to
    stderr.

    Returns:
        ``out_dir/checkpoint.pth``.

    Raises:
        InputError: bad config, dataset smaller than one global batch, an existing checkpoint without
            ``resume``, or a checkpoint that does not match the config/dataset/world size.
        FloatingPointError: non-finite loss.
    """
    config.validate()
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    # under torchrun: NCCL on CUDA (one GPU per local rank), gloo on the CPU; every rank leaves together
    with cdist.session(cdist.resolve_device(config.device)) as device_name:
        device, rank, world = torch.device(device_name), cdist.rank(), cdist.world_size()
        resume_from: Optional[Path] = None
        if resume:
            resume_from = ckpt_path if resume is True else Path(resume)
            if not resume_from.is_file():
                raise InputError(f"{resume_from}: no checkpoint to resume from")
        elif ckpt_path.exists():
            raise InputError(f"{ckpt_path} exists; resume the run or choose another output folder")

        n_images = len(dataset)
        sampler = DistributedSampler(range(n_images), num_replicas=world, rank=rank, shuffle=True,
                                     seed=config.seed, drop_last=False)
        niter = len(sampler) // config.batch_size
        if niter < 1:
            raise InputError(f"the dataset has {n_images} images, fewer than one batch of {config.batch_size} "
                             f"per process x {world} processes")
        seed_everything(config.seed)  # same initial weights on every rank
        trainer = PassTrainer(config, niter, device, world_size=world, ddp=world > 1)
        start_epoch, start_iter = 0, 0
        if resume_from is not None:
            ckpt = read_checkpoint(resume_from)
            _check_resume_config(ckpt.get("config", {}), config)
            if ckpt.get("n_images") != n_images or ckpt.get("world_size") != world:
                raise InputError(f"cannot resume: checkpoint was made with {ckpt.get('n_images')} images on "
                                 f"{ckpt.get('world_size')} processes, now {n_images} on {world}")
            trainer.load_state_dict(ckpt)
            start_epoch, start_iter = int(ckpt["epoch"]), int(ckpt["iter_in_epoch"])
            if start_epoch >= config.epochs:
                if rank == 0:
                    logging.getLogger("partreid").warning(
                        "%s: this run already finished (%d of %d epochs); nothing to do, nothing changed",
                        out_dir, start_epoch, config.epochs)
                return ckpt_path
            if rank == 0:
                set_rng_state(ckpt["rng"])
            else:
                seed_everything(int(item_seed(config.seed, rank, int(ckpt["iteration"]))) % (2 ** 31))
        else:
            seed_everything(config.seed + rank)  # per-rank stochastic depth

        augment = PassMultiCropAugment(global_size=tuple(config.image_size), local_size=tuple(config.local_size),
                                       global_scale=tuple(config.global_crops_scale),
                                       local_scale=tuple(config.local_crops_scale),
                                       local_per_band=config.local_crops_per_band)
        if augment.layout != trainer.layout:
            raise InputError(f"augmentation layout {augment.layout} differs from the model's {trainer.layout}")
        views_ds = MultiCropDataset(dataset, augment, seed=config.seed)
        collate, device_aug = collate_views, None
        if resolve_augment_on(config.augment_on, device) == "device":  # workers only decode
            device_aug = DeviceMultiCrop(tuple(config.image_size), tuple(config.local_size),
                                         tuple(config.global_crops_scale), tuple(config.local_crops_scale),
                                         local_per_band=config.local_crops_per_band)
            views_ds, collate = DecodedImages(dataset), collate_uint8

        metrics_path = out_dir / METRICS_NAME
        writer = None
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(out_dir / "config.json") as tmp:
                tmp.write_text(json.dumps(asdict(config), indent=2) + "\n")
            _truncate_metrics(metrics_path, start_epoch * niter + start_iter)
            writer = _make_writer(out_dir)

        def checkpoint(epoch_next: int, iter_next: int, path: Path = ckpt_path) -> None:
            if rank != 0:
                return
            payload = trainer.state_dict()
            payload.update({"epoch": epoch_next, "iter_in_epoch": iter_next,
                            "iteration": epoch_next * niter + iter_next, "niter_per_epoch": niter,
                            "n_images": n_images, "world_size": world, "config": asdict(config),
                            "rng": rng_state(), META_KEY: _backbone_meta(config)})
            _save_checkpoint(path, payload)

        fields = ["epoch", "iteration", "loss", "lr", "wd", "momentum", "teacher_temp", "images_per_s"]
        metrics_file = None
        if rank == 0:
            new_file = not metrics_path.exists() or metrics_path.stat().st_size == 0
            metrics_file = open(metrics_path, "a", newline="")
            csv_writer = csv.writer(metrics_file)
            if new_file:
                csv_writer.writerow(fields)
        stop_at = config.stop_after_iters
        finished = True
        try:
            for epoch in range(start_epoch, config.epochs):
                skip = start_iter if epoch == start_epoch else 0
                sampler.set_epoch(epoch)
                views_ds.set_epoch(epoch)
                loader = DataLoader(views_ds, batch_size=config.batch_size,
                                    sampler=SkipSampler(sampler, skip * config.batch_size),
                                    num_workers=config.num_workers, collate_fn=collate, drop_last=True,
                                    pin_memory=device.type == "cuda",
                                    generator=torch.Generator().manual_seed(config.seed + epoch))
                bar = tqdm(total=niter, initial=skip, desc=f"epoch {epoch}", file=sys.stderr,
                           disable=not (config.progress and rank == 0), dynamic_ncols=True, leave=False)
                tick = time.perf_counter()
                rate = None
                for i, views in enumerate(loader, start=skip):
                    it = epoch * niter + i
                    if views is not None:
                        if device_aug is not None:
                            views = device_views(device_aug, views, device,  # seed of (run, rank, epoch, iteration)
                                                 item_seed(config.seed + 7919 * rank, epoch, n_images + i))
                        stats = trainer.step(views, epoch, it)
                        now = time.perf_counter()
                        ips = views[0].shape[0] * world / max(now - tick, 1e-9)
                        tick = now
                        rate = ips if rate is None else 0.9 * rate + 0.1 * ips
                        if rank == 0:
                            csv_writer.writerow([epoch, it, f"{stats['loss']:.6f}", f"{stats['lr']:.6e}",
                                                 f"{stats['wd']:.6f}", f"{stats['momentum']:.6f}",
                                                 f"{stats['teacher_temp']:.4f}", f"{ips:.2f}"])
                            metrics_file.flush()
                            if writer is not None:
                                for key in ("loss", "lr", "wd", "momentum"):
                                    writer.add_scalar(f"train/{key}", stats[key], it)
                                writer.add_scalar("train/images_per_s", ips, it)
                        bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}",
                                        img_s=f"{rate:.1f}")
                    bar.update(1)
                    done = it + 1
                    if i + 1 == niter:
                        break
                    if stop_at is not None and done >= stop_at:
                        checkpoint(epoch, i + 1)
                        finished = False
                        break
                    if config.checkpoint_every and done % config.checkpoint_every == 0:
                        checkpoint(epoch, i + 1)
                bar.close()
                if not finished:
                    break
                checkpoint(epoch + 1, 0)
                if config.snapshot_every and (epoch + 1) % config.snapshot_every == 0:
                    checkpoint(epoch + 1, 0, out_dir / f"checkpoint{epoch + 1:04d}.pth")
                start_iter = 0
                if stop_at is not None and (epoch + 1) * niter >= stop_at and epoch + 1 < config.epochs:
                    finished = False
                    break
        finally:
            if metrics_file is not None:
                metrics_file.close()
            if writer is not None:
                writer.close()
        if rank == 0 and finished and config.export_on_finish and ckpt_path.exists():
            export_backbone(ckpt_path, out_dir / BACKBONE_NAME)
        return ckpt_path


def export_backbone(run_or_ckpt: Union[str, os.PathLike], out: Union[str, os.PathLike]) -> Path:
    """Write the TEACHER backbone of a PASS run alone, in the official PASS key layout (PASS
    ``convert_model_dino.py``), plus our metadata (arch, image size, pixel mean/std, epoch, iteration),
    atomically (:func:`common.models.vit.save_backbone`).

    Args:
        run_or_ckpt: a run folder (its ``checkpoint.pth`` is used) or a checkpoint file holding ``teacher``.
        out: destination file.

    Returns:
        ``out`` as a Path.

    Raises:
        InputError: no checkpoint, or it holds no teacher backbone.
    """
    src = Path(run_or_ckpt)
    if src.is_dir():
        src = src / CHECKPOINT_NAME
    ckpt = read_checkpoint(src)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("teacher"), dict):
        raise InputError(f"{src}: not a PASS training checkpoint (no 'teacher' entry)")
    state = {}
    for key, value in ckpt["teacher"].items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith("backbone."):
            state[key[len("backbone."):]] = value
    if not state:
        raise InputError(f"{src}: the teacher holds no backbone.* tensors")
    meta = dict(ckpt.get(META_KEY) or {})
    meta.update({"source": "pass-pretrain teacher", "epoch": ckpt.get("epoch"), "iteration": ckpt.get("iteration")})
    return save_backbone(state, out, meta)
