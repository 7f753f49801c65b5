"""What every task needs to evaluate exactly under DDP: gather per-sample outputs from all ranks, and log
numbers that are already the same on every rank without averaging them again."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist


def gather_outputs(outputs: list[dict]) -> list[dict]:
    """All ranks' outputs on every rank (a no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return outputs
    gathered: list[list[dict]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, outputs)
    return [item for rank_outputs in gathered for item in rank_outputs]


def log_rank_identical(module: pl.LightningModule, values: dict[str, Any]) -> None:
    """``module.log`` values that are already the same on every rank (gathered, then scored once).

    ``sync_dist=True`` would average them across ranks, which is pointless and, with 3 ranks, not even exact
    in floating point. Lightning advises it for every epoch-level value under DDP, when it reads the values
    back after the epoch; that advice is silenced for exactly these keys.

    The ``val/*`` values of the latest call are also kept as ``module.last_validation_metrics``, which
    :class:`~updown.callbacks.MetricsReport` reports: ``trainer.callback_metrics`` still holds a key that only
    an earlier validation logged (e.g. ``val/grounding`` of an epoch whose captions named an object).
    """
    for key, value in values.items():
        warnings.filterwarnings(
            "ignore", message=re.escape(f"It is recommended to use `self.log({key!r}, ..., sync_dist=True)`")
        )
        module.log(key, value, sync_dist=False)
    validation = {key: float(value) for key, value in values.items() if key.startswith("val/")}
    if validation:
        module.last_validation_metrics = validation
