"""Exceptions shared by every stage.

The CLI maps :class:`InputError` (bad usage or bad input) to exit code 2 with a one-line message,
and any other exception to exit code 1.
"""


class InputError(ValueError):
    """Bad input or bad usage: a missing file, a file of the wrong format, mismatched shapes, NaN features...

    The message is one line and names the file and the problem; the CLI prints it as ``error: <message>``
    and exits with code 2.
    """


class OutputBusyError(InputError, OSError):
    """Another process is writing the same output file right now (its lock is held).

    An :class:`InputError` (exit 2, one line) for the CLI, and an :class:`OSError` for callers that treat a
    failed write of an optional file (a cache) as a warning.
    """


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM; raised by the CLI's signal handler so that SIGTERM unwinds exactly like
    Ctrl-C (SIGINT): ``finally`` blocks run, partial files are removed or kept for ``--resume``, DataLoader
    workers are shut down."""
