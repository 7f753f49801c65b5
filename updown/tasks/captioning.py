"""CaptioningTask: cross-entropy training of the UpDown captioner, beam-search validation, caption metrics.

The model is built when the data is known (``configure_model``): its vocabulary and feature size come from
the datamodule, and both are stored in every checkpoint, so a checkpoint rebuilds its model on its own and
a checkpoint from another vocabulary is refused with both vocabularies named.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from updown.callbacks import checkpoint_callbacks
from updown.data.vocabulary import Vocabulary
from updown.decoding import beam_search
from updown.losses import sequence_cross_entropy
from updown.models.captioner import UpDownCaptioner
from updown.tasks.distributed import gather_outputs, log_rank_identical
from updown.tasks.optim import configure_from_hparams
from updown.tasks.vocabulary_model import VocabularyModel

# pycocoevalcap keys -> our log keys.
METRIC_KEYS = {
    "Bleu_1": "bleu1", "Bleu_2": "bleu2", "Bleu_3": "bleu3", "Bleu_4": "bleu4",
    "METEOR": "meteor", "ROUGE_L": "rouge_l", "CIDEr": "cider", "SPICE": "spice",
}  # fmt: skip


class CaptioningTask(VocabularyModel, pl.LightningModule):
    """Train the UpDown captioner with cross-entropy; validate by beam search scored like the COCO server.

    Args:
        embedding_size: word embedding size (paper: 1000).
        hidden_size: size of both LSTMs (paper: 1000).
        attention_size: attention projection size (paper: 512).
        dropout: dropout before the output layer (paper: none; the Adam recipe uses 0.5).
        feature_encoder: optional attention block in front of the model: "se", "nonlocal", "gc", "cot".
        optimizer: "sgd", "adam" or "adamax".
        learning_rate: initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        lr_schedule: "linear" (to 0 over training), "step" (x ``lr_gamma`` every ``lr_step_size`` epochs) or
            "constant".
        lr_step_size: epochs between decays for "step".
        lr_gamma: decay factor for "step".
        label_smoothing: cross-entropy label smoothing.
        scheduled_sampling: probability of feeding the model's own sample instead of the ground-truth word.
        beam_size: beam size for validation / test decoding (paper: 5).
        max_decoding_length: most tokens decoded, ``<eos>`` included (paper: 20).
        length_penalty: GNMT length penalty alpha for beam search (0: plain log-probability).
        block_trigrams: forbid repeated trigrams while decoding.
        spice: SPICE during validation: "off" (default, it needs CoreNLP jars and minutes), "auto" or "on".
        val_metrics: pycocoevalcap metric families computed at validation.
    """

    monitor = "val/cider"

    def __init__(
        self,
        embedding_size: int = 1000,
        hidden_size: int = 1000,
        attention_size: int = 512,
        dropout: float = 0.0,
        feature_encoder: str | None = None,
        optimizer: str = "sgd",
        learning_rate: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_schedule: str = "linear",
        lr_step_size: int = 3,
        lr_gamma: float = 0.8,
        label_smoothing: float = 0.0,
        scheduled_sampling: float = 0.0,
        beam_size: int = 5,
        max_decoding_length: int = 20,
        length_penalty: float = 0.0,
        block_trigrams: bool = False,
        spice: str = "off",
        val_metrics: tuple[str, ...] = ("Bleu", "METEOR", "ROUGE_L", "CIDEr"),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: UpDownCaptioner | None = None
        self.vocabulary: Vocabulary | None = None
        self._outputs: list[dict] = []
        # Images the last validation scored (set on global rank 0), DDP padding repeats removed.
        self.validation_num_samples: int | None = None
        self._human_scores: dict[str, float] | None = None

    # ----------------------------------------------------------------------------------------------- model
    def build_model(self, vocabulary: Vocabulary, image_feature_size: int, grid_shape=None) -> None:
        """Create the captioner for ``vocabulary`` and features of size ``image_feature_size``."""
        from updown.modules.blocks import build_feature_encoder

        h = self.hparams
        self.vocabulary = vocabulary
        self.image_feature_size = image_feature_size
        self.grid_shape = grid_shape
        self.model = UpDownCaptioner(
            vocabulary_size=len(vocabulary),
            image_feature_size=image_feature_size,
            embedding_size=h.embedding_size,
            hidden_size=h.hidden_size,
            attention_size=h.attention_size,
            dropout=h.dropout,
            max_caption_length=h.max_decoding_length,
            pad_index=vocabulary.pad_index,
            bos_index=vocabulary.bos_index,
            eos_index=vocabulary.eos_index,
            unk_index=vocabulary.unk_index,
            feature_encoder=build_feature_encoder(
                h.feature_encoder, image_feature_size, grid_shape=grid_shape
            ),
        )

    def configure_callbacks(self):
        return checkpoint_callbacks(self.monitor, self._trainer)

    # -------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        output = self.model(
            batch["image_features"],
            batch["image_features_mask"],
            batch["caption_tokens"],
            image_index=batch["image_index"],
            scheduled_sampling_probability=self.hparams.scheduled_sampling,
        )
        loss = sequence_cross_entropy(
            output["logits"],
            batch["caption_tokens"][:, 1:],
            self.vocabulary.pad_index,
            self.hparams.label_smoothing,
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["caption_tokens"].size(0))
        return loss

    def configure_optimizers(self):
        return configure_from_hparams(self)

    # ------------------------------------------------------------------------------------------- decoding
    def decode(self, batch: dict, beam_size: int | None = None):
        """Beam-search captions for a batch; returns a :class:`updown.decoding.DecodingOutput`."""
        h = self.hparams
        state = self.model.init_state(batch["image_features"], batch["image_features_mask"])
        return beam_search(
            self.model.step,
            state,
            beam_size=beam_size or h.beam_size,
            max_length=h.max_decoding_length,
            length_penalty=h.length_penalty,
            block_trigrams=h.block_trigrams,
            bos_index=self.vocabulary.bos_index,
            eos_index=self.vocabulary.eos_index,
            pad_index=self.vocabulary.pad_index,
            unk_index=self.vocabulary.unk_index,
        )

    def captions_of(self, tokens: torch.Tensor) -> list[str]:
        return [" ".join(self.vocabulary.decode(row)) for row in tokens.tolist()]

    def validation_step(self, batch: dict, batch_index: int) -> None:
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

    def _grounding_counts(self, batch: dict, output) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: generated category words whose most-attended region belongs to an object of that
        category, and all generated category words; two ``(B,)`` integer tensors (zeros without categories).
        """
        batch_size = output.tokens.size(0)
        if "region_category" not in batch or output.attention is None:
            return torch.zeros(batch_size, dtype=torch.long), torch.zeros(batch_size, dtype=torch.long)
        names = self.trainer.datamodule.features.region_category_names
        # shape: (V,) category of each vocabulary word, -1 for other words
        word_category = torch.full((len(self.vocabulary),), -1, dtype=torch.long, device=output.tokens.device)
        for category, name in enumerate(names):
            if self.vocabulary.index(name) != self.vocabulary.unk_index:
                word_category[self.vocabulary.index(name)] = category
        # shape: (B, T)
        categories = word_category[output.tokens]
        is_object_word = (categories >= 0) & output.mask
        top_region = output.attention.argmax(dim=-1)
        region_category = batch["region_category"].to(top_region.device).gather(1, top_region)
        grounded = (region_category == categories) & is_object_word
        # shape: (B,) each
        return grounded.sum(dim=1).cpu(), is_object_word.sum(dim=1).cpu()

    def on_validation_epoch_end(self) -> None:
        scores = self.score_outputs(gather_outputs(self._outputs))
        self._outputs = []
        log_rank_identical(self, {f"val/{key}": value for key, value in scores.items()})

    def score_outputs(self, outputs: list[dict]) -> dict[str, float]:
        """Caption metrics of gathered validation outputs, one copy of each image.

        Rank 0 scores (pycocoevalcap runs Java once) and broadcasts, so every rank logs the same numbers and
        ``sync_dist`` is not needed. The result equals a single-process run's on the same images.
        """
        from updown.metrics.coco_caption import human_consensus, score_captions

        scores: dict[str, float] = {}
        if self.trainer.is_global_zero:
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
            grounding_total = sum(item.get("grounding_total", 0) for item in by_image.values())
            if grounding_total:
                scores["grounding"] = (
                    sum(item.get("grounded", 0) for item in by_image.values()) / grounding_total
                )
            self.validation_num_samples = len(by_image)
        return self.trainer.strategy.broadcast(scores, src=0)


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
