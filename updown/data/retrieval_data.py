"""Image-text retrieval data: shuffled (image, caption) pairs to train on, 5-caption image sets to evaluate.

The files are the captioning ones (prepared ``captions.json``, ``vocabulary.json``, region features; the
synthetic world by default), read through :class:`~updown.data.datamodules.CaptionFilesDataModule`.

Training follows VSE++ / SCAN / BFAN: one item per (image, caption) pair, shuffled, so an epoch sees every
caption once and a batch of B pairs gives the (B, B) similarity matrix of the ranking loss. A batch may
hold two captions of the same image (a few per batch on the synthetic world, rare on COCO); their pair is
a true match, not a negative, so :func:`updown.tasks.retrieval.retrieval_loss` masks every same-image
pair out of the negatives by ``image_id``. Masking, unlike a sampler that forbids repeats, keeps plain
shuffling, which Lightning's distributed sampler can shard.

Evaluation uses every image of the split with exactly ``captions_per_image`` captions (its first ones;
COCO images have 5 to 7, SCAN's and BFAN's files keep 5), captions listed in image order, so the
similarity matrix has the layout of :mod:`updown.metrics.retrieval`: caption ``j`` belongs to image
``j // captions_per_image``.

Captions are encoded with ``<bos>`` and ``<eos>``, as SCAN's vocabulary wraps them in ``<start>`` and
``<end>`` (BFAN reads SCAN's files).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from updown.config import PositiveInt
from updown.data.caption_preparation import ImageCaptions
from updown.data.datamodules import CaptionFilesDataModule
from updown.data.datasets import collate_regions, pad_sequences
from updown.data.readers import PendingRegions, RegionFeatures
from updown.data.vocabulary import Vocabulary
from updown.types import RetrievalEvalBatch, RetrievalTrainBatch


class RetrievalPairDataset(Dataset):
    """One item per (image, caption) pair: up to ``captions_per_image`` captions of every image.

    Args:
        features: the region-feature reader.
        images: images with their tokenised captions.
        vocabulary: maps words to indices; unknown words become ``<unk>``.
        captions_per_image: captions used per image (the first ones).
        max_caption_length: words kept per caption (``<bos>`` and ``<eos>`` are added around them).
    """

    def __init__(
        self,
        features: RegionFeatures,
        images: Sequence[ImageCaptions],
        vocabulary: Vocabulary,
        captions_per_image: int = 5,
        max_caption_length: int = 64,
    ) -> None:
        self.features = features
        captions = [
            (image.image_id, vocabulary.encode(tokens[:max_caption_length]))
            for image in images
            for tokens in image.tokens[:captions_per_image]
        ]
        # Numpy arrays, not a list of (image id, token list) pairs: a forked DataLoader worker that reads a
        # Python object writes its reference count, copying its page, so at COCO scale (566,435 pairs) a list
        # would grow every worker by ~100 MB over an epoch; arrays are never written.
        self.image_ids = np.array([image_id for image_id, _ in captions], dtype=np.int64)
        # Pair p's caption is _tokens[_starts[p] : _starts[p + 1]].
        self._tokens = np.fromiter((t for _, caption in captions for t in caption), dtype=np.int32)
        self._starts = np.cumsum([0] + [len(caption) for _, caption in captions], dtype=np.int64)
        self.pad_index = vocabulary.pad_index

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[PendingRegions, list[int]]:
        caption = self._tokens[self._starts[index] : self._starts[index + 1]].tolist()
        return self.features.pending(int(self.image_ids[index])), caption

    def collate(self, items) -> RetrievalTrainBatch:
        """Batch B pairs; row ``i`` of the regions and caption ``i`` match.

        Returns:
            :func:`~updown.data.datasets.collate_regions` keys (``image_id (B,)`` tells repeated images
            apart) plus ``caption_tokens (B, T)`` int64 and ``caption_lengths (B,)`` int64 (with ``<bos>``
            and ``<eos>``).
        """
        batch = collate_regions([regions for regions, _ in items])
        batch["caption_tokens"], batch["caption_lengths"] = pad_sequences(
            [caption for _, caption in items], self.pad_index
        )
        return batch


class RetrievalEvaluationDataset(Dataset):
    """One item per image with exactly ``captions_per_image`` captions, for the all-pairs similarity matrix.

    Args:
        features: the region-feature reader.
        images: the split's images with their tokenised captions.
        vocabulary: maps words to indices.
        captions_per_image: captions kept per image (the first ones); an image with fewer is an error.
        max_caption_length: words kept per caption.
        source: the captions file, named in errors.
    """

    def __init__(
        self,
        features: RegionFeatures,
        images: Sequence[ImageCaptions],
        vocabulary: Vocabulary,
        captions_per_image: int = 5,
        max_caption_length: int = 64,
        source: str = "captions",
    ) -> None:
        short = [image.image_id for image in images if len(image.tokens) < captions_per_image]
        if short:
            raise ValueError(
                f"{source}: {len(short)} image(s) of the evaluation split have fewer than "
                f"{captions_per_image} captions (e.g. image {short[0]}); retrieval recall needs the same "
                "number for every image. Lower data.captions_per_image or drop those images when preparing "
                "the captions."
            )
        self.features = features
        self.image_ids = [image.image_id for image in images]
        self.captions = [
            [vocabulary.encode(tokens[:max_caption_length]) for tokens in image.tokens[:captions_per_image]]
            for image in images
        ]
        self.pad_index = vocabulary.pad_index

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[int, PendingRegions, list[list[int]]]:
        return index, self.features.pending(self.image_ids[index]), self.captions[index]

    def collate(self, items) -> RetrievalEvalBatch:
        """Stack B images once and list their k captions each, in image order.

        Returns:
            :func:`~updown.data.datasets.collate_regions` keys, ``caption_tokens (B * k, T)`` and
            ``caption_lengths (B * k,)`` (caption ``j`` of the batch belongs to image ``j // k``), and
            ``dataset_index (B,)`` int64, each image's position in the split (restores the order after
            distributed ranks are gathered).
        """
        batch = collate_regions([regions for _, regions, _ in items])
        captions = [caption for _, _, image_captions in items for caption in image_captions]
        batch["caption_tokens"], batch["caption_lengths"] = pad_sequences(captions, self.pad_index)
        batch["dataset_index"] = torch.tensor([index for index, _, _ in items], dtype=torch.long)
        return batch


class RetrievalDataModule(CaptionFilesDataModule):
    """Caption data served for image-text retrieval (see the module docstring for what a batch holds).

    Args:
        captions_per_image: captions per image, at most in training and exactly in evaluation (COCO: 5).
        max_caption_length: words kept per caption; long enough that COCO captions stay whole, as in BFAN.
        batch_size: (image, caption) pairs per training batch (BFAN: 128).
        eval_batch_size: images per evaluation batch, each with its ``captions_per_image`` captions.
        **kwargs: the arguments of :class:`~updown.data.datamodules.CaptionFilesDataModule` (caption files,
            features, splits, workers, synthetic world). COCO: train on Karpathy train + restval (SCAN's
            113,287 images), score the 5000 images of Karpathy val / test (the 1K and 5K protocols).
    """

    def __init__(
        self,
        captions_per_image: PositiveInt = 5,
        max_caption_length: PositiveInt = 64,
        batch_size: PositiveInt = 128,
        eval_batch_size: PositiveInt = 100,
        **kwargs,
    ) -> None:
        super().__init__(
            max_caption_length=max_caption_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            **kwargs,
        )
        self.captions_per_image = self.hparams.captions_per_image

    def build_train_dataset(self, splits: list[str]) -> RetrievalPairDataset:
        return RetrievalPairDataset(
            self.features,
            self.images(splits),
            self.vocabulary,
            self.captions_per_image,
            self.max_caption_length,
        )

    def build_dataset(self, split: str) -> RetrievalEvaluationDataset:
        """One item per image of ``split`` with its first ``captions_per_image`` captions."""
        return RetrievalEvaluationDataset(
            self.features,
            self.images([split]),
            self.vocabulary,
            self.captions_per_image,
            self.max_caption_length,
            source=f"{self.captions_jsonpath} (split {split!r})",
        )

    def num_evaluation_images(self, split: str) -> int:
        """Images scored on ``split``; the 1K / 5K protocols need 5000."""
        return len(self.dataset(split))
