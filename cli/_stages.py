"""File-level stage functions of the commands (CLI-only code): spec/checkpoint in, files out.

They are thin over the library: :func:`partreid.common.extract.extract_to_file`,
:func:`partreid.common.retrieval.evaluation.evaluate_rank` and the pictures of :mod:`partreid.cli._plots`.
Imported only by the commands that extract or evaluate, so its imports may be heavy.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from partreid.common.errors import InputError
from partreid.common.h5io import features_for_labels, read_features, read_labels
from partreid.common.retrieval.evaluation import distance_chunks, evaluate_rank, topk_per_query
from partreid.common.splits import choose_split

log = logging.getLogger("partreid")


def extract_features(checkpoint: str, spec: str, out, *, split: Optional[str] = None, fusion: str = "auto",
                     neck: str = "after", flip: bool = False, normalize: bool = True, parts: bool = True,
                     arch: Optional[str] = None, image_size=None, interpolation: str = "bicubic",
                     batch_size: int = 64, workers: int = 2, device: str = "cpu", resume: bool = False,
                     strict: bool = False, command: str = "", verbose: bool = True) -> Path:
    """Load a checkpoint and a dataset split and write their features file (``extract-features``).

    Returns:
        the output path.

    Raises:
        InputError: bad checkpoint, dataset spec or split; see :func:`partreid.common.extract.extract_to_file`.
    """
    # torch, the models and the dataset readers load only here: ``evaluate`` on features files never needs them
    from partreid.common.data import load_dataset
    from partreid.common.extract import FeatureOptions, extract_to_file, resolve_fusion
    from partreid.common.models.loader import load_model

    ds = load_dataset(spec, verbose=verbose, strict=strict)
    split, frame = choose_split(ds, split)
    loaded = load_model(checkpoint, arch=arch, image_size=image_size)
    log.info("model: %s (%s, input %dx%d)", loaded.source, loaded.arch, *loaded.image_size)
    if loaded.kind == "onnx" and fusion not in ("auto", loaded.meta.get("fusion")):
        raise InputError(f"{checkpoint}: this exported model computes fusion {loaded.meta.get('fusion')!r} "
                         f"(fixed at export); drop --fusion or export again with --fusion {fusion}")
    opts = FeatureOptions(fusion=resolve_fusion(loaded, fusion), neck=neck, flip=flip, normalize=normalize,
                          parts=parts)
    return extract_to_file(loaded, ds, frame, out, split=split, opts=opts, batch_size=batch_size, workers=workers,
                           device=device, resume=resume, strict=strict, interpolation=interpolation,
                           command=command, inputs=(checkpoint,))


METRIC_KEYS = ("mAP", "rank1", "rank5", "rank10", "rank20", "mINP")


def format_metrics_table(metrics: dict) -> str:
    """The evaluation table: mAP, CMC rank-1/5/10/20 and mINP in percent, plus the query/gallery counts."""
    head = "  ".join(f"{k:>7}" for k in ("mAP", "rank-1", "rank-5", "rank-10", "rank-20", "mINP"))
    row = "  ".join(f"{100 * metrics[k]:>6.2f}%" for k in METRIC_KEYS)
    skipped = metrics["num_query"] - metrics["num_valid_query"]
    foot = (f"queries: {metrics['num_query']} ({metrics['num_valid_query']} with a positive, {skipped} skipped)   "
            f"gallery: {metrics['num_gallery']}")
    extra = f"   re-ranked (k1={metrics['k1']}, k2={metrics['k2']}, lambda={metrics['lambda']})" \
        if metrics.get("rerank") else ""
    if metrics.get("protocol"):
        extra += f"   protocol: {metrics['protocol']}"
    from partreid.common.calibration import format_verification

    ver = format_verification(metrics["verification"]) if metrics.get("verification") else ""
    return f"{head}\n{row}\n{foot}{extra}" + (f"\n{ver}" if ver else "")


def image_refs(attrs: dict, paths) -> list:
    """Per row of a features file, something :func:`partreid.cli._plots.save_ranked_lists` can open: the absolute
    image path, or (for LMDB datasets) a zero-argument callable reading the key."""
    root = Path(str(attrs.get("dataset_root", "")))
    if (root / "keys.pkl").exists():
        from partreid.common.data import load_dataset

        ds = load_dataset(str(attrs.get("dataset")), verbose=False)
        return [functools.partial(ds.open_image, p) for p in paths]
    return [str(root / p) for p in paths]


def evaluate_arrays(qf, gf, q_pids, g_pids, q_camids, g_camids, *, rerank: bool = False, k1: int = 20, k2: int = 6,
                    lambda_value: float = 0.3, protocol: str = "market", metric: str = "euclidean",
                    q_self=None, verification: bool = False, threshold=None) -> dict:
    """:func:`partreid.common.retrieval.evaluation.evaluate_rank` of query against gallery features, with
    ``rerank`` on the k-reciprocal re-ranked distances (Zhong et al. CVPR 2017, Eq. 12; TransReID
    ``utils/reranking.py`` ``re_ranking``), whose parameters are then recorded in the dict. ``q_self``,
    ``verification`` and ``threshold``: see ``evaluate_rank`` (a threshold applies to plain distances only).

    Raises:
        InputError: see ``evaluate_rank``; re-ranking with a metric other than ``'euclidean'`` or a threshold.
    """
    if not rerank:
        return evaluate_rank(None, q_pids, g_pids, q_camids, g_camids, qf=qf, gf=gf, metric=metric,
                             protocol=protocol, q_self=q_self, verification=verification, threshold=threshold)
    if metric != "euclidean":
        raise InputError("re-ranking uses the squared Euclidean distance; use --metric euclidean")
    if threshold is not None:
        raise InputError("a distance threshold applies to plain distances, not to re-ranked ones; drop --rerank")
    # the re-ranking code (and its sparse-matrix dependencies) loads only for --rerank
    from partreid.common.retrieval.reranking import reranked_distance_chunks

    chunks = reranked_distance_chunks(np.ascontiguousarray(qf, np.float32), np.ascontiguousarray(gf, np.float32),
                                      k1, k2, lambda_value, None)
    metrics = evaluate_rank(chunks, q_pids, g_pids, q_camids, g_camids, protocol=protocol, q_self=q_self)
    metrics.update({"rerank": True, "k1": int(k1), "k2": int(k2), "lambda": float(lambda_value)})
    return metrics


def evaluate_files(query, gallery, *, rerank: bool = False, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                   protocol: str = "auto", metric: str = "euclidean", show_ranks: int = 0,
                   out_dir=None, verification: bool = True, threshold_file=None, split_query: int = 0,
                   seed: int = 0) -> dict:
    """Evaluate a query features file against a gallery features file (``evaluate --query --gallery``).

    Args:
        query, gallery: features files. With ``split_query`` = K > 0, ``gallery`` may be None: the query file
            is one labelled set, split into K seeded queries per identity and the rest as gallery
            (:func:`partreid.common.retrieval.evaluation.split_query`).
        protocol: ``auto`` (``no-camera`` when every camid is -1, else ``market``), ``market``, ``cuhk03`` or
            ``no-camera`` (the query's own image, same absolute path, is the only junk entry).
        verification: also report TPR at FMR 1e-2/1e-3 (genuine = same pid, impostor = different pid).
        threshold_file: a ``calibrate`` result; adds the FMR and TPR that its threshold really gives.

    Returns:
        the dict of :func:`partreid.common.retrieval.evaluation.evaluate_rank` (with ``protocol`` and
        ``verification``); with ``show_ranks`` > 0 also ``ranked_lists``, the paths of the ranked-list pictures
        written under ``out_dir``.

    Raises:
        InputError: unreadable files, feature widths that differ, or a threshold file for another metric.
    """
    from partreid.common.retrieval.evaluation import self_indices

    q = read_features(query, parts=False)
    if split_query:
        from partreid.common.retrieval.evaluation import split_query as split_rows

        q_rows, g_rows = split_rows(q.pid, split_query, seed=seed)
        g = subset_features(q, g_rows) if gallery is None else read_features(gallery, parts=False)
        q = subset_features(q, q_rows)
        log.info("--split-query %d: %d queries, %d gallery images", split_query, len(q), len(g))
    else:
        g = read_features(gallery, parts=False)
    if q.global_feats.shape[1] != g.global_feats.shape[1]:
        raise InputError(f"{query} has D={q.global_feats.shape[1]} but {gallery} has D={g.global_feats.shape[1]}")
    if q.attrs.get("model_sha256") != g.attrs.get("model_sha256"):
        log.warning("query and gallery features come from different models (model_sha256 differs)")
    from partreid.common.retrieval.evaluation import tied_distance_fraction

    tied = tied_distance_fraction(q.global_feats, g.global_feats, metric=metric)
    if tied > 0.05:
        log.warning("%.0f%% of the gallery distances tie exactly (identical gallery features?); ties are ranked by "
                    "gallery row order (stable sort), so these metrics depend on that order", 100 * tied)
    threshold = None
    if threshold_file:
        from partreid.common.calibration import read_threshold

        cal = read_threshold(threshold_file, metric=metric, model_sha256=g.attrs.get("model_sha256"))
        threshold = cal["threshold"]
    q_self = self_indices(_abs_paths(q), _abs_paths(g))
    metrics = evaluate_arrays(q.global_feats, g.global_feats, q.pid, g.pid, q.camid, g.camid, rerank=rerank, k1=k1,
                              k2=k2, lambda_value=lambda_value, protocol=protocol, metric=metric, q_self=q_self,
                              verification=verification and not rerank, threshold=threshold)
    if show_ranks:
        metrics["ranked_lists"] = [str(p) for p in save_rank_pictures(q, g, show_ranks, out_dir, metric=metric)]
    return metrics


def _abs_paths(feats) -> list:
    """Absolute image paths of a features file's rows (dataset root + relative path): the image identity used
    by the no-camera protocol."""
    root = str(feats.attrs.get("dataset_root", ""))
    return [str(Path(root) / p) if root else str(p) for p in feats.path]


def subset_features(feats, rows):
    """The rows ``rows`` (int array) of a :class:`partreid.common.h5io.FeaturesFile`, as a new one."""
    import dataclasses

    return dataclasses.replace(feats, global_feats=feats.global_feats[rows],
                               parts=None if feats.parts is None else feats.parts[rows], path=feats.path[rows],
                               pid=feats.pid[rows], camid=feats.camid[rows])


def save_rank_pictures(q, g, n: int, out_dir, metric: str = "euclidean", topk: int = 10):
    """Ranked-list pictures of ``n`` queries spread over the query list: the query, then its top-``topk``
    (same-pid same-camera junk skipped; green = right, red = wrong)."""
    from partreid.cli._plots import save_ranked_lists  # PIL and matplotlib only when pictures are asked for

    if out_dir is None:
        raise InputError("--show-ranks needs --out-dir")
    n = max(1, min(int(n), len(q)))
    chosen = np.unique(np.round(np.linspace(0, len(q) - 1, n)).astype(int))
    idx, _ = topk_per_query(distance_chunks(q.global_feats[chosen], g.global_feats, metric=metric), topk,
                            q_pids=q.pid[chosen], q_camids=q.camid[chosen], g_pids=g.pid, g_camids=g.camid)
    return save_ranked_lists(image_refs(q.attrs, q.path[chosen]), image_refs(g.attrs, g.path), idx,
                             q.pid[chosen], q.camid[chosen], g.pid, g.camid, n=len(chosen), out_dir=out_dir,
                             topk=topk)


def evaluate_checkpoint(checkpoint: str, spec: str, *, fusion: str = "auto", neck: str = "after", flip: bool = False,
                        arch=None, image_size=None, batch_size: int = 64, workers: int = 2, device: str = "cpu",
                        out_dir=None, **eval_kwargs) -> dict:
    """Extract the query and gallery splits of ``spec`` with ``checkpoint`` and evaluate (``evaluate --checkpoint``).

    With ``out_dir`` the two features files are kept there (``query.h5``, ``gallery.h5``); otherwise they go to a
    temporary folder.
    """
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="partreid-eval-"))
    files = {}
    if eval_kwargs.get("split_query"):
        # one labelled set: extract it once, then split it into queries and gallery
        files["query"] = extract_features(checkpoint, spec, work / "all.h5", split=None, fusion=fusion, neck=neck,
                                          flip=flip, arch=arch, image_size=image_size, batch_size=batch_size,
                                          workers=workers, device=device, parts=False)
        files["gallery"] = None
    for split in () if files else ("query", "gallery"):
        files[split] = extract_features(checkpoint, spec, work / f"{split}.h5", split=split, fusion=fusion, neck=neck,
                                        flip=flip, arch=arch, image_size=image_size, batch_size=batch_size,
                                        workers=workers, device=device, parts=False, verbose=split == "query")
    metrics = evaluate_files(files["query"], files["gallery"], out_dir=work, **eval_kwargs)
    if not out_dir:
        shutil.rmtree(work, ignore_errors=True)
    return metrics


def plot_clusters_file(labels_path, out_png, max_clusters: int = 16, per_row: int = 12) -> Path:
    """``clusters.png`` of a labels file: one row of crops per discovered identity (see
    :func:`partreid.cli._plots.save_cluster_grid`); true pids, when known, colour the frames."""
    from partreid.cli._plots import save_cluster_grid

    labels = read_labels(labels_path)
    feats = features_for_labels(labels, parts=False)
    pids = labels.pid if (labels.pid >= 0).any() else None
    return save_cluster_grid(image_refs(feats.attrs, labels.path), labels.labels, out_png,
                             max_clusters=max_clusters, per_row=per_row, pids=pids)
