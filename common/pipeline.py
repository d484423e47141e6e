"""File-level stage functions shared by the CLI and ``finetune``: spec/checkpoint in, files out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Tuple

from partreid.common.errors import InputError

log = logging.getLogger("partreid")


def choose_split(ds, split: Optional[str]) -> Tuple[str, "object"]:
    """Rows of ``split``; default: ``train`` when present, else the dataset's only split.

    Raises:
        InputError: the split does not exist, or no default can be chosen.
    """
    splits = list(dict.fromkeys(ds.frame["split"]))
    if split in (None, ""):
        if "train" in splits:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise InputError(f"{ds.spec}: choose a split with --split ({', '.join(splits)})")
    if split == "all":
        return split, ds.frame
    if split not in splits:
        raise InputError(f"{ds.spec}: no split {split!r} (available: {', '.join(splits) or 'none'})")
    return split, ds.frame[ds.frame["split"] == split].reset_index(drop=True)


def resolve_fusion(loaded, fusion: str) -> str:
    """``auto`` → ``cat`` for ViTs (PASS's retrieval feature), ``cls`` (GAP) for ResNet-50 and finetuned models."""
    if fusion != "auto":
        return fusion
    return "cat" if loaded.kind == "vit" else "cls"


def extract_features(checkpoint: str, spec: str, out, *, split: Optional[str] = None, fusion: str = "auto",
                     neck: str = "after", flip: bool = False, normalize: bool = True, parts: bool = True,
                     arch: Optional[str] = None, image_size=None, interpolation: str = "bicubic",
                     batch_size: int = 64, workers: int = 2, device: str = "cpu", resume: bool = False,
                     strict: bool = False, command: str = "", verbose: bool = True) -> Path:
    """Load a checkpoint and a dataset split and write their features file (``extract-features``).

    Returns:
        the output path.

    Raises:
        InputError: bad checkpoint, dataset spec or split; see :func:`common.extract.extract_to_file`.
    """
    from partreid.common.data import load_dataset
    from partreid.common.extract import FeatureOptions, extract_to_file
    from partreid.common.models.loader import load_model

    ds = load_dataset(spec, verbose=verbose, strict=strict)
    split, frame = choose_split(ds, split)
    loaded = load_model(checkpoint, arch=arch, image_size=image_size)
    log.info("model: %s (%s, input %dx%d)", loaded.source, loaded.arch, *loaded.image_size)
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
    return f"{head}\n{row}\n{foot}{extra}"


def image_refs(attrs: dict, paths) -> list:
    """Per row of a features file, something :func:`common.visualize.save_ranked_lists` can open: the absolute
    image path, or (for LMDB datasets) a zero-argument callable reading the key."""
    import functools

    root = Path(str(attrs.get("dataset_root", "")))
    if (root / "keys.pkl").exists():
        from partreid.common.data import load_dataset

        ds = load_dataset(str(attrs.get("dataset")), verbose=False)
        return [functools.partial(ds.open_image, p) for p in paths]
    return [str(root / p) for p in paths]


def evaluate_arrays(qf, gf, q_pids, q_camids, g_pids, g_camids, *, rerank: bool = False, k1: int = 20, k2: int = 6,
                    lambda_value: float = 0.3, protocol: str = "market", metric: str = "euclidean") -> dict:
    """mAP/CMC/mINP of query features against gallery features (see :mod:`partreid.common.retrieval.evaluation`)."""
    from partreid.common.retrieval.evaluation import evaluate_features

    metrics = evaluate_features(qf, gf, q_pids, q_camids, g_pids, g_camids, metric=metric, rerank=rerank, k1=k1,
                                k2=k2, lambda_value=lambda_value, protocol=protocol)
    out = {k: float(metrics[k]) for k in METRIC_KEYS}
    out.update({k: int(metrics[k]) for k in ("num_query", "num_valid_query", "num_gallery")})
    if rerank:
        out.update({"rerank": True, "k1": k1, "k2": k2, "lambda": lambda_value})
    return out


def evaluate_files(query, gallery, *, rerank: bool = False, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                   protocol: str = "market", metric: str = "euclidean", show_ranks: int = 0,
                   out_dir=None) -> dict:
    """Evaluate a query features file against a gallery features file (``evaluate --query --gallery``).

    Returns:
        the metrics dict (fractions in [0, 1] plus counts); with ``show_ranks`` > 0 also ``ranked_lists``,
        the paths of the ranked-list pictures written under ``out_dir``.

    Raises:
        InputError: unreadable files, or feature widths that differ.
    """
    from partreid.common.h5io import read_features

    q = read_features(query, parts=False)
    g = read_features(gallery, parts=False)
    if q.global_feats.shape[1] != g.global_feats.shape[1]:
        raise InputError(f"{query} has D={q.global_feats.shape[1]} but {gallery} has D={g.global_feats.shape[1]}")
    if q.attrs.get("model_sha256") != g.attrs.get("model_sha256"):
        log.warning("query and gallery features come from different models (model_sha256 differs)")
    metrics = evaluate_arrays(q.global_feats, g.global_feats, q.pid, q.camid, g.pid, g.camid, rerank=rerank, k1=k1,
                              k2=k2, lambda_value=lambda_value, protocol=protocol, metric=metric)
    if show_ranks:
        metrics["ranked_lists"] = [str(p) for p in save_rank_pictures(q, g, show_ranks, out_dir, metric=metric)]
    return metrics


def save_rank_pictures(q, g, n: int, out_dir, metric: str = "euclidean", topk: int = 10):
    """Ranked-list pictures of ``n`` queries spread over the query list: the query, then its top-``topk``
    (same-pid same-camera junk skipped; green = right, red = wrong)."""
    import numpy as np

    from partreid.common.retrieval.evaluation import distance_chunks, topk_per_query
    from partreid.common.visualize import save_ranked_lists

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
    import tempfile

    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="partreid-eval-"))
    files = {}
    for split in ("query", "gallery"):
        files[split] = extract_features(checkpoint, spec, work / f"{split}.h5", split=split, fusion=fusion, neck=neck,
                                        flip=flip, arch=arch, image_size=image_size, batch_size=batch_size,
                                        workers=workers, device=device, parts=False, verbose=split == "query")
    metrics = evaluate_files(files["query"], files["gallery"], out_dir=work, **eval_kwargs)
    if not out_dir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return metrics


def plot_clusters_file(labels_path, out_png, max_clusters: int = 16, per_row: int = 12) -> Path:
    """``clusters.png`` of a labels file: one row of crops per discovered identity (see
    :func:`common.visualize.save_cluster_grid`); true pids, when known, colour the frames."""
    from partreid.common.h5io import features_for_labels, read_labels
    from partreid.common.visualize import save_cluster_grid

    labels = read_labels(labels_path)
    feats = features_for_labels(labels, parts=False)
    pids = labels.pid if (labels.pid >= 0).any() else None
    return save_cluster_grid(image_refs(feats.attrs, labels.path), labels.labels, out_png,
                             max_clusters=max_clusters, per_row=per_row, pids=pids)
