"""The model life cycle the captioning and retrieval tasks share: built from the datamodule's vocabulary and
feature size when fitting, rebuilt from the checkpoint (which stores both) when loading, and refused when the
checkpoint and the data disagree on the vocabulary."""

from __future__ import annotations

from typing import Any

from updown.data.vocabulary import Vocabulary


def check_vocabulary(
    expected: Vocabulary, actual: Vocabulary, expected_source: str, actual_source: str
) -> None:
    """Refuse to combine a model and data whose vocabularies differ, naming both."""
    if expected.tokens == actual.tokens:
        return
    differing = next((i for i, (a, b) in enumerate(zip(expected.tokens, actual.tokens)) if a != b), None)
    where = (
        f"first difference at index {differing}: {expected.tokens[differing]!r} vs {actual.tokens[differing]!r}"
        if differing is not None
        else "one is a prefix of the other"
    )
    raise ValueError(
        f"Vocabulary mismatch: {expected_source} has {len(expected)} tokens, {actual_source} has {len(actual)} "
        f"({where}). Use the vocabulary.json the checkpoint was trained with, or retrain."
    )


def restored_checkpoint(task: Any) -> str:
    """``the checkpoint PATH`` while a Trainer restores one (``--ckpt_path``), else ``the checkpoint``."""
    path = task._trainer.ckpt_path if task._trainer is not None else None
    return f"the checkpoint {path}" if path else "the checkpoint"


class VocabularyModel:
    """Mixin for a LightningModule whose ``build_model(vocabulary, image_feature_size, grid_shape)`` creates
    ``self.model`` and sets ``self.vocabulary``, ``self.image_feature_size`` and ``self.grid_shape``.

    Subclasses name the datamodule they need: ``datamodule_marker`` (an attribute only that kind has) and
    ``datamodule_description`` (for the error), and may check it further in :meth:`check_datamodule`.
    """

    datamodule_marker = "vocabulary"
    datamodule_description = "a caption datamodule (e.g. updown.data.datamodules.CaptioningDataModule)"
    checkpoint_kind = "captioning"

    def check_datamodule(self, datamodule: Any) -> None:
        """Further checks on the set-up datamodule before the model is built (none by default)."""

    def configure_model(self) -> None:
        if self._trainer is None:
            return  # load_from_checkpoint outside a Trainer: on_load_checkpoint builds from the checkpoint
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, self.datamodule_marker):
            raise ValueError(
                f"{type(self).__name__} needs {self.datamodule_description}, got {type(datamodule).__name__}. "
                "Fix `data.class_path` in the config."
            )
        datamodule.setup("fit" if self.trainer.training else "validate")
        self.check_datamodule(datamodule)
        vocabulary, features = datamodule.vocabulary, datamodule.features
        if self.model is None:
            self.build_model(vocabulary, features.feature_size, features.grid_shape)
        else:
            check_vocabulary(self.vocabulary, vocabulary, "the checkpoint", str(datamodule.vocabulary_path))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vocabulary"] = self.vocabulary.tokens
        checkpoint["image_feature_size"] = self.image_feature_size
        checkpoint["grid_shape"] = self.grid_shape

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "vocabulary" not in checkpoint:
            raise ValueError(
                f"{restored_checkpoint(self)} holds no vocabulary: it was not written by a updown "
                f"{self.checkpoint_kind} task. Pass the checkpoint of a {self.checkpoint_kind} run."
            )
        vocabulary = Vocabulary(checkpoint["vocabulary"])
        if self.model is None:
            self.build_model(vocabulary, checkpoint["image_feature_size"], checkpoint.get("grid_shape"))
        else:
            data = getattr(getattr(self._trainer, "datamodule", None), "vocabulary_path", None)
            check_vocabulary(vocabulary, self.vocabulary, restored_checkpoint(self), f"the data ({data})")
