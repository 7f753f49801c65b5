"""Batch dictionaries: the one place where batch keys are defined.

Every collate function returns one of these (its return annotation says which), and every task step takes
one, so a name means the same thing from the HDF5 file to the loss. Shapes use ``B`` for batch size, ``R`` for the number of
regions (boxes) after padding to the batch's largest box count, ``D`` for the feature size, ``T`` for
sequence length.
"""

from __future__ import annotations

from typing import TypedDict

import torch
from typing_extensions import NotRequired  # typing.NotRequired from Python 3.11


class RegionBatch(TypedDict):
    """Region features of a batch of images, padded to the batch's largest box count.

    Keys:
        image_id: ``(B,)`` int64 COCO image ids.
        image_features: ``(B, R, D)`` float32; rows beyond an image's box count are zero.
        image_features_mask: ``(B, R)`` bool, True for a real box. Never infer it from zero features.
        image_boxes: ``(B, R, 4)`` float32 x1, y1, x2, y2 in pixels.
        image_spatial: ``(B, R, 5)`` float32 (x1/w, y1/h, x2/w, y2/h, area/(w*h)).

    With the ``device`` feature store, ``image_features`` is filled only once the batch is on its device: until
    then the batch holds :data:`FEATURES_INDEX_KEY` instead.
    """

    image_id: torch.Tensor
    image_features: torch.Tensor
    image_features_mask: torch.Tensor
    image_boxes: torch.Tensor
    image_spatial: torch.Tensor


#: ``(B,)`` int64 rows of the ``device`` feature store (updown/data/feature_store.py). It lives only between
#: the collate function and ``on_after_batch_transfer``, which replaces it with ``image_features`` gathered on
#: the device; no task or model ever sees it.
FEATURES_INDEX_KEY = "image_features_index"


class CaptionTrainBatch(RegionBatch):
    """B images with all their N captions; regions appear once per image, not once per caption.

    Keys (besides :class:`RegionBatch`):
        caption_tokens: ``(N, T)`` int64, ``<bos> w_1 .. w_n <eos> <pad>..``.
        caption_lengths: ``(N,)`` int64, number of tokens including ``<bos>`` and ``<eos>``.
        image_index: ``(N,)`` int64, the image row (0..B-1) of each caption.
    """

    caption_tokens: torch.Tensor
    caption_lengths: torch.Tensor
    image_index: torch.Tensor


class CaptionEvalBatch(RegionBatch):
    """One item per image, with its raw reference strings (for the official scorer).

    Keys (besides :class:`RegionBatch`):
        references: list of B lists of raw caption strings.
        region_category: ``(B, R)`` int64 object category of each region, -1 for background and padding;
            only when the feature file labels its regions (the synthetic world does), for grounding.
    """

    references: list[list[str]]
    region_category: NotRequired[torch.Tensor]


class RetrievalTrainBatch(RegionBatch):
    """B (image, caption) pairs; row ``i`` of the regions and caption ``i`` match (images may repeat).

    Keys (besides :class:`RegionBatch`):
        caption_tokens: ``(B, T)`` int64 with ``<bos>`` and ``<eos>``.
        caption_lengths: ``(B,)`` int64.
    """

    caption_tokens: torch.Tensor
    caption_lengths: torch.Tensor


class RetrievalEvalBatch(RegionBatch):
    """B images with k captions each, in image order (caption ``j`` belongs to image ``j // k``).

    Keys (besides :class:`RegionBatch`):
        caption_tokens: ``(B * k, T)`` int64.
        caption_lengths: ``(B * k,)`` int64.
        dataset_index: ``(B,)`` int64, each image's position in the split (restores the order after ranks
            are gathered).
    """

    caption_tokens: torch.Tensor
    caption_lengths: torch.Tensor
    dataset_index: torch.Tensor


class VQABatch(RegionBatch):
    """One question per item.

    Keys (besides :class:`RegionBatch`):
        question_id: ``(B,)`` int64.
        question_tokens: ``(B, T)`` int64, right-padded with ``<pad>`` (0).
        question_lengths: ``(B,)`` int64.
        answer_scores: ``(B, A)`` float32 soft VQA scores per answer in the answer vocabulary
            (all zero for questions without annotations).
        answers: list of B lists of the 10 raw human answers (empty without annotations).
        answer_types: B official answer types ("yes/no", "number", "other"); None without annotations.
    """

    question_id: torch.Tensor
    question_tokens: torch.Tensor
    question_lengths: torch.Tensor
    answer_scores: torch.Tensor
    answers: list[list[str]]
    answer_types: list[str | None]
