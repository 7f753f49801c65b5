"""Bidirectional focal attention (BFAN) for image-text matching.

Liu et al., "Focus Your Attention: A Bidirectional Focal Attention Network for Image-Text Matching",
ACM MM 2019 (arXiv 1909.11416). Attention from a query fragment (a word, or a region) over the context
fragments (the regions, or the words) runs in three steps:

1. *Pre-assign*: raw relevance ``s_ij = q_i . c_j``, LeakyReLU(0.1), l2-normalised over the query
   fragments, then ``a_ij = softmax_j(lambda * s_ij)`` over the real context fragments.
2. *Identify* the relevant context fragments: ``F_ij = sum_k (a_ij - a_ik) g_k`` over real ``k`` and
   fragment ``j`` is relevant when ``F_ij > 0``. ``"equal"`` takes ``g_k = 1`` (above the mean weight);
   ``"prob"`` takes ``g_k = sqrt(a_ik)``.
3. *Re-assign*: ``a'_ij = H_ij a_ij / sum_k H_ik a_ik``; irrelevant fragments get exactly zero weight.

When no fragment qualifies (all real fragments carry the same weight, e.g. a one-box image or a
one-word caption) every real fragment is equally relevant and keeps its pre-assigned weight; the
reference code divides 0 by 0 there. Padded fragments never receive weight and never influence
real ones.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

FocalType = Literal["equal", "prob"]
FOCAL_TYPES: tuple[str, ...] = get_args(FocalType)


def _check_focal_type(focal_type: str) -> None:
    if focal_type not in FOCAL_TYPES:
        raise ValueError(f"focal_type={focal_type!r} is unknown: use one of {FOCAL_TYPES}.")


def focal_attention_weights(
    scores: torch.Tensor,
    query_mask: torch.Tensor,
    context_mask: torch.Tensor,
    lambda_softmax: float = 20.0,
    focal_type: str = "equal",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Focal attention weights of every query fragment over the context fragments.

    Args:
        scores: ``(..., num_query, num_context)`` raw dot products ``q_i . c_j``.
        query_mask: bool, broadcastable to ``(..., num_query)``, True for a real query fragment.
        context_mask: bool, broadcastable to ``(..., num_context)``, True for a real context fragment.
            Every row must have at least one real context fragment.
        lambda_softmax: inverse temperature of the pre-assignment softmax (the paper uses 20).
        focal_type: ``"equal"`` or ``"prob"`` (how relevant fragments are identified).
        eps: added to the l2 norm, as in the reference code.

    Returns:
        ``(..., num_query, num_context)`` weights; each row sums to one over the real context fragments
        and is exactly zero on padded and irrelevant ones. Rows of padded query fragments are defined
        (finite) but meaningless.
    """
    _check_focal_type(focal_type)
    query_mask = query_mask.unsqueeze(-1)
    context_mask = context_mask.unsqueeze(-2)

    # Step 1, pre-assign. The l2 norm runs over the query fragments (as in SCAN / BFAN), so padded
    # queries are zeroed first to keep them out of it.
    relevance = F.leaky_relu(scores, negative_slope=0.1).masked_fill(~query_mask, 0.0)
    relevance = relevance / (torch.linalg.vector_norm(relevance, dim=-2, keepdim=True) + eps)
    logits = (lambda_softmax * relevance).masked_fill(~context_mask, float("-inf"))
    attention = torch.softmax(logits, dim=-1)

    # Step 2, identify: a hard decision, so no gradient flows through it.
    with torch.no_grad():
        if focal_type == "equal":
            # shape: (..., 1, 1)
            num_context = context_mask.sum(dim=-1, keepdim=True).to(attention.dtype)
            focal = attention * num_context - attention.sum(dim=-1, keepdim=True)
        else:
            # sum_k (a_j - a_k) sqrt(a_k) = a_j sum_k sqrt(a_k) - sum_k a_k^1.5, in O(num_context).
            confidence = attention.sqrt()
            focal = attention * confidence.sum(dim=-1, keepdim=True) - (attention * confidence).sum(
                dim=-1, keepdim=True
            )
        relevant = (focal > 0) & context_mask
        nothing_relevant = ~relevant.any(dim=-1, keepdim=True)
        relevant = relevant | (nothing_relevant & context_mask)

    # Step 3, re-assign over the relevant fragments only.
    kept = attention * relevant
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)


def focal_attention(
    query: torch.Tensor,
    query_mask: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    lambda_softmax: float = 20.0,
    focal_type: str = "equal",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Focal attention of aligned pairs: query ``b`` attends over context ``b``.

    Meant for inspection (which regions a word focuses on); :func:`bfan_similarity` computes all
    pairs without materialising the attended vectors.

    Args:
        query: ``(batch_size, num_query, embedding_size)``.
        query_mask: ``(batch_size, num_query)`` bool, True for a real fragment.
        context: ``(batch_size, num_context, embedding_size)``.
        context_mask: ``(batch_size, num_context)`` bool, True for a real fragment.
        lambda_softmax: inverse temperature of the pre-assignment softmax.
        focal_type: ``"equal"`` or ``"prob"``.

    Returns:
        ``attended``: ``(batch_size, num_query, embedding_size)`` focal-attended context per query
        fragment, and ``weights``: ``(batch_size, num_query, num_context)``.
    """
    # shape: (batch_size, num_query, num_context)
    scores = torch.bmm(query, context.transpose(1, 2))
    weights = focal_attention_weights(scores, query_mask, context_mask, lambda_softmax, focal_type)
    # shape: (batch_size, num_query, embedding_size)
    attended = torch.bmm(weights, context)
    return attended, weights


def _mean_attended_cosine(
    weights: torch.Tensor,
    dots: torch.Tensor,
    context_gram: torch.Tensor,
    query_norms: torch.Tensor,
    query_mask: torch.Tensor,
    gram_equation: str,
    eps: float,
) -> torch.Tensor:
    """Mean over real query fragments of cos(q_i, sum_j w_ij c_j), from dot products only.

    ``q_i . sum_j w_ij c_j = sum_j w_ij (q_i . c_j)`` and ``|sum_j w_ij c_j|^2 = w_i^T G w_i`` with the
    context Gram matrix ``G``, so no ``(..., num_query, embedding_size)`` tensor is ever built.
    """
    numerator = (weights * dots).sum(dim=-1)
    squared_norm = (torch.einsum(gram_equation, weights, context_gram) * weights).sum(dim=-1)
    attended_norms = squared_norm.clamp_min(eps * eps).sqrt()
    cosine = numerator / (query_norms * attended_norms).clamp_min(eps)
    cosine = cosine.masked_fill(~query_mask, 0.0)
    return cosine.sum(dim=-1) / query_mask.sum(dim=-1).to(cosine.dtype)


def bfan_similarity(
    image_embeddings: torch.Tensor,
    image_mask: torch.Tensor,
    caption_embeddings: torch.Tensor,
    caption_mask: torch.Tensor,
    lambda_softmax: float = 20.0,
    focal_type: str = "equal",
    eps: float = 1e-8,
) -> torch.Tensor:
    """BFAN similarity of every image with every caption: text-to-image plus image-to-text.

    Text-to-image: each word attends (focally) over the regions; the score is the mean over words of
    the cosine between the word and its attended region vector. Image-to-text swaps the roles. The
    two are summed, as in the paper.

    Memory grows as ``num_images * num_captions * num_regions * num_words``; chunk large sets (see
    :meth:`updown.models.retrieval.BFANRetrieval.similarity`).

    Args:
        image_embeddings: ``(num_images, num_regions, embedding_size)`` region embeddings.
        image_mask: ``(num_images, num_regions)`` bool, True for a real box; at least one per image.
        caption_embeddings: ``(num_captions, num_words, embedding_size)`` word embeddings.
        caption_mask: ``(num_captions, num_words)`` bool, True for a real word; at least one per caption.
        lambda_softmax: inverse temperature of the pre-assignment softmax.
        focal_type: ``"equal"`` or ``"prob"``.
        eps: numerical floor of norms, as in the reference code.

    Returns:
        ``(num_images, num_captions)`` similarities in ``[-2, 2]``.
    """
    _check_focal_type(focal_type)
    # Zeroing padded rows keeps even non-finite padding out of the products below.
    image_embeddings = image_embeddings.masked_fill(~image_mask.unsqueeze(-1), 0.0)
    caption_embeddings = caption_embeddings.masked_fill(~caption_mask.unsqueeze(-1), 0.0)
    # shape: (num_images, num_captions, num_regions, num_words)
    scores = torch.einsum("ird,ctd->icrt", image_embeddings, caption_embeddings)
    # shape: (num_images, num_regions, num_regions)
    region_gram = torch.bmm(image_embeddings, image_embeddings.transpose(1, 2))
    # shape: (num_captions, num_words, num_words)
    word_gram = torch.bmm(caption_embeddings, caption_embeddings.transpose(1, 2))
    # shape: (num_images, 1, num_regions)
    image_mask = image_mask[:, None, :]
    # shape: (1, num_captions, num_words)
    caption_mask = caption_mask[None, :, :]

    # shape: (num_images, num_captions, num_words, num_regions)
    text_scores = scores.transpose(-1, -2)
    text_weights = focal_attention_weights(
        text_scores, caption_mask, image_mask, lambda_softmax, focal_type, eps
    )
    text_to_image = _mean_attended_cosine(
        text_weights,
        text_scores,
        region_gram,
        caption_embeddings.norm(dim=-1)[None],
        caption_mask,
        "ictr,irs->icts",
        eps,
    )

    image_weights = focal_attention_weights(scores, image_mask, caption_mask, lambda_softmax, focal_type, eps)
    image_to_text = _mean_attended_cosine(
        image_weights,
        scores,
        word_gram,
        image_embeddings.norm(dim=-1)[:, None],
        image_mask,
        "icrt,ctu->icru",
        eps,
    )
    return text_to_image + image_to_text
