"""Optimiser and learning-rate schedule recipes shared by the tasks (config values, not code changes)."""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam", "adamax")
SCHEDULES = ("constant", "linear", "step")


def build_optimizer(
    parameters, name: str, learning_rate: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``sgd`` (with momentum), ``adam`` or ``adamax``."""
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamax":
        return torch.optim.Adamax(parameters, lr=learning_rate, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r} is not known; use one of {OPTIMIZERS}.")


def build_schedule(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, step_size: int = 3, gamma: float = 0.8
) -> dict | None:
    """A Lightning ``lr_scheduler`` config.

    ``linear``: decays to 0 over ``total_steps`` optimiser steps (the paper's SGD recipe). ``step``: multiplies
    by ``gamma`` every ``step_size`` epochs (the common Adam recipe). ``constant``: None.
    """
    if name == "constant":
        return None
    if name == "linear":
        total = max(int(total_steps), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
        return {"scheduler": scheduler, "interval": "step"}
    if name == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
        return {"scheduler": scheduler, "interval": "epoch"}
    raise ValueError(f"lr_schedule {name!r} is not known; use one of {SCHEDULES}.")


def configure_from_hparams(module) -> object:
    """``configure_optimizers`` of every task: optimiser and schedule from the task's hyper-parameters
    (``optimizer``, ``learning_rate``, ``momentum``, ``weight_decay``, ``lr_schedule``, ``lr_step_size``,
    ``lr_gamma``)."""
    h = module.hparams
    optimizer = build_optimizer(module.parameters(), h.optimizer, h.learning_rate, h.momentum, h.weight_decay)
    schedule = build_schedule(
        optimizer, h.lr_schedule, module.trainer.estimated_stepping_batches, h.lr_step_size, h.lr_gamma
    )
    return optimizer if schedule is None else {"optimizer": optimizer, "lr_scheduler": schedule}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
