"""Opt-in ``torch.compile`` of a task's per-step recurrence, as a Lightning callback.

Add it on the command line (or under ``trainer.callbacks`` in a config)::

    python -m updown.fit --config configs/captioning/updown_xe_adam.yaml \\
        --trainer.callbacks+=updown.tasks.compile.CompileSteps

It calls the model's ``compile_steps()`` (e.g. :meth:`updown.models.captioner.UpDownCaptioner.compile_steps`)
when fitting, validating, testing or predicting starts, once per model. Compiling happens in place, so parameter
names and checkpoints do not change, and the first steps wait for the compiler (about a minute on a GPU machine,
several on a small CPU). docs/benchmarks.md gives its measured effect.
"""

from __future__ import annotations

import pytorch_lightning as pl


class CompileSteps(pl.Callback):
    """Compile ``pl_module.model``'s steps with ``torch.compile`` before the first batch.

    Args:
        dynamic: compile once for every batch size (packed training shrinks the batch step by step; False
            recompiles for each new size).
        mode: ``torch.compile``'s mode (None, ``"reduce-overhead"``, ``"max-autotune"``, ...).
    """

    def __init__(self, dynamic: bool = True, mode: str | None = None) -> None:
        self.dynamic = dynamic
        self.mode = mode
        self._compiled: set[int] = set()

    def _compile(self, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if id(model) in self._compiled:
            return
        compile_steps = getattr(model, "compile_steps", None)
        if compile_steps is None:
            raise ValueError(
                f"CompileSteps: {type(pl_module).__name__}'s model ({type(model).__name__}) has no compile_steps(); "
                "remove updown.tasks.compile.CompileSteps from trainer.callbacks for this task."
            )
        compile_steps(dynamic=self.dynamic, mode=self.mode)
        self._compiled.add(id(model))

    # The model exists from configure_model on, which runs after the callbacks' setup.
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._compile(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._compile(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._compile(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._compile(pl_module)
