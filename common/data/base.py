"""The dataset object shared by every reader, its fingerprint, and the folder-listing helpers.

A loaded dataset is a :class:`ReIDDataset`: a table of images with the columns ``path`` (str, relative to the
dataset root, or the LMDB key), ``pid`` (int64, -1 = unknown), ``camid`` (int64, 0-based, -1 = unknown) and
``split`` (``'train'``, ``'query'``, ``'gallery'`` or ``'all'``), sorted by split and then by path.

Rules common to all readers: image files are ``.jpg``, ``.jpeg``, ``.png`` and ``.bmp`` (any case); names
starting with ``.`` are ignored (hidden files, macOS ``._*`` forks). Rows are sorted by split (train, query,
gallery, all) and then by path, so that features line up with a stable order (the upstream trainers iterate
``sorted(dataset.train)``, e.g. PPLR ``examples/train_pplr.py``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from PIL import Image

from partreid.common.data.decode import open_image_file
from partreid.common.errors import InputError

IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")
SPLITS: Tuple[str, ...] = ("train", "query", "gallery", "all")
KINDS: Tuple[str, ...] = ("market1501", "dukemtmc", "msmt17", "cuhk03np", "folder", "csv", "luperson", "lmdb")

# Well-known dataset folder names, tried first when ROOT is a parent folder (the layouts of PPLR, cluster-contrast
# and PASS: ``Market-1501-v15.09.15/``, ``MSMT17_V1/``, ...).
KNOWN_SUBDIRS: Dict[str, Tuple[str, ...]] = {
    "market1501": ("market-1501-v15.09.15", "market-1501", "market1501"),
    "dukemtmc": ("dukemtmc-reid", "dukemtmc"),
    "msmt17": ("msmt17_v1", "msmt17_v2", "msmt17"),
    "cuhk03np": ("cuhk03-np", "cuhk03_np", "cuhk03np"),
}


# ----------------------------------------------------------------------------------------------- dataset object

class ReIDDataset:
    """A loaded dataset: the image table plus what is needed to open its images.

    Attributes:
        kind: one of :data:`KINDS`.
        root: absolute dataset root (``pathlib.Path``); ``path`` values are relative to it.
        frame: ``pandas.DataFrame`` with columns ``path`` (str), ``pid`` (int64, -1 unknown),
            ``camid`` (int64, 0-based, -1 unknown), ``split`` (str), sorted by split then path, index 0..N-1.
            Train pids are the raw pids of the files/lists (no relabelling: that is the trainer's job).
        version: dataset variant, e.g. ``'MSMT17_V1'``, ``'MSMT17_V2'``, ``'labeled'``, ``'detected'``; else None.
        fingerprint: ``"<N>:<sha256 hex of the sorted paths joined by '\\n' (UTF-8)>"``.
        spec: the spec string this dataset was loaded from.
        strict: default for :class:`partreid.common.data.images.ImageDataset` (fail instead of skipping
            unreadable images).
        warnings: warning lines printed while loading (also kept here for callers and tests).
        pid_names: for ``folder`` datasets with non-numeric pid folders, ``pid_names[pid]`` is the folder name.
        lmdb_path: for ``lmdb`` datasets, the folder holding ``data.mdb`` (None otherwise).
    """

    lmdb_path: Optional[Path] = None

    def __init__(self, kind: str, root: Path, frame: pd.DataFrame, *, version: Optional[str] = None,
                 spec: Optional[str] = None, strict: bool = False, fingerprint: Optional[str] = None,
                 pid_names: Optional[List[str]] = None, warnings: Optional[List[str]] = None):
        self.kind = kind
        self.root = Path(root)
        self._frame = frame
        self.version = version
        self.spec = spec if spec is not None else f"{kind}:{root}"
        self.strict = strict
        self.fingerprint = fingerprint if fingerprint is not None else compute_fingerprint(frame["path"])
        self.pid_names = pid_names
        self.warnings = list(warnings or [])

    @property
    def frame(self) -> pd.DataFrame:
        """The image table (see the class docstring)."""
        return self._frame

    @frame.setter
    def frame(self, value: pd.DataFrame) -> None:
        self._frame = value

    def __len__(self) -> int:
        return len(self.frame)

    def __repr__(self) -> str:
        v = f", version={self.version!r}" if self.version else ""
        return f"ReIDDataset(kind={self.kind!r}, root='{self.root}', n={len(self)}{v})"

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

    def path_at(self, row: int) -> str:
        """The ``path`` value of row ``row`` of :attr:`frame` (0..N-1)."""
        return str(self.frame["path"].iat[int(row)])

    def image_path(self, rel_path: str) -> str:
        """Where an image lives, for messages: the absolute file path."""
        return str(self.root / rel_path)

    def open_image(self, rel_path: str) -> Image.Image:
        """Open one image as an RGB ``PIL.Image.Image`` (decoded fully, file closed).

        ``rel_path`` is a ``path`` value of :attr:`frame` (relative to :attr:`root`, or absolute for csv rows
        outside it). LMDB datasets override this (:class:`partreid.common.data.luperson.LmdbDataset`).

        Raises:
            OSError: the image is missing, unreadable or corrupt (the message names it).
        """
        return open_image_file(self.root / rel_path)

    def read_bytes(self, rel_path: str) -> bytes:
        """The encoded file content of one image (for decoders that take bytes, e.g. ``torchvision.io``).

        Raises:
            OSError: the file is missing or unreadable (the message names it).
        """
        try:
            with open(self.root / rel_path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise OSError(f"{self.image_path(rel_path)}: image file not found") from None

    def summary(self) -> str:
        """Readable summary table (ids, images, cameras per split), as printed by ``load_dataset``.

        ids count the distinct pids other than -1 (the Market distractor pid 0 counts as one id, as in the
        cluster-contrast logs ``examples/logs/log.txt``); cameras count the distinct camids other than -1;
        '-' means unknown.
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


def compute_fingerprint(paths: Iterable[str], presorted: bool = False) -> str:
    """Dataset fingerprint ``"<N>:<sha256 hex>"`` of the image paths.

    The hash is SHA-256 of the sorted paths joined by ``'\\n'`` and encoded as UTF-8; N is the number of
    paths. It changes when an image is added, removed or renamed, not when pixels change. ``presorted``: the
    caller guarantees ``paths`` is a sorted list of str (skips a second sort of millions of paths).
    """
    ordered = paths if presorted else sorted(str(p) for p in paths)
    digest = hashlib.sha256()
    for i in range(0, len(ordered), 65536):  # chunks: no second copy of all the paths at once
        digest.update((("\n" if i else "") + "\n".join(ordered[i:i + 65536])).encode("utf-8"))
    return f"{len(ordered)}:{digest.hexdigest()}"


class LoadLog:
    """Collects warnings (always printed to stderr) and info lines (printed when verbose) while loading."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.warnings: List[str] = []

    def info(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- listing helpers

def casefold_child(folder: Path, name: str) -> Optional[Path]:
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


def child_dirs(folder: Path) -> Dict[str, Path]:
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


def split_dirs(folder: Path, table: Dict[str, Tuple[str, ...]]) -> Dict[str, Path]:
    """Which splits of ``table`` have a folder in ``folder`` (case-insensitive names; first name wins)."""
    children = child_dirs(folder)
    found: Dict[str, Path] = {}
    for split, names in table.items():
        for n in names:
            if n in children:
                found[split] = children[n]
                break
    return found


def descend(root: Path, test, prefer: Sequence[str] = (), depth: int = 2) -> Optional[Path]:
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
            children = child_dirs(folder)
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


def is_image_name(name: str) -> bool:
    """Whether a file name is an accepted image (extension in :data:`IMAGE_EXTENSIONS`, not hidden)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images_flat(folder: Path) -> Tuple[List[str], List[str]]:
    """(image file names, sub-folder names) directly in ``folder``, both sorted."""
    files, dirs = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                dirs.append(e.name)
            elif is_image_name(e.name) and e.is_file():
                files.append(e.name)
    return sorted(files), sorted(dirs)


def walk_images(root: Path) -> List[str]:
    """Relative POSIX paths of every image file under ``root`` (recursive ``os.scandir``; follows symlinked
    folders once, guarding against cycles; hidden entries and names holding a newline skipped). Unsorted."""
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


def make_frame(paths: Sequence[str], pids, camids, splits) -> pd.DataFrame:
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


def malformed_names(folder: Path, bad: List[str], expect: str, kind: str) -> InputError:
    """The error for file names that do not follow a dataset's naming scheme (names the first, counts the rest)."""
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return InputError(f"{folder / bad[0]}: file name does not match {expect}{more}; is this a {kind} dataset?")
