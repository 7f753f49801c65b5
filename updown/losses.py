"""Losses of the captioning, VQA and retrieval tasks, as plain functions of tensors."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def sequence_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    pad_index: int = 0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Token-level cross-entropy averaged over the non-padding target tokens of the whole batch.

    Every real token weighs the same, so long captions count more than short ones (the usual XE
    objective of captioning code). With ``label_smoothing`` ``e``, the target distribution puts ``1 - e``
    on the target and spreads ``e`` uniformly over all ``V`` tokens (``torch.nn.CrossEntropyLoss``'s
    definition).

    Args:
        logits: ``(batch_size, max_length, vocabulary_size)`` unnormalised scores.
        targets: ``(batch_size, max_length)`` int64 target ids, ``pad_index`` where there is no token.
        pad_index: id ignored in the average.
        label_smoothing: in ``[0, 1)``.

    Returns:
        Scalar loss; 0 (with a graph) when every target is padding.
    """
    if logits.dim() != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(
            f"sequence_cross_entropy: logits must be (batch_size, max_length, vocabulary_size) and targets "
            f"(batch_size, max_length), got {tuple(logits.shape)} and {tuple(targets.shape)}; for captions "
            f"pass the model's logits with caption_tokens[:, 1:]."
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"sequence_cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}.")
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=pad_index,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    # Dividing the sum ourselves keeps an all-padding batch at 0 instead of NaN.
    num_tokens = (targets != pad_index).sum().clamp(min=1)
    return total / num_tokens


def scst_loss(token_logprobs: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """Self-critical policy-gradient loss (Rennie et al. 2017): ``mean_n -(r_n - b_n) * sum_t log p(w_nt)``.

    Normalisation: log-probabilities are SUMMED over each sample's tokens (so the gradient is the
    REINFORCE estimate of the whole sequence's reward) and the result is AVERAGED over the ``N`` samples.
    The advantage is treated as a constant (no gradient flows into the reward or the baseline).

    Args:
        token_logprobs: ``(N, max_length)`` log-probabilities of the sampled tokens (with gradients).
        mask: ``(N, max_length)`` bool or 0/1, True for the tokens up to and including ``<eos>``.
        advantage: ``(N,)`` reward minus baseline of each sample.

    Returns:
        Scalar loss.
    """
    if token_logprobs.shape != mask.shape or advantage.shape != token_logprobs.shape[:1]:
        raise ValueError(
            f"scst_loss: token_logprobs and mask must be (N, max_length) and advantage (N,), got "
            f"{tuple(token_logprobs.shape)}, {tuple(mask.shape)} and {tuple(advantage.shape)}."
        )
    # shape: (N,)
    sequence_logprobs = (token_logprobs * mask.to(token_logprobs.dtype)).sum(dim=1)
    return -(advantage.detach().to(sequence_logprobs.dtype) * sequence_logprobs).mean()


def soft_score_bce(logits: torch.Tensor, answer_scores: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy against soft VQA scores, as in hengyuan-hu/bottom-up-attention-vqa.

    That code computes ``binary_cross_entropy_with_logits(logits, labels)`` (a mean over all ``B * A``
    entries) and multiplies by ``A``; this function does the same, which equals the BCE SUMMED over
    answers and AVERAGED over questions. Summing keeps each answer logit's gradient independent of the
    answer vocabulary size (a plain mean would shrink it ~3000 times), so the reference code's learning
    rates carry over.

    Args:
        logits: ``(batch_size, num_answers)`` unnormalised scores.
        answer_scores: ``(batch_size, num_answers)`` soft targets in ``[0, 1]``.

    Returns:
        Scalar loss.
    """
    if logits.dim() != 2 or logits.shape != answer_scores.shape:
        raise ValueError(
            f"soft_score_bce: logits and answer_scores must both be (batch_size, num_answers), got "
            f"{tuple(logits.shape)} and {tuple(answer_scores.shape)}; check the answer vocabulary size."
        )
    return F.binary_cross_entropy_with_logits(logits, answer_scores.to(logits.dtype)) * logits.size(1)


def hardest_negative_ranking_loss(
    similarity: torch.Tensor, margin: float = 0.2, max_violation: bool = True
) -> torch.Tensor:
    """Triplet ranking loss of VSE++ (Faghri et al. 2018) over a batch of matching image-caption pairs.

    For each positive pair ``(i, i)`` and direction, the hinge ``[margin - s(i, i) + s(i, j)]_+`` is taken
    against the hardest negative in the batch (``max_violation=True``, VSE++ "MH") or summed over all
    negatives (``max_violation=False``, the VSE0 "SH" loss). Both directions (image -> caption along rows,
    caption -> image along columns) are added and the result is SUMMED over the batch, as VSE++ and BFAN do.

    Args:
        similarity: ``(B, B)`` scores, ``similarity[i, j]`` between image ``i`` and caption ``j``;
            positives on the diagonal.
        margin: the hinge margin.
        max_violation: use only the hardest negative per positive.

    Returns:
        Scalar loss.
    """
    if similarity.dim() != 2 or similarity.size(0) != similarity.size(1):
        raise ValueError(
            f"hardest_negative_ranking_loss: similarity must be square (B, B) with positives on the "
            f"diagonal, got {tuple(similarity.shape)}."
        )
    # shape: (B, 1)
    positives = similarity.diagonal().unsqueeze(1)
    is_positive = torch.eye(similarity.size(0), dtype=torch.bool, device=similarity.device)
    # Row i: image i against every other caption; column j: caption j against every other image.
    caption_violations = (margin + similarity - positives).clamp(min=0).masked_fill(is_positive, 0.0)
    image_violations = (margin + similarity - positives.t()).clamp(min=0).masked_fill(is_positive, 0.0)
    if max_violation:
        return caption_violations.amax(dim=1).sum() + image_violations.amax(dim=0).sum()
    return caption_violations.sum() + image_violations.sum()


def self_critical_baseline(
    reward: np.ndarray, kind: str, greedy_reward: np.ndarray | None = None
) -> np.ndarray:
    """The baseline of each sample.

    Args:
        reward: ``(B, k)`` rewards of the k samples of each image.
        kind: "mean_of_others" (mean of the image's other k - 1 rewards), "beam_mean" (mean of all k) or
            "greedy" (``greedy_reward`` of the image).
        greedy_reward: ``(B,)`` rewards of the greedy captions, for "greedy".

    Returns:
        ``(B, k)`` baselines.
    """
    num_samples = reward.shape[1]
    if kind == "mean_of_others":
        return (reward.sum(axis=1, keepdims=True) - reward) / (num_samples - 1)
    if kind == "beam_mean":
        return np.repeat(reward.mean(axis=1, keepdims=True), num_samples, axis=1)
    return np.repeat(greedy_reward[:, None], num_samples, axis=1)


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
