"""LUPerson, the unlabelled pre-training set: an image tree with a cached file index, or its LMDB.

Upstream: PASS reads LUPerson with ``torchvision.datasets.ImageFolder`` (PASS ``main_pass.py``); LUPerson itself
ships as an LMDB of raw JPEG bytes under keys ``{country:02d}_{city:02d}_{video:04d}_{image:08d}`` plus a pickled
key list (DengpanFu/LUPerson ``LUP/convert_lmdb.py``). Both are read here directly, without unpacking.

Scale (about 4.2M images). Paths are held in a :class:`PathTable` (one UTF-8 byte blob + int64 offsets), not a
Python list: 4M paths cost about 4M × (path length + 8) bytes instead of about 4M × 90, and DataLoader workers
touch no Python reference counts when reading them. The listing of a tree, and the key list of an LMDB, are
cached as such a table in a binary file under ``$XDG_CACHE_HOME/partreid/`` (default ``~/.cache/partreid``),
never in the dataset folder; a cached table is memory-mapped, so loading it takes milliseconds and every worker
shares the same pages, whatever the start method (a pickled table re-opens the map instead of copying it).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from PIL import Image

from partreid.common.data.base import (IMAGE_EXTENSIONS, LoadLog, ReIDDataset, child_dirs, compute_fingerprint,
                                       walk_images)
from partreid.common.data.decode import decode_image_bytes
from partreid.common.errors import InputError
from partreid.common.fileio import atomic_path

INDEX_FORMAT = "partreid.pathtable"
INDEX_FORMAT_VERSION = 2
_MAGIC = b"PARTREID-PATHTABLE\n"
_ALIGN = 4096


# ----------------------------------------------------------------------------------------------- path table

class PathTable(Sequence[str]):
    """An immutable sequence of N str, stored as one UTF-8 byte blob and N+1 int64 offsets.

    ``table[i]`` is ``blob[offsets[i]:offsets[i+1]].decode('utf-8')``. A table read from a file
    (:meth:`load`) is memory-mapped; pickling it sends only the file name and re-maps it on the other side.

    Args:
        blob: uint8 array, the concatenated UTF-8 paths.
        offsets: int64 array of length N+1, non-decreasing, ``offsets[0] == 0``, ``offsets[-1] == len(blob)``.
    """

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, *, _file: Optional[Tuple[str, int, int, int]] = None):
        self.blob = blob
        self.offsets = offsets
        self._file = _file  # (path, offsets byte position, N, blob byte position) when memory-mapped

    @classmethod
    def from_strings(cls, items: Iterable[str]) -> "PathTable":
        """Build a table from str (kept in the given order)."""
        items = items if isinstance(items, list) else list(items)
        text = "".join(items)
        data = text.encode("utf-8")
        if len(data) == len(text):  # ASCII: byte lengths are the str lengths
            lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        else:
            lengths = np.fromiter((len(s.encode("utf-8")) for s in items), dtype=np.int64, count=len(items))
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.frombuffer(data, dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"path index {i} out of range 0..{len(self) - 1}")
        return bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        data = bytes(self.blob)
        offs = self.offsets.tolist()
        for a, b in zip(offs[:-1], offs[1:]):
            yield data[a:b].decode("utf-8")

    def tolist(self) -> List[str]:
        """All entries as a Python list (costly for millions of entries: for tables and tests)."""
        return list(self)

    def take(self, rows: Sequence[int]) -> "PathTable":
        """A new in-memory table holding the entries at ``rows`` (int array), in that order."""
        return PathTable.from_strings(self[int(r)] for r in rows)

    def __eq__(self, other) -> bool:
        if isinstance(other, PathTable):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.blob, other.blob)
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"PathTable(n={len(self)}, bytes={len(self.blob)})"

    # -- file form: _MAGIC, one JSON header line padded to _ALIGN, offsets (N+1 int64 LE), blob
    def save(self, path: Path, header: Dict) -> None:
        """Write the table and a JSON ``header`` atomically to ``path`` (parent folders created)."""
        head = dict(header, format=INDEX_FORMAT, format_version=INDEX_FORMAT_VERSION, count=len(self),
                    blob_bytes=int(len(self.blob)))
        line = _MAGIC + json.dumps(head, sort_keys=True).encode("utf-8") + b"\n"
        pad = (-len(line)) % _ALIGN
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(line + b" " * pad)
                f.write(np.ascontiguousarray(self.offsets, dtype="<i8").tobytes())
                f.write(np.ascontiguousarray(self.blob, dtype=np.uint8).tobytes())

    @classmethod
    def load(cls, path: Path) -> Tuple["PathTable", Dict]:
        """Memory-map a table written by :meth:`save`; returns (table, header).

        Raises:
            ValueError: not a path-table file, another format version, or a truncated file.
            OSError: the file cannot be read.
        """
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError(f"{path}: not a path table")
            header = json.loads(f.readline())
            start = f.tell()
        if header.get("format") != INDEX_FORMAT or header.get("format_version") != INDEX_FORMAT_VERSION:
            raise ValueError(f"{path}: path table format {header.get('format_version')}")
        n, nbytes = int(header["count"]), int(header["blob_bytes"])
        off_pos = start + (-start) % _ALIGN
        blob_pos = off_pos + 8 * (n + 1)
        if os.path.getsize(path) != blob_pos + nbytes:
            raise ValueError(f"{path}: truncated path table")
        table = cls._map(str(path), off_pos, n, blob_pos, nbytes)
        return table, header

    @classmethod
    def _map(cls, path: str, off_pos: int, n: int, blob_pos: int, nbytes: int) -> "PathTable":
        offsets = np.memmap(path, dtype="<i8", mode="r", offset=off_pos, shape=(n + 1,))
        blob = (np.memmap(path, dtype=np.uint8, mode="r", offset=blob_pos, shape=(nbytes,)) if nbytes
                else np.zeros(0, dtype=np.uint8))
        return cls(blob, offsets, _file=(path, off_pos, n, blob_pos))

    def __reduce__(self):
        if self._file is not None and os.path.isfile(self._file[0]):
            path, off_pos, n, blob_pos = self._file
            return (PathTable._map, (path, off_pos, n, blob_pos, int(len(self.blob))))
        return (PathTable, (np.asarray(self.blob), np.asarray(self.offsets)))


# ----------------------------------------------------------------------------------------------- cache files

def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/partreid`` (default ``~/.cache/partreid``): where file indexes are cached."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "partreid"


def _cache_file(kind: str, root: Path) -> Path:
    key = hashlib.sha256(str(root).encode("utf-8")).hexdigest()[:16]
    safe = re.sub(r"[^\w.-]", "_", root.name)[:40]
    return cache_dir() / f"{kind}-{safe}-{key}.bin"


def tree_state(root: Path) -> Dict:
    """What invalidates a cached tree listing: mtimes (ns) of ROOT and of its direct sub-folders."""
    state: Dict = {"root_mtime_ns": root.stat().st_mtime_ns, "subdir_mtime_ns": {}}
    with os.scandir(root) as it:
        for e in it:
            if not e.name.startswith(".") and e.is_dir():
                try:
                    state["subdir_mtime_ns"][e.name] = e.stat().st_mtime_ns
                except OSError:
                    pass
    return state


def _read_cached(cache: Path, identity: Dict) -> Optional[Tuple[PathTable, str]]:
    """(table, fingerprint) from ``cache`` when its header matches ``identity`` exactly, else None."""
    try:
        table, header = PathTable.load(cache)
    except (OSError, ValueError, KeyError):
        return None
    if any(header.get(k) != v for k, v in identity.items()):
        return None
    return table, header["fingerprint"]


def _write_cached(cache: Path, identity: Dict, table: PathTable, fingerprint: str, log: LoadLog,
                  what: str) -> None:
    try:
        table.save(cache, dict(identity, fingerprint=fingerprint))
        log.info(f"{what}: index of {len(table)} images cached in {cache}")
    except OSError as exc:
        log.warn(f"{what}: could not write the index cache {cache} ({exc}); it will be built again next time")


def load_file_index(root: Path, *, refresh: bool = False,
                    log: Optional[LoadLog] = None) -> Tuple[PathTable, str, str]:
    """Sorted relative paths of every image under ``root``, from a cache when it is current.

    Listing a 4M-file tree takes long, so it is done once; the sorted listing is stored as a
    :class:`PathTable` file in :func:`cache_dir`, named after the absolute root, and memory-mapped when read.
    The dataset folder is never written (a read-only dataset works). The cache is used only if its root and
    the mtimes of ROOT and of its direct sub-folders are those recorded at the listing (adding or removing a
    file deeper down does not change them: pass ``refresh=True``, CLI ``--refresh-index``, after such edits).
    Writes are atomic; a failure to write the cache is a warning, not an error.

    Returns:
        (paths, fingerprint, source) where source is ``'cache:<file>'`` or ``'scan'``.

    Raises:
        OSError: ``root`` cannot be listed.
    """
    log = log or LoadLog(False)
    root = Path(os.path.abspath(root))
    cache = _cache_file("file-index", root)
    identity = {"root": str(root), "state": tree_state(root), "extensions": list(IMAGE_EXTENSIONS)}
    if not refresh:
        hit = _read_cached(cache, identity)
        if hit is not None:
            return hit[0], hit[1], f"cache:{cache}"
    paths = sorted(walk_images(root))
    fingerprint = compute_fingerprint(paths, presorted=True)
    table = PathTable.from_strings(paths)
    del paths
    _write_cached(cache, identity, table, fingerprint, log, str(root))
    return table, fingerprint, "scan"


# ----------------------------------------------------------------------------------------------- datasets

class LupersonDataset(ReIDDataset):
    """An unlabelled dataset whose rows are a :class:`PathTable` (pid = camid = -1, split ``'train'``).

    :attr:`frame` is built on first use only (4M rows of str cost about 1 GB); :meth:`path_at`, ``len`` and
    :attr:`paths` never build it. Pickling (DataLoader workers under spawn/forkserver) leaves the frame out.
    """

    def __init__(self, kind: str, root: Path, paths: PathTable, *, spec: str, fingerprint: str,
                 lmdb_path: Optional[Path] = None):
        self.paths = paths
        self.lmdb_path = lmdb_path
        super().__init__(kind, root, None, spec=spec, fingerprint=fingerprint)  # type: ignore[arg-type]

    @property
    def frame(self) -> pd.DataFrame:
        if self._frame is None:
            n = len(self.paths)
            self._frame = pd.DataFrame({"path": pd.Series(self.paths.tolist(), dtype=str),
                                        "pid": np.full(n, -1, dtype=np.int64),
                                        "camid": np.full(n, -1, dtype=np.int64),
                                        "split": pd.Series(["train"] * n, dtype=str)})
        return self._frame

    @frame.setter
    def frame(self, value: pd.DataFrame) -> None:
        self._frame = value

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def splits(self) -> List[str]:
        return ["train"] if len(self.paths) else []

    def path_at(self, row: int) -> str:
        return self.paths[row]

    def summary(self) -> str:
        """Summary table as for other datasets (unlabelled: no ids, no cameras), without building the frame."""
        head = f"dataset {self.kind}: {self.root}"
        return "\n".join([head, "  split    |  # ids | # images | # cameras",
                           "  ---------+--------+----------+----------",
                           f"  {'train':<8} | {'-':>6} | {len(self):>8} | {'-':>9}",
                           f"  fingerprint {self.fingerprint[:24]}..."])

    def __getstate__(self) -> Dict:
        state = dict(self.__dict__)
        state["_frame"] = None
        return state


class LmdbDataset(LupersonDataset):
    """LUPerson's LMDB: ``path`` values are the keys; images are decoded from the stored bytes when read."""

    def __init__(self, root: Path, paths: PathTable, *, spec: str, fingerprint: str, lmdb_path: Path):
        super().__init__("lmdb", root, paths, spec=spec, fingerprint=fingerprint, lmdb_path=lmdb_path)
        self._reader = LmdbReader(lmdb_path)

    def image_path(self, rel_path: str) -> str:
        """``<lmdb folder>[key]``, for messages."""
        return f"{self.lmdb_path}[{rel_path}]"

    def read_bytes(self, rel_path: str) -> bytes:
        """The JPEG bytes stored under the key ``rel_path``.

        Raises:
            OSError: the key is absent or the LMDB cannot be read.
        """
        return self._reader.get(rel_path)

    def open_image(self, rel_path: str) -> Image.Image:
        """Decode the image stored under the key ``rel_path`` into an RGB ``PIL.Image.Image``.

        The LMDB environment is opened lazily once per process, so this works inside DataLoader workers.

        Raises:
            OSError: the key is absent, the LMDB cannot be read or the bytes are not an image.
        """
        return decode_image_bytes(self._reader.get(rel_path), self.image_path(rel_path))


def read_image_tree(root: Path, spec: str, refresh: bool, log: LoadLog) -> LupersonDataset:
    """Unlabelled image tree (LUPerson JPEGs): every image under ROOT, recursively; pid = camid = -1, split
    ``'train'``. Unlike ``ImageFolder`` no class sub-folder is required. Uses :func:`load_file_index`."""
    root = Path(os.path.abspath(root))
    paths, fingerprint, source = load_file_index(root, refresh=refresh, log=log)
    if source != "scan":
        log.info(f"{spec}: {len(paths)} images from the cached index ({source[6:]})")
    return LupersonDataset("luperson", root, paths, spec=spec, fingerprint=fingerprint)


# ----------------------------------------------------------------------------------------------- LMDB

def import_lmdb():
    """Import the optional ``lmdb`` package.

    Raises:
        InputError: not installed (tells to ``pip install partreid[lmdb]``).
    """
    try:
        import lmdb  # optional dependency: only LMDB datasets need it
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


class LmdbReader:
    """Read-only access to an LMDB of encoded images, keyed by UTF-8 strings (LUPerson ``LUP/convert_lmdb.py``).

    The reader holds only the path; the environment comes from :func:`lmdb_environment`, opened lazily once per
    process. A reader created in the main process and copied into DataLoader workers (by fork or by pickling)
    thus gets a fresh environment in each worker, as LMDB requires (an environment must not be used across
    ``fork()``).
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self._env: Optional[Tuple[int, object]] = None  # (pid, environment) of the last read

    def __getstate__(self) -> Dict:
        return {"path": self.path, "_env": None}

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``.

        Raises:
            OSError: the key is absent or the LMDB cannot be read.
        """
        lmdb = import_lmdb()
        pid = os.getpid()
        if self._env is None or self._env[0] != pid:
            self._env = (pid, lmdb_environment(self.path))  # per process, shared with other readers
        env = self._env[1]
        try:
            with env.begin(write=False) as txn:
                data = txn.get(key.encode("utf-8"))
        except lmdb.Error as exc:
            raise OSError(f"{self.path}[{key}]: LMDB read failed ({exc})") from None
        if data is None:
            raise OSError(f"{self.path}[{key}]: key not in the LMDB")
        return data


def lmdb_layout(root: Path) -> Optional[Tuple[Path, Optional[Path]]]:
    """(LMDB folder, keys.pkl or None) if ``root`` holds LUPerson's LMDB, else None.

    Accepted: ``root/{keys.pkl,data.mdb}``; ``root/keys.pkl`` + one sub-folder holding ``data.mdb`` (the
    layout ``LUP/convert_lmdb.py`` writes: ``keys.pkl`` next to ``lup_lmdb/``); ``root/data.mdb`` with
    ``keys.pkl`` in the parent folder or absent (keys then come from the LMDB itself).

    Raises:
        InputError: ``keys.pkl`` without an LMDB, or several LMDBs beside it.
    """
    keys = root / "keys.pkl"
    if (root / "data.mdb").is_file():
        if keys.is_file():
            return root, keys
        if (root.parent / "keys.pkl").is_file():
            return root, root.parent / "keys.pkl"
        return root, None
    if keys.is_file():
        dbs = [c for c in child_dirs(root).values() if (c / "data.mdb").is_file()]
        if len(dbs) == 1:
            return dbs[0], keys
        if len(dbs) > 1:
            raise InputError(f"{root}: several LMDBs next to keys.pkl ({', '.join(sorted(d.name for d in dbs))})")
        raise InputError(f"{root}: keys.pkl found but no LMDB (data.mdb) beside it or in a sub-folder")
    return None


def _file_state(path: Optional[Path]) -> Optional[List[int]]:
    if path is None:
        return None
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _read_keys(db_dir: Path, keys_file: Optional[Path], env, log: LoadLog) -> List[str]:
    entries = env.stat()["entries"]
    if keys_file is None:
        log.info(f"{db_dir}: no keys.pkl; listing the keys from the LMDB")
        with env.begin() as txn:
            return [bytes(k).decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False)]
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
    return keys


def read_lmdb(root: Path, spec: str, log: LoadLog, refresh: bool = False) -> LmdbDataset:
    """LUPerson's LMDB: raw JPEG bytes under keys ``CC_CC_VVVV_IIIIIIII`` plus a pickled key list.

    ``path`` = the key (str), sorted; pid = camid = -1; split ``'train'``. Images are decoded from the stored
    bytes when read (nothing is written to disk). Without ``keys.pkl`` the keys are listed from the LMDB. The
    sorted key list is cached like a tree listing (:func:`load_file_index`), keyed by the LMDB folder and the
    sizes and mtimes of ``keys.pkl`` and ``data.mdb``. ``keys.pkl`` is a pickle: load only files you trust.

    Raises:
        InputError: no LMDB found, ``lmdb`` not installed, or ``keys.pkl`` is not a list of str/bytes keys.
    """
    layout = lmdb_layout(root)
    if layout is None:
        raise InputError(f"{root}: no LUPerson LMDB (keys.pkl + data.mdb)")
    db_dir, keys_file = layout
    db_dir = Path(os.path.abspath(db_dir))
    try:
        env = lmdb_environment(db_dir)
    except OSError as exc:
        raise InputError(str(exc)) from None
    cache = _cache_file("lmdb-keys", db_dir)
    identity = {"root": str(db_dir), "keys_file": str(keys_file) if keys_file else None,
                "keys_state": _file_state(keys_file), "db_state": _file_state(db_dir / "data.mdb")}
    hit = None if refresh else _read_cached(cache, identity)
    if hit is not None:
        table, fingerprint = hit
        log.info(f"{spec}: {len(table)} keys from the cached index ({cache})")
    else:
        keys = sorted(_read_keys(db_dir, keys_file, env, log))
        fingerprint = compute_fingerprint(keys, presorted=True)
        table = PathTable.from_strings(keys)
        del keys
        _write_cached(cache, identity, table, fingerprint, log, str(db_dir))
    return LmdbDataset(Path(os.path.abspath(root)), table, spec=spec, fingerprint=fingerprint, lmdb_path=db_dir)
