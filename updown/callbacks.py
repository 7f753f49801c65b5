"""Callbacks: the end-of-run metrics report (rich table + ``metrics.json`` in the run directory), and the
checkpointing that makes ``--ckpt_path last`` resume exactly, mid-epoch included (``last.ckpt`` every N steps,
per-step seeds).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from rich.console import Console
from rich.table import Table

from updown.checkpointing import run_seed
from updown.config import PositiveInt, check_arguments
from updown.io import write_json


def run_directory(trainer: pl.Trainer) -> Path:
    """Where a run keeps ``config.yaml``, ``metrics.json`` and ``checkpoints/`` (the logger's version folder)."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class MetricsReport(pl.Callback):
    """After fitting, print the final validation metrics and write them to ``<run>/metrics.json``.

    ``metrics.json`` holds every ``val/*`` value of the last validation, the best monitored value and its
    checkpoint, and anything a task adds in ``extra_metrics`` (e.g. SCST's starting CIDEr).
    """

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # The last validation's values as the task logged them; Lightning's callback_metrics would also keep
        # keys that only an earlier validation logged.
        last = getattr(pl_module, "last_validation_metrics", None)
        if last is None:
            last = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        metrics = dict(sorted(last.items()))
        metrics.update(getattr(pl_module, "extra_metrics", {}))
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_score is not None:
            metrics[f"best/{checkpoint.monitor}"] = float(checkpoint.best_model_score)
            metrics["best_checkpoint"] = str(checkpoint.best_model_path)
        metrics["epochs"] = trainer.current_epoch
        metrics["global_step"] = trainer.global_step
        path = run_directory(trainer) / "metrics.json"
        write_json(path, metrics, indent=2)
        print_metrics("Final metrics", metrics, path)


def print_metrics(title: str, metrics: dict[str, Any], path: Path) -> None:
    """A rich table of ``metrics`` (floats to 4 decimals), then where they were written."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    console.print(f"Written to {path}")


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose best score survives a resume into a new ``version_N`` folder.

    Lightning drops the restored best score when the checkpoint folder changed, so a resumed run would report
    (and keep) the best of its own validations only. The earlier best files stay where they are: Lightning
    deletes superseded checkpoints only inside the current folder.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({**state_dict, "dirpath": self.dirpath})


class LastCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt``, what ``--ckpt_path last`` resumes: rewritten after every validation (or at the
    end of every epoch without one) and, with ``every_n_train_steps``, every that many optimizer steps.

    ``python -m updown.fit`` configures it as ``--last_checkpoint.every_n_train_steps N`` (or ``last_checkpoint:``
    in a config). A run killed mid-epoch resumes from the newest of these checkpoints and ends with the metrics
    of an uninterrupted run (same seed): the datamodules' training order and :class:`StepSeeding` make the
    remaining batches and their random draws the same.

    Args:
        every_n_train_steps: also write ``last.ckpt`` every this many optimizer steps (None: only after
            validation). Each write costs about one ``torch.save`` of the model and optimizer state.
    """

    def __init__(self, every_n_train_steps: PositiveInt | None = None) -> None:
        arguments = check_arguments(
            LastCheckpoint, {"every_n_train_steps": every_n_train_steps}, "last_checkpoint"
        )
        every_n_train_steps = arguments["every_n_train_steps"]
        super().__init__(monitor=None, save_top_k=1, filename="last", every_n_train_steps=every_n_train_steps)
        # Lightning stops saving after validation once a step interval is set; keep those saves so last.ckpt is
        # always the newest state (the end of training included).
        self._every_n_epochs = 1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        # A checkpoint taken just before a validation resumes after it: Lightning skips the validation of a
        # restored batch, so the resumed run would miss its metrics. on_validation_end saves this step instead.
        if self._every_n_train_steps and validation_follows(trainer):
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)


def validation_follows(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates right after the current training batch."""
    epoch_loop = trainer.fit_loop.epoch_loop
    try:
        return bool(epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):  # a later Lightning: validation at least follows the last batch
        return bool(trainer.enable_validation and epoch_loop.batch_progress.is_last_batch)


class StepSeeding(pl.Callback):
    """Reseed torch, numpy and ``random`` before every training batch from ``(seed, epoch, batch, rank)``.

    The random draws of a batch (dropout, scheduled sampling, SCST samples) then depend on its position only,
    not on what ran before it in this process, so a run resumed from any checkpoint draws exactly what the
    uninterrupted run drew. (Saving the generators' states instead would have to restore them at the very point
    they were saved, which Lightning's restart, prefetching and DataLoader workers make fragile.) The seed is
    ``seed_everything``'s and is stored in checkpoints; DDP ranks draw differently (the rank is mixed in).
    """

    def __init__(self) -> None:
        self.seed: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.seed is None:
            self.seed = run_seed()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        entropy = [self.seed or 0, trainer.current_epoch, batch_idx, trainer.global_rank]
        # shape: (2,) two 32-bit words -> one 64-bit torch seed; numpy and random take the first word
        words = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
        torch.manual_seed(int(words[0]) << 32 | int(words[1]))
        np.random.seed(int(words[0]))
        random.seed(int(words[0]))


def checkpoint_callbacks(
    monitor: str, trainer: pl.Trainer | None = None, mode: str = "max"
) -> list[pl.Callback]:
    """The best checkpoint by ``monitor`` (first, so ``trainer.checkpoint_callback`` reports it), ``last.ckpt``
    rewritten after every validation, for ``--ckpt_path last``, and :class:`StepSeeding` for exact resumes.

    ``ModelCheckpoint(save_last=True)`` alone rewrites ``last.ckpt`` only when the best improves (Lightning 2.6),
    so resuming would silently restart from the best epoch. A :class:`LastCheckpoint` already among the
    ``trainer``'s callbacks (``updown.fit``'s ``--last_checkpoint.*``) is returned instead of a default one, which
    moves it after the best checkpoint (Lightning replaces a trainer callback with a model callback of its type).
    """
    configured = (
        [c for c in trainer.callbacks if isinstance(c, LastCheckpoint)] if trainer is not None else []
    )
    return [
        BestCheckpoint(monitor=monitor, mode=mode, filename="best-{epoch}-{step}"),
        configured[0] if configured else LastCheckpoint(),
        StepSeeding(),
    ]
