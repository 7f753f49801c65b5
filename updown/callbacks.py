"""Callbacks: the end-of-run metrics report (rich table + ``metrics.json`` in the run directory)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from rich.console import Console
from rich.table import Table

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
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
        metrics.update(getattr(pl_module, "extra_metrics", {}))
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_score is not None:
            metrics[f"best/{checkpoint.monitor}"] = float(checkpoint.best_model_score)
            metrics["best_checkpoint"] = str(checkpoint.best_model_path)
        metrics["epochs"] = trainer.current_epoch
        metrics["global_step"] = trainer.global_step
        path = run_directory(trainer) / "metrics.json"
        write_json(path, metrics, indent=2)
        table = Table(title="Final metrics")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in metrics.items():
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        console = Console()
        console.print(table)
        console.print(f"Written to {path}")


def checkpoint_callbacks(monitor: str) -> list[ModelCheckpoint]:
    """The best checkpoint by ``monitor`` (first, so ``trainer.checkpoint_callback`` reports it) and ``last.ckpt``
    rewritten after every validation, for ``--ckpt_path last``.

    ``ModelCheckpoint(save_last=True)`` alone rewrites ``last.ckpt`` only when the best improves (Lightning 2.6),
    so resuming would silently restart from the best epoch.
    """
    return [
        ModelCheckpoint(monitor=monitor, mode="max", filename="best-{epoch}-{step}"),
        ModelCheckpoint(monitor=None, save_top_k=1, filename="last"),
    ]
