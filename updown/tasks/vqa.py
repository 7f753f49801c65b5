"""VQATask: the bottom-up / top-down VQA model trained with soft-score BCE and scored by the official metric.

Validation answers each question with the argmax over the answer vocabulary and scores that string against
the 10 raw human answers exactly as the official GT-Vision-Lab evaluation does
(:class:`~updown.metrics.vqa_accuracy.VQAAccuracy`), overall and per answer type, in percent. With
``question_only_baseline`` a question-only :class:`~updown.models.vqa.UpDownVQA` (separate parameters, its
own loss and its own gradient clipping) trains on the same batches, so every run reports how much the image
adds over the language prior (``val/question_only_accuracy``).

As in :class:`~updown.tasks.captioning.CaptioningTask`, the model is built when the data is known
(``configure_model``); both vocabularies are stored in every checkpoint, so a checkpoint rebuilds its model
on its own, and a checkpoint trained with other vocabularies is refused with both named.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from updown.callbacks import checkpoint_callbacks
from updown.data.vocabulary import AnswerVocabulary, Vocabulary
from updown.losses import soft_score_bce
from updown.metrics.distributed import MeanPerSample
from updown.metrics.vqa_accuracy import VQAAccuracy
from updown.models.vqa import UpDownVQA
from updown.tasks.distributed import log_rank_identical
from updown.tasks.optim import configure_from_hparams
from updown.tasks.vocabulary_model import check_vocabulary, restored_checkpoint


class VQATask(pl.LightningModule):
    """Train :class:`~updown.models.vqa.UpDownVQA` with soft-score BCE; validate with the official VQA accuracy.

    Logs ``train/loss``, ``train/soft_score`` (the reproduction's training score: soft target of the argmax
    answer), ``val/loss``, ``val/vqa_accuracy`` and ``val/vqa_accuracy_<answer type>`` (``yes_no``,
    ``number``, ``other``), all accuracies in percent; with the baseline also ``train/question_only_loss``,
    ``val/question_only_accuracy`` and ``val/question_only_accuracy_<answer type>``.

    Args:
        embedding_size: word embedding size (paper: 300, GloVe's).
        hidden_size: GRU and joint embedding size (paper: 512; hengyuan-hu's reproduction: 1024).
        dropout: dropout in the attention scorer (reproduction: 0.2).
        classifier_dropout: dropout inside the classifier (reproduction: 0.5).
        weight_norm: weight-normalise every linear layer (reproduction: yes).
        fusion: ``"product"`` (the paper's top-down attention) or ``"cross_attention"``.
        attention: the top-down attention's scorer: ``"concat"`` (the paper's ``w^T GT([v_i; q])``) or
            ``"product"`` (the reproduction's ``w^T (f(v_i) * f(q))``).
        activation: every non-linear layer: ``"gated_tanh"`` (the paper) or ``"relu"`` (the reproduction).
        feature_norm: ``"none"`` (the paper) or ``"layer"`` (LayerNorm on each region feature first).
        num_heads: heads of the cross-attention fusion.
        glove_path: optional GloVe text file (e.g. glove.6B.300d.txt) to initialise the word embedding.
        feature_encoder: optional attention block in front of the model: "se", "nonlocal", "gc", "cot".
        optimizer: "adamax" (reproduction), "adam" or "sgd".
        learning_rate: initial learning rate (Adamax's default 2e-3 in the reproduction).
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        lr_schedule: "constant" (reproduction), "linear" (to 0 over training) or "step" (x ``lr_gamma`` every
            ``lr_step_size`` epochs).
        lr_step_size: epochs between decays for "step".
        lr_gamma: decay factor for "step".
        question_only_baseline: also train a question-only model on the same batches and report its accuracy.
        normalization: answer normalisation of the metric: "official" (2021 rule) or "legacy" (pre-2021).
    """

    monitor = "val/vqa_accuracy"

    def __init__(
        self,
        embedding_size: int = 300,
        hidden_size: int = 512,
        dropout: float = 0.2,
        classifier_dropout: float = 0.5,
        weight_norm: bool = True,
        fusion: str = "product",
        attention: str = "concat",
        activation: str = "gated_tanh",
        feature_norm: str = "none",
        num_heads: int = 8,
        glove_path: str | None = None,
        feature_encoder: str | None = None,
        optimizer: str = "adamax",
        learning_rate: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        lr_step_size: int = 5,
        lr_gamma: float = 0.5,
        question_only_baseline: bool = False,
        normalization: str = "official",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: UpDownVQA | None = None
        self.question_only_model: UpDownVQA | None = None
        self.question_vocabulary: Vocabulary | None = None
        self.answer_vocabulary: AnswerVocabulary | None = None
        # Metric states are per-question lists, concatenated across ranks and deduplicated by question id,
        # so the result is exact under DDP (whose sampler repeats questions to even out the ranks).
        self.val_accuracy = VQAAccuracy(normalization=normalization)
        self.val_question_only_accuracy = VQAAccuracy(normalization=normalization)
        # val/loss likewise: a per-question mean, not a per-rank mean of batch means.
        self.val_loss = MeanPerSample()
        # Questions the last validation scored (every rank), DDP padding repeats removed.
        self.validation_num_samples: int | None = None

    # ----------------------------------------------------------------------------------------------- model
    def build_model(
        self,
        question_vocabulary: Vocabulary,
        answer_vocabulary: AnswerVocabulary,
        image_feature_size: int,
        grid_shape: tuple[int, int] | None = None,
        glove_path: str | None = None,
    ) -> None:
        """Create the model (and the question-only baseline) for these vocabularies and feature size."""
        from updown.modules.blocks import build_feature_encoder

        h = self.hparams
        self.question_vocabulary, self.answer_vocabulary = question_vocabulary, answer_vocabulary
        self.image_feature_size, self.grid_shape = image_feature_size, grid_shape
        common = dict(
            vocabulary_size=len(question_vocabulary),
            num_answers=len(answer_vocabulary),
            image_feature_size=image_feature_size,
            embedding_size=h.embedding_size,
            hidden_size=h.hidden_size,
            dropout=h.dropout,
            classifier_dropout=h.classifier_dropout,
            weight_norm=h.weight_norm,
            activation=h.activation,
            glove_path=glove_path,
            vocabulary_tokens=question_vocabulary.tokens,
            pad_index=question_vocabulary.pad_index,
        )
        self.model = UpDownVQA(
            **common,
            fusion=h.fusion,
            attention=h.attention,
            feature_norm=h.feature_norm,
            num_heads=h.num_heads,
            feature_encoder=build_feature_encoder(
                h.feature_encoder, image_feature_size, grid_shape=grid_shape
            ),
        )
        # Built second, so the main model's initialisation does not depend on whether the baseline exists.
        self.question_only_model = (
            UpDownVQA(**common, question_only=True) if h.question_only_baseline else None
        )

    def configure_model(self) -> None:
        if self._trainer is None:
            return  # load_from_checkpoint outside a Trainer: on_load_checkpoint builds from the checkpoint
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "answer_vocabulary"):
            raise ValueError(
                f"{type(self).__name__} needs a VQA datamodule (updown.data.vqa_data.VQADataModule), got "
                f"{type(datamodule).__name__}. Fix `data.class_path` in the config."
            )
        if datamodule.features is None:
            datamodule.setup(self.trainer.state.fn.value)
        question_vocabulary, answer_vocabulary = datamodule.question_vocabulary, datamodule.answer_vocabulary
        if self.model is None:
            features = datamodule.features
            self.build_model(
                question_vocabulary, answer_vocabulary, features.feature_size, features.grid_shape,
                glove_path=self.hparams.glove_path,
            )  # fmt: skip
        else:
            self.check_vocabularies(
                question_vocabulary, answer_vocabulary, f"the data ({datamodule.prepared_dir})"
            )

    def check_vocabularies(
        self, question_vocabulary: Vocabulary, answer_vocabulary: AnswerVocabulary, source: str
    ) -> None:
        """Refuse vocabularies other than the model's, naming both and the first difference."""
        check_vocabulary(
            self.question_vocabulary, question_vocabulary, "the model's question vocabulary", source
        )
        check_answer_vocabulary(self.answer_vocabulary, answer_vocabulary, "the model", source)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["question_vocabulary"] = self.question_vocabulary.tokens
        checkpoint["answer_vocabulary"] = self.answer_vocabulary.answers
        checkpoint["image_feature_size"] = self.image_feature_size
        checkpoint["grid_shape"] = self.grid_shape

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "answer_vocabulary" not in checkpoint or "question_vocabulary" not in checkpoint:
            raise ValueError(
                f"{restored_checkpoint(self)} holds no VQA vocabularies: it was not written by a updown VQA "
                "task. Pass the checkpoint of a VQA run."
            )
        question_vocabulary = Vocabulary(checkpoint["question_vocabulary"])
        answer_vocabulary = AnswerVocabulary(checkpoint["answer_vocabulary"])
        if self.model is None:
            # No GloVe look-up: the checkpoint's weights replace the embedding anyway.
            self.build_model(
                question_vocabulary,
                answer_vocabulary,
                checkpoint["image_feature_size"],
                checkpoint.get("grid_shape"),
            )
        else:
            # Resuming onto a model built from the data: the checkpoint must use the data's vocabularies.
            source = restored_checkpoint(self)
            data = f"the data ({getattr(getattr(self._trainer, 'datamodule', None), 'prepared_dir', None)})"
            check_vocabulary(
                question_vocabulary, self.question_vocabulary, f"{source} (question vocabulary)", data
            )
            check_answer_vocabulary(answer_vocabulary, self.answer_vocabulary, source, data)

    def configure_callbacks(self):
        return checkpoint_callbacks(self.monitor, self._trainer)

    # -------------------------------------------------------------------------------------------- training
    def _logits(self, model: UpDownVQA, batch: dict) -> torch.Tensor:
        inputs = (batch["image_features"], batch["image_features_mask"])
        # shape: (B, A)
        return model(*inputs, batch["question_tokens"], batch["question_lengths"])["logits"]

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        batch_size = batch["question_tokens"].size(0)
        logits = self._logits(self.model, batch)
        loss = soft_score_bce(logits, batch["answer_scores"])
        # shape: (B,)
        soft_score = batch["answer_scores"].gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/soft_score", 100 * soft_score.mean(), prog_bar=True, batch_size=batch_size)
        if self.question_only_model is not None:
            # The models share no parameter, so the summed loss gives each exactly its own gradient.
            baseline_loss = soft_score_bce(
                self._logits(self.question_only_model, batch), batch["answer_scores"]
            )
            self.log("train/question_only_loss", baseline_loss, batch_size=batch_size)
            loss = loss + baseline_loss
        return loss

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip each model's gradients on its own (``trainer.gradient_clip_val``, by norm unless "value").

        One global norm over both models would let the baseline's gradients shrink the main model's update.
        """
        if not gradient_clip_val:
            return
        for model in (self.model, self.question_only_model):
            if model is None:
                continue
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(model.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), gradient_clip_val)

    def configure_optimizers(self):
        # Adamax / Adam / SGD update each parameter from its own gradient: the baseline cannot move the model.
        return configure_from_hparams(self)

    # ------------------------------------------------------------------------------------------- decoding
    def answers_of(self, logits: torch.Tensor) -> list[str]:
        """The answer string of each row's highest logit; ``logits`` is ``(B, A)``."""
        return [self.answer_vocabulary.answers[index] for index in logits.argmax(dim=1).tolist()]

    def answer(self, batch: dict, question_only: bool = False) -> list[str]:
        """Predicted answer strings of a batch (argmax over the answer vocabulary)."""
        model = self.question_only_model if question_only else self.model
        if model is None:
            raise ValueError(
                "answer(question_only=True) needs a task trained with question_only_baseline: true."
            )
        return self.answers_of(self._logits(model, batch))

    def validation_step(self, batch: dict, batch_index: int) -> None:
        if any(len(answers) == 0 for answers in batch["answers"]):
            raise ValueError(
                "Validation questions have no human answers: the val split must be annotated (train or val), "
                "not test-dev. Set data.init_args.val_split to an annotated split."
            )
        logits = self._logits(self.model, batch)
        # shape: (B,) soft_score_bce per question: its mean over the batch is soft_score_bce of the batch
        question_losses = F.binary_cross_entropy_with_logits(
            logits, batch["answer_scores"].to(logits.dtype), reduction="none"
        ).sum(dim=1)
        self.val_loss.update(question_losses, batch["question_id"])
        types = batch.get("answer_types")
        self.val_accuracy.update(self.answers_of(logits), batch["answers"], batch["question_id"], types)
        if self.question_only_model is not None:
            answers = self.answer(batch, question_only=True)
            self.val_question_only_accuracy.update(answers, batch["answers"], batch["question_id"], types)

    def on_validation_epoch_end(self) -> None:
        # Each compute() gathers the per-question states of every rank and keeps one copy of each question,
        # so every rank logs the same numbers, those of a single process: no sync_dist needed.
        values = {"val/loss": self.val_loss.compute().float()}
        self.val_loss.reset()
        pairs = [("val/vqa_accuracy", self.val_accuracy)]
        if self.question_only_model is not None:
            pairs.append(("val/question_only_accuracy", self.val_question_only_accuracy))
        for prefix, metric in pairs:
            for key, value in metric.compute().items():
                name = prefix if key == "overall" else f"{prefix}_{answer_type_key(key)}"
                values[name] = (100 * value).float()
            metric.reset()
        self.validation_num_samples = self.val_accuracy.num_questions
        log_rank_identical(self, values)

    def predict_step(self, batch: dict, batch_index: int) -> list[dict[str, Any]]:
        """Official results entries ``{"question_id": int, "answer": str}`` for a batch."""
        answers = self.answer(batch)
        return [{"question_id": int(q), "answer": a} for q, a in zip(batch["question_id"].tolist(), answers)]


def answer_type_key(answer_type: str) -> str:
    """A log-key suffix for an official answer type: ``"yes/no"`` -> ``"yes_no"``."""
    return answer_type.replace("/", "_").replace(" ", "_")


def check_answer_vocabulary(
    expected: AnswerVocabulary, actual: AnswerVocabulary, expected_source: str, actual_source: str
) -> None:
    """Refuse to combine a model and data whose answer classes differ, naming both."""
    if expected.answers == actual.answers:
        return
    differing = next((i for i, (a, b) in enumerate(zip(expected.answers, actual.answers)) if a != b), None)
    where = (
        f"first difference at class {differing}: {expected.answers[differing]!r} vs {actual.answers[differing]!r}"
        if differing is not None
        else "one is a prefix of the other"
    )
    raise ValueError(
        f"Answer vocabulary mismatch: {expected_source} has {len(expected)} answer classes, {actual_source} has "
        f"{len(actual)} ({where}). Use the answer_vocabulary.json the checkpoint was trained with, or retrain."
    )
