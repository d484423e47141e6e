"""Atomic writes and content hashes.

Every output file of every stage is written through :func:`atomic_path`: the data goes to a temporary file
in the destination folder and is renamed over the destination only when the writer finished without error,
so a killed process never leaves half a file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

from partreid.common.errors import InputError

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(dest: PathLike, inputs: tuple = ()) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it to ``dest`` when the block exits cleanly.

    Args:
        dest: final output path. Its folder is created if needed.
        inputs: paths the caller reads; writing over one of them raises :class:`InputError`
            (a stage never overwrites its input).

    Raises:
        InputError: ``dest`` is one of ``inputs``.
    """
    dest = Path(dest)
    for src in inputs:
        if src is not None and str(src) != "-" and Path(src).exists() and dest.exists() \
                and os.path.samefile(src, dest):
            raise InputError(f"{dest}: refusing to overwrite the input file; choose another --out")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def sha256_file(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in ``chunk_bytes`` blocks (bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            h.update(block)
    return h.hexdigest()
