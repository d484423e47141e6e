"""PartReID: PASS part-aware self-supervised pre-training and PPLR unsupervised fine-tuning for person re-ID.

The repository root is this package: setuptools maps it to ``partreid`` (see ``setup.cfg``), so the folders
``common/``, ``pass_pretrain/``, ``pplr_finetune/`` and ``cli/`` are ``partreid.common`` and so on.

The Python API (see the README's "Python API"):

- :func:`load_model`: any accepted checkpoint, or ``random:ARCH``;
- :class:`FeatureExtractor`: paths, PIL images, uint8 H×W×3 arrays or tensors → ``{"global": N×D,
  "parts": N×P×Dp}`` float32 arrays;
- :func:`read_features` / :func:`write_features`: the features file (HDF5) every stage reads and writes;
- :func:`pseudo_labels`: k-reciprocal Jaccard + DBSCAN pseudo-labels of a feature array;
- :func:`cross_agreement`: PPLR cross-agreement scores (Eq. 1) of global and part feature arrays;
- :func:`evaluate_rank`: mAP, CMC and mINP from a distance matrix or query/gallery features.

Each name is imported on first use (PEP 562), so ``import partreid`` and the commands stay light: torch loads
only with :func:`load_model` / :class:`FeatureExtractor`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

from partreid.common import __version__

#: public name → (module, attribute)
_API = {
    "load_model": ("partreid.common.models.loader", "load_model"),
    "FeatureExtractor": ("partreid.common.extract", "FeatureExtractor"),
    "read_features": ("partreid.common.h5io", "read_features"),
    "write_features": ("partreid.common.h5io", "write_features"),
    "pseudo_labels": ("partreid.pplr_finetune.pseudo_labels", "pseudo_labels"),
    "cross_agreement": ("partreid.pplr_finetune.cross_agreement", "cross_agreement_from_features"),
    "evaluate_rank": ("partreid.common.retrieval.evaluation", "evaluate_rank"),
}

__all__ = ["__version__", *_API]

if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from partreid.common.extract import FeatureExtractor
    from partreid.common.h5io import read_features, write_features
    from partreid.common.models.loader import load_model
    from partreid.common.retrieval.evaluation import evaluate_rank
    from partreid.pplr_finetune.cross_agreement import cross_agreement_from_features as cross_agreement
    from partreid.pplr_finetune.pseudo_labels import pseudo_labels


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'partreid' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
