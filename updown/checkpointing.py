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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with crash-safe writes on local filesystems (remote URLs unchanged).

    ``python -m updown.fit`` installs it unless ``trainer.plugins`` names another ``CheckpointIO``; elsewhere
    pass ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def with_atomic_checkpoint_io(plugins: Any) -> list:
    """``trainer.plugins`` with an :class:`AtomicCheckpointIO` added unless one ``CheckpointIO`` is given already."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        return plugins
    return [*plugins, AtomicCheckpointIO()]
