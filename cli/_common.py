"""Conventions shared by every command.

- A command writes its output file and prints that file's path, and only that, on stdout. Logs and progress
  bars go to stderr.
- When the input-file argument is omitted or is ``-``, the path is read from stdin, so
  ``extract-features ... | cluster --out l.h5 | refine-labels --out r.h5`` works in a shell.
- Exit codes: 0 success; 2 bad usage or bad input (one line on stderr, no traceback unless ``--debug``);
  1 internal error; 130 Ctrl-C; 143 SIGTERM (both keep what ``--resume`` needs).
- Integrity (issue 12), each one mechanism used by every command: :class:`Command`/:class:`Group` (one-line
  usage errors), :func:`validate_options` (numeric options checked before any work), :func:`guard_files` (the
  output guard: aliases, writable folders, write locks), :func:`guarded` (exit codes, SIGTERM like SIGINT);
  :func:`partreid.common.fileio.atomic_path` (exclusive per-process partial files, 0666 & ~umask).
- Common options: ``--device auto|cpu|cuda``, ``--seed``, ``-v/--verbose``, ``--debug``, ``--version``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import click

from partreid.common import __version__
from partreid.common.errors import InputError, Terminated

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
log = logging.getLogger("partreid")


def setup_logging(verbose: int = 0) -> None:
    """Send readable log lines to stderr (INFO by default, DEBUG with ``-v``)."""
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("partreid")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def read_input_path(value: Optional[str], what: str = "input file") -> str:
    """Return ``value``, or read the path from stdin when it is omitted or ``-``.

    Raises:
        InputError: nothing given and stdin is a terminal or empty.
    """
    if value not in (None, "", "-"):
        return str(value)
    if sys.stdin is None or sys.stdin.isatty():
        raise InputError(f"no {what} given: pass it as an argument or pipe its path on stdin")
    lines = [ln.strip() for ln in sys.stdin.read().splitlines() if ln.strip()]
    if not lines:
        raise InputError(f"no {what} given: stdin was empty (did the previous command fail?)")
    return lines[-1]


def emit_output(path) -> None:
    """Print the output file's path on stdout (the only stdout line a command writes)."""
    click.echo(str(path))
    sys.stdout.flush()


def resolve_device(device: str) -> str:
    """``--device auto|cpu|cuda`` → a torch device string (see :func:`partreid.common.distributed.resolve_device`).

    Imports torch: call it only in commands that run a network.
    """
    from partreid.common.distributed import resolve_device as resolve

    return resolve(device)


def seed_everything(seed: Optional[int], torch: bool = True) -> None:
    """Seed Python and NumPy, and with ``torch=True`` torch too (no-op for None).

    Commands that run no network pass ``torch=False`` so that torch is never imported.
    """
    if seed is None:
        return
    if torch:
        from partreid.common.rng import seed_everything as seed_all

        seed_all(seed)
    else:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed % (2 ** 32))


def common_options(func: Optional[Callable] = None, *, seed_default: Optional[int] = 0,
                   seed_help: str = "Random seed.") -> Callable:
    """Add ``--device``, ``--seed``, ``-v/--verbose``, ``--debug`` and ``--version`` to a click command.

    Used bare (``@common_options``) or with another ``--seed`` default (``@common_options(seed_default=None,
    seed_help=...)``: a command whose seed comes from a preset unless given)."""
    if func is None:
        return functools.partial(common_options, seed_default=seed_default, seed_help=seed_help)
    func = click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")(func)
    func = click.option("-v", "--verbose", count=True, help="More log output (DEBUG level).")(func)
    func = click.option("--seed", type=int, default=seed_default, show_default=seed_default is not None,
                        help=seed_help)(func)
    func = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        show_default=True, help="Where to run: CUDA when available, else CPU.")(func)
    func = click.version_option(__version__, "--version", prog_name="partreid")(func)
    return func


# --------------------------------------------------------------------------------------------- usage errors
class OneLineUsageError(click.UsageError):
    """A click usage error shown as one line: ``error: no such option: --bogus (see 'cluster --help')``."""

    def __init__(self, message: str, command_path: str):
        super().__init__(message)
        self.command_path = command_path

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()} (see '{self.command_path} --help')", err=True)


def _usage_text(exc: click.ClickException) -> str:
    text = " ".join(exc.format_message().split())
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        text = text[0].lower() + text[1:]
    return text.rstrip(".")


def _one_line(exc: click.ClickException, fallback: str) -> OneLineUsageError:
    ctx = getattr(exc, "ctx", None)
    text = _usage_text(exc)
    if isinstance(exc, click.NoSuchOption):
        text = f"no such option: {exc.option_name}"
    return OneLineUsageError(text, ctx.command_path if ctx is not None else fallback)


class _OneLineErrors:
    """Mixin for click commands and groups: every usage error (unknown option, missing or invalid value, unknown
    sub-command) becomes :class:`OneLineUsageError` (exit 2, one line on stderr)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except OneLineUsageError:
            raise
        except click.UsageError as exc:
            raise _one_line(exc, info_name or self.name or "") from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OneLineUsageError:
            raise
        except click.UsageError as exc:
            raise _one_line(exc, ctx.command_path) from None


class Command(_OneLineErrors, click.Command):
    """The click command class of every PartReID command (``@click.command(cls=Command, ...)``)."""


class Group(_OneLineErrors, click.Group):
    """The click group class of PartReID command groups; its sub-commands are :class:`Command`."""

    command_class = Command


# --------------------------------------------------------------------------------------------- option checks
#: option parameter name → (check, description); None values (preset defaults) are not checked
OPTION_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "k1": (lambda v: v >= 1, ">= 1"),
    "k2": (lambda v: v >= 1, ">= 1"),
    "k": (lambda v: v >= 1, ">= 1"),
    "k_agreement": (lambda v: v >= 1, ">= 1"),
    "min_samples": (lambda v: v >= 1, ">= 1"),
    "num_instances": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "iters": (lambda v: v >= 1, ">= 1"),
    "workers": (lambda v: v >= 0, ">= 0"),
    "show_ranks": (lambda v: v >= 0, ">= 0"),
    "eps": (lambda v: 0 < v <= 1, "in (0, 1] (a Jaccard distance lies in [0, 1])"),
    "lambda_value": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


def validate_options(values: Dict[str, Any], ctx: Optional[click.Context] = None) -> None:
    """Check numeric options against :data:`OPTION_RULES` before any work.

    Raises:
        InputError: e.g. ``--batch-size must be >= 1, got 0``.
    """
    flags = {}
    if ctx is not None:
        flags = {p.name: max(p.opts, key=len) for p in ctx.command.params if getattr(p, "opts", None)}
    for name, (ok, text) in OPTION_RULES.items():
        value = values.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value != value or not ok(value):  # NaN fails every rule
            flag = flags.get(name, "--" + name.replace("_", "-"))
            raise InputError(f"{flag} must be {text}, got {value}")


# --------------------------------------------------------------------------------------------- output guard
_GUARD_STACK: Optional[contextlib.ExitStack] = None


def _expand_read(label: str, path: str) -> List[Tuple[str, str]]:
    """A read path and what it makes the command read besides: a labels file's features file, a run folder's
    files."""
    out = [(label, path)]
    p = Path(path)
    try:
        if p.is_dir():  # a run folder; at most 1000 entries are looked at (never a whole dataset tree)
            for child in itertools.islice(p.iterdir(), 1000):
                if child.is_file():
                    out.append((f"{label} (in {path})", str(child)))
        elif p.is_file():
            recorded = _recorded_features_file(p)
            if recorded:
                out.append((f"the features file of {label} {path}", recorded))
    except OSError:
        pass
    return out


def _recorded_features_file(path: Path) -> Optional[str]:
    """``features_file`` recorded in a labels file (HDF5 attribute or CSV header), without reading its data."""
    try:
        if path.suffix.lower() == ".csv":
            with open(path, encoding="utf-8", errors="replace") as fh:
                for _, line in zip(range(64), fh):
                    if not line.startswith("#"):
                        break
                    if line.startswith("# features_file="):
                        value = line.split("=", 1)[1].strip()
                        return json.loads(value) if value.startswith('"') else value
            return None
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89HDF\r\n\x1a\n":
                return None
        import h5py

        with h5py.File(path, "r") as f:
            value = f.attrs.get("features_file")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return str(value) if value else None
    except (OSError, ValueError):
        return None


def spec_paths(spec: Optional[str]) -> List[str]:
    """Files a dataset spec makes a command read that it could be asked to overwrite: a ``csv:`` manifest."""
    if not spec:
        return []
    if spec.startswith("csv:"):
        return [spec[4:]]
    if spec.lower().endswith(".csv") and Path(spec).is_file():
        return [spec]
    return []


def _check_writable(label: str, path: Path, is_dir: bool) -> None:
    if path.exists():
        if is_dir and not path.is_dir():
            raise InputError(f"{label} {path}: exists and is not a folder")
        if not is_dir and path.is_dir():
            raise InputError(f"{label} {path}: is a folder, expected a file path")
        target = path if is_dir else path.parent
    else:
        target = path.parent
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{label} {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{label} {path}: cannot write in {probe} (permission denied)")


def guard_files(*, reads: Optional[Dict[str, Any]] = None, writes: Optional[Dict[str, Any]] = None,
                run_dirs: Optional[Dict[str, Tuple[Any, Sequence[str]]]] = None,
                out_dirs: Optional[Dict[str, Any]] = None, specs: Optional[Dict[str, Any]] = None) -> None:
    """The output guard every command calls before it does any work.

    It collects what the command will read (``reads``: files or folders, plus what they point to: the features
    file a labels file records, the files of a run folder; ``specs``: dataset specs, whose ``csv:`` manifest is
    read) and what it will write (``writes``: files; ``run_dirs``: a run folder and the names written in it;
    ``out_dirs``: folders that receive files). Then, before any work:

    * two outputs naming one file, or an output naming a file the command reads, is refused: paths are
      compared resolved (``realpath``) and by ``(st_dev, st_ino)``, so symlinks and hard links count;
    * every output's folder must exist and be writable, or be creatable;
    * each output file and run folder is locked (:func:`partreid.common.fileio.output_lock`) until the command
      ends, so a second process writing the same path is refused at once.

    Args are ``{label: path}`` (label = how the message names it, e.g. ``"--out"``); None paths are skipped.

    Raises:
        InputError: an alias, an unwritable folder; OutputBusyError: another process writes the same output.
    """
    from partreid.common.fileio import output_lock, same_file

    if not (writes or run_dirs or out_dirs):
        return
    read_list: List[Tuple[str, str]] = []
    for label, path in (reads or {}).items():
        if path not in (None, "", "-") and not str(path).startswith("random:"):
            read_list += _expand_read(label, str(path))
    for label, spec in (specs or {}).items():
        read_list += [(f"the manifest of {label}", p) for p in spec_paths(spec)]
    write_list: List[Tuple[str, Path, bool]] = []
    for label, path in (writes or {}).items():
        if path not in (None, ""):
            write_list.append((label, Path(path), False))
    for label, item in (run_dirs or {}).items():
        folder, names = item
        if folder not in (None, ""):
            write_list.append((label, Path(folder), True))
            write_list += [(f"{label} ({name})", Path(folder) / name, False) for name in names]
    for label, folder in (out_dirs or {}).items():
        if folder not in (None, ""):
            write_list.append((label, Path(folder), True))

    for i, (wl, wp, _) in enumerate(write_list):
        for wl2, wp2, _ in write_list[i + 1:]:
            if same_file(wp, wp2):
                raise InputError(f"{wl} and {wl2} name the same file {wp}; give each output its own path")
        for rl, rp in read_list:
            if same_file(wp, rp):
                what = "that file" if os.path.realpath(wp) == os.path.realpath(rp) else f"{rp} (the same file)"
                raise InputError(f"{wl} {wp} would overwrite {what}, which this command reads as {rl}; "
                                 f"a command never writes a file it reads: choose another {wl.split()[0]}")
    for wl, wp, is_dir in write_list:
        _check_writable(wl, wp, is_dir)
    if _GUARD_STACK is not None:
        locked = [(wl, wp) for wl, wp, is_dir in write_list
                  if is_dir and wl in (run_dirs or {}) or not is_dir and wl in (writes or {})]
        for wl, wp in locked:
            _GUARD_STACK.enter_context(output_lock(wp, f"{wl} {wp}"))


def run_checkpoint(checkpoint: Optional[str], what: str = "--checkpoint") -> Optional[str]:
    """A model path, with a run folder replaced by the model file it holds.

    A ``pass-pretrain`` run folder gives its export ``teacher_backbone.pth`` (else its ``checkpoint.pth``), a
    ``finetune`` run folder its ``last.pth``.

    Raises:
        InputError: a folder holding none of them.
    """
    if not checkpoint or not Path(checkpoint).is_dir():
        return checkpoint
    from partreid.cli._runs import run_model_file

    found = run_model_file(checkpoint)
    if found is None:
        raise InputError(f"{what} {checkpoint}: a folder without a model (no teacher_backbone.pth, last.pth or "
                         f"checkpoint.pth); give a checkpoint file or a pass-pretrain/finetune run folder")
    log.info("%s %s: using %s", what, checkpoint, found)
    return str(found)


# --------------------------------------------------------------------------------------------- the wrapper
def _on_sigterm(signum, frame):
    global _SIGNAL_SEEN
    if os.getpid() != _MAIN_PID:  # a forked DataLoader worker: end like an untrapped SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _SIGNAL_SEEN = signal.SIGTERM
    raise Terminated()


def _on_sigint(signum, frame):
    """Python's own Ctrl-C behaviour (raise KeyboardInterrupt), remembering that it happened."""
    global _SIGNAL_SEEN
    if os.getpid() == _MAIN_PID:
        _SIGNAL_SEEN = signal.SIGINT
    raise KeyboardInterrupt()


_MAIN_PID = os.getpid()
#: the signal received while a command body ran: a library that turns the handler's exception into one of its own
#: (h5py reports an exception raised inside its type-conversion callback as ``TypeError: Operation not defined
#: for data type class``) must not make a Ctrl-C or SIGTERM look like an internal error
_SIGNAL_SEEN: Optional[int] = None


def _on_unraisable(unraisable) -> None:
    """Deliver a signal again when Python had to swallow its exception.

    A signal handler raises in whatever Python code runs at that moment. If that is code whose exceptions Python
    cannot propagate (an ``os.register_at_fork`` callback such as ``logging._releaseLock`` while a DataLoader
    worker starts, a ``__del__``, a weakref callback), the Terminated/KeyboardInterrupt is printed as "Exception
    ignored" and lost, and the command would run to completion. Re-sending the signal to this process raises it
    again at the next bytecode of the main flow.
    """
    exc = unraisable.exc_value
    if isinstance(exc, KeyboardInterrupt) and os.getpid() == _MAIN_PID:
        # from another thread, a moment later: sent from here, the handler would raise inside this hook again
        sig = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        timer = threading.Timer(0.01, os.kill, (os.getpid(), sig))
        timer.daemon = True
        timer.start()
        return
    _PREVIOUS_UNRAISABLEHOOK(unraisable)


_PREVIOUS_UNRAISABLEHOOK = sys.unraisablehook


def _after_signal(unraisable) -> None:
    """After a Ctrl-C or SIGTERM: objects the signal interrupted while they were being built (a DataLoader
    iterator whose ``__init__`` never finished) raise in ``__del__`` as the process ends. That is expected, not
    news for the user: it goes to the debug log, and the one-line error stays the last line on stderr."""
    log.debug("while stopping, ignored in %r: %s: %s", unraisable.object, type(unraisable.exc_value).__name__,
              unraisable.exc_value)


def guarded(func: Callable) -> Callable:
    """Run a command body with the project's exit-code and error-message conventions.

    Before the body: numeric options are checked (:func:`validate_options`), SIGTERM is routed like Ctrl-C
    (:class:`~partreid.common.errors.Terminated`; a signal whose exception Python had to swallow is delivered
    again, :func:`_on_unraisable`; one whose exception a library turned into another error still ends as that
    signal), and an exit stack is opened for the locks
    :func:`guard_files` takes. Afterwards every failure is one line on stderr: ``error: ...`` and exit 2 for bad
    input or usage, exit 130 on Ctrl-C, 143 on SIGTERM (state kept for ``--resume``), ``internal error: ...``
    and exit 1 otherwise.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        global _GUARD_STACK, _MAIN_PID, _PREVIOUS_UNRAISABLEHOOK, _SIGNAL_SEEN
        debug = kwargs.get("debug", False) or os.environ.get("PARTREID_DEBUG") == "1"
        setup_logging(kwargs.get("verbose", 0))
        ctx = click.get_current_context(silent=True)
        resumable = ctx is not None and any(p.name == "resume" for p in ctx.command.params)
        _MAIN_PID = os.getpid()
        _SIGNAL_SEEN = None
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
            previous_int = signal.signal(signal.SIGINT, _on_sigint)
        except ValueError:  # not the main thread
            previous = previous_int = None
        previous_hook = sys.unraisablehook
        if previous_hook is not _on_unraisable:
            _PREVIOUS_UNRAISABLEHOOK = previous_hook
        sys.unraisablehook = _on_unraisable
        stack = contextlib.ExitStack()
        outer, _GUARD_STACK = _GUARD_STACK, stack
        def stop_for_signal(sig: int):
            nonlocal previous_hook
            if not debug:  # objects the signal caught mid-construction fail in __del__ as they are freed
                previous_hook = _after_signal
            hint = "; partial results are kept: run it again with --resume" if resumable else ""
            if sig == signal.SIGTERM:
                click.echo(f"error: terminated (SIGTERM){hint}", err=True)
                sys.exit(EXIT_SIGTERM)
            click.echo(f"error: interrupted (SIGINT){hint}", err=True)
            sys.exit(EXIT_SIGINT)

        try:
            with stack:
                validate_options(kwargs, ctx)
                return func(*args, **kwargs)
        except InputError as exc:
            if _SIGNAL_SEEN is not None:  # the signal's exception, reworded on its way up
                stop_for_signal(_SIGNAL_SEEN)
            if debug:
                traceback.print_exc()
            click.echo(f"error: {one_line(exc)}", err=True)
            sys.exit(EXIT_INPUT)
        except (click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except click.ClickException as exc:  # e.g. BadParameter raised while parsing a value in the body
            click.echo(f"error: {_usage_text(exc)}", err=True)
            sys.exit(EXIT_INPUT)
        except KeyboardInterrupt as exc:
            stop_for_signal(signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
        except BrokenPipeError:
            sys.exit(EXIT_INTERNAL)
        except Exception as exc:  # internal error: exit 1
            if _SIGNAL_SEEN is not None:  # the signal's exception, reworded on its way up
                stop_for_signal(_SIGNAL_SEEN)
            if debug:
                traceback.print_exc()
            else:
                click.echo(f"internal error: {type(exc).__name__}: {exc} (re-run with --debug for the traceback)",
                           err=True)
            sys.exit(EXIT_INTERNAL)
        finally:
            _GUARD_STACK = outer
            sys.unraisablehook = previous_hook
            if previous is not None:
                with contextlib.suppress(ValueError):
                    signal.signal(signal.SIGTERM, previous)
                    signal.signal(signal.SIGINT, previous_int)

    return wrapper


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line.

    An InputError raised inside a DataLoader worker comes back wrapped ("Caught InputError in DataLoader worker
    process 0. Original Traceback ..."); the original one-line message is its last line.
    """
    text = str(exc).strip()
    if "\n" not in text:
        return text
    marker = f"{type(exc).__module__}.{type(exc).__name__}: "
    for line in reversed(text.splitlines()):
        if line.startswith(marker):
            return line[len(marker):]
    return text.splitlines()[0]


def not_implemented(name: str) -> None:
    """Exit 2 with a one-line message for a command that is not built yet."""
    click.echo(f"error: {name}: not implemented yet", err=True)
    sys.exit(EXIT_INPUT)
