"""``search``: rank a gallery features file for unlabelled query crops (or query features), with an optional
same-person decision, a CSV of the ranked lists and a contact sheet. No pids or cameras are needed.

Queries may be: a features file (``.h5``); a list file (``.txt``/``.lst``, one image path per line, relative
paths taken from the list's folder); a dataset spec or a folder (an unlabelled folder is read as an image
tree). Image queries are extracted with ``checkpoint`` (a torch checkpoint or an exported ONNX file) using the
gallery file's feature options (fusion, neck, flip, normalisation), so both sides are comparable.

Distances are those of ``evaluate`` (:func:`partreid.common.retrieval.evaluation.distance_chunks`) and the
ranking is its stable one (distance, then gallery index). The decision is "same person" when
``distance <= threshold`` (:func:`partreid.common.retrieval.evaluation.same_person`).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from partreid.common.errors import InputError
from partreid.common.fileio import atomic_path
from partreid.common.retrieval.evaluation import distance_chunks, same_person, topk_per_query

log = logging.getLogger("partreid.search")

#: Gallery entries listed per query by default.
DEFAULT_TOPK = 10
LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass
class Queries:
    """Query features and where their images are.

    Attributes:
        feats: float32 (Q, D).
        paths: Q absolute image paths (or the stored path when the root is unknown).
        model_sha256: the model that computed ``feats`` ("" when unknown).
    """

    feats: np.ndarray
    paths: List[str]
    model_sha256: str = ""


def absolute_paths(feats) -> List[str]:
    """Absolute image paths of a features file's rows (its ``dataset_root`` joined with each ``path``)."""
    root = str(feats.attrs.get("dataset_root", ""))
    return [str(Path(root) / p) if root else str(p) for p in feats.path]


def _list_dataset(list_file: Path):
    """A dataset of the images named in a list file (one path per line; '#' comments and blank lines skipped)."""
    import pandas as pd

    from partreid.common.data.base import ReIDDataset

    try:
        lines = list_file.read_text().splitlines()
    except OSError as exc:
        raise InputError(f"{list_file}: cannot read the list file ({exc.strerror})") from None
    paths = []
    for ln in lines:
        ln = ln.strip()
        if ln and not ln.startswith("#"):
            p = Path(ln).expanduser()
            paths.append(str(p if p.is_absolute() else (list_file.parent / p).resolve()))
    if not paths:
        raise InputError(f"{list_file}: no image paths in the list file")
    frame = pd.DataFrame({"path": paths, "pid": np.full(len(paths), -1, np.int64),
                          "camid": np.full(len(paths), -1, np.int64), "split": ["all"] * len(paths)})
    return ReIDDataset("csv", Path("/"), frame, spec=str(list_file))


def _image_dataset(source: str):
    """A dataset spec, a folder (labelled layouts detected; otherwise an unlabelled image tree) or a list file."""
    from partreid.common.data import load_dataset

    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return _list_dataset(path)
    try:
        return load_dataset(source, verbose=False)
    except InputError:
        if path.is_dir():
            return load_dataset(f"luperson:{path}", verbose=False)
        raise


def load_queries(source: str, gallery, *, checkpoint: Optional[str] = None, split: Optional[str] = None,
                 batch_size: int = 64, workers: int = 2, device: str = "cpu", progress: bool = True) -> Queries:
    """Query features from a features file, or extracted from images with ``checkpoint`` (module docstring).

    Args:
        source: features file, list file, dataset spec or folder.
        gallery: the gallery :class:`partreid.common.h5io.FeaturesFile` (its feature options are reused).
        checkpoint: model for image queries (required then).
        split: split of a dataset spec (default: as ``extract-features``).

    Raises:
        InputError: unreadable source, image queries without a checkpoint, or no readable image.
    """
    from partreid.common.h5io import read_features

    if str(source).lower().endswith(".h5"):
        q = read_features(source, parts=False)
        return Queries(q.global_feats, absolute_paths(q), str(q.attrs.get("model_sha256", "")))
    if not checkpoint:
        raise InputError(f"{source}: image queries need --checkpoint (the model the gallery was extracted with)")
    from partreid.common.extract import FeatureOptions, extract_arrays
    from partreid.common.models.loader import load_model
    from partreid.common.splits import choose_split

    ds = _image_dataset(source)
    _, frame = choose_split(ds, split)
    loaded = load_model(checkpoint)
    attrs = gallery.attrs
    sha = str(attrs.get("model_sha256", ""))
    if sha and sha != loaded.sha256:
        log.warning("the gallery was extracted with another model (model_sha256 differs from %s)", checkpoint)
    fusion = str(attrs.get("fusion", "cls")) or "cls"
    neck = str(attrs.get("neck", "after"))
    opts = FeatureOptions(fusion=fusion if fusion in ("cls", "cat", "mean") else "cls",
                          neck=neck if neck in ("after", "before") else "after", flip=bool(attrs.get("flip", False)),
                          normalize=bool(attrs.get("normalized", True)), parts=False)
    g, _, kept = extract_arrays(loaded, ds, frame, opts=opts, batch_size=batch_size, workers=workers,
                                device=device, progress=progress)
    paths = [ds.image_path(p) for p in frame["path"].to_numpy()[kept]]
    return Queries(g, paths, loaded.sha256)


def rank_gallery(qf: np.ndarray, gf: np.ndarray, topk: int = DEFAULT_TOPK, metric: str = "euclidean"):
    """The ``topk`` nearest gallery rows of every query: int64 (Q, k) indices and float32 (Q, k) distances
    (padded with −1 / inf when the gallery is smaller than ``topk``)."""
    return topk_per_query(distance_chunks(qf, gf, metric=metric), topk)


def write_matches_csv(out, query_paths: Sequence[str], gallery_paths: Sequence[str], idx: np.ndarray,
                      dist: np.ndarray, threshold: Optional[float], inputs=()) -> Path:
    """The ranked lists as CSV: ``query, rank, gallery, distance, same_person`` (rank 1 = nearest;
    ``same_person`` is 1/0, empty without a threshold). Written atomically."""
    out = Path(out)
    with atomic_path(out, inputs=tuple(inputs)) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["query", "rank", "gallery", "distance", "same_person"])
            for qi in range(idx.shape[0]):
                for r in range(idx.shape[1]):
                    j = int(idx[qi, r])
                    if j < 0:
                        break
                    d = float(dist[qi, r])
                    decision = "" if threshold is None else int(bool(same_person(d, threshold)))
                    w.writerow([query_paths[qi], r + 1, gallery_paths[j], f"{d:.6f}", decision])
    return out


def save_contact_sheet(out, query_paths: Sequence[str], gallery_paths: Sequence[str], idx: np.ndarray,
                       dist: np.ndarray, threshold: Optional[float], *, max_queries: int = 8,
                       tile=(64, 128), inputs=()) -> Path:
    """A PNG contact sheet: one row per query (spread over the query list), the query then its ranked gallery
    crops, each tile captioned with its distance and framed green ("same person", ``d <= threshold``), red
    (different) or grey (no threshold). Unreadable images are drawn as grey tiles. Written atomically.

    Args:
        tile: (width, height) of a tile in pixels.
    """
    from PIL import Image, ImageDraw

    nq = idx.shape[0]
    rows = np.unique(np.round(np.linspace(0, nq - 1, max(1, min(int(max_queries), nq)))).astype(int))
    k = idx.shape[1]
    tw, th = tile
    cap, pad, gap = 14, 3, 10
    width = pad + (tw + pad) * (k + 1) + gap
    height = pad + (th + cap + pad) * len(rows)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)

    def put(path, x, y, colour, caption):
        try:
            with Image.open(path) as im:
                img = im.convert("RGB").resize((tw - 4, th - 4))
        except (OSError, ValueError):
            img = Image.new("RGB", (tw - 4, th - 4), (200, 200, 200))
        draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=colour)
        sheet.paste(img, (x + 2, y + 2))
        draw.text((x + 2, y + th), caption, fill=(0, 0, 0))

    for r, qi in enumerate(rows):
        y = pad + r * (th + cap + pad)
        put(query_paths[qi], pad, y, (40, 40, 200), "query")
        for c in range(k):
            j = int(idx[qi, c])
            if j < 0:
                break
            d = float(dist[qi, c])
            if threshold is None:
                colour, mark = (150, 150, 150), ""
            elif same_person(d, threshold):
                colour, mark = (0, 170, 0), " same"
            else:
                colour, mark = (210, 0, 0), " diff"
            put(gallery_paths[j], pad + gap + (c + 1) * (tw + pad), y, colour, f"{d:.3f}{mark}")
    out = Path(out)
    with atomic_path(out, inputs=tuple(inputs)) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def resolve_threshold(threshold: Optional[str], threshold_file=None, checkpoint: Optional[str] = None,
                      metric: str = "euclidean", model_sha256: str = "") -> Optional[float]:
    """The decision threshold: a number, or ``auto`` = the ``threshold_file`` (a ``calibrate`` result), else the
    threshold embedded in an exported ONNX ``checkpoint``; None when neither ``threshold`` nor the file is given.

    Raises:
        InputError: not a number, ``auto`` without a source, or a threshold for another metric.
    """
    from partreid.common.calibration import read_threshold

    if threshold is None and threshold_file is None:
        return None
    if threshold not in (None, "auto"):
        try:
            return float(threshold)
        except ValueError:
            raise InputError(f"--threshold {threshold!r}: expected a number or 'auto'") from None
    if threshold_file:
        return float(read_threshold(threshold_file, metric=metric, model_sha256=model_sha256)["threshold"])
    if checkpoint and str(checkpoint).lower().endswith(".onnx"):
        from partreid.common.models.onnx_backend import read_onnx_metadata

        record = read_onnx_metadata(checkpoint).get("threshold")
        if record:
            if record.get("metric", "euclidean") != metric:
                raise InputError(f"{checkpoint}: its threshold is for the {record.get('metric')} distance; "
                                 f"use --metric {record.get('metric')}")
            return float(record["threshold"])
    raise InputError("--threshold auto needs --threshold-file (a calibrate result) or an ONNX --checkpoint "
                     "exported with --threshold-file")
