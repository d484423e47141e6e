"""Conventions shared by every command.

- A command writes its output file and prints that file's path, and only that, on stdout. Logs and progress
  bars go to stderr.
- When the input-file argument is omitted or is ``-``, the path is read from stdin, so
  ``extract-features ... | cluster --out l.h5 | refine-labels --out r.h5`` works in a shell.
- Exit codes: 0 success; 2 bad usage or bad input (one line on stderr, no traceback unless ``--debug``);
  1 internal error.
- Common options: ``--device auto|cpu|cuda``, ``--seed``, ``-v/--verbose``, ``--debug``, ``--version``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from typing import Callable, Optional

import click

from partreid.common import __version__
from partreid.common.errors import InputError

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2
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


def common_options(func: Callable) -> Callable:
    """Add ``--device``, ``--seed``, ``-v/--verbose``, ``--debug`` and ``--version`` to a click command."""
    func = click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")(func)
    func = click.option("-v", "--verbose", count=True, help="More log output (DEBUG level).")(func)
    func = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")(func)
    func = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        show_default=True, help="Where to run: CUDA when available, else CPU.")(func)
    func = click.version_option(__version__, "--version", prog_name="partreid")(func)
    return func


def guarded(func: Callable) -> Callable:
    """Run a command body with the project's exit-code and error-message conventions."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False) or os.environ.get("PARTREID_DEBUG") == "1"
        setup_logging(kwargs.get("verbose", 0))
        try:
            return func(*args, **kwargs)
        except InputError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {one_line(exc)}", err=True)
            sys.exit(EXIT_INPUT)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(EXIT_INTERNAL)
        except Exception as exc:  # internal error: exit 1
            if debug:
                traceback.print_exc()
            else:
                click.echo(f"internal error: {type(exc).__name__}: {exc} (re-run with --debug for the traceback)",
                           err=True)
            sys.exit(EXIT_INTERNAL)

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
