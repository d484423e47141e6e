"""A "same person" distance threshold estimated without labels, from a target set's refined pseudo-labels.

A tracker or a search tool has to decide whether two crops show the same person: ``distance <= threshold``.
The usual recipe sets the threshold at a target false-match rate (FMR) on labelled validation pairs. Users who
adapt a model to their own cameras with unsupervised fine-tuning have no such labels, but they do have the
PPLR pseudo-labels of their target set (``cluster`` + ``refine-labels``). :func:`calibrate_threshold` uses them
as stand-in labels.

Estimator
---------
1. Read the refined labels file (``labels`` (N,), ``agreement`` (N, P)) and the global features it refers to.
2. Score each cluster by the mean cross-agreement of its members (PPLR Eq. 1, averaged over parts and
   members) and keep the *high-agreement* clusters: size ≥ 2 and score ≥ ``min_agreement`` (default: the
   median cluster score, :data:`DEFAULT_AGREEMENT_QUANTILE`). Outliers (label −1) are not used.
3. *Genuine* pairs: every pair of images inside one kept cluster. *Impostor* pairs: every pair of images of
   two different kept clusters.
4. The threshold is the largest "just below an impostor distance" value whose FMR on those impostor pairs is
   ≤ the target (:func:`partreid.common.retrieval.evaluation.threshold_at_fmr`, the same rule ``evaluate``
   uses for "TPR at FMR"). All pairs are used (no sampling): the distances are produced in row blocks and
   only the ``floor(fmr · #impostors) + 1`` smallest impostor distances are kept. The distance is the one of
   ``evaluate``: squared Euclidean (default) or cosine, on the stored global features.

Assumptions, and how they fail
------------------------------
* *One cluster = one person.* A cluster that merges two people adds impostor pairs to the genuine set (it
  makes the estimated TPR optimistic) and hides those hard impostors from the impostor set (the estimated FMR
  is then lower than the real one: the threshold is too loose). Keeping only high-agreement clusters is meant
  to drop most such merges (PPLR's motivation for the agreement score).
* *Different clusters = different people.* One person split into two clusters puts genuine pairs, at small
  distance, among the impostors: the estimated FMR is then higher than the real one and the threshold is
  too strict (conservative).
* *The kept clusters represent the deployment's impostors.* Clustering keeps the images whose neighbours
  agree; the images left as outliers (often the hardest, or the people seen once) are missing. Real impostor
  pairs involving them are not seen, which biases the estimate in either direction.
* *Enough impostor pairs.* The FMR is estimated from ``floor(fmr · #impostors)`` pairs below the threshold;
  with fewer than ~10 such pairs the estimate is noisy (a warning is printed).
* The features must be those the threshold will be applied to (same model, fusion, neck, normalisation and
  metric); ``search``/``evaluate`` check the metric and warn when the model hash differs.

The result is a JSON file (:func:`write_threshold`); check it on labelled data with
``evaluate --threshold-file``, which reports the FMR and TPR the threshold really gives.

This module does not import torch.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from partreid.common import __version__
from partreid.common.errors import InputError
from partreid.common.fileio import atomic_path, sha256_file
from partreid.common.retrieval.evaluation import same_person, threshold_at_fmr

log = logging.getLogger("partreid.calibration")

THRESHOLD_FORMAT = "partreid.threshold"
THRESHOLD_FORMAT_VERSION = 1
#: Default target false-match rate.
DEFAULT_FMR = 1e-3
#: Default ``min_agreement``: this quantile of the cluster agreement scores (0.5 = the median cluster).
DEFAULT_AGREEMENT_QUANTILE = 0.5
METRICS = ("euclidean", "cosine")
#: Rows per distance block (bounded memory: one block of ROWS × N float32).
_BLOCK_ROWS = 1024


def pair_distances(a: np.ndarray, b: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """Distances between the rows of ``a`` (M, D) and ``b`` (K, D), float32 (M, K), as ``evaluate`` computes them:
    squared Euclidean ``‖a‖² + ‖b‖² − 2 a·b`` or cosine ``1 − â·b̂`` (a zero vector gives distance 1).

    Raises:
        InputError: unknown metric or different widths.
    """
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if a.shape[1] != b.shape[1]:
        raise InputError(f"features of widths {a.shape[1]} and {b.shape[1]} cannot be compared")
    if metric == "cosine":
        an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return (1.0 - an @ bn.T).astype(np.float32)
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)).astype(np.float32)


def cluster_agreement(labels: np.ndarray, agreement: Optional[np.ndarray]) -> Dict[int, float]:
    """Mean cross-agreement of each cluster (label ≥ 0): mean over its members of their mean over parts.
    Without ``agreement`` every cluster scores 1.0."""
    labels = np.asarray(labels)
    ids = np.unique(labels[labels >= 0])
    if agreement is None:
        return {int(c): 1.0 for c in ids}
    per_image = np.asarray(agreement, np.float64).reshape(len(labels), -1).mean(axis=1)
    return {int(c): float(per_image[labels == c].mean()) for c in ids}


def pseudo_pair_statistics(feats: np.ndarray, groups: np.ndarray, fmrs, metric: str = "euclidean",
                           block_rows: int = _BLOCK_ROWS) -> Dict[str, Any]:
    """Genuine (same group) and impostor (different groups) pair distances of ``feats`` (N, D) float32 with
    group ids ``groups`` (N,) int, every unordered pair once.

    Returns:
        dict with ``genuine`` (float32 (G,) all genuine distances), ``impostor_smallest`` (float32 ascending,
        the ``floor(max(fmrs) · #impostors) + 1`` smallest impostor distances) and ``num_impostor`` (int).
    """
    feats = np.asarray(feats, np.float32)
    groups = np.asarray(groups, np.int64)
    n = len(groups)
    sizes = np.unique(groups, return_counts=True)[1].astype(np.int64)
    num_imp = int((n * n - (sizes * sizes).sum()) // 2)
    keep = int(np.floor(max(fmrs) * num_imp + 1e-9)) + 1
    genuine, smallest = [], np.zeros(0, np.float32)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        d = pair_distances(feats[start:stop], feats, metric)
        rows = np.arange(start, stop)[:, None]
        upper = np.arange(n)[None, :] > rows                  # each unordered pair once
        same = groups[start:stop, None] == groups[None, :]
        genuine.append(d[upper & same])
        imp = d[upper & ~same]
        if len(imp) > keep:
            imp = np.partition(imp, keep - 1)[:keep]
        smallest = np.concatenate([smallest, imp])
        if len(smallest) > keep:
            smallest = np.partition(smallest, keep - 1)[:keep]
    return {"genuine": np.concatenate(genuine) if genuine else np.zeros(0, np.float32),
            "impostor_smallest": np.sort(smallest), "num_impostor": num_imp}


def calibrate_threshold(labels_path, *, fmr: float = DEFAULT_FMR, min_agreement: Optional[float] = None,
                        min_cluster_size: int = 2, metric: str = "euclidean", features_path=None
                        ) -> Dict[str, Any]:
    """Estimate the distance threshold at a target false-match rate from refined pseudo-labels (module docstring).

    Args:
        labels_path: a labels file from ``refine-labels`` (a plain ``cluster`` output works too: every cluster
            is then kept, with a warning).
        fmr: target false-match rate in (0, 1) (default :data:`DEFAULT_FMR`).
        min_agreement: keep clusters whose mean cross-agreement is ≥ this (in [0, 1]); None = the
            :data:`DEFAULT_AGREEMENT_QUANTILE` quantile of the cluster scores.
        min_cluster_size: smallest cluster kept (≥ 2).
        metric: ``euclidean`` (squared, as ``evaluate``) or ``cosine``.
        features_path: override the features file the labels refer to (its hash must still match).

    Returns:
        the threshold record (see :func:`write_threshold`): ``threshold`` (float; same person when
        ``distance <= threshold``), ``metric``, ``target_fmr``, ``estimated_fmr``, ``estimated_tpr``, pair and
        cluster counts, provenance and ``warnings``.

    Raises:
        InputError: unreadable files, a bad fmr, or fewer than two usable clusters.
    """
    from partreid.common.h5io import features_for_labels, read_labels

    if not 0 < float(fmr) < 1:
        raise InputError(f"--fmr must be in (0, 1), got {fmr}")
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    if int(min_cluster_size) < 2:
        raise InputError(f"--min-cluster-size must be >= 2, got {min_cluster_size}")
    labels = read_labels(labels_path)
    feats = features_for_labels(labels, features_path, parts=False)
    warnings = []
    if labels.agreement is None:
        warnings.append("the labels file has no cross-agreement scores (run refine-labels): every cluster is "
                        "used, merged identities are not filtered out")
    scores = cluster_agreement(labels.labels, labels.agreement)
    ids, sizes = np.unique(labels.labels[labels.labels >= 0], return_counts=True)
    size_of = dict(zip(ids.tolist(), sizes.tolist()))
    big = [c for c in scores if size_of[c] >= int(min_cluster_size)]
    if min_agreement is None:
        min_agreement = float(np.quantile([scores[c] for c in big], DEFAULT_AGREEMENT_QUANTILE)) if big else 0.0
        how = f"the median cluster agreement ({min_agreement:.3f})"
    else:
        how = f"{float(min_agreement):g}"
    kept = np.array(sorted(c for c in big if scores[c] >= float(min_agreement)), dtype=np.int64)
    if len(kept) < 2:
        raise InputError(f"{labels_path}: only {len(kept)} cluster(s) of size >= {min_cluster_size} with "
                         f"agreement >= {float(min_agreement):.3f}; need at least two (lower --min-agreement, "
                         "or cluster a larger set)")
    rows = np.flatnonzero(np.isin(labels.labels, kept))
    log.info("calibrate: %d of %d clusters kept (agreement >= %s), %d images", len(kept), len(scores), how,
             len(rows))
    stats = pseudo_pair_statistics(feats.global_feats[rows], labels.labels[rows], [fmr], metric)
    gen, n_imp = stats["genuine"], stats["num_impostor"]
    threshold, matches = threshold_at_fmr(stats["impostor_smallest"], n_imp, fmr)
    expected = float(fmr) * n_imp
    if expected < 10:
        warnings.append(f"only {n_imp} impostor pairs: FMR {fmr:g} is estimated from {expected:.1f} pairs; "
                        "the threshold is noisy (cluster a larger set or use a larger --fmr)")
    for w in warnings:
        log.warning(w)
    return {
        "format": THRESHOLD_FORMAT,
        "format_version": THRESHOLD_FORMAT_VERSION,
        "threshold": float(threshold),
        "metric": metric,
        "decision": "same person when distance <= threshold",
        "target_fmr": float(fmr),
        "estimated_fmr": matches / n_imp,
        "estimated_tpr": float(np.count_nonzero(same_person(gen, threshold))) / max(1, len(gen)),
        "num_genuine_pairs": int(len(gen)),
        "num_impostor_pairs": int(n_imp),
        "clusters_used": int(len(kept)),
        "clusters_total": int(len(scores)),
        "images_used": int(len(rows)),
        "images_total": int(len(labels)),
        "min_agreement": float(min_agreement),
        "min_cluster_size": int(min_cluster_size),
        "estimator": "pseudo-label pairs: genuine = inside one high-agreement cluster, impostor = across two "
                     "such clusters; threshold = largest value with estimated FMR <= target",
        "labels_file": str(Path(labels_path).resolve()),
        "labels_sha256": sha256_file(labels_path),
        "features_file": str(feats.filename),
        "model_sha256": str(feats.attrs.get("model_sha256", "")),
        "normalized": bool(feats.attrs.get("normalized", False)),
        "fusion": str(feats.attrs.get("fusion", "")),
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "warnings": warnings,
    }


def write_threshold(out, record: Dict[str, Any], inputs=()) -> Path:
    """Write a threshold record as JSON, atomically (never over one of ``inputs``)."""
    out = Path(out)
    with atomic_path(out, inputs=tuple(inputs)) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return out


def read_threshold(path, *, metric: Optional[str] = None, model_sha256: Optional[str] = None) -> Dict[str, Any]:
    """Read a threshold file written by ``calibrate`` (or a JSON object with ``threshold`` and ``metric``).

    Args:
        path: the JSON file.
        metric: the metric the caller will use; a different one in the file is an error.
        model_sha256: the model of the features the caller compares; a different one is a warning.

    Raises:
        InputError: missing/unreadable file, no numeric ``threshold``, or a metric mismatch.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such threshold file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON threshold file ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("threshold"), (int, float)):
        raise InputError(f"{path}: no numeric 'threshold' (expected the output of partreid calibrate)")
    file_metric = record.get("metric", "euclidean")
    if metric is not None and file_metric != metric:
        raise InputError(f"{path}: the threshold is for the {file_metric} distance; use --metric {file_metric}")
    sha = record.get("model_sha256")
    if model_sha256 and sha and sha != model_sha256:
        log.warning("%s was calibrated on features of another model (model_sha256 differs); its threshold may "
                    "not apply", path)
    return record


def format_verification(ver: Dict[str, Any]) -> str:
    """Readable lines for the ``verification`` dict of an evaluation (TPR at FMR, and at a given threshold)."""
    parts = []
    for key, val in ver.items():
        if key.startswith("tpr@fmr="):
            f = key.split("=", 1)[1]
            parts.append(f"TPR {100 * val:.2f}% @ FMR {f} (d <= {ver.get('threshold@fmr=' + f, float('nan')):.4f})")
    lines = ["verification: " + ", ".join(parts) +
             f"   pairs: {ver.get('num_genuine', 0)} genuine, {ver.get('num_impostor', 0)} impostor"]
    if "threshold" in ver:
        lines.append(f"at threshold {ver['threshold']:.4f}: FMR {100 * ver['fmr@threshold']:.4f}%  "
                     f"TPR {100 * ver['tpr@threshold']:.2f}%")
    return "\n".join(lines)
