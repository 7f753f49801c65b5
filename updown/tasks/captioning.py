"""CaptioningTask: cross-entropy training of the UpDown captioner, beam-search validation, caption metrics.

The model life cycle, optimiser and checkpoints are :class:`~updown.tasks.base.Task`'s: the captioner is built
from the data's vocabulary and feature size, both stored in every checkpoint, so a checkpoint rebuilds its
model on its own and a checkpoint from another vocabulary is refused with both vocabularies named.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Literal

import torch
from pytorch_lightning.utilities import rank_zero_info

from updown.config import (
    ClosedUnitInterval,
    Config,
    HalfOpenUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
)
from updown.data.base import DataSpec
from updown.data.datamodules import CaptioningDataModule
from updown.data.image_constraints import ConstraintConfig, ConstraintFiles, ImageConstraints, resolve_files
from updown.data.synthetic import SyntheticSpec, SyntheticWorld, ensure_synthetic_world
from updown.data.vocabulary import Vocabulary
from updown.data.word_vectors import load_caption_word_vectors
from updown.decoding import BeamSearchConfig, DecodingOutput, beam_search, constrained_beam_search
from updown.losses import sequence_cross_entropy
from updown.metrics.grounding import grounding_counts, word_categories
from updown.models.captioner import CaptionerConfig, UpDownCaptioner
from updown.tasks.base import Task
from updown.tasks.optim import OptimizerConfig
from updown.types import CaptionEvalBatch, CaptionTrainBatch, RegionBatch

# pycocoevalcap keys -> our log keys.
METRIC_KEYS = {
    "Bleu_1": "bleu1", "Bleu_2": "bleu2", "Bleu_3": "bleu3", "Bleu_4": "bleu4",
    "METEOR": "meteor", "ROUGE_L": "rouge_l", "CIDEr": "cider", "SPICE": "spice",
}  # fmt: skip

SpiceMode = Literal["off", "auto", "on"]
#: ``net.word_vectors`` value that takes the synthetic novel-object world's own vectors (the file lives in the
#: world's cache folder, whose name depends on its parameters).
SYNTHETIC_WORD_VECTORS = "synthetic"
# Plain beam search (the default); a frozen config, safe as an argument default.
NO_CONSTRAINTS = ConstraintConfig()


@dataclasses.dataclass(frozen=True)
class ScheduledSampling(Config):
    """How often training feeds the model its own sampled word instead of the ground truth (Bengio et al. 2015).

    The probability is 0 before ``start_epoch``; from it on, ``probability + increase_by * k`` after every
    ``increase_every`` epochs (``k`` of them), at most ``max_probability``. self-critical.pytorch's UpDown recipe:
    start 0, +0.05 every 5 epochs, at most 0.25. A constant probability: ``increase_by: 0``.

    Args:
        probability: the probability at ``start_epoch``.
        start_epoch: the first epoch that samples.
        increase_every: epochs between increases.
        increase_by: added at every increase.
        max_probability: the ceiling.
    """

    probability: ClosedUnitInterval = 0.0
    start_epoch: NonNegativeInt = 0
    increase_every: PositiveInt = 5
    increase_by: NonNegativeFloat = 0.0
    max_probability: ClosedUnitInterval = 0.25

    def at_epoch(self, epoch: int) -> float:
        """The sampling probability during ``epoch`` (0-based)."""
        if epoch < self.start_epoch:
            return 0.0
        increases = (epoch - self.start_epoch) // self.increase_every
        return min(
            self.probability + self.increase_by * increases, max(self.max_probability, self.probability)
        )


# The paper's recipe: SGD 0.01, momentum 0.9, weight decay 5e-4, decayed linearly to 0 over training.
PAPER_SGD = OptimizerConfig("sgd", 0.01, weight_decay=5e-4, schedule="linear")


class CaptioningTask(Task):
    """Train the UpDown captioner with cross-entropy; validate by beam search scored like the COCO server.

    Args:
        net: the captioner's hyper-parameters (:class:`~updown.models.captioner.CaptionerConfig`).
        optimizer: the paper's recipe by default: SGD 0.01 with momentum 0.9 and weight decay 5e-4, decayed
            linearly to 0 over training.
        decoding: beam search for validation, test and prediction (:class:`~updown.decoding.BeamSearchConfig`).
        label_smoothing: cross-entropy label smoothing.
        scheduled_sampling: when to feed the model's own sample instead of the ground-truth word
            (:class:`ScheduledSampling`; default: never).
        spice: SPICE during validation: "off" (default, it needs CoreNLP jars and minutes), "auto" or "on".
        val_metrics: pycocoevalcap metric families computed at validation.
        constraints: constrained beam search from object detections for validation, test and prediction (the
            nocaps baseline; :class:`~updown.data.image_constraints.ConstraintConfig`; off by default).
    """

    datamodule_class = CaptioningDataModule
    datamodule_description = "a caption datamodule (e.g. updown.data.datamodules.CaptioningDataModule)"
    vocabulary_names = ("caption",)
    checkpoint_kind = "captioning"
    monitor = "val/cider"
    monitor_mode = "max"

    def __init__(
        self,
        net: CaptionerConfig = CaptionerConfig(),
        optimizer: OptimizerConfig = PAPER_SGD,
        decoding: BeamSearchConfig = BeamSearchConfig(),
        label_smoothing: HalfOpenUnitInterval = 0.0,
        scheduled_sampling: ScheduledSampling = ScheduledSampling(),
        spice: SpiceMode = "off",
        val_metrics: tuple[str, ...] = ("Bleu", "METEOR", "ROUGE_L", "CIDEr"),
        constraints: ConstraintConfig = NO_CONSTRAINTS,
    ) -> None:
        super().__init__(optimizer)
        self.net_config = CaptionerConfig.coerce(net)
        self.decoding = BeamSearchConfig.coerce(decoding)
        self.constraints = ConstraintConfig.coerce(constraints)
        self._image_constraints: ImageConstraints | None = None
        self.scheduled_sampling = ScheduledSampling.coerce(scheduled_sampling)
        self.model: UpDownCaptioner | None = None
        self.vocabulary: Vocabulary | None = None
        self._outputs: list[dict] = []
        self._human_scores: dict[str, float] | None = None

    def build_model(self, spec: DataSpec) -> None:
        self.vocabulary = vocabulary = Vocabulary(spec.vocabularies["caption"])
        self.model = UpDownCaptioner(
            len(vocabulary),
            spec.image_feature_size,
            self.net_config,
            max_caption_length=self.decoding.max_length,
            pad_index=vocabulary.pad_index,
            bos_index=vocabulary.bos_index,
            eos_index=vocabulary.eos_index,
            unk_index=vocabulary.unk_index,
            grid_shape=spec.grid_shape,
        )

    def initialize_from_data(self) -> None:
        """Fill the frozen word vectors from ``net.word_vectors`` (the file is not read when a checkpoint's
        weights, which hold the vectors, replace the model's)."""
        path = self.net_config.word_vectors
        if path is None:
            return
        if path == SYNTHETIC_WORD_VECTORS:
            world = self.synthetic_world()
            if world is None or not world.word_vectors_path.is_file():
                raise ValueError(
                    f"model.init_args.net.word_vectors {path!r} takes the synthetic novel-object world's vectors, but "
                    "the data is not such a world. Set data.init_args.synthetic.held_out_categories, or give a "
                    "GloVe-format file."
                )
            path = str(world.word_vectors_path)
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"model.init_args.net.word_vectors {path}: word-vector file not found. Pass a GloVe-format text "
                "file (e.g. glove.6B.300d.txt, with embedding_size 300), or null for the paper's learned embedding."
            )
        vectors, missing = load_caption_word_vectors(
            path, self.vocabulary.tokens, self.net_config.embedding_size
        )
        self.model.set_word_vectors(vectors)
        rank_zero_info(
            f"Word vectors from {path}: {len(self.vocabulary) - len(missing)} of {len(self.vocabulary)} words found; "
            f"the others get random vectors ({', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''})."
        )

    # -------------------------------------------------------------------------------------------- training
    def training_step(self, batch: CaptionTrainBatch, batch_index: int) -> torch.Tensor:
        # forward_packed skips <pad>: logits and loss of the real tokens only (the loss equals
        # sequence_cross_entropy over the padded logits of model.forward).
        output = self.model.forward_packed(
            batch["image_features"],
            batch["image_features_mask"],
            batch["caption_tokens"],
            image_index=batch["image_index"],
            scheduled_sampling_probability=self.scheduled_sampling.at_epoch(self.current_epoch),
        )
        # shape: (1, num_tokens, vocabulary_size) and (1, num_tokens): one "sequence" of every real token.
        loss = sequence_cross_entropy(
            output["logits"].float().unsqueeze(0),  # float32 softmax under bf16 autocast (a no-op in float32)
            output["targets"].unsqueeze(0),
            self.vocabulary.pad_index,
            self.hparams.label_smoothing,
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["caption_tokens"].size(0))
        return loss

    # ------------------------------------------------------------------------------------------- decoding
    def decode(self, batch: RegionBatch, beam_size: int | None = None) -> DecodingOutput:
        """Beam-search captions for a batch (``beam_size`` overrides the configured one); constrained beam search
        from the images' detections when ``constraints.enabled``."""
        d = self.decoding
        state = self.model.init_state(batch["image_features"], batch["image_features_mask"])
        search = beam_search
        if self.constraints.enabled:
            image_constraints = self.image_constraints()(batch["image_id"].tolist())
            search = functools.partial(
                constrained_beam_search,
                constraints=image_constraints,
                min_constraints_to_satisfy=self.constraints.min_constraints_to_satisfy,
            )
        return search(
            self.model.step,
            state,
            beam_size=beam_size or d.beam_size,
            max_length=d.max_length,
            length_penalty=d.length_penalty,
            block_trigrams=d.block_trigrams,
            **self.repeated_word_constraint(),
            bos_index=self.vocabulary.bos_index,
            eos_index=self.vocabulary.eos_index,
            pad_index=self.vocabulary.pad_index,
            unk_index=self.vocabulary.unk_index,
        )

    def set_constraints(self, constraints: ConstraintConfig) -> None:
        """Decode with ``constraints`` from now on (``updown.predict --constraints``); files are read on first use."""
        self.constraints = ConstraintConfig.coerce(constraints)
        self._image_constraints = None

    def image_constraints(self) -> ImageConstraints:
        """Image id -> constraints, built from ``constraints``' files (or the synthetic world's) on first use."""
        if self._image_constraints is None:
            world = self.synthetic_world()
            defaults = None
            if world is not None:
                if not world.detections_jsonpath.is_file():
                    raise ValueError(
                        "model.init_args.constraints.enabled: the synthetic world has no detections; only the "
                        "novel-object world writes them (set data.init_args.synthetic.held_out_categories, e.g. "
                        "configs/captioning/synthetic_novel.yaml), or give constraints.detections_jsonpath."
                    )
                defaults = ConstraintFiles(
                    world.detections_jsonpath, world.class_hierarchy_jsonpath, world.word_forms_tsvpath
                )
            files = resolve_files(self.constraints, defaults)
            self._image_constraints = ImageConstraints(self.constraints, files, self.vocabulary)
        return self._image_constraints

    def synthetic_world(self) -> SyntheticWorld | None:
        """The synthetic world the trainer's datamodule reads, or None (real data, or no trainer)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None or datamodule.hparams.get("features_h5path") is not None:
            return None
        return ensure_synthetic_world(datamodule.synthetic or SyntheticSpec(), datamodule.data_root)

    def repeated_word_constraint(self) -> dict[str, Any]:
        """``decoding``'s repeated-word constraint as the keyword arguments of the beam searches."""
        repeatable = [self.vocabulary.index(word) for word in self.decoding.repeatable_words]
        return {
            "block_repeated_words": self.decoding.block_repeated_words,
            "repeatable_tokens": sorted({i for i in repeatable if i != self.vocabulary.unk_index}),
        }

    def captions_of(self, tokens: torch.Tensor) -> list[str]:
        return [" ".join(self.vocabulary.decode(row)) for row in tokens.tolist()]

    # ------------------------------------------------------------------------------------------ validation
    def validation_step(self, batch: CaptionEvalBatch, batch_index: int) -> None:
        output = self.decode(batch)
        captions = self.captions_of(output.tokens)
        grounded, grounding_total = self._grounding_counts(batch, output)
        # One record per image, grounding counts included: under DDP the sampler repeats images to even out
        # the ranks, and per-image records let score_outputs keep exactly one copy of each.
        for row, image_id in enumerate(batch["image_id"].tolist()):
            self._outputs.append({
                "image_id": image_id,
                "caption": captions[row],
                "references": batch["references"][row],
                "grounded": int(grounded[row]),
                "grounding_total": int(grounding_total[row]),
            })  # fmt: skip

    def _grounding_counts(
        self, batch: CaptionEvalBatch, output: DecodingOutput
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, grounded and all generated category words (zeros without region categories)."""
        if "region_category" not in batch or output.attention is None:
            zeros = torch.zeros(output.tokens.size(0), dtype=torch.long)
            return zeros, zeros
        names = self.trainer.datamodule.features.region_category_names
        return grounding_counts(
            output.tokens, output.mask, output.attention, batch["region_category"],
            word_categories(self.vocabulary, names),
        )  # fmt: skip

    def on_validation_epoch_end(self) -> None:
        outputs, self._outputs = self._outputs, []
        self.log_scores("val", self.score_on_rank_zero(outputs, self.score_outputs))

    def score_outputs(self, outputs: list[dict]) -> dict[str, float]:
        """Caption metrics of gathered validation outputs, one copy of each image; equal to a single-process
        run's on the same images."""
        from updown.metrics.coco_caption import human_consensus, score_captions

        by_image = unique_by_image(outputs)
        predictions = {image_id: item["caption"] for image_id, item in by_image.items()}
        references = {image_id: item["references"] for image_id, item in by_image.items()}
        overall, _ = score_captions(
            references, predictions, spice=self.hparams.spice, metrics=self.hparams.val_metrics
        )
        scores = {METRIC_KEYS[k]: float(v) for k, v in overall.items() if k in METRIC_KEYS}
        if self._human_scores is None:
            human = human_consensus(references, spice="off", metrics=("CIDEr",))
            self._human_scores = {"human_cider": float(human["CIDEr"])}
        scores.update(self._human_scores)
        grounding_total = sum(item["grounding_total"] for item in by_image.values())
        if grounding_total:
            scores["grounding"] = sum(item["grounded"] for item in by_image.values()) / grounding_total
        self.validation_num_samples = len(by_image)
        return scores

    # ------------------------------------------------------------------------------------------ prediction
    def predict_step(self, batch: CaptionEvalBatch, batch_index: int) -> dict[str, Any]:
        """The decoded captions of a batch, with what the prediction writer saves; one entry per image, on the CPU.

        Returns:
            ``image_id`` (B ints), ``caption`` (B strings), ``tokens (B, T)`` and ``lengths (B,)`` (``<eos>``
            included), ``attention (B, T, R)`` float32 (None without attention), ``num_boxes (B,)`` and
            ``image_boxes`` as ``boxes (B, R, 4)``.
        """
        output = self.decode(batch)
        return {
            "image_id": batch["image_id"].tolist(),
            "caption": self.captions_of(output.tokens),
            "tokens": output.tokens.cpu(),
            "lengths": output.lengths.cpu(),
            "attention": None if output.attention is None else output.attention.float().cpu(),
            "num_boxes": batch["image_features_mask"].sum(dim=1).cpu(),
            "boxes": batch["image_boxes"].cpu(),
        }


def unique_by_image(outputs: list[dict]) -> dict[int, dict]:
    """One validation record per image id, in ascending id order.

    ``DistributedSampler`` pads a split whose size the world size does not divide by repeating its first
    samples, so gathered outputs can hold an image twice (with the same caption: decoding is per image).
    Ascending ids make the scorers see the same images in the same order whatever the world size, so
    their float sums, and therefore the scores, are bit-identical to a single-process run.
    """
    by_image: dict[int, dict] = {}
    for item in outputs:
        by_image.setdefault(item["image_id"], item)
    return {image_id: by_image[image_id] for image_id in sorted(by_image)}
