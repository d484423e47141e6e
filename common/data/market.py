"""Market-1501 and DukeMTMC-reID readers (the Market layout and ``PPPP_cC...`` file names).

Upstream: PPLR ``pplr/datasets/market1501.py`` and PASS ``TR/datasets/market1501.py`` parse ``([-\\d]+)_c(\\d)``,
drop pid -1 (junk), keep pid 0 (distractors) and map camera c1..c6 to 0..5.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

from partreid.common.data.base import (KNOWN_SUBDIRS, LoadLog, ReIDDataset, child_dirs, descend, list_images_flat,
                                       make_frame, malformed_names, split_dirs)
from partreid.common.errors import InputError

# Market-style split folders; the first name found wins.
MARKET_SPLIT_DIRS: Dict[str, Tuple[str, ...]] = {
    "train": ("bounding_box_train",),
    "query": ("query",),
    "gallery": ("bounding_box_test", "gallery"),
}

_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")  # upstream regex ([-\d]+)_c(\d)


def has_market_splits(folder: Path) -> bool:
    """Whether ``folder`` holds at least one Market-style split folder."""
    return bool(split_dirs(folder, MARKET_SPLIT_DIRS))


def _read_market_split(folder: Path, rel: str, split: str, kind: str, rows: list) -> int:
    """Parse one Market-style split folder into ``rows``; returns the number of junk (pid -1) images."""
    files, _ = list_images_flat(folder)
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
        raise malformed_names(folder, bad, "PID_cCAM... (camera from 1)", kind)
    return junk


def read_market_dirs(root: Path, dirs: Dict[str, Path], kind: str, spec: str, log: LoadLog,
                     version: Optional[str] = None) -> ReIDDataset:
    """Read the Market-style split folders ``dirs`` (split → folder) of a dataset rooted at ``root``."""
    rows: list = []
    junk = 0
    for split in ("train", "query", "gallery"):
        if split in dirs:
            junk += _read_market_split(dirs[split], dirs[split].name, split, kind, rows)
    if junk:
        log.info(f"{spec}: dropped {junk} junk images (pid -1)")
    paths, pids, cams, splits = zip(*rows) if rows else ((), (), (), ())
    return ReIDDataset(kind, root, make_frame(paths, pids, cams, splits), version=version, spec=spec)


def read_market(root: Path, kind: str, spec: str, log: LoadLog) -> ReIDDataset:
    """Market-1501 / DukeMTMC-reID layout.

    Names ``PPPP_cC...``: pid = PPPP, camid = C - 1 (Market c1..c6 → 0..5, Duke c1..c8 → 0..7). Junk (pid -1)
    is dropped; distractors (pid 0) are kept. Train pids are not relabelled. ``gallery/`` is an alias of
    ``bounding_box_test/``; a dataset may have only some splits. ROOT may also be a parent folder holding e.g.
    ``Market-1501-v15.09.15/`` (the PPLR layout) or ``market1501/`` (the PASS layout).

    Raises:
        InputError: no Market-style split folder, or a file name that does not parse.
    """
    found = descend(root, has_market_splits, prefer=KNOWN_SUBDIRS[kind])
    if found is None:
        raise InputError(f"{root}: no Market-style split folders (bounding_box_train/, query/, "
                         f"bounding_box_test/ or gallery/) for {kind}")
    dirs = split_dirs(found, MARKET_SPLIT_DIRS)
    children = child_dirs(found)
    if "gallery" in dirs and "bounding_box_test" in children and "gallery" in children:
        log.warn(f"{found}: both bounding_box_test/ and gallery/ exist; using bounding_box_test/")
    return read_market_dirs(Path(os.path.abspath(found)), dirs, kind, spec, log)
