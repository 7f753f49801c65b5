"""The optimiser and learning-rate schedule of every task, declared once as :class:`OptimizerConfig`.

In a config::

    model:
      init_args:
        optimizer: {name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 5.0e-4, schedule: linear}

and on the command line ``--model.init_args.optimizer.lr 0.005``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from updown.config import Config, HalfOpenUnitInterval, NonNegativeFloat, PositiveFloat, PositiveInt

OptimizerName = Literal["sgd", "adam", "adamax", "adadelta"]
ScheduleName = Literal["constant", "linear", "step", "exponential"]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Config):
    """Optimiser and schedule.

    Args:
        name: ``sgd`` (with ``momentum``), ``adam``, ``adamax`` or ``adadelta``.
        lr: initial learning rate.
        momentum: SGD momentum (ignored by the others).
        weight_decay: L2 weight decay.
        schedule: ``constant``; ``linear`` (decays to 0 over ``total_steps`` optimiser steps, the paper's SGD
            recipe, Caffe's ``poly`` policy with power 1); ``step`` (multiplies by ``gamma`` every ``step_size``
            epochs, the common Adam recipe); ``exponential`` (multiplies by ``gamma`` after every optimiser step,
            Caffe's ``exp`` policy, the Up-Down SCST solver's).
        total_steps: steps of the ``linear`` decay; None: the whole training (Lightning's estimate).
        step_size: epochs between decays for ``step``.
        gamma: decay factor for ``step`` (per ``step_size`` epochs) and ``exponential`` (per optimiser step).
    """

    name: OptimizerName = "sgd"
    lr: PositiveFloat = 0.01
    momentum: HalfOpenUnitInterval = 0.9
    weight_decay: NonNegativeFloat = 0.0
    schedule: ScheduleName = "constant"
    total_steps: PositiveInt | None = None
    step_size: PositiveInt = 3
    gamma: PositiveFloat = 0.8

    def build(self, parameters, estimated_total_steps: int) -> torch.optim.Optimizer | dict:
        """What ``configure_optimizers`` returns: the optimiser, with its Lightning ``lr_scheduler`` config
        unless the schedule is constant. ``estimated_total_steps``: the trainer's optimiser-step estimate."""
        optimizer = build_optimizer(parameters, self)
        if self.schedule == "constant":
            return optimizer
        if self.schedule == "linear":
            total = max(int(self.total_steps or estimated_total_steps), 1)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: max(0.0, 1.0 - step / total)
            )
            schedule = {"scheduler": scheduler, "interval": "step"}
        elif self.schedule == "exponential":
            scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.gamma)
            schedule = {"scheduler": scheduler, "interval": "step"}
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.step_size, gamma=self.gamma)
            schedule = {"scheduler": scheduler, "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def build_optimizer(parameters, config: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimiser ``config.name`` over ``parameters``."""
    if config.name == "sgd":
        return torch.optim.SGD(
            parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    optimizers = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax, "adadelta": torch.optim.Adadelta}
    return optimizers[config.name](parameters, lr=config.lr, weight_decay=config.weight_decay)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
