"""What every command-line entry point shares: turning a user's mistake into one clear message.

A user error (a bad path, a malformed file, an unknown id) is reported as ``PROG: error: MESSAGE`` on stderr
with exit code 2 and no traceback; ``--debug`` shows the traceback instead. Errors we did not anticipate are
bugs and keep their traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

# The exceptions our readers and validators raise for bad input; each carries a message naming the file,
# the problem and the fix.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, PermissionError, IsADirectoryError)


def error_message(error: BaseException) -> str:
    """The message of ``error`` without KeyError's quotes, or a DataLoader worker's traceback."""
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    if "\nOriginal Traceback" in message:
        # torch re-raises a worker's error with the worker's traceback in the message; its last line is
        # "ValueError: <our message>".
        last = message.rstrip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return message


def run_guarded(prog: str, function: Callable[[], int | None], debug: bool = False) -> int:
    """Run ``function``; on a user error print one line to stderr and return 2 (re-raise when ``debug``)."""
    try:
        return function() or 0
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{prog}: error: {error_message(error)}", file=sys.stderr)
        return 2
