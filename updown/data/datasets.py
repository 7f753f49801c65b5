"""Datasets and collate functions: tokenise, pad, and batch region features.

Caption training works per *image*: an item is one image with all its captions, and the collate function
stacks each image's regions once and lists its captions with an ``image_index`` into the image rows. An
epoch therefore sees every caption of every image, while region features are read, moved and projected
once per image instead of once per caption (5x less work at COCO's 5 captions per image).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from updown.data.batch_memory import batch_tensor, slot_tensor
from updown.data.caption_preparation import ImageCaptions
from updown.data.readers import PendingRegions, RegionFeature, RegionFeatures
from updown.data.vocabulary import Vocabulary
from updown.types import FEATURES_INDEX_KEY, CaptionEvalBatch, CaptionTrainBatch, RegionBatch


def collate_regions(regions: Sequence[RegionFeature | PendingRegions]) -> RegionBatch:
    """Pad the regions of a batch of images to the batch's largest box count.

    Datasets give :class:`~updown.data.readers.PendingRegions` (``reader.pending(image_id)``), which the reader
    reads as one batch (:meth:`~updown.data.readers.RegionFeatures.collate`); :class:`RegionFeature` items
    (``reader[image_id]``) are stacked here. Both give the same batch.

    Returns:
        A dict with ``image_id (B,)``, ``image_features (B, R, D)``, ``image_features_mask (B, R)`` (True for
        a real box; padding is never inferred from zero features), ``image_boxes (B, R, 4)`` and
        ``image_spatial (B, R, 5)``. Regions of the ``device`` feature store (``features`` None) give
        ``image_features_index (B,)`` int64, their rows in the store, instead of ``image_features``: the
        features are gathered once the batch is on its device
        (:meth:`~updown.data.readers.RegionFeatures.finish_batch`).
    """
    if isinstance(regions[0], PendingRegions):
        return regions[0].reader.collate([r.image_id for r in regions])
    batch_size = len(regions)
    max_boxes = max(r.num_boxes for r in regions)
    boxes = batch_tensor((batch_size, max_boxes, 4), torch.float32)
    spatial = batch_tensor((batch_size, max_boxes, 5), torch.float32)
    mask = batch_tensor((batch_size, max_boxes), torch.bool)
    boxes_np, spatial_np, mask_np = boxes.numpy(), spatial.numpy(), mask.numpy()
    for i, r in enumerate(regions):
        n = r.num_boxes
        boxes_np[i, :n], spatial_np[i, :n], mask_np[i, :n] = r.boxes, r.spatial, True
    batch: RegionBatch = {"image_id": torch.tensor([r.image_id for r in regions], dtype=torch.long)}
    if regions[0].features is None:
        batch[FEATURES_INDEX_KEY] = torch.tensor([r.store_row for r in regions], dtype=torch.long)
    else:
        # shape: (B, R, D)
        features = slot_tensor((batch_size, max_boxes, regions[0].features.shape[1]), torch.float32)
        # numpy copies in this thread (a torch copy this size would go to the intra-op pool). Every element is
        # written once: the real rows copied, the padding zeroed (zeroing it all first doubles the writes).
        features_np = features.numpy()
        for i, r in enumerate(regions):
            features_np[i, : r.num_boxes] = r.features
            features_np[i, r.num_boxes :] = 0
        batch["image_features"] = features
    batch.update(image_features_mask=mask, image_boxes=boxes, image_spatial=spatial)
    return batch


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad integer sequences.

    Returns:
        ``tokens (N, T)`` int64 and ``lengths (N,)`` int64.
    """
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.full((len(sequences), int(lengths.max())), pad_index, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens, lengths


class CaptionTrainingDataset(Dataset):
    """One item per image: its regions and all its captions as token indices.

    Args:
        features: the region-feature reader.
        images: images with their tokenised captions.
        vocabulary: maps words to indices; unknown words become ``<unk>``.
        max_caption_length: words kept per caption (the paper: 20 for decoding; longer training captions are
            truncated, keeping ``<eos>``).
    """

    def __init__(
        self,
        features: RegionFeatures,
        images: Sequence[ImageCaptions],
        vocabulary: Vocabulary,
        max_caption_length: int = 20,
    ) -> None:
        self.features = features
        self.image_ids = np.array([image.image_id for image in images], dtype=np.int64)
        # Every caption's token indices in one flat array, with offsets, instead of a list of lists of ints:
        # a DataLoader worker that reads a Python object writes its reference count, which copies the page it
        # lies on out of the memory shared with the main process, so at COCO scale (616,767 captions, ~7M
        # tokens) lists would grow each worker by hundreds of MB over an epoch; numpy arrays are never written.
        encoded = [
            vocabulary.encode(tokens[:max_caption_length]) for image in images for tokens in image.tokens
        ]
        self._tokens = np.fromiter((t for caption in encoded for t in caption), dtype=np.int32)
        # Caption c is _tokens[_caption_starts[c] : _caption_starts[c + 1]]; image i has the captions
        # _image_starts[i] : _image_starts[i + 1].
        self._caption_starts = np.cumsum([0] + [len(caption) for caption in encoded], dtype=np.int64)
        self._image_starts = np.cumsum([0] + [len(image.tokens) for image in images], dtype=np.int64)
        self.pad_index = vocabulary.pad_index

    def __len__(self) -> int:
        return len(self.image_ids)

    def captions(self, index: int) -> list[list[int]]:
        """The token indices of every caption of image ``index``."""
        bounds = self._caption_starts[self._image_starts[index] : self._image_starts[index + 1] + 1].tolist()
        return [self._tokens[start:stop].tolist() for start, stop in zip(bounds[:-1], bounds[1:])]

    def __getitem__(self, index: int) -> tuple[PendingRegions, list[list[int]]]:
        return self.features.pending(int(self.image_ids[index])), self.captions(index)

    def collate(self, items) -> CaptionTrainBatch:
        """Stack images once; list every caption with ``image_index`` into the image rows.

        Returns:
            :func:`collate_regions` keys plus ``caption_tokens (N, T)``, ``caption_lengths (N,)`` and
            ``image_index (N,)`` for the N captions of the batch's B images.
        """
        batch = collate_regions([regions for regions, _ in items])
        captions = [c for _, image_captions in items for c in image_captions]
        image_index = [i for i, (_, image_captions) in enumerate(items) for _ in image_captions]
        batch["caption_tokens"], batch["caption_lengths"] = pad_sequences(captions, self.pad_index)
        batch["image_index"] = torch.tensor(image_index, dtype=torch.long)
        return batch


class CaptionEvaluationDataset(Dataset):
    """One item per image with its raw reference strings (scored by the official protocol).

    When the feature file labels its regions (the synthetic world does), items also carry each region's
    object category, so attention grounding can be measured.
    """

    def __init__(self, features: RegionFeatures, images: Sequence[ImageCaptions]) -> None:
        self.features = features
        self.image_ids = [image.image_id for image in images]
        self.references = [image.captions for image in images]
        self.labelled = features.region_category_names is not None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[PendingRegions, list[str], np.ndarray | None]:
        image_id = self.image_ids[index]
        categories = self.features.extra(image_id, "region_category") if self.labelled else None
        return self.features.pending(image_id), self.references[index], categories

    @staticmethod
    def collate(items) -> CaptionEvalBatch:
        """:func:`collate_regions` keys plus ``references`` (B lists of raw strings) and, for labelled
        regions, ``region_category (B, R)`` int64 (-1 for background and padding)."""
        batch = collate_regions([regions for regions, _, _ in items])
        batch["references"] = [references for _, references, _ in items]
        if items[0][2] is not None:
            categories = torch.full(batch["image_features_mask"].shape, -1, dtype=torch.long)
            for row, (_, _, labels) in enumerate(items):
                categories[row, : len(labels)] = torch.from_numpy(labels.astype(np.int64))
            batch["region_category"] = categories
        return batch
