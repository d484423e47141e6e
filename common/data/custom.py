"""Readers for your own data: a labelled folder (``folder:ROOT``) and a CSV manifest (``csv:FILE``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pandas as pd

from partreid.common.data.base import (IMAGE_EXTENSIONS, SPLITS, LoadLog, ReIDDataset, list_images_flat, make_frame,
                                       malformed_names, split_dirs, walk_images)
from partreid.common.errors import InputError

FOLDER_SPLIT_DIRS: Dict[str, Tuple[str, ...]] = {
    "train": ("bounding_box_train", "train"),
    "query": ("query",),
    "gallery": ("bounding_box_test", "gallery", "test"),
}
_FOLDER_NAME = re.compile(r"^(-?\d+)(?:_c(\d+)|(?=_)|$)")   # PID_cCAM..., PID_..., PID
_CAMERA_IN_NAME = re.compile(r"_c(\d+)")
_INT_NAME = re.compile(r"^-?\d+$")


def read_folder(root: Path, spec: str, log: LoadLog) -> ReIDDataset:
    """Generic labelled folder.

    If ROOT has split folders (``bounding_box_train``/``train``, ``query``, ``bounding_box_test``/``gallery``/
    ``test``) each is read as its split; otherwise ROOT is one split ``'all'``. Within a split folder:

    * image files directly inside → names ``PID[_cCAM]...``: pid = PID, camid = CAM - 1, or -1 without a
      ``_cCAM`` field (sub-folders are then ignored);
    * otherwise one sub-folder per pid (images found recursively): pid = the folder name when all pid
      folder names are integers, else the index of the name in the sorted list of all pid folder names over
      all splits (kept in ``ds.pid_names``); camid = CAM - 1 from a ``_cCAM`` field in the file name, else -1.

    pid -1 images (Market junk) are dropped.

    Raises:
        InputError: a flat file name that does not start with a pid.
    """
    dirs = split_dirs(root, FOLDER_SPLIT_DIRS)
    targets = [(s, dirs[s], dirs[s].name) for s in ("train", "query", "gallery") if s in dirs] \
        if dirs else [("all", root, "")]
    raw: list = []  # (path, pid label (int or str), camid, split)
    for split, folder, rel in targets:
        files, subdirs = list_images_flat(folder)
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
                raise malformed_names(folder, bad, "PID_cCAM... or PID_... (or use one sub-folder per pid)",
                                      "folder")
        else:
            for sub in subdirs:
                for relpath in sorted(walk_images(folder / sub)):
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
        raw = [(p, mapping[lab] if isinstance(lab, str) else lab, c, s) for p, lab, c, s in raw]
    kept = [r for r in raw if r[1] != -1]
    if len(kept) < len(raw):
        log.info(f"{spec}: dropped {len(raw) - len(kept)} junk images (pid -1)")
    paths, pids, cams, splits = zip(*kept) if kept else ((), (), (), ())
    return ReIDDataset("folder", root, make_frame(paths, pids, cams, splits), spec=spec, pid_names=pid_names)


def read_csv(path: Path, spec: str, log: LoadLog) -> ReIDDataset:
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
    return ReIDDataset("csv", root, make_frame(rel_paths, pids, camids, splits), spec=spec)
