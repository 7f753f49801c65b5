"""VQATask: the bottom-up / top-down VQA model trained with soft-score BCE and scored by the official metric.

Validation answers each question with the argmax over the answer vocabulary and scores that string against
the 10 raw human answers exactly as the official GT-Vision-Lab evaluation does
(:class:`~updown.metrics.vqa_accuracy.VQAAccuracy`), overall and per answer type, in percent. With
``question_only_baseline`` a question-only :class:`~updown.models.vqa.UpDownVQA` (separate parameters, its
own loss and its own gradient clipping) trains on the same batches, so every run reports how much the image
adds over the language prior (``val/question_only_accuracy``).

The model life cycle, optimiser and checkpoints are :class:`~updown.tasks.base.Task`'s: both vocabularies are
stored in every checkpoint, so a checkpoint rebuilds its model on its own, and a checkpoint trained with other
vocabularies is refused with both named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from updown.data.base import DataSpec
from updown.data.glove import load_glove
from updown.data.vocabulary import AnswerVocabulary, Vocabulary
from updown.data.vqa_data import VQADataModule
from updown.losses import soft_score_bce
from updown.metrics.distributed import MeanPerSample
from updown.metrics.vqa_accuracy import VQAAccuracy
from updown.models.vqa import UpDownVQA, VQAConfig
from updown.tasks.base import Task
from updown.tasks.distributed import log_rank_identical
from updown.tasks.optim import OptimizerConfig
from updown.types import VQABatch

Normalization = Literal["official", "legacy"]

# hengyuan-hu/bottom-up-attention-vqa's optimiser: Adamax 2e-3, constant.
REPRODUCTION_ADAMAX = OptimizerConfig("adamax", 2e-3)


class VQATask(Task):
    """Train :class:`~updown.models.vqa.UpDownVQA` with soft-score BCE; validate with the official VQA accuracy.

    Logs ``train/loss``, ``train/soft_score`` (the reproduction's training score: soft target of the argmax
    answer), ``val/loss``, ``val/vqa_accuracy`` and ``val/vqa_accuracy_<answer type>`` (``yes_no``,
    ``number``, ``other``), all accuracies in percent; with the baseline also ``train/question_only_loss``,
    ``val/question_only_accuracy`` and ``val/question_only_accuracy_<answer type>``.

    Args:
        net: the model's hyper-parameters (:class:`~updown.models.vqa.VQAConfig`).
        optimizer: the reproduction's Adamax 2e-3 by default.
        glove_path: optional GloVe text file (e.g. glove.6B.300d.txt) to initialise the word embedding.
        question_only_baseline: also train a question-only model on the same batches and report its accuracy.
        normalization: answer normalisation of the metric: "official" (2021 rule) or "legacy" (pre-2021).
    """

    datamodule_class = VQADataModule
    datamodule_description = "a VQA datamodule (updown.data.vqa_data.VQADataModule)"
    vocabulary_names = ("question", "answer")
    checkpoint_kind = "VQA"
    monitor = "val/vqa_accuracy"
    monitor_mode = "max"

    def __init__(
        self,
        net: VQAConfig = VQAConfig(),
        optimizer: OptimizerConfig = REPRODUCTION_ADAMAX,
        glove_path: str | None = None,
        question_only_baseline: bool = False,
        normalization: Normalization = "official",
    ) -> None:
        super().__init__(optimizer)
        self.net_config = VQAConfig.coerce(net)
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

    def build_model(self, spec: DataSpec) -> None:
        """The model, and the question-only baseline, for these vocabularies and feature size."""
        self.question_vocabulary = Vocabulary(spec.vocabularies["question"])
        self.answer_vocabulary = AnswerVocabulary(spec.vocabularies["answer"])
        common = dict(
            vocabulary_size=len(self.question_vocabulary),
            num_answers=len(self.answer_vocabulary),
            image_feature_size=spec.image_feature_size,
            pad_index=self.question_vocabulary.pad_index,
        )
        self.model = UpDownVQA(**common, config=self.net_config, grid_shape=spec.grid_shape)
        # Built second, so the main model's initialisation does not depend on whether the baseline exists.
        self.question_only_model = (
            UpDownVQA(**common, config=self.net_config.replace(feature_encoder=None), question_only=True)
            if self.hparams.question_only_baseline
            else None
        )

    def initialize_from_data(self) -> None:
        """Initialise the word embeddings from GloVe (``glove_path``); words GloVe lacks keep their random rows."""
        path = self.hparams.glove_path
        if path is None:
            return
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"model.init_args.glove_path {path}: GloVe file not found. This recipe initialises the word "
                "embedding from GloVe: download glove.6B.zip from https://nlp.stanford.edu/projects/glove/, unzip "
                f"it and put glove.6B.300d.txt at {path} (or pass --model.init_args.glove_path FILE; null trains "
                "from random embeddings, which is not the recipe)."
            )
        for model in (self.model, self.question_only_model):
            if model is not None:
                vectors, _ = load_glove(path, self.question_vocabulary.tokens, model.embedding.weight)
                with torch.no_grad():
                    model.embedding.weight.copy_(vectors)
                    model.embedding.weight[model.pad_index].zero_()

    # -------------------------------------------------------------------------------------------- training
    def _logits(self, model: UpDownVQA, batch: VQABatch) -> torch.Tensor:
        inputs = (batch["image_features"], batch["image_features_mask"])
        # shape: (B, A)
        return model(*inputs, batch["question_tokens"], batch["question_lengths"])["logits"]

    def training_step(self, batch: VQABatch, batch_index: int) -> torch.Tensor:
        batch_size = batch["question_tokens"].size(0)
        logits = self._logits(self.model, batch)
        # In float32: under bf16-mixed the logits are bf16, and soft_score_bce would round the soft targets to
        # them (0.3 -> 0.30078); BCE runs in float32 under autocast anyway, so this costs one (B, A) cast.
        loss = soft_score_bce(logits.float(), batch["answer_scores"])
        # shape: (B,)
        soft_score = batch["answer_scores"].gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/soft_score", 100 * soft_score.mean(), prog_bar=True, batch_size=batch_size)
        if self.question_only_model is not None:
            # The models share no parameter, so the summed loss gives each exactly its own gradient, and
            # Adamax / Adam / SGD update each parameter from its own gradient: the baseline cannot move the model.
            baseline_loss = soft_score_bce(
                self._logits(self.question_only_model, batch).float(), batch["answer_scores"]
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

    # ------------------------------------------------------------------------------------------- decoding
    def answers_of(self, logits: torch.Tensor) -> list[str]:
        """The answer string of each row's highest logit; ``logits`` is ``(B, A)``."""
        return [self.answer_vocabulary.answers[index] for index in logits.argmax(dim=1).tolist()]

    def answer(self, batch: VQABatch, question_only: bool = False) -> list[str]:
        """Predicted answer strings of a batch (argmax over the answer vocabulary)."""
        model = self.question_only_model if question_only else self.model
        if model is None:
            raise ValueError(
                "answer(question_only=True) needs a task trained with question_only_baseline: true."
            )
        return self.answers_of(self._logits(model, batch))

    def validation_step(self, batch: VQABatch, batch_index: int) -> None:
        if any(len(answers) == 0 for answers in batch["answers"]):
            raise ValueError(
                "Validation questions have no human answers: the val split must be annotated (train or val), "
                "not test-dev. Set data.init_args.val_split to an annotated split."
            )
        logits = self._logits(self.model, batch)
        # shape: (B,) soft_score_bce per question: its mean over the batch is soft_score_bce of the batch
        question_losses = F.binary_cross_entropy_with_logits(
            logits.float(), batch["answer_scores"].float(), reduction="none"
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

    def predict_step(self, batch: VQABatch, batch_index: int) -> dict[str, Any]:
        """The answers of a batch, with what the prediction writer saves; one entry per question, on the CPU.

        Returns:
            ``question_id`` and ``image_id`` (B ints each), ``answer`` (B strings, the official results' field),
            ``attention (B, R)`` float32 over the regions, ``num_boxes (B,)`` and ``boxes (B, R, 4)``.
        """
        output = self.model(
            batch["image_features"],
            batch["image_features_mask"],
            batch["question_tokens"],
            batch["question_lengths"],
        )
        return {
            "question_id": batch["question_id"].tolist(),
            "image_id": batch["image_id"].tolist(),
            "answer": self.answers_of(output["logits"]),
            "attention": output["attention"].float().cpu(),
            "num_boxes": batch["image_features_mask"].sum(dim=1).cpu(),
            "boxes": batch["image_boxes"].cpu(),
        }


def answer_type_key(answer_type: str) -> str:
    """A log-key suffix for an official answer type: ``"yes/no"`` -> ``"yes_no"``."""
    return answer_type.replace("/", "_").replace(" ", "_")
