"""Crash-safe checkpoint files and the run seed that resumable training derives its randomness from.

A checkpoint is written to a hidden temporary file in its own folder (``.last.ckpt.<pid>.partial``), flushed
and fsynced, then renamed over the target with ``os.replace``, which is atomic on POSIX and Windows within
one filesystem. A process killed mid-write (SIGKILL, OOM killer, preemption) therefore leaves the previous
checkpoint intact and at most a ``*.partial`` file, which nothing reads: ``--ckpt_path last`` matches only
``last*.ckpt``. Lightning's own ``TorchCheckpointIO`` stages the file in the system temporary folder and moves
it without fsync, which is a copy, not a rename, when that folder is on another filesystem.
"""

from __future__ import annotations

import os
import random
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import CheckpointIO, TorchCheckpointIO

PARTIAL_SUFFIX = ".partial"


def run_seed() -> int:
    """The seed of this run: ``seed_everything``'s (``PL_GLOBAL_SEED``), otherwise a fresh random one.

    Components that draw from it (the training order, the per-step seeds) store the value in checkpoints, so a
    resumed run continues with the seed it started with.
    """
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None else random.SystemRandom().randrange(2**32)


def partial_path(path: Path) -> Path:
    """The temporary file ``path`` is written to before the rename: hidden, in the same folder (same filesystem)."""
    return path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves ``path`` half-written: temporary file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(path)
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            # The data must be on disk before the rename is: otherwise a power loss can leave an empty target.
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    # Makes the rename itself durable; not possible on Windows, where opening a folder fails.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _archive_problem(path: Path) -> str | None:
    """Why the zip archive of a checkpoint is damaged (truncated, a flipped byte: CRC mismatch), or None.

    ``torch.save`` writes a zip archive whose records carry CRC-32 checksums, but ``torch.load`` does not verify
    them: a checkpoint with a flipped byte in its weights loads silently and predicts something else. Reading every
    record through :mod:`zipfile` checks them (about as fast as reading the file). Files in the legacy, non-zip
    format have no checksum; they are left to ``torch.load``.
    """
    with open(path, "rb") as file:
        if file.read(4) != b"PK\x03\x04":
            return None
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        ValueError,
        NotImplementedError,
    ) as error:
        return f"damaged archive: {error}"
    return None if damaged is None else f"checksum mismatch in record {damaged}"


def load_checkpoint(
    path: str | os.PathLike,
    what: str = "checkpoint",
    required: Sequence[str] = ("state_dict",),
    task_class: type | None = None,
    fix: str = "Use a .ckpt written by python -m updown.fit.",
) -> dict[str, Any]:
    """Read a checkpoint file, turning every way it can be unreadable into one clear error naming it.

    The one reader of checkpoints for every entry point: ``updown.fit`` / ``updown.validate`` ``--ckpt_path``
    (through :class:`AtomicCheckpointIO`), ``updown.predict --checkpoint`` and SCST's ``init_weights``.

    Args:
        path: the checkpoint file.
        what: how the user named it, for the message (``--ckpt_path``, ``model.init_args.init_weights``).
        required: top-level keys the caller needs.
        task_class: when given, a :class:`~updown.tasks.base.Task` subclass whose vocabularies the checkpoint
            must describe (a checkpoint of another task is refused).
        fix: what to do about a checkpoint of another task.

    Raises:
        FileNotFoundError: no such file.
        ValueError: truncated or corrupted (a checksum mismatch), not a checkpoint at all, missing ``required``
            keys, or (with ``task_class``) written by another task.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: checkpoint not found. Check the path.")
    problem = _archive_problem(path)
    if problem is None:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # torch raises many types for a truncated or foreign file
            lines = str(error).strip().splitlines() or [type(error).__name__]
            problem = f"{type(error).__name__}: {lines[0]}"
    if problem is not None:
        raise ValueError(
            f"{what} {path}: not a readable PyTorch checkpoint ({problem}); it is truncated, corrupted or not a "
            "checkpoint at all. Copy it again, or use another .ckpt written by python -m updown.fit."
        )
    missing = [key for key in required if key not in checkpoint] if isinstance(checkpoint, dict) else required
    if not isinstance(checkpoint, dict) or missing:
        held = (
            f"a {type(checkpoint).__name__}"
            if not isinstance(checkpoint, dict)
            else f"no {', '.join(missing)}"
        )
        raise ValueError(f"{what} {path}: not a Lightning checkpoint ({held}). {fix}")
    if task_class is not None:
        check_checkpoint_kind(checkpoint, f"{what} {path}", task_class, fix)
    return checkpoint


def check_checkpoint_kind(checkpoint: dict[str, Any], name: str, task_class: type, fix: str) -> None:
    """Refuse a checkpoint of another task: one that stores none of ``task_class``'s vocabularies."""
    from updown.data.base import DataSpec

    try:
        spec = DataSpec.from_checkpoint(checkpoint, name)
    except (KeyError, TypeError, ValueError, AttributeError):
        spec = None
    vocabularies = getattr(spec, "vocabularies", None)
    if not isinstance(vocabularies, dict) or not set(task_class.vocabulary_names) <= set(vocabularies):
        names = " and ".join(task_class.vocabulary_names)
        raise ValueError(
            f"{name}: not a {task_class.checkpoint_kind} checkpoint (no {names} vocabulary stored). {fix}"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with crash-safe writes on local filesystems (remote URLs unchanged).

    ``python -m updown.fit`` installs it unless ``trainer.plugins`` names another ``CheckpointIO``; elsewhere
    pass ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        # --ckpt_path of updown.fit and updown.validate: a truncated or foreign file is one clear error.
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint(path, "--ckpt_path", required=("state_dict", "pytorch-lightning_version"))


def with_atomic_checkpoint_io(plugins: Any) -> list:
    """``trainer.plugins`` with an :class:`AtomicCheckpointIO` added unless one ``CheckpointIO`` is given already."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        return plugins
    return [*plugins, AtomicCheckpointIO()]
