"""File output that never leaves partial files, and JSON input with clear errors.

Every tool and entry point writes through :func:`atomic_output`: the data goes to a temporary file in
the destination's folder and is renamed over the destination only when writing succeeded, so a crash or
a bad input never leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds.

    Args:
        path: final destination.
        force: when False, refuse to replace an existing ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``force`` is False.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(
            f"{path}: output file exists. Pass --force to overwrite it, or choose another path."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    # mkstemp creates the file 0600; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any, force: bool = True, indent: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_output(path, force=force) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file, turning a missing, empty or malformed file into one clear error.

    Args:
        path: the file.
        what: what the file is meant to be, for the message (e.g. "captions JSON").

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty or not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found. Check the path.")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: {what} is empty. Regenerate it or point to the right file.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: {what} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}). "
            "Regenerate it or point to the right file."
        ) from None


def check_output_paths(outputs: dict[str, str | os.PathLike | None], force: bool) -> None:
    """Refuse output paths before the long work that fills them: folders, and existing files unless ``force``.

    Args:
        outputs: command-line flag -> the path it names (None: not asked for), e.g. ``{"--output": "r.json"}``.
        force: overwrite existing files (``--force``).

    Raises:
        IsADirectoryError: a path is a folder.
        FileExistsError: a file exists and ``force`` is False.
    """
    for flag, path in outputs.items():
        if path is None:
            continue
        if Path(path).is_dir():
            raise IsADirectoryError(f"{flag} {path}: is a folder. Give a file path.")
        if Path(path).exists() and not force:
            raise FileExistsError(
                f"{flag} {path}: output file exists. Pass --force to overwrite it, or choose another path."
            )
