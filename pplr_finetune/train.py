"""PPLR unsupervised fine-tuning: the epoch loop (PPLR ``examples/train_pplr.py`` ``main_worker``; PASS's own USL
setting PASS-reID ``CC-PASS/examples/cluster_contrast_train_usl.py`` as a preset).

Each epoch:

1. **extract** global and part features of the training set (:func:`common.extract.extract_to_file`, the
   function behind ``extract-features``);
2. **cluster** them: k-reciprocal Jaccard + DBSCAN (:func:`pplr_finetune.pseudo_labels.cluster_features_file`,
   behind ``cluster``); outliers are left out of the epoch;
3. score the **cross-agreement** of every part (:func:`pplr_finetune.cross_agreement.refine_labels_file`,
   behind ``refine-labels``);
4. **train** ``iters`` iterations on P×K batches: PGLR on the global head, soft-margin batch-hard triplet,
   and per part label-smoothed CE (before ``aals_epoch``) or AALS (from it), averaged over the parts;
5. step the LR schedule, evaluate every ``eval_every`` epochs (and at the last epoch), checkpoint.

The per-epoch files go to a work folder (kept with ``keep_intermediate``), so the loop and the shell pipeline
``extract-features | cluster | refine-labels`` run exactly the same code.

Reported results are those of the **last** epoch. The best test-set epoch is logged, labelled as test-set
selection (the peers silently keep it; we do not).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from partreid.common import distributed as dist
from partreid.common.data import load_dataset
from partreid.common.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, collate_skip_none
from partreid.common.errors import InputError
from partreid.common.extract import FeatureOptions, extract_arrays, extract_to_file
from partreid.common.fileio import atomic_path
from partreid.common.h5io import features_for_labels, read_labels
from partreid.common.models.checkpoint import read_checkpoint
from partreid.common.models.loader import LoadedModel, load_model
from partreid.common.models.reid import ReIDModel, cluster_centroids, save_reid_checkpoint
from partreid.common.retrieval.evaluation import evaluate_rank
from partreid.common.rng import rng_state, seed_everything, set_rng_state
from partreid.pplr_finetune.config import PRESETS, FinetuneConfig, resolve_bn_groups  # noqa: F401 - re-exported
from partreid.common.splits import choose_split
from partreid.pplr_finetune.cluster_memory import HardClusterMemory
from partreid.pplr_finetune.cross_agreement import refine_labels_file
from partreid.pplr_finetune.losses import (aals_loss, batch_precision, build_camera_proxies, ce_label_smooth,
                                           inter_camera_proxy_loss, pglr_loss, soft_triplet_loss)
from partreid.pplr_finetune.pseudo_labels import cluster_features_file
from partreid.pplr_finetune.sampler import PKSampler
from partreid.pplr_finetune.transforms import train_transform

log = logging.getLogger("partreid.finetune")

# --------------------------------------------------------------------------------------------------- helpers
def _normalization(cfg: FinetuneConfig, loaded) -> Tuple[tuple, tuple]:
    if cfg.normalization == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if cfg.normalization == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(loaded.pixel_mean), tuple(loaded.pixel_std)


def build_model(cfg: FinetuneConfig, bn_groups: int = 1):
    """Backbone from the checkpoint + BNNecks/classifiers → (ReIDModel, LoadedModel of the backbone).

    ``--arch resnet50`` starts from ImageNet weights as PPLR does: ``cfg.checkpoint`` (torchvision weights or a
    fine-tuned model) or ``cfg.resnet_weights``; a random ResNet-50 only with ``cfg.random_init``.

    Raises:
        InputError: ``--arch resnet50`` without weights and without ``random_init``; bad checkpoint.
    """
    if cfg.arch == "resnet50" and (not cfg.checkpoint or cfg.checkpoint == "random:resnet50"):
        if not cfg.resnet_weights and not cfg.random_init:
            raise InputError("--arch resnet50 needs ImageNet weights: pass --resnet-weights FILE (torchvision "
                             "resnet50 .pth, as PPLR starts from), or --random-init to train from scratch")
        loaded = load_model("random:resnet50", resnet_weights=cfg.resnet_weights, image_size=cfg.image_size)
    else:
        loaded = load_model(cfg.checkpoint, arch=cfg.arch if cfg.arch != "resnet50" else None,
                            image_size=cfg.image_size)
    if loaded.kind == "reid":  # continue from a fine-tuned model
        model = loaded.model
        model.set_bn_groups(bn_groups)
    else:
        fusion = "cls" if loaded.kind == "resnet" else cfg.fusion
        if cfg.drop_path and hasattr(loaded.model, "set_drop_path"):
            loaded.model.set_drop_path(cfg.drop_path)
        model = ReIDModel(loaded.model, fusion=fusion, num_classes=cfg.classifier_capacity, bn_groups=bn_groups)
    return model, loaded


class SeededItems(torch.utils.data.Dataset):
    """Items ``(row, seed)`` → ``images[row]`` drawn under torch's CPU RNG seeded with ``seed`` (restored after).

    The train augmentation of a batch then depends only on (seed, epoch, iteration, position in the global batch),
    not on the number of data-loader workers or of processes: one process and ``torchrun`` draw the same crops,
    flips and erasing boxes.
    """

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        row, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.images[int(row)]


class SeededBatches(torch.utils.data.Sampler):
    """Wrap a :class:`PKSampler`: each index becomes ``(row, seed)`` with a seed from (base, epoch, global
    iteration, position in the global batch)."""

    def __init__(self, sampler, seed: int, epoch: int):
        self.sampler, self.seed, self.epoch = sampler, int(seed), int(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        offset = self.sampler.rank * (self.sampler.batch_size // self.sampler.world_size)
        for it, batch in enumerate(self.sampler, start=self.sampler.start_iter):
            seeds = np.random.SeedSequence([self.seed, self.epoch, it]).generate_state(self.sampler.batch_size)
            yield [(row, int(seeds[offset + j])) for j, row in enumerate(batch)]


def gather_batch(out: Dict[str, torch.Tensor], sizes, *tensors: torch.Tensor):
    """Under DDP: every rank's outputs and labels concatenated in rank order (the global batch, as
    nn.DataParallel gathers it), so the losses (batch-hard triplet, memory update, PGLR) see the whole batch.

    ``sizes``: every rank's batch size (:func:`partreid.common.distributed.batch_sizes`); they may differ when a
    rank's collate dropped unreadable images. Outputs keep their gradient
    (:func:`partreid.common.distributed.gather_rows`); DDP's averaging then gives the gradient of the
    global-batch loss. A no-op in one process.
    """
    out = {k: dist.gather_rows(v, sizes, grad=True) for k, v in out.items()}
    return (out,) + tuple(dist.gather_rows(t, sizes) for t in tensors)


class _Run:
    """State of one fine-tuning run (kept in one object so the epoch steps read top to bottom)."""

    def __init__(self, cfg: FinetuneConfig, out_dir: Path):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.device = dist.resolve_device(cfg.device)
        self.amp_dtype, use_scaler = dist.resolve_amp(cfg.amp, self.device)
        if self.rank == 0:
            log.info("precision: %s", "float32 (the published code's)" if self.amp_dtype is None else
                     f"{str(self.amp_dtype).replace('torch.', '')} autocast" + (" with a GradScaler" if use_scaler
                                                                               else ""))
        labels_file = None
        if cfg.labels:
            labels_file = read_labels(cfg.labels)
        spec = cfg.data
        if not spec and labels_file is not None:
            spec = str(features_for_labels(labels_file, parts=False).attrs.get("dataset", ""))
        if not spec:
            raise InputError("--data SPEC is required (or --labels from a features file that records its dataset)")
        self.ds = load_dataset(spec, verbose=self.rank == 0)
        self.spec = spec
        self.labels_file = labels_file
        _, self.train_frame = choose_split(self.ds)
        eval_ds = load_dataset(cfg.eval_data, verbose=False) if cfg.eval_data else self.ds
        splits = set(eval_ds.frame["split"])
        self.eval_ds = eval_ds if {"query", "gallery"} <= splits and (eval_ds.frame["pid"] >= 0).any() else None

        self.bn_groups, bn_line = resolve_bn_groups(cfg.bn_groups, cfg.batch_size, self.world, cfg.bn_batch)
        if self.rank == 0:
            log.info("%s", bn_line)
        self.model, self.loaded = build_model(cfg, self.bn_groups)
        self.model.to(self.device)
        self.mean, self.std = _normalization(cfg, self.loaded)
        self.image_size = tuple(cfg.image_size or self.loaded.image_size)
        self.meta = {"arch": self.loaded.arch,
                     "image_size": list(self.image_size), "pixel_mean": list(self.mean), "pixel_std": list(self.std),
                     "fusion": self.model.fusion, "preset_loss": cfg.loss, "dataset": spec,
                     "dataset_fingerprint": self.ds.fingerprint, "init_checkpoint": cfg.checkpoint}
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.start_epoch = 0
        self.history: List[Dict[str, Any]] = []
        self.current_labels: Optional[Dict[str, np.ndarray]] = None
        self.ddp_model = self.model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[torch.cuda.current_device()] if self.device.startswith("cuda") else None,
                find_unused_parameters=True)

    # -- set-up
    def _make_optimizer(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        cfg = self.cfg
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        raise InputError(f"unknown optimizer {cfg.optimizer!r} (adam or sgd)")

    def as_loaded(self, source: str):
        """The model being trained, wrapped for :mod:`common.extract` (BNNeck features, this run's input)."""
        return LoadedModel(self.model, "reid", self.meta["arch"], self.image_size, self.mean, self.std, source,
                           "finetune", dict(self.meta))

    # -- checkpoints
    @property
    def state_path(self) -> Path:
        return self.out / "checkpoint.pth"

    def save(self, epoch: int) -> None:
        """Atomically write the training state after ``epoch`` (resume point) and ``last.pth`` (the model)."""
        if self.rank != 0:
            return
        state = {"format": "partreid.finetune_state", "epoch": epoch + 1, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": rng_state(), "labels": self.current_labels,
                 "history": self.history, "config": dataclasses.asdict(self.cfg),
                 "active_classes": int(self.model.active_classes),
                 "capacity": self.model.classifier_capacity}
        with atomic_path(self.state_path) as tmp:
            torch.save(state, tmp)
        save_reid_checkpoint(self.out / "last.pth", self.model, dict(self.meta, epoch=epoch + 1))

    def load(self) -> bool:
        """Restore a previous run's state from ``checkpoint.pth``; False when there is none."""
        if not self.state_path.exists():
            return False
        state = read_checkpoint(self.state_path, what="finetune checkpoint")
        if state.get("format") != "partreid.finetune_state":
            raise InputError(f"{self.state_path}: not a finetune checkpoint")
        if state["capacity"] > self.model.classifier_capacity:
            self.model.resize_classifiers(state["capacity"], self.optimizer)
        self.model.load_state_dict(state["model"])
        self.model.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.current_labels = state["labels"]
        set_rng_state(state["rng"])
        log.info("resumed %s after epoch %d", self.state_path, self.start_epoch)
        return True

    # -- steps 1-3: pseudo-labels through the stage functions
    def pseudo_labels(self, epoch: int) -> Dict[str, np.ndarray]:
        """Extract → cluster → refine for this epoch; returns labels, agreement, camid, path and the features."""
        cfg = self.cfg
        work = Path(cfg.keep_intermediate) if cfg.keep_intermediate else self.out / "work"
        epoch_dir = work / f"epoch_{epoch:03d}"
        if epoch == self.start_epoch and self.labels_file is not None:
            refined = self.labels_file
        else:
            feats_path = extract_to_file(self.as_loaded("finetune (current epoch)"), self.ds, self.train_frame,
                                         epoch_dir / "features.h5",
                                         split="train", opts=FeatureOptions(neck="after", normalize=True),
                                         batch_size=max(cfg.batch_size, 64), workers=cfg.workers,
                                         device=self.device, progress=cfg.progress, amp=cfg.amp,
                                         command=f"finetune epoch {epoch}: extract")
            self.model.train()
            refined = None
            if self.rank == 0:
                labels_path, report = cluster_features_file(
                    feats_path, epoch_dir / "labels.h5", k1=cfg.k1, k2=cfg.k2, eps=cfg.eps,
                    min_samples=cfg.min_samples, convention=cfg.convention, knn=cfg.knn, device=self.device,
                    command=f"finetune epoch {epoch}: cluster")
                log.info("epoch %d clustering:\n%s", epoch, report)
                refined_path, report = refine_labels_file(labels_path, epoch_dir / "refined.h5", k=cfg.k,
                                                          device=self.device,
                                                          command=f"finetune epoch {epoch}: refine-labels")
                log.info("epoch %d cross-agreement:\n%s", epoch, report)
                refined = read_labels(refined_path)
        result = None
        if self.rank == 0:
            feats = features_for_labels(refined)
            result = {"labels": refined.labels, "agreement": refined.agreement, "camid": refined.camid,
                      "path": refined.path, "global": feats.global_feats, "parts": feats.parts}
            if result["agreement"] is None:
                raise InputError(f"{refined.filename}: no cross-agreement scores; run refine-labels on it first")
        result = dist.broadcast_object(result)
        if not cfg.keep_intermediate and epoch_dir.exists() and self.rank == 0:
            shutil.rmtree(epoch_dir, ignore_errors=True)
        return result

    # -- step 4: one epoch of training
    def train_epoch(self, epoch: int, pl: Dict[str, np.ndarray]) -> Dict[str, float]:
        cfg = self.cfg
        labels = np.asarray(pl["labels"], dtype=np.int64)
        keep = labels >= 0
        num_clusters = int(labels[keep].max()) + 1 if keep.any() else 0
        if num_clusters < 2 and epoch == self.start_epoch and self.labels_file is not None:
            raise InputError(f"{cfg.labels}: the labels given with --labels hold {num_clusters} cluster(s) "
                             f"({int((~keep).sum())} of {len(labels)} samples are outliers); re-run cluster on its "
                             f"features with another --eps (--sweep-eps helps choose), or give other --labels")
        if num_clusters < 2:
            raise InputError(f"epoch {epoch}: DBSCAN found {num_clusters} cluster(s) at eps={cfg.eps}; "
                             f"try another --eps (cluster --sweep-eps helps choose)")
        g_cent = cluster_centroids(pl["global"], labels)
        p_cent = torch.stack([cluster_centroids(pl["parts"][:, n], labels) for n in range(pl["parts"].shape[1])])
        self.model.reset_classifiers(g_cent, p_cent, self.optimizer)
        memory = None
        if cfg.loss == "cluster-contrast":
            memory = HardClusterMemory(g_cent, cfg.memory_temperature, cfg.memory_momentum).to(self.device)
        proxies = None
        if cfg.camera_aware:
            proxies = [build_camera_proxies(torch.as_tensor(pl["global"]), torch.as_tensor(labels),
                                              torch.as_tensor(pl["camid"]))]
            proxies += [build_camera_proxies(torch.as_tensor(pl["parts"][:, n]), torch.as_tensor(labels),
                                               torch.as_tensor(pl["camid"])) for n in range(pl["parts"].shape[1])]
            proxies = [tuple(t.to(self.device) for t in p) for p in proxies]

        frame = pd.DataFrame({"path": pl["path"], "pid": -1, "camid": pl["camid"]})
        images = ImageDataset(self.ds, frame, train_transform(self.image_size, self.mean, self.std))
        sampler = PKSampler(labels, pl["camid"], num_instances=cfg.num_instances, batch_size=cfg.batch_size,
                            num_iters=cfg.iters, seed=cfg.seed, rank=self.rank, world_size=self.world)
        sampler.set_epoch(epoch)
        loader = DataLoader(SeededItems(images), batch_sampler=SeededBatches(sampler, cfg.seed, epoch),
                            num_workers=cfg.workers, collate_fn=collate_skip_none,
                            pin_memory=self.device.startswith("cuda"), persistent_workers=False)
        labels_t = torch.as_tensor(labels)
        agree_t = torch.as_tensor(np.asarray(pl["agreement"], dtype=np.float32))
        cam_t = torch.as_tensor(np.asarray(pl["camid"], dtype=np.int64))
        sums: Dict[str, float] = {}
        seen = 0
        t0 = time.time()
        self.ddp_model.train()
        bar = tqdm(loader, total=len(sampler), desc=f"epoch {epoch}", unit="it", leave=False,
                   disable=not cfg.progress or self.rank != 0)
        for it, (x, idx) in enumerate(bar):
            sizes = dist.batch_sizes(len(idx), self.device)
            if min(sizes) == 0:  # a rank lost its whole batch to unreadable images: every rank skips the step
                continue
            x = x.to(self.device, non_blocking=True)
            y = labels_t[idx].to(self.device)
            ca = agree_t[idx].to(self.device)
            cams = cam_t[idx].to(self.device)
            with dist.autocast(self.device, self.cfg.amp):
                out = self.ddp_model(x)
            out = {k: v.float() for k, v in out.items()}
            out, y, ca, cams = gather_batch(out, sizes, y, ca, cams)
            terms = self.losses(epoch, out, y, ca, cams, memory, proxies)
            loss = sum(terms.values())
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            terms["loss"] = loss.detach()
            terms["prec"] = torch.tensor(batch_precision(out["logits_global"].detach(), y))
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            seen += 1
            if cfg.progress and self.rank == 0 and (it % max(cfg.log_every, 1) == 0 or it == len(sampler) - 1):
                rate = seen * len(idx) * self.world / max(time.time() - t0, 1e-9)
                bar.set_postfix({k: f"{v / seen:.3f}" for k, v in sums.items()} | {"img/s": f"{rate:.1f}"})
        bar.close()
        means = {k: v / max(seen, 1) for k, v in sums.items()}
        means.update({"steps": seen, "clusters": num_clusters, "outliers": int((~keep).sum()),
                      "agreement_mean": float(np.asarray(pl["agreement"])[keep].mean()),
                      "lr": float(self.optimizer.param_groups[0]["lr"]),
                      "images_per_s": seen * cfg.batch_size / max(time.time() - t0, 1e-9)})
        return means

    def losses(self, epoch, out, y, ca, cams, memory, proxies) -> Dict[str, torch.Tensor]:
        """The loss terms of one batch (PPLR ``pplr/trainers.py`` ``PPLRTrainer``,
        ``PPLRTrainerCAM``, or cluster-contrast ``clustercontrast/trainers.py``)."""
        cfg = self.cfg
        tri_feat = out["global_bn"] if cfg.triplet_feature == "bnneck-output" else out["global_feat"]
        if cfg.loss == "cluster-contrast":
            return {"memory": memory(out["global_bn"], y)}
        terms = {"pglr": pglr_loss(out["logits_global"], out["logits_parts"], y, ca, beta=cfg.beta),
                 "triplet": soft_triplet_loss(tri_feat, y)}
        parts = out["logits_parts"]
        if epoch >= cfg.aals_epoch:
            part_terms = [aals_loss(parts[:, n], y, ca[:, n]) for n in range(parts.shape[1])]
        else:
            part_terms = [ce_label_smooth(parts[:, n], y, epsilon=cfg.label_smooth) for n in range(parts.shape[1])]
        terms["part"] = torch.stack(part_terms).mean()
        if cfg.camera_aware:
            g = inter_camera_proxy_loss(out["global_bn"], y, cams, *proxies[0], temperature=cfg.cam_temperature,
                                          num_negatives=cfg.cam_negatives)
            p = torch.stack([inter_camera_proxy_loss(out["parts_bn"][:, n], y, cams, *proxies[n + 1],
                                                       temperature=cfg.cam_temperature,
                                                       num_negatives=cfg.cam_negatives)
                             for n in range(parts.shape[1])]).mean()
            terms["camera"] = cfg.lambda_cam * (g + p)
        return terms

    # -- step 5: evaluation
    def evaluate(self) -> Optional[Dict[str, float]]:
        """mAP/CMC on the labelled query/gallery with the current model (rank 0), or None without one."""
        if self.eval_ds is None or self.rank != 0:
            return None
        feats = {}
        for split in ("query", "gallery"):
            frame = self.eval_ds.split(split).reset_index(drop=True)
            g, _, kept = extract_arrays(self.as_loaded("finetune"), self.eval_ds, frame,
                                        opts=FeatureOptions(neck="after", parts=False),
                                        batch_size=max(self.cfg.batch_size, 64), workers=self.cfg.workers,
                                        device=self.device, progress=self.cfg.progress, amp=self.cfg.amp)
            feats[split] = (g, frame["pid"].to_numpy()[kept], frame["camid"].to_numpy()[kept])
        self.model.train()
        (qf, qp, qc), (gf, gp, gc) = feats["query"], feats["gallery"]
        return evaluate_rank(None, qp, gp, qc, gc, qf=qf, gf=gf)


def _write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


def finetune(cfg: FinetuneConfig, out_dir) -> Path:
    """Run PPLR fine-tuning (see the module docstring); returns the path of the final model (``last.pth``).

    Files in ``out_dir``: ``checkpoint.pth`` (resume state, every epoch), ``last.pth`` (the model in the
    ``partreid.reid_model`` format, readable by ``extract-features``/``evaluate``), ``metrics.csv`` (per epoch:
    losses, clusters, outliers, mean agreement, lr, images/s, mAP when evaluated) and ``summary.json``
    (``finetune --plot`` draws ``metrics.png`` from ``metrics.csv``).

    Raises:
        InputError: bad checkpoint/dataset/labels, or an epoch whose clustering gives fewer than 2 clusters.
    """
    out = Path(out_dir)
    seed_everything(cfg.seed)
    run = _Run(cfg, out)
    if cfg.resume:
        run.load()
        if run.start_epoch >= cfg.epochs:
            log.warning("%s: this run already finished (%d of %d epochs); nothing to do, nothing changed",
                        out, run.start_epoch, cfg.epochs)
            return out / "last.pth"
    elif run.state_path.exists():
        raise InputError(f"{run.state_path} exists: pass --resume to continue that run, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    last_metrics = None
    for epoch in range(run.start_epoch, cfg.epochs):
        t0 = time.time()
        pl = run.pseudo_labels(epoch)
        run.current_labels = {"labels": np.asarray(pl["labels"]), "path": np.asarray(pl["path"])}
        row: Dict[str, Any] = {"epoch": epoch}
        row.update(run.train_epoch(epoch, pl))
        run.scheduler.step()
        last = epoch == cfg.epochs - 1
        if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or last):
            metrics = run.evaluate()
            if metrics:
                row.update({k: metrics[k] for k in ("mAP", "rank1", "rank5", "rank10", "mINP")})
                if last:
                    last_metrics = metrics
        row["seconds"] = time.time() - t0
        run.history.append(row)
        run.save(epoch)
        if run.rank == 0:
            _write_csv(out / "metrics.csv", run.history)
            msg = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            log.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, msg)
    if run.rank == 0 and run.history:
        evaluated = [r for r in run.history if r.get("mAP") is not None and not
                     (isinstance(r.get("mAP"), float) and math.isnan(r["mAP"]))]
        summary = {"last_epoch": run.history[-1]["epoch"], "last": last_metrics}
        if evaluated:
            best = max(evaluated, key=lambda r: r["mAP"])
            summary["best_epoch_by_test_mAP"] = {"epoch": best["epoch"], "mAP": best["mAP"],
                                                 "note": "selected on the TEST set; not a valid result"}
            log.info("reported (last epoch %d): %s; best test-set epoch %d (mAP %.4f) is test-set selection, "
                     "not reported", run.history[-1]["epoch"], last_metrics, best["epoch"], best["mAP"])
        with atomic_path(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    dist.barrier()
    return out / "last.pth"
