"""The HDF5 contract between stages: features files and labels files.

Other tools read these files, so the names are exact and documented in the README.

**Features file** (root attr ``format`` = ``"partreid.features"``, ``format_version`` = 1)

========== ===================== ========== =============================================
dataset    dtype                 shape      meaning
========== ===================== ========== =============================================
``global`` float32               (N, D)     the retrieval feature
``parts``  float32               (N, P, Dp) optional, one row per part
``path``   variable-length UTF-8 (N,)       image path, relative to the dataset root
``pid``    int64                 (N,)       person id; -1 = unknown
``camid``  int64                 (N,)       camera id; -1 = unknown
========== ===================== ========== =============================================

Root attributes: ``format``, ``format_version``, ``normalized`` (bool), ``dataset``, ``dataset_root``,
``dataset_fingerprint``, ``split``, ``model_sha256``, ``image_size`` ([H, W] pixels), ``command``,
``package_version``, ``created``.

**Labels file** (``format`` = ``"partreid.labels"``, ``format_version`` = 1): ``labels`` int64 (N,) with
-1 = outlier; optional ``agreement`` float32 (N, P) (written by ``refine-labels``); optional ``knn`` int64
(N, k) (the neighbour lists ``cluster`` computed, self included, nearest first); ``path``, ``pid``, ``camid``
copied from the features file. Root attributes: ``format``, ``format_version``, ``features_file``,
``features_sha256`` and the parameters that produced the labels.

Rules: readers check the format, the version, that all shapes agree and that features are finite; every
failure raises :class:`common.errors.InputError` with one line naming the file and the problem. Writes are
atomic (temporary file in the same folder, then rename). ``.csv`` is accepted for labels files as an
export/import format.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import h5py
import numpy as np

from partreid.common import __version__
from partreid.common.errors import InputError
from partreid.common.fileio import (PathLike, atomic_path, check_not_input, new_partial, output_lock, partials_of,
                                    sha256_file)

FEATURES_FORMAT = "partreid.features"
LABELS_FORMAT = "partreid.labels"
FORMAT_VERSION = 1
_STR = h5py.string_dtype("utf-8")
#: rows checked per block for NaN/Inf, so validation of a 4M×768 file needs bounded memory
_CHECK_ROWS = 65536


@dataclass
class FeaturesFile:
    """Contents of a features file.

    Attributes:
        global_feats: float32 (N, D) retrieval features.
        parts: float32 (N, P, Dp) part features, or None.
        path: object array (N,) of str, paths relative to the dataset root.
        pid: int64 (N,), -1 = unknown.
        camid: int64 (N,), -1 = unknown.
        attrs: the root attributes (plain Python values).
        filename: where the file was read from.
    """

    global_feats: np.ndarray
    parts: Optional[np.ndarray]
    path: np.ndarray
    pid: np.ndarray
    camid: np.ndarray
    attrs: Dict[str, Any] = field(default_factory=dict)
    filename: Optional[Path] = None

    def __len__(self) -> int:
        return int(self.global_feats.shape[0])

    @property
    def has_pids(self) -> bool:
        """True when at least one row carries a real person id (pid >= 0)."""
        return bool(len(self.pid)) and bool((self.pid >= 0).any())


@dataclass
class LabelsFile:
    """Contents of a labels file.

    Attributes:
        labels: int64 (N,), -1 = outlier.
        agreement: float32 (N, P) cross-agreement scores, or None.
        knn: int64 (N, k) neighbour lists (self included, nearest first), or None.
        path, pid, camid: as in :class:`FeaturesFile`.
        attrs: root attributes, including ``features_file`` and ``features_sha256``.
        filename: where the file was read from.
    """

    labels: np.ndarray
    agreement: Optional[np.ndarray]
    knn: Optional[np.ndarray]
    path: np.ndarray
    pid: np.ndarray
    camid: np.ndarray
    attrs: Dict[str, Any] = field(default_factory=dict)
    filename: Optional[Path] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_clusters(self) -> int:
        """Number of clusters (labels >= 0)."""
        return int(np.unique(self.labels[self.labels >= 0]).size)


# --------------------------------------------------------------------------------------------- helpers
def stage_attrs(command: str = "") -> Dict[str, Any]:
    """Provenance attributes every stage writes: ``command``, ``package_version``, ``created`` (UTC ISO)."""
    if not command:
        command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else ""
    return {
        "command": command,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _to_attr(value: Any) -> Any:
    """Convert a Python value to something h5py stores as an attribute (dicts/None become JSON strings)."""
    if value is None:
        return "null"
    if isinstance(value, (dict, list, tuple)) and not (
            isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float, np.number)) for v in value)):
        return json.dumps(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _from_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open_h5(path: PathLike, what: str) -> h5py.File:
    path = Path(path)
    if str(path) == "-" or not str(path):
        raise InputError(f"no {what} given (argument empty and nothing on stdin)")
    if not path.exists():
        raise InputError(f"{path}: no such {what}")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a {what}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:  # not HDF5, truncated, locked
        reason = "truncated or corrupt HDF5 file" if h5py.is_hdf5(path) else "not an HDF5 file"
        raise InputError(f"{path}: {reason} ({str(exc).splitlines()[0]})") from None


def _check_format(f: h5py.File, path: Path, expected: str) -> Dict[str, Any]:
    attrs = {k: _from_attr(v) for k, v in f.attrs.items()}
    fmt = attrs.get("format")
    if fmt != expected:
        found = f"format {fmt!r}" if fmt is not None else "no 'format' attribute"
        raise InputError(f"{path}: not a {expected} file ({found})")
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: {expected} format_version {version} is not supported (expected {FORMAT_VERSION})")
    return attrs


def _read(f: h5py.File, path: Path, name: str, required: bool = True) -> Optional[np.ndarray]:
    if name not in f:
        if required:
            raise InputError(f"{path}: dataset '{name}' is missing")
        return None
    try:
        ds = f[name]
        if ds.dtype.kind == "O" or h5py.check_string_dtype(ds.dtype) is not None:
            return np.asarray(ds.asstr()[...], dtype=object)
        return ds[...]
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: dataset '{name}' is unreadable, the file is probably truncated "
                         f"({str(exc).splitlines()[0]})") from None


def _check_rows(where: Path, n: int, **arrays: Optional[np.ndarray]) -> None:
    for name, arr in arrays.items():
        if arr is not None and arr.shape[0] != n:
            raise InputError(f"{where}: mismatched N: '{name}' has {arr.shape[0]} rows, expected {n}")


def _check_finite(path: Path, name: str, arr: np.ndarray) -> None:
    if arr.size == 0:
        return
    flat = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(-1, 1)
    for start in range(0, flat.shape[0], _CHECK_ROWS):
        block = flat[start:start + _CHECK_ROWS]
        bad = ~np.isfinite(block)
        if bad.any():
            row = start + int(np.nonzero(bad.any(axis=1))[0][0])
            count = int(bad.any(axis=1).sum())
            raise InputError(f"{path}: '{name}' holds NaN/Inf values (first at row {row}; "
                             f"{count}+ rows affected)")


def _check_finite_stream(f: h5py.File, path: Path, name: str) -> None:
    """:func:`_check_finite` on a dataset read ``_CHECK_ROWS`` rows at a time (not kept in memory)."""
    ds = f[name]
    rows = max(1, _CHECK_ROWS // max(1, int(np.prod(ds.shape[1:])) // 64))
    for start in range(0, ds.shape[0], rows):
        try:
            block = ds[start:start + rows]
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: dataset '{name}' is unreadable, the file is probably truncated "
                             f"({str(exc).splitlines()[0]})") from None
        try:
            _check_finite(path, name, block)
        except InputError:
            bad = ~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
            raise InputError(f"{path}: '{name}' holds NaN/Inf values (first at row "
                             f"{start + int(np.nonzero(bad)[0][0])})") from None


def _as_str_array(values: Sequence[str]) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


# --------------------------------------------------------------------------------------------- features
def _shape_of(f: h5py.File, path: Path, name: str) -> Optional[tuple]:
    """Shape of dataset ``name`` (None when absent), read from the metadata only."""
    if name not in f:
        return None
    obj = f[name]
    if not isinstance(obj, h5py.Dataset):
        raise InputError(f"{path}: '{name}' is not a dataset")
    return tuple(obj.shape)


def _check_kind(path: Path, f: h5py.File, name: str, kinds: str, what: str) -> None:
    if name not in f or not isinstance(f[name], h5py.Dataset):
        return
    dt = f[name].dtype
    if h5py.check_string_dtype(dt) is not None or dt.kind not in kinds:
        raise InputError(f"{path}: '{name}' must hold {what}, got dtype {dt}")


def _check_not_empty(path: Path, n: int, what: str, allow_empty: bool) -> None:
    if n == 0 and not allow_empty:
        raise InputError(f"{path}: the {what} holds no rows (N = 0); nothing to work on")


def read_features(path: PathLike, parts: bool = True, allow_empty: bool = False) -> FeaturesFile:
    """Read and validate a features file.

    The whole file is validated, also what is not loaded: the shapes of ``global`` (N, D), ``parts``
    (N, P, Dp), ``path``, ``pid`` and ``camid`` (N,), their dtypes, and the finiteness of ``global`` and
    ``parts`` (with ``parts=False`` the part features are streamed through the check, not kept), so a bad file
    is refused by the first stage that opens it, not one stage later.

    Args:
        path: the ``.h5`` file.
        parts: also load ``parts`` (N, P, Dp) when present.
        allow_empty: accept N = 0 (default: an :class:`InputError`, since no stage can work on it).

    Returns:
        :class:`FeaturesFile`.

    Raises:
        InputError: missing file, not HDF5, truncated, another format or version, mismatched N, bad shapes or
            dtypes, NaN/Inf features, N = 0.
    """
    path = Path(path)
    with _open_h5(path, "features file") as f:
        attrs = _check_format(f, path, FEATURES_FORMAT)
        gshape = _shape_of(f, path, "global")
        if gshape is None:
            raise InputError(f"{path}: dataset 'global' is missing")
        if len(gshape) != 2:
            raise InputError(f"{path}: 'global' must be 2-D (N, D), got shape {gshape}")
        n = gshape[0]
        if gshape[1] < 1:
            raise InputError(f"{path}: 'global' has D = 0 columns")
        pshape = _shape_of(f, path, "parts")
        if pshape is not None:
            if len(pshape) != 3:
                raise InputError(f"{path}: 'parts' must be 3-D (N, P, Dp), got shape {pshape}")
            if pshape[0] != n:
                raise InputError(f"{path}: mismatched N: 'parts' has {pshape[0]} rows, expected {n}")
            if pshape[1] < 1 or pshape[2] < 1:
                raise InputError(f"{path}: 'parts' has an empty dimension, shape {pshape}")
        for name in ("path", "pid", "camid"):
            shape = _shape_of(f, path, name)
            if shape is None:
                raise InputError(f"{path}: dataset '{name}' is missing")
            if len(shape) != 1:
                raise InputError(f"{path}: '{name}' must be 1-D (N,), got shape {shape}")
        _check_kind(path, f, "global", "f", "floating-point features")
        _check_kind(path, f, "parts", "f", "floating-point features")
        _check_kind(path, f, "pid", "iu", "integer ids")
        _check_kind(path, f, "camid", "iu", "integer ids")
        g = _read(f, path, "global")
        p = _read(f, path, "parts", required=False) if parts else None
        if not parts and pshape is not None:
            _check_finite_stream(f, path, "parts")
        paths = _read(f, path, "path")
        pid = _read(f, path, "pid").astype(np.int64, copy=False)
        camid = _read(f, path, "camid").astype(np.int64, copy=False)
    _check_rows(path, n, parts=p, path=paths, pid=pid, camid=camid)
    _check_not_empty(path, n, "features file", allow_empty)
    g = np.ascontiguousarray(g, dtype=np.float32)
    _check_finite(path, "global", g)
    if p is not None:
        p = np.ascontiguousarray(p, dtype=np.float32)
        _check_finite(path, "parts", p)
    return FeaturesFile(g, p, paths, pid, camid, attrs, path)


def _features_attrs(attrs: Mapping[str, Any], normalized: bool) -> Dict[str, Any]:
    out = {"format": FEATURES_FORMAT, "format_version": FORMAT_VERSION, "normalized": bool(normalized)}
    defaults = {"dataset": "", "dataset_root": "", "dataset_fingerprint": "", "split": "",
                "model_sha256": "", "image_size": [0, 0]}
    out.update(defaults)
    out.update(stage_attrs(str(attrs.get("command", ""))))
    out.update({k: v for k, v in attrs.items() if k not in ("format", "format_version")
                and not (k == "command" and not v)})
    return out


def write_features(out: PathLike, global_feats: np.ndarray, parts: Optional[np.ndarray],
                   paths: Sequence[str], pids: Sequence[int], camids: Sequence[int],
                   attrs: Mapping[str, Any], inputs: Sequence[PathLike] = ()) -> Path:
    """Write a complete features file atomically.

    Args:
        out: destination ``.h5``.
        global_feats: float32 (N, D).
        parts: float32 (N, P, Dp) or None.
        paths, pids, camids: (N,) each.
        attrs: root attributes (``normalized`` is required; the provenance attributes are added).
        inputs: files this stage read; ``out`` may not be one of them.

    Returns:
        ``out`` as a Path.

    Raises:
        InputError: shapes disagree, features are not finite, or ``out`` is an input.
    """
    out = Path(out)
    g = np.ascontiguousarray(global_feats, dtype=np.float32)
    if g.ndim != 2:
        raise InputError(f"{out}: global features must be (N, D), got {g.shape}")
    n = g.shape[0]
    p = None if parts is None else np.ascontiguousarray(parts, dtype=np.float32)
    pid = np.asarray(pids, dtype=np.int64)
    camid = np.asarray(camids, dtype=np.int64)
    path_arr = _as_str_array(paths)
    _check_rows(out, n, parts=p, path=path_arr, pid=pid, camid=camid)
    _check_finite(out, "global", g)
    if p is not None:
        _check_finite(out, "parts", p)
    meta = _features_attrs(attrs, bool(attrs.get("normalized", False)))
    with atomic_path(out, inputs=tuple(inputs)) as tmp:
        with h5py.File(tmp, "w") as f:
            _create_feature_datasets(f, n, g.shape[1], None if p is None else p.shape[1:])
            f["global"][...] = g
            if p is not None:
                f["parts"][...] = p
            f["path"][...] = path_arr
            f["pid"][...] = pid
            f["camid"][...] = camid
            for k, v in meta.items():
                f.attrs[k] = _to_attr(v)
    return out


def _chunk_rows(n: int, row_bytes: int) -> int:
    return int(max(1, min(n, (1 << 20) // max(row_bytes, 1))))


def _create_feature_datasets(f: h5py.File, n: int, dim: int, parts_shape: Optional[tuple]) -> None:
    f.create_dataset("global", shape=(n, dim), dtype=np.float32,
                     chunks=(_chunk_rows(n, dim * 4), dim) if n else None)
    if parts_shape is not None:
        pp, dp = parts_shape
        f.create_dataset("parts", shape=(n, pp, dp), dtype=np.float32,
                         chunks=(_chunk_rows(n, pp * dp * 4), pp, dp) if n else None)
    f.create_dataset("path", shape=(n,), dtype=_STR)
    f.create_dataset("pid", shape=(n,), dtype=np.int64)
    f.create_dataset("camid", shape=(n,), dtype=np.int64)


class FeaturesWriter:
    """Chunked, resumable writer of a features file.

    Rows are written in order with :meth:`write`; progress lives in a partial file unique to this process,
    ``.<name>.<pid>-<hex>.partial.h5`` next to the destination (:func:`common.fileio.new_partial`), created
    while holding the destination's write lock (:func:`common.fileio.output_lock`, held until :meth:`finish` or
    :meth:`close`), so a second writer of the same ``out`` is refused before it touches anything. A killed
    extraction resumed with ``resume=True`` adopts the matching partial file and continues after the last
    completed chunk. :meth:`finish` drops rows marked skipped (unreadable images), checks the features are
    finite and renames the result over ``out``.

    Args:
        out: destination ``.h5``.
        paths, pids, camids: (N,) metadata of every row to be written, in order.
        dim: D of ``global``; parts_shape: (P, Dp) or None.
        attrs: root attributes (see :func:`write_features`); ``resume_key`` in the partial file must match
            ``attrs`` fields ``dataset_fingerprint``, ``split`` and ``model_sha256`` for a resume.
        resume: continue a partial file when one matches; otherwise start again (older partial files of
            ``out`` are removed).

    Raises:
        InputError: ``out`` is one of ``inputs``. OutputBusyError: another process is writing ``out``.
    """

    def __init__(self, out: PathLike, paths: Sequence[str], pids: Sequence[int], camids: Sequence[int],
                 dim: int, parts_shape: Optional[tuple], attrs: Mapping[str, Any], resume: bool = False,
                 inputs: Sequence[PathLike] = ()):
        self.out = Path(out)
        check_not_input(self.out, inputs)
        self.n = len(paths)
        self.attrs = _features_attrs(attrs, bool(attrs.get("normalized", False)))
        key = json.dumps([str(self.attrs.get(k, "")) for k in ("dataset_fingerprint", "split", "model_sha256")]
                         + [self.n, int(dim), list(parts_shape) if parts_shape else None,
                            bool(self.attrs["normalized"]), str(self.attrs.get("options", ""))])
        self.rows_done = 0
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(output_lock(self.out))
        try:
            self._open(key, paths, pids, camids, dim, parts_shape, resume)
        except BaseException:
            self._lock.close()
            raise

    def _open(self, key, paths, pids, camids, dim, parts_shape, resume) -> None:
        stale = partials_of(self.out, ".h5")
        self.partial = None
        if resume:
            for cand in stale:
                try:
                    f = h5py.File(cand, "r+")
                except OSError:
                    continue  # unreadable partial file
                # the header is complete once resume_key is written (last); a writer killed before has none
                done = f.attrs.get("rows_done")
                if done is not None and _from_attr(f.attrs.get("resume_key")) == key:
                    self.f, self.partial = f, cand
                    self.rows_done = int(done)
                    break
                f.close()
        for old in stale:  # earlier writers are gone (we hold the lock): their leftovers go
            if old != self.partial:
                old.unlink(missing_ok=True)
        if self.partial is not None:
            return
        self.partial = new_partial(self.out, ".h5")
        self.f = h5py.File(self.partial, "w")
        _create_feature_datasets(self.f, self.n, int(dim), parts_shape)
        self.f.create_dataset("skipped", shape=(self.n,), dtype=np.bool_)
        self.f["path"][...] = _as_str_array(paths)
        self.f["pid"][...] = np.asarray(pids, dtype=np.int64)
        self.f["camid"][...] = np.asarray(camids, dtype=np.int64)
        self.f.attrs["rows_done"] = 0
        self.f.attrs["resume_key"] = key  # last: marks the header complete for a later resume
        self.f.flush()

    def write(self, start: int, global_feats: np.ndarray, parts: Optional[np.ndarray] = None,
              skipped: Optional[np.ndarray] = None) -> None:
        """Write rows ``[start, start + len(global_feats))``; ``start`` must equal :attr:`rows_done`.

        Args:
            global_feats: float32 (c, D); parts: float32 (c, P, Dp) or None.
            skipped: bool (c,) rows whose image was unreadable (their feature rows are ignored).
        """
        if start != self.rows_done:
            raise ValueError(f"rows must be written in order: expected start {self.rows_done}, got {start}")
        stop = start + len(global_feats)
        self.f["global"][start:stop] = global_feats
        if parts is not None:
            self.f["parts"][start:stop] = parts
        if skipped is not None:
            self.f["skipped"][start:stop] = skipped
        self.rows_done = stop
        self.f.attrs["rows_done"] = stop
        self.f.flush()

    def finish(self) -> Path:
        """Validate, drop skipped rows, and atomically move the result to ``out``; returns ``out``."""
        if self.rows_done != self.n:
            raise ValueError(f"only {self.rows_done} of {self.n} rows were written")
        f = self.f
        skipped = f["skipped"][...]
        keep = ~skipped
        g = f["global"][...][keep]
        p = f["parts"][...][keep] if "parts" in f else None
        paths = np.asarray(f["path"].asstr()[...], dtype=object)[keep]
        pid = f["pid"][...][keep]
        camid = f["camid"][...][keep]
        f.close()
        attrs = dict(self.attrs)
        attrs["num_skipped"] = int(skipped.sum())
        try:
            write_features(self.out, g, p, paths, pid, camid, attrs)
            self.partial.unlink(missing_ok=True)
        finally:
            self._lock.close()
        return self.out

    def close(self) -> None:
        """Close the partial file, keeping it for a later ``resume``, and release the write lock."""
        try:
            self.f.close()
        except Exception:  # already closed
            pass
        self._lock.close()


# --------------------------------------------------------------------------------------------- labels
def _labels_attrs(attrs: Mapping[str, Any], features_file: PathLike, features_sha256: str) -> Dict[str, Any]:
    out = {"format": LABELS_FORMAT, "format_version": FORMAT_VERSION,
           "features_file": str(Path(features_file).resolve()), "features_sha256": features_sha256}
    out.update(stage_attrs(str(attrs.get("command", ""))))
    out.update({k: v for k, v in attrs.items() if k not in ("format", "format_version", "features_file",
                                                            "features_sha256") and not (k == "command" and not v)})
    return out


def write_labels(out: PathLike, labels: np.ndarray, *, features_file: PathLike, path: Sequence[str],
                 pid: Sequence[int], camid: Sequence[int], attrs: Mapping[str, Any],
                 agreement: Optional[np.ndarray] = None, knn: Optional[np.ndarray] = None,
                 features_sha256: Optional[str] = None, inputs: Sequence[PathLike] = ()) -> Path:
    """Write a labels file atomically (``.h5``, or ``.csv`` for people who want to look at it).

    Args:
        out: destination; a ``.csv`` suffix writes the CSV export (``knn`` is not exported to CSV).
        labels: int64 (N,) pseudo-labels, -1 = outlier.
        features_file: the features file the labels were computed from; its SHA-256 is recorded.
        path, pid, camid: (N,) copied from the features file.
        attrs: clustering parameters and provenance.
        agreement: float32 (N, P) or None. knn: int64 (N, k) or None.
        features_sha256: the hash if already known (saves re-reading a large file).
        inputs: files this stage read (never overwritten).

    Raises:
        InputError: mismatched N or ``out`` is an input.
    """
    out = Path(out)
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    path_arr = _as_str_array(path)
    pid = np.asarray(pid, dtype=np.int64)
    camid = np.asarray(camid, dtype=np.int64)
    agreement = None if agreement is None else np.asarray(agreement, dtype=np.float32)
    knn = None if knn is None else np.asarray(knn, dtype=np.int64)
    _check_rows(out, n, path=path_arr, pid=pid, camid=camid, agreement=agreement, knn=knn)
    sha = features_sha256 or sha256_file(features_file)
    meta = _labels_attrs(attrs, features_file, sha)
    all_inputs = tuple(inputs) + (features_file,)
    if out.suffix.lower() == ".csv":
        return _write_labels_csv(out, labels, path_arr, pid, camid, agreement, meta, all_inputs)
    with atomic_path(out, inputs=all_inputs) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("labels", data=labels)
            if agreement is not None:
                f.create_dataset("agreement", data=agreement)
            if knn is not None:
                f.create_dataset("knn", data=knn, chunks=(_chunk_rows(n, knn.shape[1] * 8), knn.shape[1])
                                 if n else None)
            f.create_dataset("path", data=path_arr, dtype=_STR)
            f.create_dataset("pid", data=pid)
            f.create_dataset("camid", data=camid)
            for k, v in meta.items():
                f.attrs[k] = _to_attr(v)
    return out


def read_labels(path: PathLike, allow_empty: bool = False) -> LabelsFile:
    """Read and validate a labels file (``.h5``, or the ``.csv`` export).

    Validated: format and version; ``labels`` (N,) integers >= -1; ``agreement`` (N, P) finite; ``knn``
    (N, k) integers in [0, N); ``path``, ``pid``, ``camid`` (N,).

    Raises:
        InputError: missing file, another format or version, truncated file, mismatched N, bad shapes or values,
            N = 0 (unless ``allow_empty``).
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        lab = _read_labels_csv(path)
    else:
        with _open_h5(path, "labels file") as f:
            attrs = _check_format(f, path, LABELS_FORMAT)
            for name in ("labels", "pid", "camid", "knn"):
                _check_kind(path, f, name, "iu", "integers")
            _check_kind(path, f, "agreement", "f", "floating-point scores")
            labels = _read(f, path, "labels").astype(np.int64, copy=False)
            agreement = _read(f, path, "agreement", required=False)
            knn = _read(f, path, "knn", required=False)
            paths = _read(f, path, "path")
            pid = _read(f, path, "pid").astype(np.int64, copy=False)
            camid = _read(f, path, "camid").astype(np.int64, copy=False)
        if agreement is not None:
            agreement = agreement.astype(np.float32, copy=False)
        if knn is not None:
            knn = knn.astype(np.int64, copy=False)
        lab = LabelsFile(labels, agreement, knn, paths, pid, camid, attrs, path)
    _validate_labels(lab, path, allow_empty)
    return lab


def _validate_labels(lab: LabelsFile, path: Path, allow_empty: bool) -> None:
    labels = lab.labels
    if labels.ndim != 1:
        raise InputError(f"{path}: 'labels' must be 1-D (N,), got shape {labels.shape}")
    n = labels.shape[0]
    for name in ("path", "pid", "camid"):
        arr = getattr(lab, name)
        if arr.ndim != 1:
            raise InputError(f"{path}: '{name}' must be 1-D (N,), got shape {arr.shape}")
    if lab.agreement is not None and lab.agreement.ndim != 2:
        raise InputError(f"{path}: 'agreement' must be 2-D (N, P), got shape {lab.agreement.shape}")
    if lab.knn is not None and lab.knn.ndim != 2:
        raise InputError(f"{path}: 'knn' must be 2-D (N, k), got shape {lab.knn.shape}")
    _check_rows(path, n, agreement=lab.agreement, knn=lab.knn, path=lab.path, pid=lab.pid, camid=lab.camid)
    _check_not_empty(path, n, "labels file", allow_empty)
    if n and labels.min() < -1:
        raise InputError(f"{path}: 'labels' holds {int(labels.min())}; labels are >= 0, or -1 for an outlier")
    if lab.agreement is not None:
        _check_finite(path, "agreement", lab.agreement)
    if lab.knn is not None and lab.knn.size and (lab.knn.min() < 0 or lab.knn.max() >= n):
        raise InputError(f"{path}: 'knn' holds row indices outside [0, {n - 1}]")


def features_for_labels(labels: LabelsFile, features_path: Optional[PathLike] = None,
                        parts: bool = True) -> FeaturesFile:
    """Load the features file a labels file refers to, checking its content hash.

    Args:
        labels: a labels file read with :func:`read_labels`.
        features_path: override the recorded ``features_file`` path (e.g. after moving files); the hash must
            still match.
        parts: also load the part features.

    Raises:
        InputError: the features file is missing, or its SHA-256 differs from the recorded ``features_sha256``
            (the message names both files), or its N differs.
    """
    recorded = labels.attrs.get("features_file", "")
    target = Path(features_path) if features_path else Path(recorded)
    if not str(target):
        raise InputError(f"{labels.filename}: the labels file records no features_file")
    if not target.exists():
        raise InputError(f"{labels.filename}: its features file {target} does not exist")
    sha = sha256_file(target)
    if sha != labels.attrs.get("features_sha256"):
        raise InputError(f"{labels.filename} was computed from a different version of {target} "
                         f"(content hash mismatch); re-run cluster on it")
    feats = read_features(target, parts=parts)
    if len(feats) != len(labels):
        raise InputError(f"{labels.filename}: {len(labels)} labels but {target} holds {len(feats)} rows")
    return feats


# --------------------------------------------------------------------------------------------- CSV export
def _write_labels_csv(out: Path, labels, paths, pid, camid, agreement, meta, inputs) -> Path:
    """CSV export: ``# partreid.labels VERSION`` and ``# key=json`` attribute lines, then columns path, pid,
    camid, label and agreement_0..P-1 (stdlib ``csv``; floats written with ``repr``, so they read back exactly)."""
    header = [f"# {LABELS_FORMAT} {FORMAT_VERSION}"] + [
        f"# {k}={json.dumps(_to_attr(v) if not isinstance(v, (int, float, str, bool)) else v)}"
        for k, v in meta.items() if k not in ("format", "format_version")]
    n_parts = 0 if agreement is None else agreement.shape[1]
    with atomic_path(out, inputs=inputs) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write("\n".join(header) + "\n")
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["path", "pid", "camid", "label"] + [f"agreement_{j}" for j in range(n_parts)])
            for i in range(len(labels)):
                row = [str(paths[i]), int(pid[i]), int(camid[i]), int(labels[i])]
                writer.writerow(row + [repr(float(agreement[i, j])) for j in range(n_parts)])
    return out


def _read_labels_csv(path: Path) -> LabelsFile:
    if not path.exists():
        raise InputError(f"{path}: no such labels file")
    attrs: Dict[str, Any] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        lines = fh.read().splitlines()
    skip = 0
    for line in lines:
        if not line.startswith("#"):
            break
        skip += 1
        body = line[1:].strip()
        if skip == 1:
            parts = body.split()
            if len(parts) != 2 or parts[0] != LABELS_FORMAT:
                raise InputError(f"{path}: not a {LABELS_FORMAT} CSV export (first line {line.strip()!r})")
            attrs["format"], attrs["format_version"] = parts[0], int(parts[1])
        elif "=" in body:
            key, value = body.split("=", 1)
            try:
                attrs[key] = json.loads(value)
            except json.JSONDecodeError:
                attrs[key] = value
    if "format" not in attrs:
        # a plain CSV: path,label (pid, camid optional) made by hand
        attrs.update({"format": LABELS_FORMAT, "format_version": FORMAT_VERSION})
    rows = list(csv.reader(line for line in lines[skip:] if line.strip()))
    if not rows:
        raise InputError(f"{path}: unreadable CSV (no header row)")
    columns = [c.strip() for c in rows[0]]
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise InputError(f"{path}: CSV is missing column(s) {', '.join(missing)}")
    body = rows[1:]
    bad = next((k for k, r in enumerate(body) if len(r) != len(columns)), None)
    if bad is not None:
        raise InputError(f"{path}: unreadable CSV (line {skip + bad + 2} has {len(body[bad])} fields, "
                         f"expected {len(columns)})")

    def column(name, dtype):
        j = columns.index(name)
        try:
            return np.array([dtype(r[j]) if dtype is str else dtype(float(r[j])) for r in body],
                            dtype=object if dtype is str else dtype)
        except ValueError as exc:
            raise InputError(f"{path}: unreadable CSV (column {name}: {exc})") from None

    n = len(body)
    agree_cols = sorted([c for c in columns if c.startswith("agreement_")], key=lambda c: int(c.split("_")[1]))
    agreement = (np.stack([column(c, np.float32) for c in agree_cols], axis=1).astype(np.float32)
                 if agree_cols and n else (np.zeros((0, len(agree_cols)), np.float32) if agree_cols else None))
    pid = column("pid", np.int64) if "pid" in columns else np.full(n, -1, np.int64)
    camid = column("camid", np.int64) if "camid" in columns else np.full(n, -1, np.int64)
    return LabelsFile(column("label", np.int64), agreement, None, column("path", str), pid, camid, attrs, path)
