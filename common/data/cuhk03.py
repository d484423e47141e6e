"""CUHK03-NP reader (the "new protocol" split of Zhong et al., CVPR 2017 re-ranking paper): Market-style splits
inside ``labeled/`` or ``detected/``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

from partreid.common.data.base import KNOWN_SUBDIRS, LoadLog, ReIDDataset, child_dirs, descend, split_dirs
from partreid.common.data.market import MARKET_SPLIT_DIRS, has_market_splits, read_market_dirs
from partreid.common.errors import InputError


def cuhk03_variants(folder: Path) -> Dict[str, Path]:
    """``{'labeled': ..., 'detected': ...}``: the variant sub-folders of ``folder`` holding Market-style splits."""
    children = child_dirs(folder)
    return {v: children[v] for v in ("labeled", "detected") if v in children and has_market_splits(children[v])}


def read_cuhk03np(root: Path, variant: Optional[str], spec: str, log: LoadLog) -> ReIDDataset:
    """CUHK03-NP (new protocol), Market-style splits in ``labeled/`` or ``detected/``.

    ``variant`` None picks ``labeled/`` when present (else ``detected/``). ROOT may also be the variant
    folder itself (``cuhk03np:ROOT/detected``), or a parent holding ``cuhk03-np/``. The version recorded is
    ``'labeled'`` or ``'detected'`` (None when ROOT is a Market-style folder of another name and no variant
    was asked for).

    Raises:
        InputError: no CUHK03-NP layout, or the asked-for variant is absent.
    """
    base = descend(root, lambda d: bool(cuhk03_variants(d)) or has_market_splits(d),
                   prefer=KNOWN_SUBDIRS["cuhk03np"])
    if base is None:
        raise InputError(f"{root}: no CUHK03-NP layout (labeled/ or detected/ with bounding_box_train/, query/, "
                         f"bounding_box_test/)")
    variants = cuhk03_variants(base)
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
    dirs = split_dirs(folder, MARKET_SPLIT_DIRS)
    return read_market_dirs(Path(os.path.abspath(folder)), dirs, "cuhk03np", spec, log, version=variant)
