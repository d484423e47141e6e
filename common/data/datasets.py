"""Dataset readers: a dataset *spec* string becomes a :class:`ReIDDataset` (reference-spec §F, §A.8).

One entry point, :func:`load_dataset`, turns a spec into a table of images with the columns
``path`` (str, relative to the dataset root, or the LMDB key), ``pid`` (int64, -1 = unknown),
``camid`` (int64, 0-based, -1 = unknown) and ``split`` (``'train'``, ``'query'``, ``'gallery'`` or ``'all'``).

Specs (``KIND:ROOT``; ROOT may start with ``~``):

================================  ========================================================================
``market1501:ROOT``               ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` (§F.1). ROOT may
                                  also be a parent holding e.g. ``Market-1501-v15.09.15/``.
``dukemtmc:ROOT``                 the same layout; ``gallery/`` is accepted for ``bounding_box_test/``.
``msmt17:ROOT``                   ``list_{train,val,query,gallery}.txt`` + image folders (§F.2), V1 or V2.
``cuhk03np:ROOT``                 CUHK03-NP, ``labeled/`` (default) or ``detected/`` sub-folders, each
                                  Market-style; ``cuhk03np-detected:ROOT`` / ``cuhk03np-labeled:ROOT`` or
                                  ``cuhk03np:ROOT/detected`` pick one.
``folder:ROOT``                   Market-style names ``PID_cCAM...`` (camera optional) or one sub-folder
                                  per pid; split folders used when present, else split ``'all'``.
``csv:FILE``                      manifest with columns ``path, pid[, camid][, split]``.
``luperson:ROOT``                 unlabelled image tree read recursively, with a cached file index
                                  (§A.8); a ROOT holding ``keys.pkl`` + an LMDB is read as ``lmdb``.
``lmdb:ROOT``                     LUPerson's LMDB (``keys.pkl`` + ``data.mdb``), images decoded on read.
``NAME``                          bare name: the folder ``NAME`` (case-insensitive) under ``$REID_DATA``;
                                  its layout is detected (see :func:`detect_layout`).
``PATH`` (contains ``/``)         a folder whose layout is detected, as for a bare name (a ``.csv`` file
                                  is read as ``csv:PATH``).
================================  ========================================================================

Rules common to all readers: image files are ``.jpg``, ``.jpeg``, ``.png`` and ``.bmp`` (any case); names
starting with ``.`` are ignored (hidden files, macOS ``._*`` forks, this module's own ``.partreid/``
cache folder). Rows are sorted by split (train, query, gallery, all) and then by path, so features line up
with a stable order (§F.1 "training code always uses ``sorted(dataset.train)``").
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from partreid.common.errors import InputError
from partreid.common.fileio import atomic_path

IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")
SPLITS: Tuple[str, ...] = ("train", "query", "gallery", "all")
KINDS: Tuple[str, ...] = ("market1501", "dukemtmc", "msmt17", "cuhk03np", "folder", "csv", "luperson", "lmdb")

# Spec prefixes accepted in front of ':' (lower-case) -> (kind, variant).
_SPEC_KINDS: Dict[str, Tuple[str, Optional[str]]] = {
    "market1501": ("market1501", None),
    "market": ("market1501", None),
    "dukemtmc": ("dukemtmc", None),
    "dukemtmc-reid": ("dukemtmc", None),
    "duke": ("dukemtmc", None),
    "msmt17": ("msmt17", None),
    "cuhk03np": ("cuhk03np", None),
    "cuhk03-np": ("cuhk03np", None),
    "cuhk03np-labeled": ("cuhk03np", "labeled"),
    "cuhk03np-detected": ("cuhk03np", "detected"),
    "folder": ("folder", None),
    "csv": ("csv", None),
    "luperson": ("luperson", None),
    "lmdb": ("lmdb", None),
}

# Market-style split folders (§F.1); the first name found wins.
_MARKET_SPLIT_DIRS: Dict[str, Tuple[str, ...]] = {
    "train": ("bounding_box_train",),
    "query": ("query",),
    "gallery": ("bounding_box_test", "gallery"),
}
_FOLDER_SPLIT_DIRS: Dict[str, Tuple[str, ...]] = {
    "train": ("bounding_box_train", "train"),
    "query": ("query",),
    "gallery": ("bounding_box_test", "gallery", "test"),
}
# Well-known dataset folder names, tried first when ROOT is a parent folder.
_KNOWN_SUBDIRS: Dict[str, Tuple[str, ...]] = {
    "market1501": ("market-1501-v15.09.15", "market-1501", "market1501"),
    "dukemtmc": ("dukemtmc-reid", "dukemtmc"),
    "msmt17": ("msmt17_v1", "msmt17_v2", "msmt17"),
    "cuhk03np": ("cuhk03-np", "cuhk03_np", "cuhk03np"),
}
_MSMT_LISTS: Dict[str, Tuple[str, ...]] = {
    "train": ("list_train.txt", "list_val.txt"),
    "query": ("list_query.txt",),
    "gallery": ("list_gallery.txt",),
}
_MSMT_IMAGE_DIRS: Dict[str, Tuple[str, ...]] = {  # V1 name first, then V2 name
    "train": ("train", "mask_train_v2"),
    "test": ("test", "mask_test_v2"),
}

_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")          # §F.1: ([-\d]+)_c(\d)
_FOLDER_NAME = re.compile(r"^(-?\d+)(?:_c(\d+)|(?=_)|$)")   # PID_cCAM..., PID_..., PID
_CAMERA_IN_NAME = re.compile(r"_c(\d+)")
_INT_NAME = re.compile(r"^-?\d+$")

INDEX_FORMAT = "partreid.fileindex"
INDEX_FORMAT_VERSION = 1
_ROOT_CACHE_DIR = ".partreid"
_INDEX_FILE = "file-index.txt.gz"


# ----------------------------------------------------------------------------------------------- dataset object

class ReIDDataset:
    """A loaded dataset: the image table plus what is needed to open its images.

    Attributes:
        kind: one of :data:`KINDS`.
        root: absolute dataset root (``pathlib.Path``); ``path`` values are relative to it.
        frame: ``pandas.DataFrame`` with columns ``path`` (str), ``pid`` (int64, -1 unknown),
            ``camid`` (int64, 0-based, -1 unknown), ``split`` (str), sorted by split then path, index 0..N-1.
            Train pids are the raw pids of the files/lists (no relabelling: that is the trainer's job, §F.1).
        version: dataset variant, e.g. ``'MSMT17_V1'``, ``'MSMT17_V2'``, ``'labeled'``, ``'detected'``; else None.
        fingerprint: ``"<N>:<sha256 hex of the sorted paths joined by '\\n' (UTF-8)>"``.
        spec: the spec string this dataset was loaded from.
        strict: default for :class:`partreid.common.data.images.ImageDataset` (fail instead of skipping unreadable images).
        warnings: warning lines printed while loading (also kept here for callers and tests).
        pid_names: for ``folder`` datasets with non-numeric pid folders, ``pid_names[pid]`` is the folder name.
        lmdb_path: for ``lmdb`` datasets, the folder holding ``data.mdb``.
    """

    def __init__(self, kind: str, root: Path, frame: pd.DataFrame, *, version: Optional[str] = None,
                 spec: Optional[str] = None, strict: bool = False, fingerprint: Optional[str] = None,
                 lmdb_path: Optional[Path] = None, pid_names: Optional[List[str]] = None,
                 warnings: Optional[List[str]] = None):
        self.kind = kind
        self.root = Path(root)
        self.frame = frame
        self.version = version
        self.spec = spec if spec is not None else f"{kind}:{root}"
        self.strict = strict
        self.fingerprint = fingerprint if fingerprint is not None else compute_fingerprint(frame["path"])
        self.lmdb_path = lmdb_path
        self.pid_names = pid_names
        self.warnings = list(warnings or [])
        self._lmdb_reader = None  # partreid.common.data.images.LmdbReader, made on first use (keeps torch out of loading)

    def __len__(self) -> int:
        return len(self.frame)

    def __repr__(self) -> str:
        v = f", version={self.version!r}" if self.version else ""
        return f"ReIDDataset(kind={self.kind!r}, root='{self.root}', n={len(self.frame)}{v})"

    @property
    def splits(self) -> List[str]:
        """Split names present, in the order train, query, gallery, all."""
        present = set(self.frame["split"].unique())
        return [s for s in SPLITS if s in present]

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one split, index reset to 0..n-1; ``'all'`` returns every row whatever its split.

        Raises:
            InputError: the split is unknown or absent from this dataset.
        """
        if name == "all":
            return self.frame.reset_index(drop=True)
        if name not in SPLITS:
            raise InputError(f"unknown split '{name}'; expected one of {', '.join(SPLITS)}")
        rows = self.frame[self.frame["split"] == name]
        if rows.empty:
            raise InputError(f"{self.spec}: no '{name}' split in this dataset "
                             f"(it has: {', '.join(self.splits) or 'nothing'})")
        return rows.reset_index(drop=True)

    def image_path(self, rel_path: str) -> str:
        """Where an image lives, for messages: the absolute file path, or ``<lmdb folder>[key]``."""
        if self.kind == "lmdb":
            return f"{self.lmdb_path}[{rel_path}]"
        return str(self.root / rel_path)

    def open_image(self, rel_path: str):
        """Open one image as an RGB ``PIL.Image.Image`` (decoded fully, file closed).

        ``rel_path`` is a ``path`` value of :attr:`frame` (relative to :attr:`root`, absolute for
        csv rows outside it, or the LMDB key). LMDB images are decoded from the stored JPEG bytes in memory;
        the LMDB environment is opened lazily once per process, so this works inside DataLoader workers.

        Raises:
            OSError: the image is missing, unreadable or corrupt (the message names it).
        """
        from partreid.common.data.images import LmdbReader, decode_image_bytes, open_image_file
        if self.lmdb_path is not None:
            if self._lmdb_reader is None:
                self._lmdb_reader = LmdbReader(self.lmdb_path)
            return decode_image_bytes(self._lmdb_reader.get(rel_path), self.image_path(rel_path))
        return open_image_file(self.root / rel_path)

    def summary(self) -> str:
        """Readable summary table (ids, images, cameras per split), as printed by :func:`load_dataset`.

        ids count the distinct pids other than -1 (the Market distractor pid 0 counts as one id, as in
        the peers' logs, §F.1); cameras count the distinct camids other than -1; '-' means unknown.
        """
        head = f"dataset {self.kind}" + (f" ({self.version})" if self.version else "") + f": {self.root}"
        lines = [head,
                 "  split    |  # ids | # images | # cameras",
                 "  ---------+--------+----------+----------"]
        rows = [(s, self.frame[self.frame["split"] == s]) for s in self.splits]
        if len(rows) > 1:
            rows.append(("total", self.frame))
        for name, part in rows:
            pids = part["pid"].to_numpy()
            cams = part["camid"].to_numpy()
            n_ids = len(np.unique(pids[pids != -1]))
            n_cams = len(np.unique(cams[cams != -1]))
            ids_s = str(n_ids) if n_ids else "-"
            cams_s = str(n_cams) if n_cams else "-"
            lines.append(f"  {name:<8} | {ids_s:>6} | {len(part):>8} | {cams_s:>9}")
        lines.append(f"  fingerprint {self.fingerprint[:24]}...")
        return "\n".join(lines)



def compute_fingerprint(paths: Iterable[str]) -> str:
    """Dataset fingerprint ``"<N>:<sha256 hex>"`` of the image paths (issue §2).

    The hash is SHA-256 of the sorted paths joined by ``'\\n'`` and encoded as UTF-8; N is the number of
    paths. It changes when an image is added, removed or renamed, not when pixels change.
    """
    ordered = sorted(str(p) for p in paths)
    digest = hashlib.sha256("\n".join(ordered).encode("utf-8")).hexdigest()
    return f"{len(ordered)}:{digest}"


# ----------------------------------------------------------------------------------------------- entry point

def load_dataset(spec: str, *, verbose: bool = True, strict: bool = False,
                 refresh: bool = False) -> ReIDDataset:
    """Read a dataset spec (see the module docstring) into a :class:`ReIDDataset`.

    Args:
        spec: ``KIND:ROOT``, ``csv:FILE``, a bare ``NAME`` under ``$REID_DATA`` or a folder path.
        verbose: print the summary table (and info lines) to stderr. Warnings are printed either way.
        strict: fail on problems that are otherwise warned about and skipped (MSMT17 list entries missing
            on disk); also the default ``strict`` of :class:`partreid.common.data.images.ImageDataset`.
        refresh: ``luperson`` trees only: rebuild the cached file index even if it looks current.

    Returns:
        The dataset; ``frame`` is sorted by split (train, query, gallery, all) then path.

    Raises:
        InputError: unknown kind, missing root, malformed file names or list lines, an empty dataset,
            ``$REID_DATA`` unset or without ``NAME``, the ``lmdb`` package missing for an LMDB.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("empty dataset spec; give KIND:ROOT (e.g. market1501:/data/Market-1501) or a NAME "
                         "under $REID_DATA")
    spec = spec.strip()
    kind, variant, arg = _parse_spec(spec)
    log = _Log(verbose)
    if kind == "csv":
        path = _resolve_path(arg, spec)
        ds = _read_csv(path, spec, log)
    else:
        root = _resolve_path(arg, spec) if kind != "auto-name" else resolve_data_name(arg)
        if kind in ("auto", "auto-name"):
            kind, root = detect_layout(root)
            log.info(f"{spec}: detected a {kind} layout in {root}")
        if not root.is_dir():
            raise InputError(f"{root}: dataset root is not a folder")
        if kind in ("market1501", "dukemtmc"):
            ds = _read_market(root, kind, spec, log)
        elif kind == "cuhk03np":
            ds = _read_cuhk03np(root, variant, spec, log)
        elif kind == "msmt17":
            ds = _read_msmt17(root, spec, strict, log)
        elif kind == "folder":
            ds = _read_folder(root, spec, log)
        elif kind == "lmdb":
            ds = _read_lmdb(root, spec, log)
        elif kind == "luperson":
            if _lmdb_layout(root) is not None:
                ds = _read_lmdb(root, spec, log)
            else:
                ds = _read_image_tree(root, spec, refresh, log)
        else:  # pragma: no cover - _parse_spec only returns known kinds
            raise InputError(f"unknown dataset kind '{kind}'")
    ds.strict = strict
    ds.warnings = log.warnings
    if len(ds.frame) == 0:
        raise InputError(f"{spec}: no images found in {ds.root} (accepted: {', '.join(IMAGE_EXTENSIONS)})")
    log.info(ds.summary())
    return ds


class _Log:
    """Collects warnings (always printed to stderr) and info lines (printed when verbose)."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.warnings: List[str] = []

    def info(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        print(f"warning: {msg}", file=sys.stderr)


def _parse_spec(spec: str) -> Tuple[str, Optional[str], str]:
    """Split a spec into (kind, variant, argument); kind 'auto' = folder path, 'auto-name' = bare name."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9_.-]*):(.*)$", spec)
    if m and not (len(m.group(1)) == 1 and m.group(2)[:1] in ("\\", "/")):  # not a Windows drive letter
        prefix, arg = m.group(1).lower(), m.group(2).strip()
        if prefix not in _SPEC_KINDS:
            raise InputError(f"unknown dataset kind '{m.group(1)}' in '{spec}'; expected one of "
                             f"{', '.join(sorted(_SPEC_KINDS))}, or a bare NAME under $REID_DATA")
        if not arg:
            raise InputError(f"dataset spec '{spec}' has no root after ':'")
        kind, variant = _SPEC_KINDS[prefix]
        return kind, variant, arg
    if "/" in spec or os.sep in spec or spec.startswith(("~", ".")):
        if spec.lower().endswith(".csv"):
            return "csv", None, spec
        return "auto", None, spec
    if not re.match(r"^[\w.+-][\w .+-]*$", spec):
        raise InputError(f"malformed dataset spec '{spec}'; give KIND:ROOT or a bare NAME under $REID_DATA")
    return "auto-name", None, spec


def _resolve_path(arg: str, spec: str) -> Path:
    """Absolute path for a spec argument; a missing relative path is also tried under ``$REID_DATA``."""
    p = Path(arg).expanduser()
    if p.exists():
        return Path(os.path.abspath(p))
    if not p.is_absolute() and os.environ.get("REID_DATA"):
        try:
            return _find_under(Path(os.environ["REID_DATA"]).expanduser(), p.parts)
        except InputError:
            pass
    raise InputError(f"{p}: dataset root not found (spec '{spec}')")


def _casefold_child(folder: Path, name: str) -> Optional[Path]:
    """The child of ``folder`` named ``name``, exactly or else case-insensitively; None if absent.

    Raises:
        InputError: several children match case-insensitively and none exactly.
    """
    exact = folder / name
    if exact.exists():
        return exact
    try:
        hits = [c for c in folder.iterdir() if c.name.casefold() == name.casefold()]
    except OSError:
        return None
    if len(hits) > 1:
        raise InputError(f"{folder}: several folders match '{name}' case-insensitively: "
                         f"{', '.join(sorted(h.name for h in hits))}")
    return hits[0] if hits else None


def _find_under(base: Path, parts: Sequence[str]) -> Path:
    cur = base
    for part in parts:
        nxt = _casefold_child(cur, part)
        if nxt is None:
            raise InputError(f"{cur / part}: not found")
        cur = nxt
    return Path(os.path.abspath(cur))


def resolve_data_name(name: str) -> Path:
    """Resolve a bare dataset NAME to the folder ``$REID_DATA/NAME``, matching the name case-insensitively.

    Raises:
        InputError: ``$REID_DATA`` is unset or not a folder, or no (or more than one) folder matches.
    """
    env = os.environ.get("REID_DATA")
    if not env:
        raise InputError(f"bare dataset name '{name}' needs the environment variable REID_DATA (the folder "
                         f"holding your datasets); or give KIND:ROOT, e.g. luperson:/data/LUPerson")
    base = Path(env).expanduser()
    if not base.is_dir():
        raise InputError(f"REID_DATA={env} is not a folder")
    hit = _casefold_child(base, name)
    if hit is None:
        try:
            have = sorted(c.name for c in base.iterdir() if not c.name.startswith("."))
        except OSError:
            have = []
        listing = ", ".join(have[:12]) + (", ..." if len(have) > 12 else "")
        raise InputError(f"no dataset '{name}' in REID_DATA={base} (it holds: {listing or 'nothing'})")
    return Path(os.path.abspath(hit))


# ----------------------------------------------------------------------------------------------- layout detection

def _child_dirs(folder: Path) -> Dict[str, Path]:
    """Non-hidden sub-folders keyed by lower-case name."""
    out: Dict[str, Path] = {}
    try:
        with os.scandir(folder) as it:
            for e in it:
                if not e.name.startswith(".") and e.is_dir():
                    out.setdefault(e.name.lower(), Path(e.path))
    except OSError:
        pass
    return out


def _split_dirs(folder: Path, table: Dict[str, Tuple[str, ...]]) -> Dict[str, Path]:
    """Which splits of ``table`` have a folder in ``folder`` (case-insensitive names; first name wins)."""
    children = _child_dirs(folder)
    found: Dict[str, Path] = {}
    for split, names in table.items():
        for n in names:
            if n in children:
                found[split] = children[n]
                break
    return found


def _has_lists(folder: Path) -> bool:
    return any((folder / n).is_file() for names in _MSMT_LISTS.values() for n in names)


def _descend(root: Path, test, prefer: Sequence[str] = (), depth: int = 2) -> Optional[Path]:
    """``root`` if ``test(root)``, else the unique descendant (up to ``depth`` levels) passing ``test``.

    Children named in ``prefer`` (lower-case) are tried first, in that order. None if nothing passes.

    Raises:
        InputError: several unrelated sub-folders pass.
    """
    if test(root):
        return root
    level = [root]
    for _ in range(depth):
        nxt: List[Path] = []
        hits: List[Path] = []
        for folder in level:
            children = _child_dirs(folder)
            for name in prefer:
                if name in children and test(children[name]):
                    return children[name]
            for c in sorted(children.values()):
                (hits if test(c) else nxt).append(c)
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            inside = ", ".join(str(h.relative_to(root)) for h in hits)
            raise InputError(f"{root}: several datasets inside ({inside}); point ROOT at one of them")
        level = nxt
    return None


def _lmdb_layout(root: Path) -> Optional[Tuple[Path, Optional[Path]]]:
    """(LMDB folder, keys.pkl or None) if ``root`` holds LUPerson's LMDB (§A.8), else None.

    Accepted: ``root/{keys.pkl,data.mdb}``; ``root/keys.pkl`` + one sub-folder holding ``data.mdb`` (the
    layout ``LUP/convert_lmdb.py`` writes: ``keys.pkl`` next to ``lup_lmdb/``); ``root/data.mdb`` with
    ``keys.pkl`` in the parent folder or absent (keys then come from the LMDB itself).
    """
    keys = root / "keys.pkl"
    if (root / "data.mdb").is_file():
        if keys.is_file():
            return root, keys
        if (root.parent / "keys.pkl").is_file():
            return root, root.parent / "keys.pkl"
        return root, None
    if keys.is_file():
        dbs = [c for c in _child_dirs(root).values() if (c / "data.mdb").is_file()]
        if len(dbs) == 1:
            return dbs[0], keys
        if len(dbs) > 1:
            raise InputError(f"{root}: several LMDBs next to keys.pkl ({', '.join(sorted(d.name for d in dbs))})")
        raise InputError(f"{root}: keys.pkl found but no LMDB (data.mdb) beside it or in a sub-folder")
    return None


def detect_layout(root: Path) -> Tuple[str, Path]:
    """Guess a folder's dataset kind; returns (kind, dataset root), the root possibly a sub-folder.

    Rules, in order: ``keys.pkl``/``data.mdb`` → ``lmdb``; ``labeled/``/``detected/`` sub-folders with
    Market-style splits → ``cuhk03np``; Market-style split folders (in ROOT or up to two levels below)
    → ``dukemtmc`` if the folder name contains "duke", ``cuhk03np`` if it contains "cuhk03", else
    ``market1501``; MSMT17 list files (in ROOT or below) → ``msmt17``; otherwise an unlabelled image tree
    → ``luperson``.

    Raises:
        InputError: ``root`` is not a folder, or holds several datasets.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset root is not a folder")
    if _lmdb_layout(root) is not None:
        return "lmdb", root
    if _cuhk03_variants(root):
        return "cuhk03np", root
    market = _descend(root, lambda d: bool(_split_dirs(d, _MARKET_SPLIT_DIRS)))
    if market is not None:
        names = " ".join(p.name.lower() for p in (root, market))
        if "duke" in names:
            return "dukemtmc", market
        if "cuhk03" in names:
            return "cuhk03np", market
        return "market1501", market
    msmt = _descend(root, _has_lists, prefer=_KNOWN_SUBDIRS["msmt17"])
    if msmt is not None:
        return "msmt17", msmt
    return "luperson", root


# ----------------------------------------------------------------------------------------------- helpers

def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images_flat(folder: Path) -> Tuple[List[str], List[str]]:
    """(image file names, sub-folder names) directly in ``folder``, both sorted."""
    files, dirs = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                dirs.append(e.name)
            elif _is_image_name(e.name) and e.is_file():
                files.append(e.name)
    return sorted(files), sorted(dirs)


def _walk_images(root: Path) -> List[str]:
    """Relative POSIX paths of every image file under ``root`` (recursive ``os.scandir``; follows symlinked
    folders once, guarding against cycles; hidden entries skipped). Unsorted."""
    out: List[str] = []
    seen = set()
    try:
        st = root.stat()
        seen.add((st.st_dev, st.st_ino))
    except OSError:
        pass
    stack = [(str(root), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            it = os.scandir(folder)
        except OSError as exc:
            print(f"warning: cannot list {folder}: {exc.strerror or exc}", file=sys.stderr)
            continue
        with it:
            for e in it:
                name = e.name
                if name.startswith(".") or "\n" in name:
                    continue
                try:
                    if e.is_dir():
                        if e.is_symlink():
                            st = e.stat()
                            key = (st.st_dev, st.st_ino)
                            if key in seen:
                                continue
                            seen.add(key)
                        stack.append((e.path, prefix + name + "/"))
                    elif name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                        out.append(prefix + name)
                except OSError:
                    continue
    return out


def _make_frame(paths: Sequence[str], pids, camids, splits) -> pd.DataFrame:
    """Build the standard frame, sorted by split order then path, index 0..N-1."""
    n = len(paths)
    frame = pd.DataFrame({
        "path": pd.Series(list(paths), dtype=str),
        "pid": np.asarray(pids, dtype=np.int64).reshape(n),
        "camid": np.asarray(camids, dtype=np.int64).reshape(n),
        "split": pd.Series(list(splits) if not isinstance(splits, str) else [splits] * n, dtype=str),
    })
    if n:
        rank = frame["split"].map({s: i for i, s in enumerate(SPLITS)})
        frame = frame.assign(_rank=rank).sort_values(["_rank", "path"], kind="stable")
        frame = frame.drop(columns="_rank").reset_index(drop=True)
    return frame


def _malformed(folder: Path, bad: List[str], expect: str, kind: str) -> InputError:
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return InputError(f"{folder / bad[0]}: file name does not match {expect}{more}; is this a {kind} dataset?")


# ----------------------------------------------------------------------------------------------- Market family

def _read_market_split(folder: Path, rel: str, split: str, kind: str, rows: list) -> int:
    """Parse one Market-style split folder into ``rows``; returns the number of junk (pid -1) images."""
    files, _ = _list_images_flat(folder)
    bad, junk = [], 0
    for name in files:
        m = _MARKET_NAME.match(name)
        if m is None or int(m.group(2)) < 1:
            bad.append(name)
            continue
        pid = int(m.group(1))
        if pid == -1:
            junk += 1
            continue
        rows.append((f"{rel}/{name}", pid, int(m.group(2)) - 1, split))
    if bad:
        raise _malformed(folder, bad, "PID_cCAM... (camera from 1)", kind)
    return junk


def _read_market_dirs(root: Path, dirs: Dict[str, Path], kind: str, spec: str, log: _Log,
                      version: Optional[str] = None) -> ReIDDataset:
    rows: list = []
    junk = 0
    for split in ("train", "query", "gallery"):
        if split in dirs:
            junk += _read_market_split(dirs[split], dirs[split].name, split, kind, rows)
    if junk:
        log.info(f"{spec}: dropped {junk} junk images (pid -1)")
    paths, pids, cams, splits = zip(*rows) if rows else ((), (), (), ())
    return ReIDDataset(kind, root, _make_frame(paths, pids, cams, splits), version=version, spec=spec)


def _read_market(root: Path, kind: str, spec: str, log: _Log) -> ReIDDataset:
    """Market-1501 / DukeMTMC-reID layout (§F.1).

    Names ``PPPP_cC...``: pid = PPPP, camid = C - 1 (Market c1..c6 → 0..5, Duke c1..c8 → 0..7). Junk (pid -1)
    is dropped; distractors (pid 0) are kept. Train pids are not relabelled. ``gallery/`` is an alias of
    ``bounding_box_test/``; a dataset may have only some splits.
    """
    found = _descend(root, lambda d: bool(_split_dirs(d, _MARKET_SPLIT_DIRS)), prefer=_KNOWN_SUBDIRS[kind])
    if found is None:
        raise InputError(f"{root}: no Market-style split folders (bounding_box_train/, query/, "
                         f"bounding_box_test/ or gallery/) for {kind}")
    dirs = _split_dirs(found, _MARKET_SPLIT_DIRS)
    children = _child_dirs(found)
    if "gallery" in dirs and "bounding_box_test" in children and "gallery" in children:
        log.warn(f"{found}: both bounding_box_test/ and gallery/ exist; using bounding_box_test/")
    return _read_market_dirs(Path(os.path.abspath(found)), dirs, kind, spec, log)


def _cuhk03_variants(folder: Path) -> Dict[str, Path]:
    children = _child_dirs(folder)
    return {v: children[v] for v in ("labeled", "detected")
            if v in children and _split_dirs(children[v], _MARKET_SPLIT_DIRS)}


def _read_cuhk03np(root: Path, variant: Optional[str], spec: str, log: _Log) -> ReIDDataset:
    """CUHK03-NP (new protocol), Market-style splits in ``labeled/`` or ``detected/``.

    ``variant`` None picks ``labeled/`` when present (else ``detected/``). ROOT may also be the variant
    folder itself (``cuhk03np:ROOT/detected``), or a parent holding ``cuhk03-np/``. The version recorded is
    ``'labeled'`` or ``'detected'`` (None when ROOT is a Market-style folder of another name and no variant
    was asked for).
    """
    base = _descend(root, lambda d: bool(_cuhk03_variants(d)) or bool(_split_dirs(d, _MARKET_SPLIT_DIRS)),
                    prefer=_KNOWN_SUBDIRS["cuhk03np"])
    if base is None:
        raise InputError(f"{root}: no CUHK03-NP layout (labeled/ or detected/ with bounding_box_train/, query/, "
                         f"bounding_box_test/)")
    variants = _cuhk03_variants(base)
    if variants:
        if variant is None:
            variant = "labeled" if "labeled" in variants else "detected"
            if len(variants) == 2:
                log.info(f"{spec}: using CUHK03-NP labeled/ (cuhk03np-detected:ROOT for the detected boxes)")
        if variant not in variants:
            raise InputError(f"{base}: no CUHK03-NP {variant}/ folder with Market-style splits")
        folder = variants[variant]
    else:
        folder = base
        name = base.name.lower()
        if name in ("labeled", "detected"):
            if variant is not None and variant != name:
                raise InputError(f"{base}: asked for CUHK03-NP {variant} but ROOT is the {name}/ folder")
            variant = name
    dirs = _split_dirs(folder, _MARKET_SPLIT_DIRS)
    return _read_market_dirs(Path(os.path.abspath(folder)), dirs, "cuhk03np", spec, log, version=variant)


# ----------------------------------------------------------------------------------------------- MSMT17

def _msmt_version_from_name(folder: Path) -> Optional[str]:
    m = re.search(r"msmt17[_\- ]?v([12])(?![0-9])", folder.name.lower())
    return f"MSMT17_V{m.group(1)}" if m else None


def _read_msmt17(root: Path, spec: str, strict: bool, log: _Log) -> ReIDDataset:
    """MSMT17 with list files (§F.2): ``list_{train,val,query,gallery}.txt`` and image folders.

    Each list line is ``<pid-folder>/<file> <pid>``; pid comes from the list (not relabelled), camid from
    the file name ``PPPP_III_CC_...``: ``int(CC) - 1`` (0-based, cameras 1-15 → 0-14, the PASS convention).
    Train = list_train + list_val (32,621 images, 1,041 ids on V1); query/gallery come from ``test/``.

    V1/V2 rule (recorded in ``version``): both releases use the same file-name pattern, so the folders
    decide. V2 when the image folders are ``mask_train_v2/``/``mask_test_v2/`` or the dataset folder is named
    ``MSMT17_V2``; otherwise V1 (``train/``/``test/`` folders, or a folder named ``MSMT17_V1``). A folder
    named ``MSMT17_V2`` whose image folders were renamed to ``train/``/``test/`` is still V2 (and warned).
    V2 prints a warning: the papers' numbers are on V1 (V2 gives about 1.7 mAP less, PASS-reID issue #1).
    Entries missing on disk are warned and dropped (InputError when ``strict``).
    """
    base = _descend(root, _has_lists, prefer=_KNOWN_SUBDIRS["msmt17"])
    if base is None:
        raise InputError(f"{root}: no MSMT17 list files (list_train.txt, list_val.txt, list_query.txt, "
                         f"list_gallery.txt)")
    base = Path(os.path.abspath(base))
    children = _child_dirs(base)
    image_dirs: Dict[str, Path] = {}
    layout_v2 = False
    for group, names in _MSMT_IMAGE_DIRS.items():
        present = [n for n in names if n in children]
        if present:
            image_dirs[group] = children[present[0]]
            layout_v2 |= present[0].startswith("mask_")
    name_version = _msmt_version_from_name(base)
    layout_version = ("MSMT17_V2" if layout_v2 else "MSMT17_V1") if image_dirs else None
    version = "MSMT17_V2" if "MSMT17_V2" in (layout_version, name_version) else "MSMT17_V1"
    if name_version is not None and layout_version is not None and name_version != layout_version:
        log.warn(f"{base}: folder name says {name_version} but the image folders are "
                 f"{', '.join(sorted(d.name + '/' for d in image_dirs.values()))}; treating it as {version}")
    if version == "MSMT17_V2":
        log.warn(f"{base}: MSMT17_V2 (face-masked release) detected; the PASS/PPLR papers report MSMT17_V1 "
                 f"numbers (V2 gives about 1.7 mAP less, reference-spec §F.2)")
    rows: list = []
    missing: List[str] = []
    for split, lists in _MSMT_LISTS.items():
        group = "train" if split == "train" else "test"
        for list_name in lists:
            list_path = base / list_name
            if not list_path.is_file():
                if list_name == "list_val.txt" and (base / "list_train.txt").is_file():
                    log.warn(f"{base}: list_val.txt missing; train is list_train.txt only "
                             f"(the papers train on list_train + list_val)")
                continue
            if group not in image_dirs:
                raise InputError(f"{base}: {list_name} found but no image folder "
                                 f"({' or '.join(n + '/' for n in _MSMT_IMAGE_DIRS[group])})")
            img_dir = image_dirs[group]
            entries = _read_msmt_list(list_path)
            exists = _existing_files(img_dir, {e[0].rsplit("/", 1)[0] if "/" in e[0] else "" for e in entries})
            for rel, pid, cam in entries:
                if rel not in exists:
                    missing.append(f"{img_dir.name}/{rel}")
                    continue
                rows.append((f"{img_dir.name}/{rel}", pid, cam, split))
    if missing:
        msg = (f"{base}: {len(missing)} list entries have no image file, e.g. {base / missing[0]}")
        if strict:
            raise InputError(msg)
        log.warn(msg + " (skipped)")
    paths, pids, cams, splits = zip(*rows) if rows else ((), (), (), ())
    return ReIDDataset("msmt17", base, _make_frame(paths, pids, cams, splits), version=version, spec=spec)


def _read_msmt_list(list_path: Path) -> List[Tuple[str, int, int]]:
    """Parse an MSMT17 list file into (relative path, pid, camid) triples.

    Raises:
        InputError: a line is not ``<path> <pid>`` or its file name has no ``_CC_`` camera field.
    """
    out = []
    with open(list_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            where = f"{list_path}:{lineno}"
            if len(parts) != 2 or not _INT_NAME.match(parts[1]):
                raise InputError(f"{where}: expected '<folder>/<file> <pid>', got {line.strip()!r}")
            rel = parts[0].replace("\\", "/")
            fields = rel.rsplit("/", 1)[-1].split("_")
            if len(fields) < 3 or not fields[2].isdigit() or int(fields[2]) < 1:
                raise InputError(f"{where}: file name {rel!r} does not match PID_INDEX_CAM_... (camera from 1)")
            out.append((rel, int(parts[1]), int(fields[2]) - 1))
    return out


def _existing_files(img_dir: Path, subdirs: Iterable[str]) -> set:
    """Relative paths (``sub/file``) of the files in the given sub-folders of ``img_dir`` (one scandir each)."""
    found = set()
    for sub in subdirs:
        folder = img_dir / sub if sub else img_dir
        prefix = f"{sub}/" if sub else ""
        try:
            with os.scandir(folder) as it:
                for e in it:
                    found.add(prefix + e.name)
        except OSError:
            continue
    return found


# ----------------------------------------------------------------------------------------------- folder

def _read_folder(root: Path, spec: str, log: _Log) -> ReIDDataset:
    """Generic labelled folder.

    If ROOT has split folders (``bounding_box_train``/``train``, ``query``, ``bounding_box_test``/``gallery``/
    ``test``) each is read as its split; otherwise ROOT is one split ``'all'``. Within a split folder:

    * image files directly inside → names ``PID[_cCAM]...``: pid = PID, camid = CAM - 1, or -1 without a
      ``_cCAM`` field (sub-folders are then ignored);
    * otherwise one sub-folder per pid (images found recursively): pid = the folder name when all pid
      folder names are integers, else the index of the name in the sorted list of all pid folder names over
      all splits (kept in ``ds.pid_names``); camid = CAM - 1 from a ``_cCAM`` field in the file name, else -1.

    pid -1 images (Market junk) are dropped.
    """
    dirs = _split_dirs(root, _FOLDER_SPLIT_DIRS)
    targets = [(s, dirs[s], dirs[s].name) for s in ("train", "query", "gallery") if s in dirs] \
        if dirs else [("all", root, "")]
    raw: list = []  # (path, pid label (int or str), camid, split)
    for split, folder, rel in targets:
        files, subdirs = _list_images_flat(folder)
        prefix = f"{rel}/" if rel else ""
        if files:
            bad = []
            for name in files:
                m = _FOLDER_NAME.match(os.path.splitext(name)[0])
                if m is None:
                    bad.append(name)
                    continue
                cam = int(m.group(2)) - 1 if m.group(2) is not None else -1
                raw.append((prefix + name, int(m.group(1)), cam, split))
            if bad:
                raise _malformed(folder, bad, "PID_cCAM... or PID_... (or use one sub-folder per pid)", "folder")
        else:
            for sub in subdirs:
                for relpath in sorted(_walk_images(folder / sub)):
                    m = _CAMERA_IN_NAME.search(os.path.splitext(relpath.rsplit("/", 1)[-1])[0])
                    cam = int(m.group(1)) - 1 if m and int(m.group(1)) >= 1 else -1
                    raw.append((f"{prefix}{sub}/{relpath}", sub, cam, split))
    pid_names = None
    labels = {r[1] for r in raw if isinstance(r[1], str)}
    if labels:
        if all(_INT_NAME.match(x) for x in labels):
            mapping = {x: int(x) for x in labels}
        else:
            pid_names = sorted(labels)
            mapping = {x: i for i, x in enumerate(pid_names)}
            log.info(f"{spec}: {len(pid_names)} non-numeric pid folders numbered 0..{len(pid_names) - 1} "
                     f"in sorted name order")
        raw = [(p, mapping[l] if isinstance(l, str) else l, c, s) for p, l, c, s in raw]
    kept = [r for r in raw if r[1] != -1]
    if len(kept) < len(raw):
        log.info(f"{spec}: dropped {len(raw) - len(kept)} junk images (pid -1)")
    paths, pids, cams, splits = zip(*kept) if kept else ((), (), (), ())
    return ReIDDataset("folder", root, _make_frame(paths, pids, cams, splits), spec=spec, pid_names=pid_names)


# ----------------------------------------------------------------------------------------------- csv

def _read_csv(path: Path, spec: str, log: _Log) -> ReIDDataset:
    """Manifest CSV with a header: ``path, pid`` and optional ``camid``, ``split`` columns.

    ``path`` is relative to the CSV's folder (the dataset root) or absolute; paths under the root are
    stored relative to it. Empty pid/camid cells mean -1 (unknown); pid -1 rows are kept (the manifest is
    explicit). ``split`` values must be train, query, gallery or all (default all).

    Raises:
        InputError: unreadable CSV, missing columns, non-integer ids, unknown split names, unsupported
            file types, or a first listed image that does not exist (usually a wrong base folder).
    """
    if not path.is_file():
        raise InputError(f"{path}: CSV manifest not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV manifest ({str(exc).splitlines()[0]})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("path", "pid") if c not in table.columns]
    if missing:
        raise InputError(f"{path}: CSV manifest lacks column(s) {', '.join(missing)} "
                         f"(needs path, pid; optional camid, split)")
    root = Path(os.path.abspath(path.parent))

    def ids(col: str) -> np.ndarray:
        if col not in table.columns:
            return np.full(len(table), -1, dtype=np.int64)
        text = table[col].astype(str).str.strip()
        num = pd.to_numeric(text.where(text != "", "-1"), errors="coerce")
        bad = num.isna() | (num != np.floor(num))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{path}: row {i + 2}: {col} {table[col].iloc[i]!r} is not an integer")
        return num.to_numpy(dtype=np.int64)

    pids, camids = ids("pid"), ids("camid")
    raw_paths = table["path"].astype(str).str.strip().str.replace("\\", "/", regex=False).tolist()
    rel_paths = []
    root_s = root.as_posix().rstrip("/") + "/"
    for i, p in enumerate(raw_paths):
        if not p:
            raise InputError(f"{path}: row {i + 2}: empty path")
        if not p.lower().endswith(IMAGE_EXTENSIONS):
            raise InputError(f"{path}: row {i + 2}: {p!r} is not a {'/'.join(IMAGE_EXTENSIONS)} image")
        if p.startswith("/"):
            norm = os.path.normpath(p)
            p = norm[len(root_s):] if norm.startswith(root_s) else norm
        rel_paths.append(p)
    if "split" in table.columns:
        splits = table["split"].astype(str).str.strip().str.lower().replace("", "all")
        unknown = sorted(set(splits) - set(SPLITS))
        if unknown:
            raise InputError(f"{path}: unknown split value(s) {', '.join(map(repr, unknown))}; "
                             f"expected {', '.join(SPLITS)}")
        splits = splits.tolist()
    else:
        splits = "all"
    if rel_paths and not (root / rel_paths[0]).exists():
        raise InputError(f"{root / rel_paths[0]}: first image of the manifest not found (paths are relative "
                         f"to the CSV's folder {root}, or absolute)")
    return ReIDDataset("csv", root, _make_frame(rel_paths, pids, camids, splits), spec=spec)


# ----------------------------------------------------------------------------------------------- LUPerson tree

def _index_cache_paths(root: Path) -> Tuple[Path, Path]:
    """(cache file inside ROOT, fallback cache file under ``$XDG_CACHE_HOME/partreid/``)."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(root).encode("utf-8")).hexdigest()[:16]
    safe = re.sub(r"[^\w.-]", "_", root.name)[:40]
    return root / _ROOT_CACHE_DIR / _INDEX_FILE, xdg / "partreid" / f"file-index-{safe}-{key}.txt.gz"


def _tree_state(root: Path) -> dict:
    """What invalidates the cached index: mtimes (ns) of ROOT and of its direct sub-folders."""
    state = {"root_mtime_ns": root.stat().st_mtime_ns, "subdir_mtime_ns": {}}
    with os.scandir(root) as it:
        for e in it:
            if not e.name.startswith(".") and e.is_dir():
                try:
                    state["subdir_mtime_ns"][e.name] = e.stat().st_mtime_ns
                except OSError:
                    pass
    return state


def _read_index(cache: Path, root: Path, state: dict) -> Optional[Tuple[List[str], str]]:
    """(sorted paths, fingerprint) from a cache file if it is current for ``root``, else None."""
    try:
        with gzip.open(cache, "rt", encoding="utf-8", newline="\n") as f:
            header = json.loads(f.readline())
            if (header.get("format") != INDEX_FORMAT or header.get("format_version") != INDEX_FORMAT_VERSION
                    or header.get("root") != str(root) or header.get("state") != state
                    or header.get("extensions") != list(IMAGE_EXTENSIONS)):
                return None
            body = f.read()
    except (OSError, ValueError, EOFError):
        return None
    paths = body.split("\n")[:-1] if body else []
    if len(paths) != header.get("count"):
        return None
    return paths, header["fingerprint"]


def _write_index(cache: Path, root: Path, state: dict, paths: List[str], fingerprint: str) -> None:
    header = {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "root": str(root),
              "state": state, "extensions": list(IMAGE_EXTENSIONS), "count": len(paths),
              "fingerprint": fingerprint}
    with atomic_path(cache) as tmp:
        with gzip.open(tmp, "wt", encoding="utf-8", newline="\n", compresslevel=1) as f:
            f.write(json.dumps(header) + "\n")
            for i in range(0, len(paths), 65536):
                chunk = paths[i:i + 65536]
                f.write("\n".join(chunk) + "\n")


def _writable_dir(folder: Path) -> bool:
    """Whether to write the index cache into ``folder``: writable for this user *and* not marked read-only
    by its mode bits (a folder without any write bit, e.g. a shared data set, is left alone even by root)."""
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def load_file_index(root: Path, *, refresh: bool = False,
                    log: Optional[_Log] = None) -> Tuple[List[str], str, str]:
    """Sorted relative paths of every image under ``root``, using a cached index (issue §2, LUPerson).

    Listing a 4M-file tree takes long, so it is done once and the sorted list is stored as a gzip text file
    (a JSON header line, then one path per line): in ``ROOT/.partreid/file-index.txt.gz`` when ROOT is
    writable (and has a write bit in its mode: folders marked read-only are never written), else in
    ``$XDG_CACHE_HOME/partreid/`` (default ``~/.cache``) under a name keyed by the absolute root. Both
    places are read. The cache is used only if the mtimes of ROOT and of its direct sub-folders
    are unchanged since the listing (adding or removing a file deeper down does not change them: pass
    ``refresh=True``, CLI ``--refresh-index``, after such edits). Writes are atomic
    (:func:`common.fileio.atomic_path`); a failure to write the cache is a warning, not an error.

    Returns:
        (paths, fingerprint, source) where source is ``'cache:<file>'`` or ``'scan'``.
    """
    log = log or _Log(False)
    root = Path(os.path.abspath(root))
    in_root, in_xdg = _index_cache_paths(root)
    # Create ROOT/.partreid before taking the state: creating it changes ROOT's mtime, writing inside it
    # later does not.
    root_writable = _writable_dir(root)
    if root_writable:
        try:
            in_root.parent.mkdir(exist_ok=True)
            root_writable = in_root.parent.is_dir() and os.access(in_root.parent, os.W_OK)
        except OSError:
            root_writable = False
    state = _tree_state(root)
    if not refresh:
        for cache in (in_root, in_xdg):
            if cache.is_file():
                hit = _read_index(cache, root, state)
                if hit is not None:
                    return hit[0], hit[1], f"cache:{cache}"
    paths = sorted(_walk_images(root))
    fingerprint = compute_fingerprint(paths)
    for cache in ((in_root, in_xdg) if root_writable else (in_xdg,)):
        try:
            _write_index(cache, root, state, paths, fingerprint)
            log.info(f"{root}: indexed {len(paths)} images; index cached in {cache}")
            break
        except OSError as exc:
            last = exc
    else:
        log.warn(f"{root}: could not write the file index cache ({last}); the tree will be listed again "
                 f"next time")
    return paths, fingerprint, "scan"


def _read_image_tree(root: Path, spec: str, refresh: bool, log: _Log) -> ReIDDataset:
    """Unlabelled image tree (LUPerson JPEGs, §A.8): every image under ROOT, recursively; pid = camid = -1,
    split ``'train'``. Unlike ``ImageFolder`` no class sub-folder is required. Uses :func:`load_file_index`."""
    root = Path(os.path.abspath(root))
    paths, fingerprint, source = load_file_index(root, refresh=refresh, log=log)
    if source != "scan":
        log.info(f"{spec}: {len(paths)} images from the cached index ({source[6:]})")
    n = len(paths)
    frame = pd.DataFrame({"path": pd.Series(paths, dtype=str), "pid": np.full(n, -1, dtype=np.int64),
                          "camid": np.full(n, -1, dtype=np.int64),
                          "split": pd.Series(["train"] * n, dtype=str)})
    return ReIDDataset("luperson", root, frame, spec=spec, fingerprint=fingerprint)


# ----------------------------------------------------------------------------------------------- LUPerson LMDB

def import_lmdb():
    """Import the optional ``lmdb`` package.

    Raises:
        InputError: not installed (tells to ``pip install partreid[lmdb]``).
    """
    try:
        import lmdb  # noqa: WPS433 - optional dependency, imported lazily
    except ImportError:
        raise InputError("reading LUPerson's LMDB needs the lmdb package: pip install 'partreid[lmdb]'") from None
    return lmdb


_LMDB_ENVS: Dict[str, Tuple[int, object]] = {}  # realpath -> (pid that opened it, lmdb.Environment)


def lmdb_environment(path: Path):
    """A read-only ``lmdb.Environment`` for ``path``, shared by everything in this process.

    py-lmdb refuses to open one environment twice in a process, and LMDB forbids using an environment
    across ``fork()``; so environments are kept per path and re-opened (after closing the inherited
    copy) when the process id changed, i.e. in a forked DataLoader worker.

    Raises:
        InputError: ``lmdb`` is not installed.
        OSError: the LMDB cannot be opened.
    """
    lmdb = import_lmdb()
    key = os.path.realpath(path)
    pid = os.getpid()
    held = _LMDB_ENVS.get(key)
    if held is not None:
        if held[0] == pid:
            return held[1]
        try:
            held[1].close()  # the copy inherited from the parent: unusable here, and blocks a re-open
        except lmdb.Error:
            pass
        del _LMDB_ENVS[key]
    try:
        env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, max_readers=2048)
    except lmdb.Error as exc:
        raise OSError(f"{path}: cannot open the LMDB ({exc})") from None
    _LMDB_ENVS[key] = (pid, env)
    return env


def _read_lmdb(root: Path, spec: str, log: _Log) -> ReIDDataset:
    """LUPerson's LMDB (§A.8): raw JPEG bytes under keys ``CC_CC_VVVV_IIIIIIII`` plus a pickled key list.

    ``path`` = the key (str); pid = camid = -1; split ``'train'``. Images are decoded from the stored bytes
    when read (nothing is written to disk). Without ``keys.pkl`` the keys are listed from the LMDB.
    ``keys.pkl`` is a pickle: load only files you trust.

    Raises:
        InputError: no LMDB found, ``lmdb`` not installed, or ``keys.pkl`` is not a list of str/bytes keys.
    """
    layout = _lmdb_layout(root)
    if layout is None:
        raise InputError(f"{root}: no LUPerson LMDB (keys.pkl + data.mdb)")
    db_dir, keys_file = layout
    try:
        env = lmdb_environment(db_dir)
    except OSError as exc:
        raise InputError(str(exc)) from None
    entries = env.stat()["entries"]
    if keys_file is not None:
        try:
            with open(keys_file, "rb") as f:
                keys = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
            raise InputError(f"{keys_file}: cannot read the key list ({exc})") from None
        if not isinstance(keys, (list, tuple)):
            raise InputError(f"{keys_file}: expected a pickled list of keys, got {type(keys).__name__}")
        try:
            keys = [k.decode("utf-8") if isinstance(k, bytes) else k for k in keys]
        except UnicodeDecodeError:
            raise InputError(f"{keys_file}: keys are not UTF-8 text") from None
        if not all(isinstance(k, str) for k in keys):
            raise InputError(f"{keys_file}: keys must be str or bytes")
        if entries < len(keys):
            log.warn(f"{db_dir}: the LMDB holds {entries} entries but keys.pkl lists {len(keys)} keys; "
                     f"missing ones will be reported as unreadable")
    else:
        log.info(f"{db_dir}: no keys.pkl; listing the keys from the LMDB")
        with env.begin() as txn:
            keys = [bytes(k).decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False)]
    n = len(keys)
    frame = pd.DataFrame({"path": pd.Series(keys, dtype=str), "pid": np.full(n, -1, dtype=np.int64),
                          "camid": np.full(n, -1, dtype=np.int64),
                          "split": pd.Series(["train"] * n, dtype=str)})
    frame = frame.sort_values("path", kind="stable").reset_index(drop=True)
    return ReIDDataset("lmdb", Path(os.path.abspath(root)), frame, spec=spec,
                       lmdb_path=Path(os.path.abspath(db_dir)))
