"""MSMT17 reader (list files + image folders), V1 and V2.

Upstream: PPLR ``pplr/datasets/msmt17.py`` (train = list_train + list_val) and PASS ``TR/datasets/msmt17.py``
(camera = ``int(name.split('_')[2]) - 1``, pids from the list without relabelling).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from partreid.common.data.base import KNOWN_SUBDIRS, LoadLog, ReIDDataset, child_dirs, descend, make_frame
from partreid.common.errors import InputError

MSMT_LISTS: Dict[str, Tuple[str, ...]] = {
    "train": ("list_train.txt", "list_val.txt"),
    "query": ("list_query.txt",),
    "gallery": ("list_gallery.txt",),
}
_MSMT_IMAGE_DIRS: Dict[str, Tuple[str, ...]] = {  # V1 name first, then V2 name
    "train": ("train", "mask_train_v2"),
    "test": ("test", "mask_test_v2"),
}
_INT_NAME = re.compile(r"^-?\d+$")


def has_msmt_lists(folder: Path) -> bool:
    """Whether ``folder`` holds at least one MSMT17 list file."""
    return any((folder / n).is_file() for names in MSMT_LISTS.values() for n in names)


def _version_from_name(folder: Path) -> Optional[str]:
    m = re.search(r"msmt17[_\- ]?v([12])(?![0-9])", folder.name.lower())
    return f"MSMT17_V{m.group(1)}" if m else None


def read_msmt17(root: Path, spec: str, strict: bool, log: LoadLog) -> ReIDDataset:
    """MSMT17 with list files: ``list_{train,val,query,gallery}.txt`` and image folders.

    Each list line is ``<pid-folder>/<file> <pid>``; pid comes from the list (not relabelled), camid from
    the file name ``PPPP_III_CC_...``: ``int(CC) - 1`` (0-based, cameras 1-15 → 0-14, the PASS convention).
    Train = list_train + list_val (32,621 images, 1,041 ids on V1); query/gallery come from ``test/``.

    V1/V2 rule (recorded in ``version``): both releases use the same file-name pattern, so the folders
    decide. V2 when the image folders are ``mask_train_v2/``/``mask_test_v2/`` or the dataset folder is named
    ``MSMT17_V2``; otherwise V1 (``train/``/``test/`` folders, or a folder named ``MSMT17_V1``). A folder
    named ``MSMT17_V2`` whose image folders were renamed to ``train/``/``test/`` is still V2 (and warned).
    V2 prints a warning: the papers' numbers are on V1 (V2 gives about 1.7 mAP less, PASS-reID issue #1).
    Entries missing on disk are warned and dropped.

    Raises:
        InputError: no list files, a list without its image folder, a malformed list line, or (``strict``)
            list entries missing on disk.
    """
    base = descend(root, has_msmt_lists, prefer=KNOWN_SUBDIRS["msmt17"])
    if base is None:
        raise InputError(f"{root}: no MSMT17 list files (list_train.txt, list_val.txt, list_query.txt, "
                         f"list_gallery.txt)")
    base = Path(os.path.abspath(base))
    children = child_dirs(base)
    image_dirs: Dict[str, Path] = {}
    layout_v2 = False
    for group, names in _MSMT_IMAGE_DIRS.items():
        present = [n for n in names if n in children]
        if present:
            image_dirs[group] = children[present[0]]
            layout_v2 |= present[0].startswith("mask_")
    name_version = _version_from_name(base)
    layout_version = ("MSMT17_V2" if layout_v2 else "MSMT17_V1") if image_dirs else None
    version = "MSMT17_V2" if "MSMT17_V2" in (layout_version, name_version) else "MSMT17_V1"
    if name_version is not None and layout_version is not None and name_version != layout_version:
        log.warn(f"{base}: folder name says {name_version} but the image folders are "
                 f"{', '.join(sorted(d.name + '/' for d in image_dirs.values()))}; treating it as {version}")
    if version == "MSMT17_V2":
        log.warn(f"{base}: MSMT17_V2 (face-masked release) detected; the PASS/PPLR papers report MSMT17_V1 "
                 f"numbers (V2 gives about 1.7 mAP less, PASS-reID issue #1)")
    rows: list = []
    missing: List[str] = []
    for split, lists in MSMT_LISTS.items():
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
            entries = read_msmt_list(list_path)
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
    return ReIDDataset("msmt17", base, make_frame(paths, pids, cams, splits), version=version, spec=spec)


def read_msmt_list(list_path: Path) -> List[Tuple[str, int, int]]:
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
