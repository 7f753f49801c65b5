"""SCSTCaptioningTask: self-critical sequence training (Rennie et al. 2017) from an XE checkpoint.

Per training image the policy draws ``k`` captions, each is rewarded with CIDEr-D against the image's
TRAINING references (document frequencies of the training corpus, optionally plus BLEU-4), and the loss
``-(r - b) * sum_t log p(w_t)`` over the tokens up to and including ``<eos>`` pushes up captions that beat
their baseline ``b``. Baselines: ``mean_of_others`` (the mean reward of the image's other samples, the
"new" SCST; default), ``greedy`` (the greedy decode's reward, Rennie et al.) or ``beam_mean`` (Anderson et
al.: the ``k`` captions of a beam search are the samples and their mean reward is the baseline).

Validation, scoring, checkpoint vocabulary handling and the optimiser are the
:class:`~updown.tasks.captioning.CaptioningTask`'s; the reward metrics live in :mod:`updown.metrics` (CIDEr-D,
sentence BLEU), the baselines and the loss in :mod:`updown.losses`, the beam candidates in :mod:`updown.decoding`. Before the first step the task decodes the validation
set once with the starting weights, so ``metrics.json`` records ``start/val/cider`` beside the final
``val/cider`` (a manual pass in ``on_train_start`` rather than Lightning's sanity check, which logs nothing
and depends on ``num_sanity_val_steps``; a resumed run takes the starting scores from its checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_warn

from updown.checkpointing import load_checkpoint
from updown.config import NonNegativeFloat, PositiveFloat, PositiveInt
from updown.data.base import DataSpec, check_vocabulary
from updown.decoding import beam_candidates, greedy_decode, sample_decode
from updown.losses import scst_loss, self_critical_baseline
from updown.metrics.bleu import SentenceBleu
from updown.metrics.cider import CiderD
from updown.tasks.captioning import CaptioningTask
from updown.tasks.optim import OptimizerConfig
from updown.types import CaptionTrainBatch

Baseline = Literal["mean_of_others", "greedy", "beam_mean"]

# self-critical.pytorch's SCST optimiser: Adam 5e-5, constant.
SCST_ADAM = OptimizerConfig("adam", 5e-5)


def caption_words(
    tokens: torch.Tensor, lengths: torch.Tensor, eos_index: int, names: Sequence[str]
) -> tuple[list[list[str]], list[bool]]:
    """Decoded captions as word lists for the reward, and whether each ended with ``<eos>``.

    Args:
        tokens: ``(N, T)`` int64 decoded tokens (after ``<bos>``, padded).
        lengths: ``(N,)`` int64 tokens per caption, ``<eos>`` included when there is one.
        eos_index: id of ``<eos>``.
        names: the vocabulary's token strings, by id.

    Returns:
        ``(words, ended)``: ``N`` word lists without ``<eos>``, and ``N`` bools.
    """
    # One transfer and one Python list per tensor; the loop is over plain ints.
    rows, counts = tokens.tolist(), lengths.tolist()
    ended = [eos_index in row for row in rows]
    words = [[names[t] for t in row[: n - end]] for row, n, end in zip(rows, counts, ended)]
    return words, ended


class SCSTCaptioningTask(CaptioningTask):
    """Fine-tune the UpDown captioner with self-critical sequence training.

    Args:
        init_weights: the XE checkpoint whose weights start training (its vocabulary must be the data's).
            Ignored when ``--ckpt_path`` resumes an SCST run.
        num_samples: captions sampled (or beam hypotheses) per image, ``k``.
        baseline: "mean_of_others" (needs k >= 2), "greedy" (greedy decode in eval mode, no graph, like
            Rennie et al. and self-critical.pytorch) or "beam_mean" (the paper's variant: the k captions of a
            beam search in eval mode are the samples, their log-probabilities recomputed with a graph).
        sample_temperature: sampling temperature (log-probabilities in the loss stay at temperature 1).
        cider_weight: weight of CIDEr-D in the reward.
        bleu_weight: weight of sentence BLEU-4 in the reward (0: CIDEr-D only).
        cider_df_path: CIDEr-D document frequencies of the training references (tools/build_cider_df.py);
            None: the datamodule's ``cider_df_path(eos_as_word)`` (the synthetic world writes them).
        eos_as_word: count ``<eos>`` as a word in the reward (the paper's Caffe code did not).
        validate_at_start: decode the validation set before training to record ``start/val/*``.
        optimizer: the SCST optimiser (default: Adam 5e-5, constant).
        **kwargs: the arguments of :class:`~updown.tasks.captioning.CaptioningTask` (``net`` must match the
            ``init_weights`` checkpoint; ``decoding.max_length`` also bounds the samples).
    """

    def __init__(
        self,
        init_weights: str | None = None,
        num_samples: PositiveInt = 5,
        baseline: Baseline = "mean_of_others",
        sample_temperature: PositiveFloat = 1.0,
        cider_weight: NonNegativeFloat = 1.0,
        bleu_weight: NonNegativeFloat = 0.0,
        cider_df_path: str | None = None,
        eos_as_word: bool = False,
        validate_at_start: bool = True,
        optimizer: OptimizerConfig = SCST_ADAM,
        **kwargs,
    ) -> None:
        # Ranges and choices are checked by Task.__init__ from the annotations; what is left relates two arguments.
        super().__init__(optimizer=optimizer, **kwargs)
        if baseline == "mean_of_others" and num_samples < 2:
            raise ValueError(
                f"model.init_args.num_samples={num_samples}: baseline 'mean_of_others' needs at least 2 samples "
                "per image (the mean of the OTHER samples)."
            )
        if cider_weight + bleu_weight == 0:
            raise ValueError(
                f"model.init_args: cider_weight={cider_weight} and bleu_weight={bleu_weight} are both 0: the reward "
                "would be 0 for every caption. Set one of them above 0."
            )
        self.extra_metrics: dict[str, float] = {}
        self._resumed = False
        self._cider: CiderD | None = None
        self._bleu = SentenceBleu()
        self._train_references: dict[int, list[list[str]]] | None = None
        self._warned_no_signal = False

    # ------------------------------------------------------------------------------------ start of training
    def configure_model(self) -> None:
        super().configure_model()
        if self.hparams.baseline == "beam_mean" and len(self.vocabulary) - 3 <= self.hparams.num_samples:
            raise ValueError(
                f"model.init_args.num_samples={self.hparams.num_samples}: beam_mean needs fewer beams than the "
                f"{len(self.vocabulary) - 3} words of the vocabulary."
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._resumed = True
        self.extra_metrics = dict(checkpoint.get("scst_start_metrics", {}))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["scst_start_metrics"] = {
            k: v for k, v in self.extra_metrics.items() if k.startswith("start/")
        }

    def on_fit_start(self) -> None:
        # After --ckpt_path restoration (configure_model runs before it), so a resumed run skips init_weights.
        if not self._resumed:
            if self.hparams.init_weights is None:
                raise ValueError(
                    "model.init_args.init_weights is required: SCST starts from an XE checkpoint "
                    "(--model.init_args.init_weights XE.ckpt), or resume an SCST run with --ckpt_path."
                )
            self.load_initial_weights(self.hparams.init_weights, str(self.datamodule.vocabulary_path))
        self._cider = CiderD.load(self._cider_df_path(), eos_as_word=self.hparams.eos_as_word)

    def load_initial_weights(self, path: str, data_source: str = "the data") -> None:
        """Load the captioner weights of a captioning checkpoint, refusing another vocabulary or model size.

        Args:
            path: a checkpoint written by a updown captioning task.
            data_source: what the current vocabulary came from, for the mismatch message.
        """
        # Lightning checkpoints pickle their hyper-parameters too; load only checkpoints you trust (as --ckpt_path).
        checkpoint = load_checkpoint(
            path, "model.init_args.init_weights", task_class=CaptioningTask,
            fix="Pass the checkpoint of a captioning (XE) run.",
        )  # fmt: skip
        stored = DataSpec.from_checkpoint(checkpoint, f"init_weights {path}")
        check_vocabulary(
            "caption",
            stored.vocabularies["caption"],
            self.vocabulary.tokens,
            f"init_weights {path}",
            data_source,
        )
        state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(state)
        except RuntimeError as error:
            trained = checkpoint.get("hyper_parameters", {})
            sizes = {"net": trained.get("net"), "image_feature_size": stored.image_feature_size}
            raise ValueError(
                f"init_weights {path}: its weights do not fit this model ({str(error).splitlines()[0]}). The "
                f"checkpoint was trained with {sizes}; set the same sizes (put the XE config first: "
                f"--config XE.yaml --config SCST.yaml)."
            ) from None

    def _cider_df_path(self) -> str:
        path = self.hparams.cider_df_path
        if path is None:
            path = self.datamodule.cider_df_path(self.hparams.eos_as_word)
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"model.init_args.cider_df_path {path}: CIDEr-D document frequencies not found. Build them with "
                f"tools/build_cider_df.py{' --eos-as-word' if self.hparams.eos_as_word else ''}."
            )
        return str(path)

    def on_train_start(self) -> None:
        # A resumed run keeps the starting scores its checkpoint recorded.
        loader = self.trainer.val_dataloaders
        if self._resumed or not self.hparams.validate_at_start or loader is None:
            return
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        # The same batches (limit_val_batches) as every later validation, so start and final compare.
        num_batches = self.trainer.num_val_batches[0] if self.trainer.num_val_batches else 0
        if num_batches == 0:
            return
        self.eval()
        with torch.no_grad():
            for index, batch in enumerate(islice(loader, int(num_batches))):
                # The whole transfer (on_after_batch_transfer included: the device feature store gathers there).
                self.validation_step(self._apply_batch_transfer_handler(batch, self.device, 0), index)
        self.train()
        outputs, self._outputs = self._outputs, []
        scores = self.score_on_rank_zero(outputs, self.score_outputs)
        self.extra_metrics = {f"start/val/{key}": value for key, value in scores.items()}
        if "cider" in scores:
            self.print(f"SCST starts from val/cider {scores['cider']:.4f}")

    def on_validation_epoch_end(self) -> None:
        outputs, self._outputs = self._outputs, []
        scores = self.score_on_rank_zero(outputs, self.score_outputs)
        self.log_scores("val", scores)
        start = self.extra_metrics.get("start/val/cider")
        if start and "cider" in scores and not self.trainer.sanity_checking:
            self.extra_metrics["gain/val/cider"] = scores["cider"] / start - 1.0

    # ------------------------------------------------------------------------------------------- training
    def _register_references(self, image_ids: list[int]) -> None:
        """Cache each new image's training references (prepared tokens, as the df file counts them)."""
        if self._train_references is None:
            self._train_references = self.datamodule.training_references()
        for image_id in image_ids:
            if image_id not in self._cider:
                references = self._train_references.get(image_id)
                if references is None:
                    raise ValueError(f"SCST: training image {image_id} has no prepared references.")
                self._cider.add_references(image_id, references)
                if self.hparams.bleu_weight > 0:
                    self._bleu.add_references(image_id, references)

    def rewards(self, tokens: torch.Tensor, lengths: torch.Tensor, keys: list[int]) -> np.ndarray:
        """``(N,)`` reward of each caption ``tokens (N, T)`` (``lengths`` with ``<eos>``) for image ``keys``."""
        words, has_eos = caption_words(tokens, lengths, self.vocabulary.eos_index, self.vocabulary.tokens)
        h = self.hparams
        # With eos_as_word, a sample cut at the maximum length gets no "<eos>" (it did not emit one).
        reward = h.cider_weight * self._cider.score(words, keys, ended=has_eos)
        if h.bleu_weight > 0:
            reward = reward + h.bleu_weight * self._bleu.score(words, keys)
        if not np.isfinite(reward).all():
            raise ValueError(
                f"SCST: {int((~np.isfinite(reward)).sum())} non-finite rewards; check the CIDEr-D document "
                f"frequencies (model.init_args.cider_df_path) and the reward weights."
            )
        return reward

    def training_step(self, batch: CaptionTrainBatch, batch_index: int) -> torch.Tensor:
        h, vocabulary = self.hparams, self.vocabulary
        image_ids = batch["image_id"].tolist()
        self._register_references(image_ids)
        k, num_images = h.num_samples, len(image_ids)
        features, mask = batch["image_features"], batch["image_features_mask"]
        specials = {
            "bos_index": vocabulary.bos_index, "eos_index": vocabulary.eos_index,
            "pad_index": vocabulary.pad_index, "unk_index": vocabulary.unk_index,
        }  # fmt: skip
        if h.baseline == "beam_mean":
            # The candidates are what the model decodes at test time (eval mode, no graph), like the greedy baseline.
            self.model.eval()
            state = self.model.init_state(features, mask)
            tokens = beam_candidates(
                self.model.step, state, beam_size=k, max_length=self.decoding.max_length,
                **specials, **self.repeated_word_constraint(),
            )  # fmt: skip
            self.model.train()
            # shape: (B * k, T + 1) the hypotheses after <bos>, teacher-forced to get their log-probs with a graph
            inputs = torch.cat([tokens.new_full((tokens.size(0), 1), vocabulary.bos_index), tokens], dim=1)
            image_index = torch.arange(num_images, device=tokens.device).repeat_interleave(k)
            logits = self.model(features, mask, inputs, image_index=image_index)["logits"]
            token_logprobs = (
                torch.log_softmax(logits.float(), dim=-1).gather(2, tokens.unsqueeze(2)).squeeze(2)
            )
            lengths = (tokens != vocabulary.pad_index).sum(dim=1)
        else:
            state = self.model.init_state(features, mask)
            sample = sample_decode(
                self.model.step, state, num_samples=k, temperature=h.sample_temperature,
                max_length=self.decoding.max_length, **specials,
            )  # fmt: skip
            tokens, token_logprobs, lengths = sample.tokens, sample.token_logprobs, sample.lengths
        # shape: (B, k)
        reward = self.rewards(tokens, lengths, np.repeat(image_ids, k).tolist()).reshape(num_images, k)
        greedy = self._greedy_rewards(features, mask, image_ids, specials) if h.baseline == "greedy" else None
        baseline = self_critical_baseline(reward, h.baseline, greedy)
        advantage = reward - baseline
        loss = scst_loss(
            token_logprobs,
            torch.arange(tokens.size(1), device=tokens.device) < lengths.unsqueeze(1),
            torch.as_tensor(advantage.reshape(-1), dtype=torch.float32, device=tokens.device),
        )
        self._log_step(loss, reward, baseline, advantage, tokens, lengths)
        return loss

    def _greedy_rewards(self, features, mask, image_ids: list[int], specials: dict) -> np.ndarray:
        """``(B,)`` reward of each image's greedy caption, decoded in eval mode (no dropout) without a graph."""
        self.model.eval()
        with torch.no_grad():
            state = self.model.init_state(features, mask)
            greedy = greedy_decode(self.model.step, state, max_length=self.decoding.max_length, **specials)
        self.model.train()
        return self.rewards(greedy.tokens, greedy.lengths, image_ids)

    def _log_step(self, loss, reward, baseline, advantage, tokens, lengths) -> None:
        has_eos = (tokens == self.vocabulary.eos_index).any(dim=1)
        # Images whose samples all tie with their baseline give no gradient: a collapsed policy shows here.
        no_signal = np.all(np.abs(advantage) < 1e-9, axis=1)
        if no_signal.all() and not self._warned_no_signal:
            self._warned_no_signal = True
            rank_zero_warn(
                "SCST: every sample of a batch got exactly its baseline's reward, so the loss is 0 (no learning "
                "signal). If train/zero_advantage_fraction stays near 1 the policy has collapsed: raise "
                "sample_temperature, lower learning_rate, or restart from the XE checkpoint."
            )
        values = {
            "train/loss": float(loss.detach()),
            "train/reward": float(reward.mean()),
            "train/baseline": float(baseline.mean()),
            "train/advantage": float(advantage.mean()),
            "train/advantage_abs": float(np.abs(advantage).mean()),
            "train/sample_length": float((lengths - has_eos.long()).float().mean()),
            "train/no_eos_fraction": float((~has_eos).float().mean()),
            "train/zero_advantage_fraction": float(no_signal.mean()),
        }
        for key, value in values.items():
            self.log(key, value, prog_bar=key in ("train/reward", "train/loss"), batch_size=reward.shape[0])
