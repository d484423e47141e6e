"""DBSCAN pseudo-labels on the sparse k-reciprocal Jaccard distance (PPLR ``examples/train_pplr.py``
``compute_pseudo_labels``; cluster-contrast).

Pipeline (:func:`pseudo_labels`): exact (or approximate) faiss kNN on the L2-normalised global features →
sparse k-reciprocal Jaccard radius graph (:mod:`partreid.common.retrieval.kreciprocal`, PPLR
``pplr/utils/faiss_rerank.py`` ``compute_jaccard_distance``) → DBSCAN on that sparse graph (the labels of
scikit-learn ``DBSCAN(metric='precomputed')``, see :func:`dbscan_labels`). Outliers are labelled -1. Nothing N×N
is allocated.

Quality helpers for choosing eps: :func:`cluster_quality` (NMI, ARI, pairwise precision/recall/F-score against
real pids), :func:`sweep_eps` (one distance graph, many eps values) and :func:`size_histogram`.
:func:`cluster_features_file` is the file-level function behind the ``cluster`` command.

Why scikit-learn is not imported here: ``import sklearn.cluster`` or ``sklearn.metrics`` costs about 0.9 s of
process start-up (scipy.stats, optimize, linalg), as much as the whole clustering of a Market-size set, and
``cluster`` is timed as a process. On a symmetric graph (every graph this module builds) DBSCAN is the connected
components of the core points plus a rule for border points, so :func:`dbscan_labels` runs scipy's
``connected_components`` and gives scikit-learn's labels exactly; any other graph goes to scikit-learn itself.
NMI and ARI come from the contingency table by their textbook formulas. The tests compare both with
scikit-learn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from partreid.common.errors import InputError
from partreid.pplr_finetune.config import FinetuneConfig as _C  # the defaults (PPLR's)
from partreid.common.h5io import read_features, write_labels
from partreid.common.retrieval.kreciprocal import CONVENTIONS, knn_columns_needed, kreciprocal_jaccard
from partreid.common.retrieval.search import knn_search, l2_normalize_rows

#: ``knn`` choices of :func:`pseudo_labels` → faiss search method
KNN_METHODS = {"exact": "exact", "approximate": "hnsw", "hnsw": "hnsw", "ivf": "ivf"}


@dataclass
class ClusterResult:
    """Output of :func:`pseudo_labels`.

    Attributes:
        labels: int64 (N,) cluster ids 0..C-1, -1 = outlier.
        knn: int64 (N, K) neighbour lists used (self included, nearest first); K = k1 ('reference'
            convention) or k1 + 1 ('textbook'), or k2 if larger.
        graph: float32 csr (N, N) Jaccard radius graph, pairs with d <= max_distance (explicit zeros kept).
        max_distance: the radius the graph was built with (>= eps; the largest eps a sweep may use).
        timings: seconds per step ('knn', 'expansion', 'encoding', 'jaccard', 'dbscan', 'total').
        params: the parameters (k1, k2, eps, min_samples, convention, knn).
    """

    labels: np.ndarray
    knn: np.ndarray
    graph: sp.csr_matrix
    max_distance: float
    timings: Dict[str, float] = field(default_factory=dict)
    params: Dict[str, object] = field(default_factory=dict)

    @property
    def num_clusters(self) -> int:
        """Number of clusters (labels >= 0)."""
        return int(self.labels.max() + 1) if self.labels.size and self.labels.max() >= 0 else 0

    @property
    def num_outliers(self) -> int:
        """Number of samples labelled -1."""
        return int((self.labels < 0).sum())


def _check_graph(graph) -> sp.csr_matrix:
    if not sp.issparse(graph):
        raise InputError("the distance graph must be a scipy.sparse matrix (N, N)")
    if graph.shape[0] != graph.shape[1]:
        raise InputError(f"the distance graph must be square, got shape {graph.shape}")
    graph = graph.tocsr()
    if graph.nnz and (not np.isfinite(graph.data).all() or graph.data.min() < 0):
        raise InputError("the distance graph holds negative or non-finite distances")
    return graph


def dbscan_labels(graph, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN on a sparse precomputed distance graph: the labels of scikit-learn
    ``DBSCAN(eps, min_samples, metric='precomputed').fit_predict(graph)``, exactly.

    Stored entries with distance <= eps are neighbours, **including stored zeros** (self, duplicate images):
    scikit-learn keeps explicit zeros of a CSR graph and only filters stored values > eps; pairs that are not
    stored are not neighbours. Each point is its own neighbour (DBSCAN stores the diagonal, 0 where it is not
    stored), as in the dense case. A core point has >= ``min_samples`` neighbours.

    On a graph whose neighbour relation is symmetric (the k-reciprocal Jaccard graph is, by construction) this is
    computed as scikit-learn's ``dbscan_inner`` defines it, without its import (0.9 s of start-up): clusters are
    the connected components of the core points (scipy ``connected_components``), numbered in order of their
    lowest-index core point; a border point (not core, next to a core point) joins the lowest-numbered cluster
    next to it; every other point is an outlier. A non-symmetric graph is passed to scikit-learn.

    Args:
        graph: float32 scipy.sparse (N, N) non-negative distances (e.g.
            :func:`partreid.common.retrieval.kreciprocal.kreciprocal_jaccard`).
        eps: neighbourhood radius (PPLR 0.5, cluster-contrast/PASS 0.6 Market, 0.7 MSMT17).
        min_samples: neighbours (self included) that make a core point (4).

    Returns:
        int64 (N,) labels 0..C-1 numbered in order of the first core point; -1 = outlier.

    Raises:
        InputError: graph not square/sparse, negative distances, eps <= 0, min_samples < 1.
    """
    graph = _check_graph(graph)
    if not eps > 0:
        raise InputError(f"eps must be > 0, got {eps}")
    if int(min_samples) < 1:
        raise InputError(f"min_samples must be >= 1, got {min_samples}")
    n = graph.shape[0]
    if n == 0:
        return np.empty(0, np.int64)
    rows = np.repeat(np.arange(n), np.diff(graph.indptr))
    near = graph.data <= eps
    off = near & (graph.indices != rows)
    src, dst = rows[off], graph.indices[off].astype(np.int64)
    nbr = sp.csr_matrix((np.ones(src.size, np.int8), (src, dst)), shape=(n, n))
    if (nbr != nbr.T).nnz:
        from sklearn.cluster import DBSCAN  # the general (directed) case: scikit-learn's own expansion order

        model = DBSCAN(eps=float(eps), min_samples=int(min_samples), metric="precomputed")
        return model.fit_predict(graph).astype(np.int64)
    # self is a neighbour unless a stored diagonal value exceeds eps
    diag_far = np.zeros(n, bool)
    on_diag = graph.indices == rows
    diag_far[rows[on_diag & ~near]] = True
    core = np.bincount(src, minlength=n) + ~diag_far >= int(min_samples)
    labels = np.full(n, -1, np.int64)
    core_idx = np.flatnonzero(core)
    if core_idx.size == 0:
        return labels
    _, comp = connected_components(nbr[core_idx][:, core_idx], directed=False)
    # number the components by their lowest core index (core_idx is ascending: first occurrence order)
    _, first = np.unique(comp, return_index=True)
    number = np.empty(first.size, np.int64)
    number[np.argsort(first, kind="stable")] = np.arange(first.size)
    labels[core_idx] = number[comp]
    # border points: the lowest cluster number among their core neighbours
    edge = core[src] & ~core[dst]
    if edge.any():
        border = np.full(n, np.iinfo(np.int64).max)
        np.minimum.at(border, dst[edge], labels[src[edge]])
        hit = border < np.iinfo(np.int64).max
        labels[hit] = border[hit]
    return labels


def pseudo_labels(features, k1: int = _C.k1, k2: int = _C.k2, eps: float = _C.eps, min_samples: int = _C.min_samples,
                  convention: str = "reference", knn: str = "exact", *, max_distance: Optional[float] = None,
                  device: str = "auto", search_options: Optional[dict] = None) -> ClusterResult:
    """Cluster features into pseudo-labels: kNN → sparse k-reciprocal Jaccard → DBSCAN (PPLR
    ``examples/train_pplr.py`` ``compute_pseudo_labels``, ``pplr/utils/faiss_rerank.py``
    ``compute_jaccard_distance``).

    Args:
        features: float32 (N, D) global features; rows are L2-normalised first unless they already are
            (PPLR extracts normalised features; the Jaccard weights assume unit vectors).
        k1: k-reciprocal neighbourhood (30). k2: query-expansion neighbourhood (6; PPLR hard-codes 6).
        eps: DBSCAN radius on the Jaccard distance. min_samples: DBSCAN min_samples (4).
        convention: 'reference' (k1 forward entries incl. self, the published behaviour) or 'textbook' (k1+1).
        knn: 'exact' (faiss IndexFlatIP, chunked) or 'approximate' (HNSW, M=32, efConstruction=64,
            efSearch=128; also 'hnsw', 'ivf') for sets of hundreds of thousands of images. Approximate search
            trades recall for O(N log N) time: missed neighbours shrink the k-reciprocal sets and can raise the
            outlier count; on 2 CPU cores exact search is about as fast up to ~2·10^5 images of D=384. Tune it
            with ``search_options`` (``ef_search``, ``ef_construction``, ``hnsw_m``, ``nprobe``).
        max_distance: radius of the stored graph (default eps); set it to the largest eps of a later sweep.
        device: faiss device: 'auto', 'cpu', or 'cuda' ('cuda' falls back to the CPU when the installed faiss
            has no GPU support, since the torch device and the faiss build are independent).
        search_options: extra keyword arguments for :func:`partreid.common.retrieval.search.knn_search`.

    Returns:
        :class:`ClusterResult`.

    Raises:
        InputError: bad shapes/values, unknown convention/knn, N too small for k1.
    """
    t0 = time.perf_counter()
    if hasattr(features, "detach"):
        features = features.detach().cpu().numpy()
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"features must be 2-D (N, D), got shape {x.shape}")
    if convention not in CONVENTIONS:
        raise InputError(f"unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    if knn not in KNN_METHODS:
        raise InputError(f"unknown knn method {knn!r}; choose 'exact' or 'approximate'")
    md = float(eps) if max_distance is None else max(float(max_distance), float(eps))
    width = knn_columns_needed(k1, k2, convention)
    if x.shape[0] < width:
        raise InputError(f"{x.shape[0]} samples are too few for k1={k1}, k2={k2} (need at least {width})")
    x = l2_normalize_rows(x)
    timings: Dict[str, float] = {}
    opts = dict(search_options or {})
    opts.setdefault("method", KNN_METHODS[knn])
    opts.setdefault("device", _faiss_device(device))
    t = time.perf_counter()
    sims, idx = knn_search(x, width, metric="ip", **opts)
    timings["knn"] = time.perf_counter() - t
    graph = kreciprocal_jaccard(x, k1, k2, max_distance=md, convention=convention, knn=idx,
                                similarities=sims, timings=timings, check_input=False)
    timings.pop("total", None)
    del sims
    t = time.perf_counter()
    labels = dbscan_labels(graph, eps, min_samples)
    timings["dbscan"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    params = {"k1": int(k1), "k2": int(k2), "eps": float(eps), "min_samples": int(min_samples),
              "convention": convention, "knn": knn}
    return ClusterResult(labels, idx, graph, md, timings, params)


def _faiss_device(device: Optional[str]) -> str:
    """Map a CLI/torch device ('auto', 'cpu', 'cuda', 'cuda:1') to a faiss device for knn_search."""
    if device is None:
        return "auto"
    device = str(device)
    if device.startswith("cpu"):
        return "cpu"
    return "auto"


# ------------------------------------------------------------------------------------------- quality


def _singleton_outliers(labels: np.ndarray) -> np.ndarray:
    """Outliers (-1) become singleton clusters with fresh ids."""
    out = labels.copy()
    neg = out < 0
    base = (out.max() + 1) if (~neg).any() else 0
    out[neg] = base + np.arange(int(neg.sum()))
    return out


def _pairs(counts: np.ndarray) -> float:
    counts = counts.astype(np.float64)
    return float((counts * (counts - 1) / 2).sum())


def cluster_quality(labels, pids) -> Dict[str, float]:
    """Clustering quality against ground-truth person ids.

    Only samples with a known pid (pid >= 0) are scored. **Outliers** (label -1) count as singleton clusters:
    they add no predicted same-cluster pair (so they never hurt precision) but the same-pid pairs they belong
    to are missed (so they lower recall), and NMI/ARI see each of them as its own cluster.

    Pairwise scores over unordered sample pairs, from the contingency table n_cp (cluster c × pid p):
    TP = Σ C(n_cp, 2), precision = TP / Σ_c C(n_c, 2), recall = TP / Σ_p C(n_p, 2),
    F = 2PR / (P + R) (0 when undefined).

    Args:
        labels: int (N,) cluster labels, -1 = outlier. pids: int (N,) person ids, -1 = unknown.

    Returns:
        dict with ``nmi`` (arithmetic normalisation), ``ari``, ``precision``, ``recall``, ``f_score``, ``num_scored``
        (samples with a pid) and ``outlier_fraction`` (among the scored samples).

    Raises:
        InputError: different lengths.
    """
    labels = np.asarray(labels, np.int64)
    pids = np.asarray(pids, np.int64)
    if labels.shape != pids.shape or labels.ndim != 1:
        raise InputError(f"labels {labels.shape} and pids {pids.shape} must be 1-D of the same length")
    known = pids >= 0
    lab = labels[known]
    pid = pids[known]
    res = {"num_scored": int(known.sum()), "outlier_fraction": float((lab < 0).mean()) if lab.size else 0.0}
    if lab.size == 0:
        res.update(nmi=float("nan"), ari=float("nan"), precision=float("nan"), recall=float("nan"),
                   f_score=float("nan"))
        return res
    lab = _singleton_outliers(lab)
    _, pid_of = np.unique(pid, return_inverse=True)
    _, lab_of = np.unique(lab, return_inverse=True)
    _, joint = np.unique(pid_of.astype(np.int64) * (int(lab_of.max()) + 1) + lab_of, return_counts=True)
    n_p = np.bincount(pid_of)  # samples per pid
    n_c = np.bincount(lab_of)  # samples per cluster
    tp = _pairs(joint)
    pred_pairs = _pairs(n_c)
    true_pairs = _pairs(n_p)
    precision = tp / pred_pairs if pred_pairs > 0 else 0.0
    recall = tp / true_pairs if true_pairs > 0 else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    res.update(nmi=_nmi(joint, n_p, n_c), ari=_ari(tp, true_pairs, pred_pairs, lab.size),
               precision=float(precision), recall=float(recall), f_score=float(f))
    return res


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _nmi(joint: np.ndarray, n_p: np.ndarray, n_c: np.ndarray) -> float:
    """Normalised mutual information, arithmetic normalisation (Vinh et al. 2010; scikit-learn's default):
    NMI = I(P; C) / ((H(P) + H(C)) / 2), with I = H(P) + H(C) − H(P, C) from the nonzero contingency cells
    ``joint``. 1 when both labelings are a single cluster."""
    if n_p.size == n_c.size == 1:
        return 1.0
    h_p, h_c = _entropy(n_p), _entropy(n_c)
    mi = max(h_p + h_c - _entropy(joint), 0.0)
    return float(mi / max((h_p + h_c) / 2, np.finfo(np.float64).eps))


def _ari(tp: float, true_pairs: float, pred_pairs: float, n: int) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985) from pair counts: (TP − E) / ((Σ_p + Σ_c) / 2 − E) with
    E = Σ_p · Σ_c / C(n, 2), where Σ_p, Σ_c are the same-pid and same-cluster pair counts. 1 when the
    labelings agree on every pair (including the degenerate all-singletons / one-cluster cases)."""
    total = n * (n - 1) / 2
    if total == 0 or (tp == true_pairs == pred_pairs):
        return 1.0
    expected = true_pairs * pred_pairs / total
    top = (true_pairs + pred_pairs) / 2
    if top == expected:
        return 1.0
    return float((tp - expected) / (top - expected))


def sweep_eps(graph, eps_values: Sequence[float], min_samples: int = 4, pids=None,
              max_distance: Optional[float] = None):
    """DBSCAN for several eps on one distance graph; the table for choosing eps on a new dataset.

    Args:
        graph: sparse (N, N) radius graph (e.g. ``ClusterResult.graph``) built with a radius >= max(eps_values).
        eps_values: radii to try. min_samples: DBSCAN min_samples.
        pids: optional int (N,) ground-truth pids (-1 unknown) → quality columns.
        max_distance: the graph's radius, if known; an eps above it raises (pairs beyond it are missing).

    Returns:
        pandas.DataFrame, one row per eps: ``eps``, ``clusters``, ``outliers``, ``largest`` (biggest cluster
        size) and, with pids, ``nmi``, ``ari``, ``precision``, ``recall``, ``f_score``.

    Raises:
        InputError: empty eps list, or an eps above ``max_distance``.
    """
    eps_values = [float(e) for e in eps_values]
    if not eps_values:
        raise InputError("no eps values to sweep")
    if max_distance is not None and max(eps_values) > max_distance + 1e-12:
        raise InputError(f"eps {max(eps_values)} exceeds the distance graph's radius {max_distance}; "
                         f"rebuild the graph with max_distance >= {max(eps_values)}")
    import pandas as pd  # only for a sweep: 0.2 s of start-up that a plain ``cluster`` run does not pay

    graph = _check_graph(graph)
    rows = []
    for eps in eps_values:
        labels = dbscan_labels(graph, eps, min_samples)
        sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, np.int64)
        row = {"eps": eps, "clusters": int(sizes.size), "outliers": int((labels < 0).sum()),
               "largest": int(sizes.max()) if sizes.size else 0}
        if pids is not None:
            q = cluster_quality(labels, pids)
            row.update({k: q[k] for k in ("nmi", "ari", "precision", "recall", "f_score")})
        rows.append(row)
    return pd.DataFrame(rows)


_SIZE_BINS = [(1, 1), (2, 3), (4, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, 200), (201, 500),
              (501, 1000), (1001, None)]


def size_histogram(labels, width: int = 40) -> str:
    """Text histogram of cluster sizes (number of clusters per size bin, plus the outlier count).

    Args:
        labels: int (N,) cluster labels, -1 = outlier. width: longest bar in characters.

    Returns:
        A multi-line string, e.g. ``"   4-5   | ####        120"``.
    """
    labels = np.asarray(labels, np.int64)
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, np.int64)
    sizes = sizes[sizes > 0]
    counts = []
    for lo, hi in _SIZE_BINS:
        sel = (sizes >= lo) if hi is None else ((sizes >= lo) & (sizes <= hi))
        counts.append(int(sel.sum()))
    top = max(counts + [1])
    lines = ["cluster size | clusters"]
    for (lo, hi), c in zip(_SIZE_BINS, counts):
        if c == 0:
            continue
        name = f"{lo}" if hi == lo else (f">{lo - 1}" if hi is None else f"{lo}-{hi}")
        bar = "#" * max(1, int(round(width * c / top)))
        lines.append(f"{name:>12} | {bar} {c}")
    lines.append(f"{'outliers':>12} | {int((labels < 0).sum())} samples")
    return "\n".join(lines)



# ------------------------------------------------------------------------------------------- file level


def _format_quality(q: Dict[str, float]) -> str:
    return (f"NMI {q['nmi']:.4f}  ARI {q['ari']:.4f}  pairwise precision {q['precision']:.4f}  "
            f"recall {q['recall']:.4f}  F {q['f_score']:.4f}  (over {q['num_scored']} samples with a pid; "
            f"outliers count as singletons)")


def cluster_report(result: ClusterResult, pids=None, sweep_table=None) -> str:
    """Human-readable report of a clustering (the ``cluster`` command's stderr)."""
    n = result.labels.size
    p = result.params
    lines = [f"clustered {n} samples: {result.num_clusters} clusters, {result.num_outliers} outliers "
             f"({100.0 * result.num_outliers / max(n, 1):.1f}%)  [k1={p.get('k1')} k2={p.get('k2')} "
             f"eps={p.get('eps')} min_samples={p.get('min_samples')} convention={p.get('convention')} "
             f"knn={p.get('knn')}]",
             "time: " + "  ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()),
             size_histogram(result.labels)]
    if pids is not None and (np.asarray(pids) >= 0).any():
        lines.append("quality vs pids: " + _format_quality(cluster_quality(result.labels, pids)))
    if sweep_table is not None:
        lines.append("eps sweep (same distance graph):")
        lines.append(sweep_table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return "\n".join(lines)


def cluster_features_file(features_path, out, *, k1: int = _C.k1, k2: int = _C.k2, eps: float = _C.eps,
                          min_samples: int = _C.min_samples, convention: str = _C.convention, knn: str = _C.knn,
                          sweep: Optional[Sequence[float]] = None, command: str = "",
                          device: str = "auto") -> Tuple[Path, str]:
    """The ``cluster`` command: features file → labels file (with ``knn``) and a report.

    Args:
        features_path: features file (``global`` is clustered).
        out: labels file to write (``.h5``; ``.csv`` exports without ``knn``).
        k1, k2, eps, min_samples, convention, knn: see :func:`pseudo_labels`.
        sweep: optional eps values; the table is added to the report (one distance graph built with radius
            max(eps, max(sweep))); the labels written are those for ``eps``.
        command: provenance string stored in the file.
        device: 'auto', 'cpu' or 'cuda' (faiss GPU when available).

    Returns:
        ``(path written, report text)``.

    Raises:
        InputError: unreadable/invalid features file, bad parameters, ``out`` equal to the input.
    """
    feats = read_features(features_path, parts=False)
    sweep = [float(e) for e in sweep] if sweep else None
    md = max([float(eps)] + (sweep or []))
    result = pseudo_labels(feats.global_feats, k1, k2, eps, min_samples, convention, knn, max_distance=md,
                           device=device)
    pids = feats.pid if feats.has_pids else None
    table = sweep_eps(result.graph, sweep, min_samples, pids=pids, max_distance=md) if sweep else None
    report = cluster_report(result, pids, table)
    attrs = dict(result.params)
    attrs.update({"knn_method": attrs.pop("knn"), "num_clusters": result.num_clusters,
                  "num_outliers": result.num_outliers, "command": command})
    path = write_labels(out, result.labels, features_file=features_path, path=feats.path, pid=feats.pid,
                        camid=feats.camid, attrs=attrs, knn=result.knn, inputs=(features_path,))
    return Path(path), report
