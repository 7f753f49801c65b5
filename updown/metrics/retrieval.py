"""Recall@K for image-text retrieval, in both directions, with the COCO 1K and 5K protocols.

The similarity matrix has one row per image and one column per caption, in the standard layout of
the VSE++ / SCAN / BFAN evaluation code: ``captions_per_image`` captions per image, caption ``j``
belonging to image ``j // captions_per_image``.

- Image-to-text (caption retrieval): an image's rank is the position of its best-ranked own caption.
- Text-to-image (image retrieval): a caption's rank is the position of its image.

Ranks count from 0 (Recall@K = percentage of ranks < K); median and mean rank count from 1, as in
the reference code. Ties are broken against the ground truth: a negative that scores exactly as high
as the best positive ranks above it, so a collapsed model with constant scores gets no credit
(argsort in the reference code leaves ties to the sort order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

# Rows of the similarity matrix handled at once, so that the 5K set (5000 x 25000) needs no
# full-size boolean temporaries.
_ROW_CHUNK = 256


def _as_similarity(similarity: torch.Tensor | np.ndarray, captions_per_image: int) -> torch.Tensor:
    similarity = torch.as_tensor(similarity)
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image={captions_per_image} must be at least 1.")
    if similarity.dim() != 2 or similarity.size(1) != captions_per_image * similarity.size(0):
        raise ValueError(
            f"similarity has shape {tuple(similarity.shape)}; expected (num_images, "
            f"{captions_per_image} * num_images) with caption j belonging to image j // {captions_per_image}. "
            "Keep all captions of each image, in image order."
        )
    if similarity.size(0) == 0:
        raise ValueError("similarity is empty: there are no images to rank.")
    if not bool(torch.isfinite(similarity).all()):
        raise ValueError("similarity contains NaN or infinite values; check the model's outputs.")
    return similarity


def retrieval_ranks(
    similarity: torch.Tensor | np.ndarray, captions_per_image: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the ground truth for every query, in both directions.

    Args:
        similarity: ``(num_images, captions_per_image * num_images)`` image-caption scores.
        captions_per_image: captions per image (5 on COCO and Flickr30K).

    Returns:
        ``image_to_text_ranks``: ``(num_images,)`` int64, the rank of each image's best own caption
        among all captions; ``text_to_image_ranks``: ``(num_captions,)`` int64, the rank of each
        caption's image among all images.
    """
    similarity = _as_similarity(similarity, captions_per_image)
    num_images, num_captions = similarity.shape
    caption_image = torch.arange(num_captions, device=similarity.device) // captions_per_image

    image_to_text = []
    for start in range(0, num_images, _ROW_CHUNK):
        block = similarity[start : start + _ROW_CHUNK]
        image_ids = torch.arange(start, start + block.size(0), device=similarity.device)
        # shape: (chunk, num_captions)
        positive = caption_image.unsqueeze(0) == image_ids.unsqueeze(1)
        best_positive = block.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
        image_to_text.append(((block >= best_positive) & ~positive).sum(dim=1))

    text_to_image = []
    for start in range(0, num_captions, _ROW_CHUNK):
        # shape: (chunk, num_images)
        block = similarity[:, start : start + _ROW_CHUNK].t()
        own_image = caption_image[start : start + block.size(0)]
        positive_score = block.gather(1, own_image.unsqueeze(1))
        negative = torch.arange(num_images, device=similarity.device).unsqueeze(0) != own_image.unsqueeze(1)
        text_to_image.append(((block >= positive_score) & negative).sum(dim=1))
    return torch.cat(image_to_text).long(), torch.cat(text_to_image).long()


def _summarise(ranks: torch.Tensor, prefix: str, ks: tuple[int, ...]) -> dict[str, float]:
    ranks_np = ranks.cpu().numpy()
    metrics = {f"{prefix}_r{k}": 100.0 * float((ranks_np < k).mean()) for k in ks}
    metrics[f"{prefix}_medr"] = float(np.floor(np.median(ranks_np)) + 1)
    metrics[f"{prefix}_meanr"] = float(ranks_np.mean() + 1)
    return metrics


def retrieval_metrics(
    similarity: torch.Tensor | np.ndarray, captions_per_image: int = 5, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K (percent), median and mean rank in both directions, and rsum, over the whole set.

    On the 5000 Karpathy test images this is the COCO 5K protocol; on Flickr30K's 1000 test images it
    is the standard Flickr30K protocol.

    Args:
        similarity: ``(num_images, captions_per_image * num_images)`` image-caption scores.
        captions_per_image: captions per image.
        ks: the K of Recall@K.

    Returns:
        ``i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr`` (image-to-text, i.e. caption retrieval), the
        same with ``t2i_`` (text-to-image, image retrieval), and ``rsum``, the sum of all six recalls.
    """
    image_to_text, text_to_image = retrieval_ranks(similarity, captions_per_image)
    metrics = {**_summarise(image_to_text, "i2t", ks), **_summarise(text_to_image, "t2i", ks)}
    metrics["rsum"] = sum(metrics[f"{direction}_r{k}"] for direction in ("i2t", "t2i") for k in ks)
    return metrics


def coco_1k_metrics(
    similarity: torch.Tensor | np.ndarray,
    captions_per_image: int = 5,
    fold_size: int = 1000,
    num_folds: int = 5,
) -> dict[str, float]:
    """COCO 1K protocol: metrics on each of 5 folds of 1000 test images, averaged over the folds.

    Fold ``f`` holds images ``f * fold_size ...`` and their captions; retrieval runs within the fold.

    Args:
        similarity: ``(fold_size * num_folds, captions_per_image * fold_size * num_folds)`` scores of
            the 5000 Karpathy test images against their 25000 captions.
        captions_per_image: captions per image.
        fold_size: images per fold (1000).
        num_folds: number of folds (5).

    Returns:
        The keys of :func:`retrieval_metrics`, each the mean over the folds.
    """
    similarity = _as_similarity(similarity, captions_per_image)
    if fold_size < 1 or num_folds < 1 or similarity.size(0) != fold_size * num_folds:
        raise ValueError(
            f"coco_1k_metrics: similarity covers {similarity.size(0)} images, but {num_folds} folds of "
            f"{fold_size} images need {fold_size * num_folds}. Score the full 5K test set, or use "
            "retrieval_metrics for another set."
        )
    folds = []
    for fold in range(num_folds):
        images = slice(fold * fold_size, (fold + 1) * fold_size)
        captions = slice(fold * fold_size * captions_per_image, (fold + 1) * fold_size * captions_per_image)
        folds.append(retrieval_metrics(similarity[images, captions], captions_per_image))
    return {key: float(np.mean([fold[key] for fold in folds])) for key in folds[0]}


def coco_5k_metrics(
    similarity: torch.Tensor | np.ndarray, captions_per_image: int = 5, num_images: int = 5000
) -> dict[str, float]:
    """COCO 5K protocol: :func:`retrieval_metrics` over all 5000 test images and 25000 captions.

    Args:
        similarity: ``(num_images, captions_per_image * num_images)`` scores.
        captions_per_image: captions per image.
        num_images: the expected number of test images (5000).

    Returns:
        The keys of :func:`retrieval_metrics`.
    """
    similarity = _as_similarity(similarity, captions_per_image)
    if similarity.size(0) != num_images:
        raise ValueError(
            f"coco_5k_metrics: similarity covers {similarity.size(0)} images, the 5K protocol needs "
            f"{num_images}. Score the full Karpathy test split, or use retrieval_metrics for another set."
        )
    return retrieval_metrics(similarity, captions_per_image)


Protocol = Literal["full", "1k", "5k"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
COCO_FOLD_SIZE, COCO_NUM_FOLDS = 1000, 5


def check_protocol(protocol: str, num_images: int | None = None, split: str = "") -> None:
    """Refuse an unknown protocol, or one that the ``num_images`` images of ``split`` cannot follow."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"model.protocol={protocol!r} is unknown; use one of {PROTOCOLS}.")
    needed = COCO_FOLD_SIZE * COCO_NUM_FOLDS
    if num_images is not None and protocol != "full" and num_images != needed:
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
