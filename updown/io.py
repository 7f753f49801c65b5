"""File output that never leaves partial files, and JSON input with clear errors.

Every tool and entry point writes through :func:`atomic_output`: the data goes to a temporary file in
the destination's folder and is renamed over the destination only when writing succeeded, so a crash or
a bad input never leaves a half-written file that a later run would trust. A command that writes several
files writes them through :func:`atomic_outputs`, all or nothing: into a staging folder (or temporary files)
next to the targets, moved into place only when every file is complete, so a failure leaves the previous
outputs as they were and no new ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
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
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_outputs(
    target: str | os.PathLike | Sequence[str | os.PathLike | None], force: bool = True
) -> Iterator[Path | list[Path | None]]:
    """Write several outputs all or nothing.

    ``target`` a folder: yield an empty staging folder next to it; when the block succeeds, every file written
    into it is moved to the same relative path under ``target`` (the staging folder is renamed to ``target`` when
    ``target`` does not exist yet). ``target`` a list of file paths (None: not asked for): yield their temporary
    paths (None kept), each next to its file, renamed over them when the block succeeds. On any error nothing
    is moved, the staging files are removed, and so are the folders created for them: the previous outputs stay
    as they were and no new one appears.

    Args:
        target: the output folder, or the output files.
        force: when False, refuse to replace an existing file (checked before anything is moved; for files,
            before the block runs).

    Raises:
        FileExistsError: an output exists and ``force`` is False, or the folder ``target`` is a file.
    """
    if isinstance(target, (list, tuple)):
        with contextlib.ExitStack() as stack:
            # Every check before the first temporary file; the renames happen together when the stack closes.
            for path in target:
                if path is not None and Path(path).exists() and not force:
                    raise FileExistsError(
                        f"{path}: output file exists. Pass --force to overwrite it, or choose another path."
                    )
            yield [None if p is None else stack.enter_context(atomic_output(p, force)) for p in target]
        return
    folder = Path(target)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder. Choose another output folder.")
    created = []
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        files = sorted(path for path in staging.rglob("*") if not path.is_dir())
        moves = [(path, folder / path.relative_to(staging)) for path in files]
        folders = [str(destination) for _, destination in moves if destination.is_dir()]
        if folders:
            raise IsADirectoryError(
                f"{', '.join(folders)}: is a folder where an output file goes. Remove it."
            )
        existing = [str(destination) for _, destination in moves if destination.exists()]
        if existing and not force:
            raise FileExistsError(
                f"{', '.join(existing)}: output file(s) exist. Pass --force to overwrite them, or choose another "
                "output folder."
            )
        if not folder.exists():
            os.rename(staging, folder)
        else:
            for path, destination in moves:
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for path in created:
            try:
                path.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(staging, ignore_errors=True)


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
