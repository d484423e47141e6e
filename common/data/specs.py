"""Dataset specs: a spec string (``KIND:ROOT``, ``csv:FILE``, a bare ``NAME`` under ``$REID_DATA`` or a folder
path) becomes a :class:`~partreid.common.data.base.ReIDDataset` through :func:`load_dataset`.

Specs (``KIND:ROOT``; ROOT may start with ``~``):

================================  ========================================================================
``market1501:ROOT``               ``bounding_box_train/``, ``query/``, ``bounding_box_test/``. ROOT may
                                  also be a parent holding e.g. ``Market-1501-v15.09.15/``.
``dukemtmc:ROOT``                 the same layout; ``gallery/`` is accepted for ``bounding_box_test/``.
``msmt17:ROOT``                   ``list_{train,val,query,gallery}.txt`` + image folders, V1 or V2.
``cuhk03np:ROOT``                 CUHK03-NP, ``labeled/`` (default) or ``detected/`` sub-folders, each
                                  Market-style; ``cuhk03np-detected:ROOT`` / ``cuhk03np-labeled:ROOT`` or
                                  ``cuhk03np:ROOT/detected`` pick one.
``folder:ROOT``                   Market-style names ``PID_cCAM...`` (camera optional) or one sub-folder
                                  per pid; split folders used when present, else split ``'all'``.
``csv:FILE``                      manifest with columns ``path, pid[, camid][, split]``.
``luperson:ROOT``                 unlabelled image tree read recursively, with a cached file index; a ROOT
                                  holding ``keys.pkl`` + an LMDB is read as ``lmdb``.
``lmdb:ROOT``                     LUPerson's LMDB (``keys.pkl`` + ``data.mdb``), images decoded on read.
``NAME``                          bare name: the folder ``NAME`` (case-insensitive) under ``$REID_DATA``;
                                  its layout is detected (see :func:`detect_layout`).
``PATH`` (contains ``/``)         a folder whose layout is detected, as for a bare name (a ``.csv`` file
                                  is read as ``csv:PATH``).
================================  ========================================================================
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from partreid.common.data.base import (IMAGE_EXTENSIONS, KNOWN_SUBDIRS, LoadLog, ReIDDataset, casefold_child,
                                       descend)
from partreid.common.data.cuhk03 import cuhk03_variants, read_cuhk03np
from partreid.common.data.custom import read_csv, read_folder
from partreid.common.data.luperson import lmdb_layout, read_image_tree, read_lmdb
from partreid.common.data.market import has_market_splits, read_market
from partreid.common.data.msmt17 import has_msmt_lists, read_msmt17
from partreid.common.errors import InputError

# Spec prefixes accepted in front of ':' (lower-case) -> (kind, variant).
SPEC_KINDS: Dict[str, Tuple[str, Optional[str]]] = {
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


def load_dataset(spec: str, *, verbose: bool = True, strict: bool = False,
                 refresh: bool = False) -> ReIDDataset:
    """Read a dataset spec (see the module docstring) into a :class:`ReIDDataset`.

    Args:
        spec: ``KIND:ROOT``, ``csv:FILE``, a bare ``NAME`` under ``$REID_DATA`` or a folder path.
        verbose: print the summary table (and info lines) to stderr. Warnings are printed either way.
        strict: fail on problems that are otherwise warned about and skipped (MSMT17 list entries missing
            on disk); also the default ``strict`` of :class:`partreid.common.data.images.ImageDataset`.
        refresh: ``luperson``/``lmdb`` only: rebuild the cached file index even if it looks current.

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
    kind, variant, arg = parse_spec(spec)
    log = LoadLog(verbose)
    if kind == "csv":
        ds = read_csv(resolve_path(arg, spec), spec, log)
    else:
        root = resolve_path(arg, spec) if kind != "auto-name" else resolve_data_name(arg)
        if kind in ("auto", "auto-name"):
            kind, root = detect_layout(root)
            log.info(f"{spec}: detected a {kind} layout in {root}")
        if not root.is_dir():
            raise InputError(f"{root}: dataset root is not a folder")
        if kind in ("market1501", "dukemtmc"):
            ds = read_market(root, kind, spec, log)
        elif kind == "cuhk03np":
            ds = read_cuhk03np(root, variant, spec, log)
        elif kind == "msmt17":
            ds = read_msmt17(root, spec, strict, log)
        elif kind == "folder":
            ds = read_folder(root, spec, log)
        elif kind == "lmdb" or (kind == "luperson" and lmdb_layout(root) is not None):
            ds = read_lmdb(root, spec, log, refresh=refresh)
        elif kind == "luperson":
            ds = read_image_tree(root, spec, refresh, log)
        else:  # pragma: no cover - parse_spec only returns known kinds
            raise InputError(f"unknown dataset kind '{kind}'")
    ds.strict = strict
    ds.warnings = log.warnings
    if len(ds) == 0:
        raise InputError(f"{spec}: no images found in {ds.root} (accepted: {', '.join(IMAGE_EXTENSIONS)})")
    if verbose:
        log.info(ds.summary())
    return ds


def parse_spec(spec: str) -> Tuple[str, Optional[str], str]:
    """Split a spec into (kind, variant, argument); kind 'auto' = folder path, 'auto-name' = bare name.

    Raises:
        InputError: unknown kind prefix, nothing after ``:``, or a malformed bare name.
    """
    m = re.match(r"^([A-Za-z][A-Za-z0-9_.-]*):(.*)$", spec)
    if m and not (len(m.group(1)) == 1 and m.group(2)[:1] in ("\\", "/")):  # not a Windows drive letter
        prefix, arg = m.group(1).lower(), m.group(2).strip()
        if prefix not in SPEC_KINDS:
            raise InputError(f"unknown dataset kind '{m.group(1)}' in '{spec}'; expected one of "
                             f"{', '.join(sorted(SPEC_KINDS))}, or a bare NAME under $REID_DATA")
        if not arg:
            raise InputError(f"dataset spec '{spec}' has no root after ':'")
        kind, variant = SPEC_KINDS[prefix]
        return kind, variant, arg
    if "/" in spec or os.sep in spec or spec.startswith(("~", ".")):
        if spec.lower().endswith(".csv"):
            return "csv", None, spec
        return "auto", None, spec
    if not re.match(r"^[\w.+-][\w .+-]*$", spec):
        raise InputError(f"malformed dataset spec '{spec}'; give KIND:ROOT or a bare NAME under $REID_DATA")
    return "auto-name", None, spec


def resolve_path(arg: str, spec: str) -> Path:
    """Absolute path for a spec argument; a missing relative path is also tried under ``$REID_DATA``.

    Raises:
        InputError: the path exists neither as given nor under ``$REID_DATA``.
    """
    p = Path(arg).expanduser()
    if p.exists():
        return Path(os.path.abspath(p))
    if not p.is_absolute() and os.environ.get("REID_DATA"):
        try:
            return _find_under(Path(os.environ["REID_DATA"]).expanduser(), p.parts)
        except InputError:
            pass
    raise InputError(f"{p}: dataset root not found (spec '{spec}')")


def _find_under(base: Path, parts: Sequence[str]) -> Path:
    cur = base
    for part in parts:
        nxt = casefold_child(cur, part)
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
    hit = casefold_child(base, name)
    if hit is None:
        try:
            have = sorted(c.name for c in base.iterdir() if not c.name.startswith("."))
        except OSError:
            have = []
        listing = ", ".join(have[:12]) + (", ..." if len(have) > 12 else "")
        raise InputError(f"no dataset '{name}' in REID_DATA={base} (it holds: {listing or 'nothing'})")
    return Path(os.path.abspath(hit))


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
    if lmdb_layout(root) is not None:
        return "lmdb", root
    if cuhk03_variants(root):
        return "cuhk03np", root
    market = descend(root, has_market_splits)
    if market is not None:
        names = " ".join(p.name.lower() for p in (root, market))
        if "duke" in names:
            return "dukemtmc", market
        if "cuhk03" in names:
            return "cuhk03np", market
        return "market1501", market
    msmt = descend(root, has_msmt_lists, prefer=KNOWN_SUBDIRS["msmt17"])
    if msmt is not None:
        return "msmt17", msmt
    return "luperson", root
