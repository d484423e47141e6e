"""Atomic, exclusive writes; file modes; content hashes.

Every output file of every stage is written through :func:`atomic_path`:

* **one writer per final path** — :func:`output_lock` takes an exclusive, non-blocking ``flock`` on a lock
  file beside the destination (``.<name>.lock``). A second process that wants to write the same path is
  refused at once with :class:`~partreid.common.errors.OutputBusyError` (one line, exit 2), before it opens
  or truncates anything. The kernel drops a ``flock`` when its holder dies, so a killed run never leaves a
  lock that blocks a later one; the lock file itself is removed on release. Locks are re-entrant within a
  process (the CLI takes them up front, the writers take them again when they write);
* **a partial file unique to the process** — :func:`new_partial` creates ``.<name>.<pid>-<random>.partial<ext>``
  beside the destination with ``O_CREAT | O_EXCL``, so no two writers ever share one;
* **rename on success** — the partial file is renamed over the destination only when the writer finished
  without error; otherwise it is deleted (a resumable writer such as
  :class:`~partreid.common.h5io.FeaturesWriter` keeps its own for ``--resume``);
* **file modes like any Unix tool** — the result gets ``0666 & ~umask`` (:func:`data_file_mode`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

from partreid.common.errors import InputError, OutputBusyError

PathLike = Union[str, os.PathLike]

PARTIAL_TAG = ".partial"
LOCK_SUFFIX = ".lock"

# realpath of a held lock file → [fd, depth]; re-entrant within one process
_HELD: Dict[str, List[int]] = {}
_HELD_MUTEX = threading.Lock()


# --------------------------------------------------------------------------------------------- modes
def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def data_file_mode() -> int:
    """Permission bits of a data file this package writes: ``0o666 & ~umask`` (``-rw-r--r--`` under umask 022)."""
    return 0o666 & ~current_umask()


# --------------------------------------------------------------------------------------------- locks
def lock_file_for(dest: PathLike) -> Path:
    """The lock file that guards writes to ``dest``: ``.<name>.lock`` in the same folder."""
    dest = Path(os.path.abspath(dest))
    return dest.with_name(f".{dest.name}{LOCK_SUFFIX}")


def _lock_rank() -> bool:
    """Only one process of a torchrun job (rank 0) writes outputs, so only it takes locks."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers in place.

    For the few steps that must not be cut in two: a file created and not yet recorded for clean-up. The block
    runs its steps unbroken; a signal that arrives meanwhile is recorded and raised again when it ends, so the
    handler's exception (KeyboardInterrupt, or the CLI's Terminated) is raised where the caller's ``finally``
    cleans up. Outside the main thread (where Python runs no signal handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []
    # a handler installed outside Python reads as None and cannot be put back: leave that signal alone
    watched = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not None]
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in watched}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


@contextlib.contextmanager
def output_lock(dest: PathLike, what: str = "") -> Iterator[None]:
    """Hold the exclusive write lock of ``dest`` for the duration of the block.

    Args:
        dest: the final output path (a file, or a run folder).
        what: how to name the path in the error message (e.g. ``"--out runs/a.h5"``); default the path.

    Raises:
        OutputBusyError: another process holds the lock (it is writing ``dest`` now).
    """
    if not _lock_rank():
        yield
        return
    lock = lock_file_for(dest)
    key = str(lock)
    with _HELD_MUTEX:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield
        finally:
            _release(key)
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    taken = False
    try:
        with signals_held():  # a Ctrl-C between creating the lock file and recording it would leave the file
            fd = _acquire(lock, what or str(dest))
            with _HELD_MUTEX:
                _HELD[key] = [fd, 1]
            taken = True
        yield
    finally:
        if taken:
            with signals_held():
                _release(key)


def _acquire(lock: Path, what: str) -> int:
    """Open-lock-verify loop: the lock counts only if the path still names the inode we locked (a previous
    holder may have unlinked it between our open and our flock)."""
    for _ in range(100):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, data_file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _read_holder(lock)
            raise OutputBusyError(f"{what}: another process{holder} is writing this file now; wait for it to "
                                  f"finish or choose another output path") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # locked a file already unlinked by its previous holder: try again
    raise OutputBusyError(f"{what}: cannot take the write lock {lock}")


def _read_holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
        return f" (pid {int(pid)})" if pid else ""
    except (OSError, ValueError):
        return ""


def _release(key: str) -> None:
    with _HELD_MUTEX:
        held = _HELD[key]
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
    fd = held[0]
    try:
        os.unlink(key)  # while still holding the lock, so a waiter re-checks the inode
    except OSError:
        pass
    os.close(fd)


def holds_lock(dest: PathLike) -> bool:
    """Whether this process holds the write lock of ``dest``."""
    return str(lock_file_for(dest)) in _HELD


# --------------------------------------------------------------------------------------------- partial files
def partial_prefix(dest: PathLike) -> str:
    """File-name prefix shared by every partial file of ``dest``: ``.<name>.``."""
    return f".{Path(dest).name}."


def new_partial(dest: PathLike, ext: Optional[str] = None) -> Path:
    """Create an empty partial file for ``dest``, unique to this process: ``.<name>.<pid>-<hex>.partial<ext>``.

    Created with ``O_CREAT | O_EXCL`` (never an existing file) and mode ``0666 & ~umask``. ``ext`` defaults
    to the destination's suffix, so tools that look at the extension still work.
    """
    dest = Path(dest)
    ext = dest.suffix if ext is None else ext
    for _ in range(100):
        path = dest.with_name(f"{partial_prefix(dest)}{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_TAG}{ext}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise OSError(f"{dest}: cannot create a unique partial file")


def partials_of(dest: PathLike, ext: Optional[str] = None) -> List[Path]:
    """Partial files of ``dest`` left by earlier (killed) writers, newest first."""
    dest = Path(dest)
    ext = dest.suffix if ext is None else ext
    prefix, tail = partial_prefix(dest), f"{PARTIAL_TAG}{ext}"
    try:
        found = [p for p in dest.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(tail)]
    except OSError:
        return []
    return sorted(found, key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)


def finalize(tmp: PathLike, dest: PathLike) -> None:
    """Give ``tmp`` the data-file mode and rename it over ``dest`` (atomic on one file system)."""
    os.chmod(tmp, data_file_mode())
    os.replace(tmp, dest)


# --------------------------------------------------------------------------------------------- aliasing
def file_identity(path: PathLike) -> Optional[Tuple[int, int]]:
    """``(st_dev, st_ino)`` of an existing path (links followed), or None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name the same file: equal resolved paths, or the same device and inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    ia, ib = file_identity(a), file_identity(b)
    return ia is not None and ia == ib


def check_not_input(dest: PathLike, inputs=()) -> None:
    """Raise :class:`InputError` when ``dest`` names one of ``inputs`` (a stage never overwrites its input)."""
    for src in inputs:
        if src is None or str(src) in ("", "-"):
            continue
        if same_file(src, dest):
            raise InputError(f"{dest}: refusing to overwrite the input file {src}; choose another output path")


@contextlib.contextmanager
def atomic_path(dest: PathLike, inputs: tuple = ()) -> Iterator[Path]:
    """Yield a fresh partial path next to ``dest``; rename it to ``dest`` when the block exits cleanly.

    Under :func:`output_lock` of ``dest`` for the whole block; the partial file is unique to this process
    (:func:`new_partial`); the result gets mode ``0666 & ~umask``; on success, partial files of ``dest`` left by
    killed writers are removed. On an exception the partial file is removed and ``dest`` is untouched.

    Args:
        dest: final output path. Its folder is created if needed.
        inputs: paths the caller reads; writing over one of them raises :class:`InputError`.

    Raises:
        InputError: ``dest`` is one of ``inputs``.
        OutputBusyError: another process is writing ``dest``.
    """
    dest = Path(dest)
    check_not_input(dest, inputs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(dest):
        tmp = None
        try:
            with signals_held():  # a signal between creating the partial file and the try would leave it
                tmp = new_partial(dest)
            yield tmp
            finalize(tmp, dest)
            for stale in partials_of(dest):  # left by killed writers (we hold the lock: none is running)
                with contextlib.suppress(OSError):
                    stale.unlink()
        finally:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()


def sha256_file(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in ``chunk_bytes`` blocks (bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            h.update(block)
    return h.hexdigest()
