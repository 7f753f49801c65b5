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
    """The message of ``error`` without KeyError's quotes."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error)


def run_guarded(prog: str, function: Callable[[], int | None], debug: bool = False) -> int:
    """Run ``function``; on a user error print one line to stderr and return 2 (re-raise when ``debug``)."""
    try:
        return function() or 0
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{prog}: error: {error_message(error)}", file=sys.stderr)
        return 2
