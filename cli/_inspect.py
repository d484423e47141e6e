"""``inspect-data``: readable summaries of what flows between stages: dataset specs, features files and labels
files (CLI-only code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import h5py
import numpy as np

from partreid.common.errors import InputError
from partreid.common.h5io import FEATURES_FORMAT, LABELS_FORMAT, read_features, read_labels
from partreid.cli._runs import describe_run, is_run_folder
from partreid.pplr_finetune.pseudo_labels import size_histogram


def _attrs_block(attrs: Dict[str, Any], skip=()) -> List[str]:
    return [f"  {k}: {attrs[k]}" for k in sorted(attrs) if k not in skip]


def describe_features(path) -> str:
    """Summary of a features file: counts, shapes, norms, ids/cameras and attributes."""
    feats = read_features(path)
    g = feats.global_feats
    lines = [f"features file: {path}", f"  rows (N): {len(feats)}", f"  global: float32 {tuple(g.shape)}"]
    if feats.parts is not None:
        lines.append(f"  parts: float32 {tuple(feats.parts.shape)}")
    norms = np.linalg.norm(g, axis=1) if len(g) else np.zeros(0)
    if len(norms):
        lines.append(f"  global L2 norm: min {norms.min():.4g}  mean {norms.mean():.4g}  max {norms.max():.4g}")
    lines.append(f"  pids: {np.unique(feats.pid[feats.pid >= 0]).size} known, {int((feats.pid < 0).sum())} unknown")
    lines.append(f"  cameras: {np.unique(feats.camid[feats.camid >= 0]).size}")
    lines.append("attributes:")
    lines += _attrs_block(feats.attrs)
    return "\n".join(lines)


def describe_labels(path) -> str:
    """Summary of a labels file: counts, cluster-size histogram, agreement statistics, attributes."""
    lab = read_labels(path)
    lines = [f"labels file: {path}", f"  rows (N): {len(lab)}"]
    if lab.knn is not None:
        lines.append(f"  knn: int64 {tuple(lab.knn.shape)}")
    if lab.agreement is not None:
        a = lab.agreement
        lines.append(f"  agreement: float32 {tuple(a.shape)}")
        for j in range(a.shape[1]):
            col = a[:, j]
            lines.append(f"    part {j + 1}: mean {col.mean():.3f}  median {np.median(col):.3f}  "
                         f"min {col.min():.3f}  max {col.max():.3f}")
    labels = lab.labels
    lines.append(f"  clusters: {lab.num_clusters}   clustered images: {int((labels >= 0).sum())}   "
                 f"outliers: {int((labels < 0).sum())}")
    lines.append(size_histogram(labels))
    lines.append("attributes:")
    lines += _attrs_block(lab.attrs)
    return "\n".join(lines)


def describe_dataset(spec: str) -> str:
    """Summary table of a dataset spec (ids, images, cameras per split), with its full fingerprint."""
    from partreid.common.data import load_dataset

    ds = load_dataset(spec, verbose=False)
    return f"{ds.summary()}\n  spec: {spec}\n  fingerprint: {ds.fingerprint}"


def describe(target: str) -> str:
    """Summary of ``target``: a run folder, a features file, a labels file (``.h5`` or ``.csv``) or a dataset spec.

    Raises:
        InputError: the target is neither a readable partreid file nor a valid dataset spec.
    """
    path = Path(target)
    if is_run_folder(path):
        return describe_run(path)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return describe_labels(path)
        fmt = None
        if h5py.is_hdf5(path):
            try:
                with h5py.File(path, "r") as f:
                    fmt = f.attrs.get("format")
                    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
            except OSError:
                fmt = None
        if fmt == FEATURES_FORMAT:
            return describe_features(path)
        if fmt == LABELS_FORMAT:
            return describe_labels(path)
        # let the reader produce the precise one-line error (truncated, wrong format, ...)
        read_features(path)
    if path.suffix.lower() in (".h5", ".hdf5") and not path.exists():
        raise InputError(f"{path}: no such file")
    return describe_dataset(target)
