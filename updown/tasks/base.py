"""The base task: the wiring every task shares, written once.

A task subclass says what is specific to it and nothing else:

- ``datamodule_class``: the datamodule it reads (checked once, with a clear error for another one);
- ``monitor``: the validation metric its best checkpoint is chosen by;
- :meth:`Task.build_model`: the model(s) built from a :class:`~updown.data.base.DataSpec`;
- ``training_step``, ``validation_step`` / ``on_validation_epoch_end`` and ``predict_step``: its steps and scores.

The base class builds the model when the data is known (``configure_model``: from the datamodule's spec when
fitting, from the checkpoint's when resuming or loading), stores the spec in every checkpoint, refuses a
checkpoint whose vocabularies differ from the data's, builds the optimiser from :class:`OptimizerConfig`,
adds the checkpoint callbacks, and scores gathered outputs once on rank 0 (:meth:`Task.score_on_rank_zero`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytorch_lightning as pl

from updown.callbacks import checkpoint_callbacks
from updown.config import check_arguments
from updown.data.base import DataSpec, RegionDataModule
from updown.tasks.distributed import gather_outputs, log_rank_identical
from updown.tasks.optim import OptimizerConfig

DEFAULT_OPTIMIZER = OptimizerConfig()


class Task(pl.LightningModule):
    """Base LightningModule of every task (see the module docstring).

    Args:
        optimizer: the optimiser and learning-rate schedule (:class:`~updown.tasks.optim.OptimizerConfig`).
    """

    #: The datamodule class this task reads; ``configure_model`` refuses any other.
    datamodule_class: ClassVar[type[RegionDataModule]] = RegionDataModule
    #: How errors name the datamodule the task needs (None: the class's dotted path).
    datamodule_description: ClassVar[str | None] = None
    #: The vocabularies (``DataSpec.vocabularies`` keys) the task's checkpoints must hold.
    vocabulary_names: ClassVar[tuple[str, ...]] = ()
    #: The task's name in errors about checkpoints of another task (None: the class name).
    checkpoint_kind: ClassVar[str | None] = None
    #: The validation metric that chooses the best checkpoint, and whether higher ("max") or lower is better.
    monitor: ClassVar[str] = "val/loss"
    monitor_mode: ClassVar[str] = "min"

    def __init__(self, optimizer: OptimizerConfig = DEFAULT_OPTIMIZER) -> None:
        super().__init__()
        # Every subclass's arguments too (Lightning collects the whole __init__ chain): checkpoints store them,
        # so load_from_checkpoint rebuilds the task with its configs.
        self.save_hyperparameters()
        # Every argument's range and choices, as declared by its annotation (PositiveInt, Literal, ...): what
        # LightningCLI checks at parse time, checked here for tasks built from Python (and stored plain).
        self.hparams.update(check_arguments(type(self), dict(self.hparams), "model.init_args"))
        self.optimizer_config = OptimizerConfig.coerce(optimizer)
        self.data_spec: DataSpec | None = None
        # The val/* values of the last validation, reported by MetricsReport (see log_rank_identical).
        self.last_validation_metrics: dict[str, float] | None = None
        # Samples the last validation scored (at least on rank 0), distributed repeats removed.
        self.validation_num_samples: int | None = None

    # ------------------------------------------------------------------------------------- what tasks add
    def build_model(self, spec: DataSpec) -> None:
        """Create ``self.model`` (and any other module) for data described by ``spec``."""
        raise NotImplementedError

    def initialize_from_data(self) -> None:
        """Initialisation that reads data files (e.g. GloVe vectors); skipped when a checkpoint's weights
        replace the model's anyway."""

    def check_datamodule(self, datamodule: RegionDataModule) -> None:
        """Further checks of the set-up datamodule, before training starts (none by default)."""

    # -------------------------------------------------------------------------------- model life cycle
    @property
    def datamodule(self) -> RegionDataModule:
        """The trainer's datamodule (checked by ``configure_model``)."""
        return self.trainer.datamodule

    def configure_model(self) -> None:
        if self._trainer is None:
            return  # load_from_checkpoint outside a Trainer: on_load_checkpoint builds from the checkpoint
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, self.datamodule_class):
            cls = self.datamodule_class
            needed = self.datamodule_description or f"a {cls.__module__}.{cls.__qualname__}"
            raise ValueError(
                f"{type(self).__name__} needs {needed}, got {type(datamodule).__name__}. "
                "Fix `data.class_path` in the config."
            )
        datamodule.setup(self.trainer.state.fn.value)
        spec = datamodule.data_spec()
        if self.data_spec is None:
            self.setup_model(spec)
            self.initialize_from_data()
        else:
            self.data_spec.check_matches(spec)
        self.check_datamodule(datamodule)

    def setup_model(self, spec: DataSpec) -> None:
        """Build the model for data described by ``spec`` and remember the spec (stored in checkpoints); what
        ``configure_model`` does with the datamodule's spec, usable without a Trainer (tests, notebooks)."""
        self.data_spec = spec
        self.build_model(spec)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["data_spec"] = self.data_spec.to_checkpoint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        source = self.restored_checkpoint()
        spec = DataSpec.from_checkpoint(checkpoint, source)
        if spec is None or not set(self.vocabulary_names) <= set(spec.vocabularies):
            kind = self.checkpoint_kind or type(self).__name__
            held = " and ".join(self.vocabulary_names) or "data"
            raise ValueError(
                f"{source} holds no {held} description: it was not written by a {kind} task. "
                f"Pass the checkpoint of a {kind} run."
            )
        if self.data_spec is None:
            self.setup_model(spec)
        else:
            # Resuming onto a model built from the data: the checkpoint must use the data's vocabularies.
            spec.check_matches(self.data_spec)

    def restored_checkpoint(self) -> str:
        """``the checkpoint PATH`` while a Trainer restores one (``--ckpt_path``), else ``the checkpoint``."""
        path = self._trainer.ckpt_path if self._trainer is not None else None
        return f"the checkpoint {path}" if path else "the checkpoint"

    # --------------------------------------------------------------------------- optimiser, callbacks
    def configure_optimizers(self):
        return self.optimizer_config.build(self.parameters(), self.trainer.estimated_stepping_batches)

    def configure_callbacks(self):
        return checkpoint_callbacks(self.monitor, self._trainer, self.monitor_mode)

    # ------------------------------------------------------------------------------------------ scoring
    def score_on_rank_zero(
        self, outputs: list[dict], score: Callable[[list[dict]], dict[str, float]]
    ) -> dict[str, float]:
        """Gather every rank's per-sample ``outputs``, ``score`` them once on global rank 0 (pycocoevalcap runs
        Java once), and broadcast the scores, so every rank logs the numbers of a single process."""
        gathered = gather_outputs(outputs)
        scores = score(gathered) if self.trainer.is_global_zero else {}
        return self.trainer.strategy.broadcast(scores, src=0)

    def log_scores(self, prefix: str, scores: dict[str, Any]) -> None:
        """Log ``scores`` as ``prefix/key``; they are identical on every rank already (no averaging)."""
        log_rank_identical(self, {f"{prefix}/{key}": value for key, value in scores.items()})
