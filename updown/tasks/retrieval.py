"""RetrievalTask: BFAN image-text matching trained with the VSE++ hardest-negative ranking loss.

Validation encodes every image and caption of the split once, scores all pairs with the model's chunked
:meth:`~updown.models.retrieval.BFANRetrieval.similarity`, and reports Recall@1/5/10 in both directions,
median / mean rank and rsum (:mod:`updown.metrics.retrieval`), under one of three protocols:

- ``"full"``: every image of the split against every caption (Flickr30K's 1000 test images, any small split);
- ``"1k"``: COCO 1K, five folds of 1000 images scored within the fold, averaged; only the five diagonal
  blocks of the matrix are computed, a fifth of the 5K work;
- ``"5k"``: COCO 5K, all 5000 Karpathy test images against their 25,000 captions.

As in :class:`~updown.tasks.captioning.CaptioningTask`, the model is built when the data is known
(``configure_model``), and its vocabulary and feature size are stored in every checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from updown.callbacks import checkpoint_callbacks
from updown.data.vocabulary import Vocabulary
from updown.losses import hardest_negative_ranking_loss
from updown.metrics.retrieval import coco_5k_metrics, retrieval_metrics
from updown.models.retrieval import BFANRetrieval
from updown.modules.focal import FOCAL_TYPES
from updown.tasks.distributed import gather_outputs, log_rank_identical
from updown.tasks.optim import configure_from_hparams
from updown.tasks.vocabulary_model import VocabularyModel

PROTOCOLS = ("full", "1k", "5k")
COCO_FOLD_SIZE, COCO_NUM_FOLDS = 1000, 5


def retrieval_loss(
    similarity: torch.Tensor, image_id: torch.Tensor, margin: float = 0.2, max_violation: bool = True
) -> torch.Tensor:
    """Hardest-negative ranking loss of a batch of pairs whose images may repeat.

    A caption of the same image is a true match, not a negative: such pairs are set to ``-inf`` so that
    no hinge can pick them (their gradient is zero).

    Args:
        similarity: ``(B, B)`` scores of image ``i`` with caption ``j``; pair ``i`` on the diagonal.
        image_id: ``(B,)`` the image of each pair.
        margin: hinge margin (VSE++ / BFAN: 0.2).
        max_violation: hardest negative only (VSE++ "MH", BFAN's ``--max_violation``) or sum over all.

    Returns:
        Scalar loss, summed over the batch as in VSE++ and BFAN.
    """
    # shape: (B, B)
    same_image = image_id.unsqueeze(1) == image_id.unsqueeze(0)
    same_image.fill_diagonal_(False)
    return hardest_negative_ranking_loss(
        similarity.masked_fill(same_image, float("-inf")), margin, max_violation
    )


def check_protocol(protocol: str, num_images: int, split: str) -> None:
    """Refuse a protocol that the number of images of ``split`` cannot follow."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"model.protocol={protocol!r} is unknown; use one of {PROTOCOLS}.")
    needed = COCO_FOLD_SIZE * COCO_NUM_FOLDS
    if protocol != "full" and num_images != needed:
        raise ValueError(
            f"model.protocol={protocol!r} needs the {needed} images of COCO's Karpathy test (or val) split, "
            f"but split {split!r} has {num_images}. Use protocol: full for other splits."
        )


def protocol_metrics(
    score: Callable[[slice, slice], torch.Tensor],
    num_images: int,
    protocol: str = "full",
    captions_per_image: int = 5,
    fold_size: int = COCO_FOLD_SIZE,
    num_folds: int = COCO_NUM_FOLDS,
) -> dict[str, float]:
    """Recall metrics of ``num_images`` images under ``protocol``; ``score`` is asked only for needed blocks.

    Args:
        score: ``score(images, captions)`` returns the ``(n_images, n_captions)`` similarity block of the
            image slice and the caption slice (captions in image order, ``captions_per_image`` each).
        num_images: images in the set.
        protocol: ``"full"``, ``"1k"`` (mean over ``num_folds`` folds of ``fold_size`` images) or ``"5k"``.
        captions_per_image: captions per image.
        fold_size, num_folds: the 1K folds (COCO: 1000 and 5).

    Returns:
        The keys of :func:`updown.metrics.retrieval.retrieval_metrics`.
    """
    if protocol == "full":
        return retrieval_metrics(
            score(slice(0, num_images), slice(0, num_images * captions_per_image)), captions_per_image
        )
    if protocol == "5k":
        whole = score(slice(0, num_images), slice(0, num_images * captions_per_image))
        return coco_5k_metrics(whole, captions_per_image, num_images=fold_size * num_folds)
    if protocol != "1k" or num_images != fold_size * num_folds:
        raise ValueError(
            f"protocol_metrics: protocol={protocol!r} with {num_images} images; use 'full', '5k', or '1k' "
            f"with {num_folds} folds of {fold_size} images."
        )
    folds = []
    for fold in range(num_folds):
        images = slice(fold * fold_size, (fold + 1) * fold_size)
        captions = slice(images.start * captions_per_image, images.stop * captions_per_image)
        folds.append(retrieval_metrics(score(images, captions), captions_per_image))
    return {key: sum(fold[key] for fold in folds) / num_folds for key in folds[0]}


class RetrievalTask(VocabularyModel, pl.LightningModule):
    """Train :class:`~updown.models.retrieval.BFANRetrieval` with the hardest-negative ranking loss; validate
    by Recall@K.

    Logs ``train/loss`` and ``val/i2t_r1``, ``val/i2t_r5``, ``val/i2t_r10``, ``val/i2t_medr``,
    ``val/i2t_meanr``, the same with ``t2i_``, and ``val/rsum`` (recalls in percent; ``test/...`` for
    ``trainer.test``). ``i2t`` is image-to-text (caption retrieval), ``t2i`` text-to-image (image retrieval).

    Args:
        word_embedding_size: word embedding size (BFAN: 300).
        joint_embedding_size: joint space and GRU size (BFAN: 1024).
        num_gru_layers: stacked bidirectional GRU layers (BFAN: 1).
        lambda_softmax: inverse temperature of the attention pre-assignment (BFAN: 20).
        focal_type: "equal" (BFAN-equal) or "prob" (BFAN-prob).
        feature_encoder: optional attention block in front of the model: "se", "nonlocal", "gc", "cot".
        margin: ranking-loss margin (BFAN: 0.2).
        max_violation: hardest negative only (BFAN trains with ``--max_violation``) or sum over negatives.
        max_violation_warmup_epochs: epochs that sum over all negatives before ``max_violation`` starts
            (BFAN: 0; VSE-infinity's ``vse_mean_warmup_epochs``: 1). Hardest negatives from the first step
            can collapse every score to one value while the features do not yet separate images (on the
            synthetic world they stay at chance).
        optimizer: "adam" (BFAN), "adamax" or "sgd".
        learning_rate: initial learning rate (BFAN: 2e-4 on Flickr30K, 5e-4 on COCO).
        momentum: SGD momentum.
        weight_decay: L2 weight decay (BFAN: none).
        lr_schedule: "step" (x ``lr_gamma`` every ``lr_step_size`` epochs, BFAN's), "linear" or "constant".
        lr_step_size: epochs between decays (BFAN's ``lr_update``: 15).
        lr_gamma: decay factor (BFAN: 0.1).
        protocol: evaluation protocol, "full", "1k" or "5k" (the last two need 5000 images).
        similarity_chunk_size: images and captions per block when scoring all pairs; memory grows as its
            square times regions times words.
    """

    monitor = "val/rsum"
    datamodule_marker = "captions_per_image"
    datamodule_description = "a retrieval datamodule (updown.data.retrieval_data.RetrievalDataModule)"
    checkpoint_kind = "retrieval"

    def __init__(
        self,
        word_embedding_size: int = 300,
        joint_embedding_size: int = 1024,
        num_gru_layers: int = 1,
        lambda_softmax: float = 20.0,
        focal_type: str = "equal",
        feature_encoder: str | None = None,
        margin: float = 0.2,
        max_violation: bool = True,
        max_violation_warmup_epochs: int = 0,
        optimizer: str = "adam",
        learning_rate: float = 2e-4,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: str = "step",
        lr_step_size: int = 15,
        lr_gamma: float = 0.1,
        protocol: str = "full",
        similarity_chunk_size: int = 128,
    ) -> None:
        super().__init__()
        if focal_type not in FOCAL_TYPES:
            raise ValueError(f"model.focal_type={focal_type!r} is unknown; use one of {FOCAL_TYPES}.")
        if protocol not in PROTOCOLS:
            raise ValueError(f"model.protocol={protocol!r} is unknown; use one of {PROTOCOLS}.")
        if max_violation_warmup_epochs < 0:
            raise ValueError(f"model.max_violation_warmup_epochs={max_violation_warmup_epochs} must be >= 0.")
        self.save_hyperparameters()
        self.model: BFANRetrieval | None = None
        self.vocabulary: Vocabulary | None = None
        self._outputs: list[dict] = []

    # ----------------------------------------------------------------------------------------------- model
    def build_model(self, vocabulary: Vocabulary, image_feature_size: int, grid_shape=None) -> None:
        """Create the BFAN model for ``vocabulary`` and features of size ``image_feature_size``."""
        from updown.modules.blocks import build_feature_encoder

        h = self.hparams
        self.vocabulary = vocabulary
        self.image_feature_size = image_feature_size
        self.grid_shape = grid_shape
        self.model = BFANRetrieval(
            vocabulary_size=len(vocabulary),
            image_feature_size=image_feature_size,
            word_embedding_size=h.word_embedding_size,
            joint_embedding_size=h.joint_embedding_size,
            num_gru_layers=h.num_gru_layers,
            lambda_softmax=h.lambda_softmax,
            focal_type=h.focal_type,
            feature_encoder=build_feature_encoder(
                h.feature_encoder, image_feature_size, grid_shape=grid_shape
            ),
            similarity_chunk_size=h.similarity_chunk_size,
        )

    def check_datamodule(self, datamodule) -> None:
        if self.trainer.state.fn in ("fit", "validate"):
            # Fail before training, not after the first epoch.
            split = datamodule.val_split
            check_protocol(self.hparams.protocol, datamodule.num_evaluation_images(split), split)

    def configure_callbacks(self):
        return checkpoint_callbacks(self.monitor, self._trainer)

    # -------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
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

    def configure_optimizers(self):
        return configure_from_hparams(self)

    # ------------------------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict, batch_index: int) -> None:
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

    def test_step(self, batch: dict, batch_index: int) -> None:
        self.validation_step(batch, batch_index)

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_start(self) -> None:
        datamodule = self.trainer.datamodule
        split = datamodule.test_split
        check_protocol(self.hparams.protocol, datamodule.num_evaluation_images(split), split)

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def _log_scores(self, prefix: str) -> None:
        scores = self.score_outputs(gather_outputs(self._outputs))
        self._outputs = []
        # Every rank holds rank 0's numbers (gathered, scored once, broadcast): log them as they are.
        log_rank_identical(self, {f"{prefix}/{key}": value for key, value in scores.items()})

    def score_outputs(self, outputs: list[dict]) -> dict[str, float]:
        """Recall metrics of gathered evaluation outputs (rank 0 scores, every rank gets the numbers)."""
        scores: dict[str, float] = {}
        if self.trainer.is_global_zero:
            embeddings = collect_embeddings(outputs)
            # The sanity check sees a few batches only, too few for the 1K / 5K protocols.
            protocol = "full" if self.trainer.sanity_checking else self.hparams.protocol
            scores = protocol_metrics(
                self._block_scorer(embeddings),
                embeddings["image_embeddings"].size(0),
                protocol,
                self.trainer.datamodule.captions_per_image,
            )
        return self.trainer.strategy.broadcast(scores, src=0)

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


def collect_embeddings(outputs: list[dict]) -> dict[str, torch.Tensor]:
    """Concatenate per-batch embeddings in split order, one copy per image.

    Args:
        outputs: dicts with ``dataset_index (B,)``, ``image_embeddings (B, R_b, E)``, ``image_mask (B, R_b)``,
            ``word_embeddings (B * k, T_b, E)`` and ``caption_mask (B * k, T_b)``, from any ranks; an image
            may appear twice (distributed samplers repeat images to even out ranks).

    Returns:
        ``image_embeddings (N, R, E)``, ``image_mask (N, R)``, ``word_embeddings (N * k, T, E)`` and
        ``caption_mask (N * k, T)``, padded to the largest R and T, images in ascending ``dataset_index``.
    """
    index = torch.cat([o["dataset_index"] for o in outputs])
    images = _pad_cat([o["image_embeddings"] for o in outputs])
    image_mask = _pad_cat([o["image_mask"] for o in outputs])
    words = _pad_cat([o["word_embeddings"] for o in outputs])
    caption_mask = _pad_cat([o["caption_mask"] for o in outputs])
    captions_per_image = words.size(0) // index.numel()
    row_of = {position: row for row, position in enumerate(index.tolist())}
    # shape: (N,)
    rows = torch.tensor([row_of[position] for position in sorted(row_of)], dtype=torch.long)
    # shape: (N * k,) the captions of each kept image, in image order
    caption_rows = (rows.unsqueeze(1) * captions_per_image + torch.arange(captions_per_image)).flatten()
    return {
        "image_embeddings": images[rows],
        "image_mask": image_mask[rows],
        "word_embeddings": words[caption_rows],
        "caption_mask": caption_mask[caption_rows],
    }


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0 after zero-padding dim 1 (regions or words) to the largest size."""
    longest = max(t.size(1) for t in tensors)
    padded = []
    for tensor in tensors:
        # F.pad lists (last dim left, right, ..., dim 1 left, right).
        widths = [0, 0] * (tensor.dim() - 2) + [0, longest - tensor.size(1)]
        padded.append(F.pad(tensor, widths))
    return torch.cat(padded)
