"""PPLR cross-agreement scores (Cho et al., CVPR 2022, Eq. 1; PPLR
``examples/train_pplr.py`` ``compute_cross_agreement``).

For every sample i and part n, the agreement between the global feature space and the part-n feature space is
the Jaccard index of the two top-k neighbour sets:

    C_i(g, p_n) = |R_i(g) ∩ R_i(p_n)| / |R_i(g) ∪ R_i(p_n)|  ∈ [0, 1]

PPLR uses it to weight the part losses (AALS) per sample. The original computes it with per-sample numpy
``intersect1d``/``union1d`` in Python list comprehensions; here it is one vectorised sort over all samples.

Self handling (a deliberate, documented difference): the original asks faiss for k + 1 neighbours and drops
column 0, assuming it is the sample itself. With exact duplicate images column 0 may be the duplicate, and
then the sample itself stays in its own set. Here self is removed **by index** (duplicates stay neighbours),
so every R_i has exactly k members other than i. For data without duplicates both give the same sets.

:func:`refine_labels_file` is the file-level function behind the ``refine-labels`` command.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pandas as pd

from partreid.common.errors import InputError
from partreid.common.h5io import features_for_labels, read_labels, write_labels
from partreid.common.retrieval.search import exclude_self_columns, knn_search, l2_normalize_rows

#: rows per block of the vectorised set intersection (bounds the temporary (rows, P, 2k) arrays)
_ROWS_PER_BLOCK = 32768


def _check_table(a: np.ndarray, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"{name} must be an integer array with {ndim} dimensions, got {a.dtype} {a.shape}")
    a = a.astype(np.int64, copy=False)
    if a.size and a.min() < 0:
        raise InputError(f"{name} holds negative indices (unfilled neighbour slots?)")
    if a.shape[-1] > 1:
        s = np.sort(a, axis=-1)
        if (s[..., 1:] == s[..., :-1]).any():
            raise InputError(f"{name} repeats an index within a neighbour set")
    return a


def cross_agreement(global_knn, part_knn) -> np.ndarray:
    """Cross-agreement scores from neighbour sets (PPLR Eq. 1).

    Args:
        global_knn: int64 (N, kg) top-kg neighbours of each sample in the global space (self excluded).
        part_knn: int64 (N, P, kp) top-kp neighbours in each part space (self excluded).

    Returns:
        float32 (N, P): |R_i(g) ∩ R_i(p_n)| / |R_i(g) ∪ R_i(p_n)|, with |∪| = kg + kp − |∩|.

    Raises:
        InputError: shapes disagree, negative indices, or an index repeated within one set.
    """
    g = _check_table(global_knn, "global neighbour table", 2)
    p = _check_table(part_knn, "part neighbour table", 3)
    if p.shape[0] != g.shape[0]:
        raise InputError(f"global table has {g.shape[0]} rows but the part table has {p.shape[0]}")
    n, kg = g.shape
    _, n_parts, kp = p.shape
    out = np.empty((n, n_parts), np.float32)
    if kg + kp == 0:
        out[:] = 0
        return out
    for s in range(0, n, _ROWS_PER_BLOCK):
        e = min(s + _ROWS_PER_BLOCK, n)
        both = np.concatenate([np.broadcast_to(g[s:e, None, :], (e - s, n_parts, kg)), p[s:e]], axis=2)
        both.sort(axis=2)
        inter = (both[..., 1:] == both[..., :-1]).sum(axis=2)  # each set is duplicate-free
        out[s:e] = inter / (kg + kp - inter)
    return out


def cross_agreement_from_features(global_feats, parts, k: int = 20, global_knn=None, *, device: str = "auto",
                                  method: str = "exact", timings: Optional[Dict[str, float]] = None,
                                  ) -> np.ndarray:
    """Cross-agreement scores from features: exact top-k searches in the global and each part space.

    As in PPLR, every feature (global and each part) is L2-normalised (a no-op for normalised input) and the
    neighbours are the k most similar other samples (cosine similarity = L2 ranking on unit vectors), self
    excluded by index (module doc).

    Args:
        global_feats: float32 (N, D) global features.
        parts: float32 (N, P, Dp) part features.
        k: neighbours per set (PPLR ``--k 20``).
        global_knn: optional int64 (N, K) global neighbour lists from ``cluster`` (self included, nearest
            first, cosine similarity on the normalised global features); reused when they hold >= k non-self
            columns, otherwise the global search is run.
        device: faiss device ('auto', 'cpu', 'cuda').
        method: faiss search method ('exact', or 'hnsw'/'ivf' for very large sets).
        timings: optional dict receiving seconds for 'global_knn', 'part_knn', 'agreement'.

    Returns:
        float32 (N, P) scores in [0, 1].

    Raises:
        InputError: shapes disagree, N <= k, NaN/inf features.
    """
    tm = timings if timings is not None else {}
    g = np.asarray(global_feats.detach().cpu().numpy() if hasattr(global_feats, "detach") else global_feats)
    pa = np.asarray(parts.detach().cpu().numpy() if hasattr(parts, "detach") else parts)
    if g.ndim != 2 or pa.ndim != 3 or pa.shape[0] != g.shape[0]:
        raise InputError(f"global features {g.shape} and part features {pa.shape} must be (N, D) and (N, P, Dp)")
    n = g.shape[0]
    k = int(k)
    if k < 1 or n <= k:
        raise InputError(f"cross-agreement with k={k} needs more than k samples, got {n}")
    t = time.perf_counter()
    g_sets = None
    if global_knn is not None:
        gk = np.asarray(global_knn)
        if gk.ndim == 2 and gk.shape[0] == n:
            try:
                g_sets = exclude_self_columns(gk, k)  # also fine for lists that hold no self
            except InputError:
                g_sets = None  # too short: search instead
    if g_sets is None:
        _, g_sets = knn_search(l2_normalize_rows(g), k, metric="ip", method=method, device=device, exclude_self=True)
    tm["global_knn"] = time.perf_counter() - t
    t = time.perf_counter()
    p_sets = np.empty((n, pa.shape[1], k), np.int64)
    for j in range(pa.shape[1]):
        _, p_sets[:, j] = knn_search(l2_normalize_rows(pa[:, j]), k, metric="ip", method=method, device=device,
                                     exclude_self=True)
    tm["part_knn"] = time.perf_counter() - t
    t = time.perf_counter()
    out = cross_agreement(g_sets, p_sets)
    tm["agreement"] = time.perf_counter() - t
    return out


def agreement_statistics(agreement) -> "object":
    """Per-part statistics of the scores: pandas.DataFrame with part, mean, std, min, q25, median, q75, max."""
    a = np.asarray(agreement, np.float64)
    rows = []
    for j in range(a.shape[1]):
        col = a[:, j]
        q = np.percentile(col, [0, 25, 50, 75, 100]) if col.size else [np.nan] * 5
        rows.append({"part": j, "mean": col.mean() if col.size else np.nan,
                     "std": col.std() if col.size else np.nan, "min": q[0], "q25": q[1], "median": q[2],
                     "q75": q[3], "max": q[4]})
    return pd.DataFrame(rows)


def refine_labels_file(labels_path, out, *, k: int = 20, command: str = "",
                       device: str = "auto") -> Tuple[Path, str]:
    """The ``refine-labels`` command: labels file → the same labels plus ``agreement`` (N, P), and a report.

    The features are found through the labels file's ``features_file`` reference; its SHA-256 must match the
    recorded one (else :class:`InputError` naming both files). The global neighbour lists stored by ``cluster``
    (``knn``) are reused when they hold at least k neighbours besides self.

    Args:
        labels_path: labels file written by ``cluster``.
        out: output labels file (``.h5`` or ``.csv``).
        k: neighbours per set (20).
        command: provenance string stored in the file.
        device: 'auto', 'cpu' or 'cuda' (faiss GPU when available; otherwise the CPU).

    Returns:
        ``(path written, report text)``.

    Raises:
        InputError: unreadable files, hash mismatch, a features file without ``parts``, N <= k.
    """
    t0 = time.perf_counter()
    labels = read_labels(labels_path)
    feats = features_for_labels(labels, parts=True)
    if feats.parts is None:
        raise InputError(f"{feats.filename}: the features file has no part features ('parts'); "
                         f"cross-agreement needs them")
    faiss_device = "cpu" if str(device).startswith("cpu") else "auto"
    global_knn = None
    if labels.knn is not None and labels.knn.shape[0] == len(labels):
        try:
            global_knn = exclude_self_columns(labels.knn, int(k))
        except InputError:
            global_knn = None  # stored lists too short for this k: search again
    timings: Dict[str, float] = {}
    agreement = cross_agreement_from_features(feats.global_feats, feats.parts, k, global_knn=global_knn,
                                              device=faiss_device, timings=timings)
    skip = {"format", "format_version", "features_file", "features_sha256", "command", "package_version",
            "created"}
    attrs = {key: val for key, val in labels.attrs.items() if key not in skip}
    attrs.update({"agreement_k": int(k), "command": command})
    path = write_labels(out, labels.labels, features_file=feats.filename, path=labels.path, pid=labels.pid,
                        camid=labels.camid, attrs=attrs, agreement=agreement, knn=labels.knn,
                        features_sha256=labels.attrs.get("features_sha256"), inputs=(labels_path,))
    stats = agreement_statistics(agreement)
    reused = "reused from the labels file" if global_knn is not None else "searched (no usable 'knn' stored)"
    lines = [f"cross-agreement (PPLR Eq. 1, k={k}) for {agreement.shape[0]} samples × {agreement.shape[1]} parts; "
             f"global neighbours {reused}",
             stats.to_string(index=False, float_format=lambda v: f"{v:.4f}"),
             "time: " + "  ".join(f"{key} {val:.2f}s" for key, val in timings.items())
             + f"  total {time.perf_counter() - t0:.2f}s"]
    return Path(path), "\n".join(lines)
