"""Exceptions shared by every stage.

The CLI maps :class:`InputError` (bad usage or bad input) to exit code 2 with a one-line message,
and any other exception to exit code 1.
"""


class InputError(ValueError):
    """Bad input or bad usage: a missing file, a file of the wrong format, mismatched shapes, NaN features...

    The message is one line and names the file and the problem; the CLI prints it as ``error: <message>``
    and exits with code 2.
    """
