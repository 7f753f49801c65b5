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


def available_devices() -> str:
    """The accelerators this machine has, for messages: ``cpu``, ``cuda (2 GPUs: cuda:0, cuda:1)``, ``mps``."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = ", ".join(f"cuda:{i}" for i in range(count))
        found.append(f"cuda, also called gpu ({count} GPU{'s' if count != 1 else ''}: {names})")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return ", ".join(found)


# Lines of a jsonargparse error that describe its structure, not the problem.
_STRUCTURE = (
    "Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
    "Given value:", "Expected a <class 'NoneType'>",
)  # fmt: skip


def _is_dataclass_path(class_path: str) -> bool:
    import dataclasses
    import pydoc

    try:
        return dataclasses.is_dataclass(pydoc.locate(class_path))
    except Exception:  # an unimportable class path: treat it as a class (init_args)
        return False


def _restricted_type(name: str):
    """The restricted number type a jsonargparse message names (``PositiveInt``), or None."""
    import jsonargparse.typing

    from updown import config

    kind = getattr(config, name, None) or getattr(jsonargparse.typing, name, None)
    return kind if config.restricted_number(kind) is not None else None


def _problem(leaf: str, value: str | None) -> str:
    """A jsonargparse leaf message (``Not of type PositiveInt: 0 does not conform to restriction v>0``) in words."""
    import re

    from updown.config import describe

    got = f", got {value}" if value is not None else ""
    match = re.match(r"Not of type (\w+): (.*)$", leaf)
    if match and _restricted_type(match.group(1)) is not None:
        return f"must be {describe(_restricted_type(match.group(1)))}{got}"
    match = re.match(r"Expected a <class '(\w+)'>", leaf)
    if match:
        what = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
        return f"must be {what.get(match.group(1), match.group(1))}{got}"
    match = re.match(r"Expected a typing\.Literal\[(.*)\](?:\. Got value: (.*))?$", leaf)
    if match:
        given = match.group(2) if match.group(2) is not None else value
        return f"must be one of {match.group(1)}" + (f", got {given!r}" if given is not None else "")
    match = re.match(r"Option '([^']+)' is not accepted", leaf)
    if match:
        return "is not an option"
    return leaf[0].lower() + leaf[1:] if leaf else "is not valid"


def parse_error_message(message: str, args: list[str]) -> str:
    """One line for a (multi-line, nested) jsonargparse error: the option as the user wrote it, the problem and
    the fix, e.g. ``--model.init_args.decoding.beam_size: must be an integer > 0, got 0. Fix the value ...``.

    Args:
        message: the parser's error message.
        args: the command line, to name an option the way it was given (or say it came from a config file).
    """
    import re

    if message.startswith("Problems parsing config"):
        configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config", "-c")]
        configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
        return (
            f"--config {' '.join(configs)}: not a valid YAML config ({' '.join(message.split(':', 1)[1].split())}). "
            "Fix the file."
        )
    path: list[tuple[int, str]] = []
    classes: list[tuple[int, str]] = []
    leaf, leaf_path, leaf_class, value = None, [], None, None
    for line in message.splitlines():
        text = line.strip()
        indent = len(line) - len(line.lstrip())
        if text.startswith("- "):
            text, indent = text[2:], indent + 2
        while path and path[-1][0] >= indent:
            path.pop()
        while classes and classes[-1][0] >= indent:
            classes.pop()
        key = re.fullmatch(r'Parser key "([^"]+)":', text)
        class_path = re.fullmatch(r"Problem with given class_path '([^']+)':", text)
        if key:
            path.append((indent, key.group(1)))
        elif class_path:
            path.append((indent, "" if _is_dataclass_path(class_path.group(1)) else "init_args"))
            classes.append((indent, class_path.group(1)))
        elif text.startswith("Given value:") and leaf is not None and value is None:
            given = text.split(":", 1)[1].strip()
            if not given.startswith(("NestedArg(", "{")):
                value = given
        elif leaf is None and text and not text.startswith(_STRUCTURE):
            leaf, leaf_path = text, [part for _, part in path if part]
            leaf_class = classes[-1][1] if classes else None
    if leaf is None:
        return " ".join(message.split())
    unknown = re.match(r"Option '([^']+)' is not accepted", leaf)
    if unknown:
        leaf_path = [*leaf_path, unknown.group(1)]
    if not leaf_path:
        return " ".join(message.split())
    option = ".".join(leaf_path)
    typed = [a for a in args if a.split("=", 1)[0] == f"--{option}"]
    if typed:
        where = f"--{option}"
        if value is None and "=" not in typed[-1]:
            position = len(args) - 1 - args[::-1].index(typed[-1])
            value = args[position + 1] if position + 1 < len(args) else None
        elif value is None:
            value = typed[-1].split("=", 1)[1]
    else:
        where = f"{option} (from --config)"
    value_match = re.match(r"Not of type \w+: (\S+) does not conform", leaf)
    if value is None and value_match:
        value = value_match.group(1)
    if unknown and leaf_class in (
        "pytorch_lightning.LightningModule",
        "pytorch_lightning.LightningDataModule",
    ):
        # init_args without a class_path: the configs never said which task or datamodule to build.
        key = leaf_path[0]
        return (
            f"{where}: {key}.init_args are given but no {key}.class_path. Name the class, e.g. --config "
            "configs/captioning/updown_xe.yaml first, or --"
            + key
            + ".class_path "
            + (
                "updown.tasks.captioning.CaptioningTask."
                if key == "model"
                else "updown.data.datamodules.CaptioningDataModule."
            )
        )
    fix = (
        f"Remove it or check its spelling (--help lists the options; --{leaf_path[0]}.help "
        f"{leaf_class or 'CLASS'} those of the class)."
        if unknown
        else "Fix the value."
    )
    return f"{where}: {_problem(leaf, value)}. {fix}"
