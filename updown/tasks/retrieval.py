"""RetrievalTask: BFAN image-text matching trained with the VSE++ hardest-negative ranking loss.

Validation encodes every image and caption of the split once, scores all pairs with the model's chunked
:meth:`~updown.models.retrieval.BFANRetrieval.similarity`, and reports Recall@1/5/10 in both directions,
median / mean rank and rsum (:mod:`updown.metrics.retrieval`), under one of three protocols:

- ``"full"``: every image of the split against every caption (Flickr30K's 1000 test images, any small split);
- ``"1k"``: COCO 1K, five folds of 1000 images scored within the fold, averaged; only the five diagonal
  blocks of the matrix are computed, a fifth of the 5K work;
- ``"5k"``: COCO 5K, all 5000 Karpathy test images against their 25,000 captions.

The model life cycle, optimiser and checkpoints are :class:`~updown.tasks.base.Task`'s; the loss and the
protocols live in :mod:`updown.losses` and :mod:`updown.metrics.retrieval`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from updown.config import NonNegativeFloat, NonNegativeInt
from updown.data.base import DataSpec
from updown.data.retrieval_data import RetrievalDataModule
from updown.losses import retrieval_loss
from updown.metrics.retrieval import Protocol, check_protocol, collect_embeddings, protocol_metrics
from updown.models.retrieval import BFANConfig, BFANRetrieval
from updown.tasks.base import Task
from updown.tasks.optim import OptimizerConfig
from updown.types import RetrievalEvalBatch, RetrievalTrainBatch

# BFAN's recipe (Flickr30K; 5e-4 on COCO): Adam 2e-4, x0.1 every 15 epochs.
BFAN_ADAM = OptimizerConfig("adam", 2e-4, schedule="step", step_size=15, gamma=0.1)


class RetrievalTask(Task):
    """Train :class:`~updown.models.retrieval.BFANRetrieval` with the hardest-negative ranking loss; validate
    by Recall@K.

    Logs ``train/loss`` and ``val/i2t_r1``, ``val/i2t_r5``, ``val/i2t_r10``, ``val/i2t_medr``,
    ``val/i2t_meanr``, the same with ``t2i_``, and ``val/rsum`` (recalls in percent; ``test/...`` for
    ``trainer.test``). ``i2t`` is image-to-text (caption retrieval), ``t2i`` text-to-image (image retrieval).

    Args:
        net: BFAN's hyper-parameters (:class:`~updown.models.retrieval.BFANConfig`).
        optimizer: BFAN's is Adam 2e-4 (Flickr30K; 5e-4 on COCO), x0.1 every 15 epochs.
        margin: ranking-loss margin (BFAN: 0.2).
        max_violation: hardest negative only (BFAN trains with ``--max_violation``) or sum over negatives.
        max_violation_warmup_epochs: epochs that sum over all negatives before ``max_violation`` starts
            (BFAN: 0; VSE-infinity's ``vse_mean_warmup_epochs``: 1). Hardest negatives from the first step
            can collapse every score to one value while the features do not yet separate images (on the
            synthetic world they stay at chance).
        protocol: evaluation protocol, "full", "1k" or "5k" (the last two need 5000 images).
    """

    datamodule_class = RetrievalDataModule
    datamodule_description = "a retrieval datamodule (updown.data.retrieval_data.RetrievalDataModule)"
    vocabulary_names = ("caption",)
    checkpoint_kind = "retrieval"
    monitor = "val/rsum"
    monitor_mode = "max"

    def __init__(
        self,
        net: BFANConfig = BFANConfig(),
        optimizer: OptimizerConfig = BFAN_ADAM,
        margin: NonNegativeFloat = 0.2,
        max_violation: bool = True,
        max_violation_warmup_epochs: NonNegativeInt = 0,
        protocol: Protocol = "full",
    ) -> None:
        super().__init__(optimizer)
        self.net_config = BFANConfig.coerce(net)
        self.model: BFANRetrieval | None = None
        self._outputs: list[dict] = []

    def build_model(self, spec: DataSpec) -> None:
        self.model = BFANRetrieval(
            len(spec.vocabularies["caption"]),
            spec.image_feature_size,
            self.net_config,
            grid_shape=spec.grid_shape,
        )

    def check_datamodule(self, datamodule: RetrievalDataModule) -> None:
        if self.trainer.state.fn in ("fit", "validate"):
            # Fail before training, not after the first epoch.
            split = datamodule.val_split
            check_protocol(self.hparams.protocol, datamodule.num_evaluation_images(split), split)

    # -------------------------------------------------------------------------------------------- training
    def training_step(self, batch: RetrievalTrainBatch, batch_index: int) -> torch.Tensor:
        similarity = self.model(
            batch["image_features"],
            batch["image_features_mask"],
            batch["caption_tokens"],
            batch["caption_lengths"],
        )
        h = self.hparams
        max_violation = h.max_violation and self.current_epoch >= h.max_violation_warmup_epochs
        loss = retrieval_loss(similarity, batch["image_id"], h.margin, max_violation)
        self.log("train/loss", loss, prog_bar=True, batch_size=similarity.size(0))
        return loss

    # ------------------------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: RetrievalEvalBatch, batch_index: int) -> None:
        image_embeddings = self.model.encode_images(batch["image_features"], batch["image_features_mask"])
        word_embeddings, caption_mask = self.model.encode_captions(
            batch["caption_tokens"], batch["caption_lengths"]
        )
        # On the CPU: a 5K split's embeddings are gigabytes, and the device only needs a block at a time.
        self._outputs.append({
            "dataset_index": batch["dataset_index"].cpu(),
            "image_embeddings": image_embeddings.cpu(),
            "image_mask": batch["image_features_mask"].cpu(),
            "word_embeddings": word_embeddings.cpu(),
            "caption_mask": caption_mask.cpu(),
        })  # fmt: skip

    def test_step(self, batch: RetrievalEvalBatch, batch_index: int) -> None:
        self.validation_step(batch, batch_index)

    def on_validation_epoch_end(self) -> None:
        self.log_scores("val", self.score_on_rank_zero(self._pop_outputs(), self.score_outputs))

    def on_test_start(self) -> None:
        datamodule = self.trainer.datamodule
        split = datamodule.test_split
        check_protocol(self.hparams.protocol, datamodule.num_evaluation_images(split), split)

    def on_test_epoch_end(self) -> None:
        self.log_scores("test", self.score_on_rank_zero(self._pop_outputs(), self.score_outputs))

    def _pop_outputs(self) -> list[dict]:
        outputs, self._outputs = self._outputs, []
        return outputs

    def score_outputs(self, outputs: list[dict]) -> dict[str, float]:
        """Recall metrics of gathered evaluation outputs, one copy of each image."""
        embeddings = collect_embeddings(outputs)
        # The sanity check sees a few batches only, too few for the 1K / 5K protocols.
        protocol = "full" if self.trainer.sanity_checking else self.hparams.protocol
        return protocol_metrics(
            self._block_scorer(embeddings),
            embeddings["image_embeddings"].size(0),
            protocol,
            self.trainer.datamodule.captions_per_image,
        )

    def _block_scorer(self, embeddings: dict[str, torch.Tensor]) -> Callable[[slice, slice], torch.Tensor]:
        def score(images: slice, captions: slice) -> torch.Tensor:
            with torch.no_grad():
                return self.model.similarity(
                    embeddings["image_embeddings"][images].to(self.device),
                    embeddings["image_mask"][images].to(self.device),
                    embeddings["word_embeddings"][captions].to(self.device),
                    embeddings["caption_mask"][captions].to(self.device),
                ).cpu()

        return score
