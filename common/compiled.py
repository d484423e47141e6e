"""numba, imported with the package's cache default: the one place that imports it.

The package's compiled kernels (the k-reciprocal Jaccard min-sums in :mod:`partreid.common.retrieval.kreciprocal`,
the CPU multi-crop renderer in :mod:`partreid.pass_pretrain.augment_cpu`) are compiled on their first call (a few
seconds) and cached on disk (numba ``cache=True``), so later processes only load them. numba keeps the cache in
``__pycache__`` beside each module; when the package folder cannot be written (a read-only or system-wide install)
and the user has set neither ``NUMBA_CACHE_DIR`` nor imported numba before this module, this module sets
``NUMBA_CACHE_DIR`` to ``$XDG_CACHE_HOME/partreid/numba`` (default ``~/.cache/partreid/numba``) before importing
numba. The threads are numba's (``NUMBA_NUM_THREADS``, default: all CPUs).

Usage: ``from partreid.common.compiled import numba``.
"""

from __future__ import annotations

import os
import sys


def numba_cache_dir(environ, package_dir: str, numba_imported: bool) -> str | None:
    """The ``NUMBA_CACHE_DIR`` this module sets before importing numba, or None to leave numba's choice.

    ``$XDG_CACHE_HOME/partreid/numba`` (default ``~/.cache/partreid/numba``) when ``package_dir`` cannot be
    written (numba would otherwise cache in ``__pycache__`` beside the modules), unless the user set
    ``NUMBA_CACHE_DIR`` or numba is already imported (it reads the variable once, when imported).
    """
    if "NUMBA_CACHE_DIR" in environ or numba_imported or os.access(package_dir, os.W_OK):
        return None
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "partreid", "numba")


_cache_dir = numba_cache_dir(os.environ, os.path.dirname(os.path.abspath(__file__)), "numba" in sys.modules)
if _cache_dir:
    os.environ["NUMBA_CACHE_DIR"] = _cache_dir

import numba  # noqa: E402  (after the cache default above)

__all__ = ["numba", "numba_cache_dir"]
