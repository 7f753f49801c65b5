"""Tests for updown.metrics.retrieval against brute-force loops in the style of the BFAN evaluation code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import updown.metrics.retrieval as retrieval_module
from updown.metrics.retrieval import coco_1k_metrics, coco_5k_metrics, retrieval_metrics, retrieval_ranks


def _brute_force(similarity: np.ndarray, captions_per_image: int = 5) -> tuple[dict, np.ndarray, np.ndarray]:
    """The reference i2t / t2i loops (argsort per query), valid when there are no ties."""
    num_images = similarity.shape[0]
    image_ranks = np.zeros(num_images)
    for index in range(num_images):
        order = np.argsort(similarity[index])[::-1]
        own = range(captions_per_image * index, captions_per_image * (index + 1))
        image_ranks[index] = min(np.where(order == j)[0][0] for j in own)
    caption_ranks = np.zeros(captions_per_image * num_images)
    for caption in range(captions_per_image * num_images):
        order = np.argsort(similarity[:, caption])[::-1]
        caption_ranks[caption] = np.where(order == caption // captions_per_image)[0][0]
    metrics = {}
    for name, ranks in (("i2t", image_ranks), ("t2i", caption_ranks)):
        for k in (1, 5, 10):
            metrics[f"{name}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        metrics[f"{name}_medr"] = np.floor(np.median(ranks)) + 1
        metrics[f"{name}_meanr"] = ranks.mean() + 1
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return metrics, image_ranks, caption_ranks


def _noisy_similarity(num_images: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    similarity = rng.normal(size=(num_images, 5 * num_images))
    # A signal on the true pairs so the recalls are neither 0 nor 100.
    similarity[np.arange(5 * num_images) // 5, np.arange(5 * num_images)] += 2.0
    return similarity


@pytest.mark.parametrize("row_chunk", [256, 7])
def test_metrics_and_ranks_match_brute_force(row_chunk, monkeypatch):
    monkeypatch.setattr(retrieval_module, "_ROW_CHUNK", row_chunk)
    similarity = _noisy_similarity(40, seed=0)
    expected, image_ranks, caption_ranks = _brute_force(similarity)
    got = retrieval_metrics(torch.from_numpy(similarity))
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key]), key
    assert 0 < got["i2t_r1"] < 100 and 0 < got["t2i_r10"] < 100
    ranks_i2t, ranks_t2i = retrieval_ranks(similarity)
    assert ranks_i2t.tolist() == image_ranks.astype(int).tolist()
    assert ranks_t2i.tolist() == caption_ranks.astype(int).tolist()


def test_perfect_and_constant_scores():
    perfect = torch.zeros(12, 60)
    perfect[torch.arange(60) // 5, torch.arange(60)] = 1.0
    metrics = retrieval_metrics(perfect)
    assert metrics["rsum"] == 600.0 and metrics["i2t_medr"] == 1.0 and metrics["t2i_meanr"] == 1.0
    # Ties count against the ground truth: a collapsed model gets no credit.
    constant = retrieval_metrics(torch.ones(12, 60))
    assert constant["i2t_r1"] == 0.0 and constant["t2i_r10"] == 0.0
    assert constant["t2i_meanr"] == 12.0


def test_hand_computed_two_image_case():
    # One caption per image. Image 0 ranks its caption first; image 1 ranks caption 0 (score 2) above its
    # own (0). Caption 0 prefers image 1 (2 > 1); caption 1 ties between the images (0 = 0), which counts
    # against it.
    metrics = retrieval_metrics(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), captions_per_image=1)
    assert metrics["i2t_r1"] == 50.0 and metrics["i2t_r5"] == 100.0
    assert metrics["i2t_medr"] == 1.0  # floor(median([0, 1]) = 0.5) + 1
    assert metrics["i2t_meanr"] == 1.5
    assert metrics["t2i_r1"] == 0.0 and metrics["t2i_medr"] == 2.0 and metrics["t2i_meanr"] == 2.0
    assert metrics["rsum"] == 50.0 + 100.0 + 100.0 + 0.0 + 100.0 + 100.0


def test_other_captions_per_image():
    rng = np.random.default_rng(3)
    similarity = rng.normal(size=(15, 30))
    similarity[np.arange(30) // 2, np.arange(30)] += 1.5
    expected, _, _ = _brute_force(similarity, captions_per_image=2)
    got = retrieval_metrics(similarity, captions_per_image=2)
    for key in expected:
        assert got[key] == pytest.approx(expected[key]), key


def test_coco_1k_averages_within_fold_metrics_and_5k_uses_everything():
    similarity = _noisy_similarity(20, seed=1)
    folds = [_brute_force(similarity[f * 4 : (f + 1) * 4, f * 20 : (f + 1) * 20])[0] for f in range(5)]
    got = coco_1k_metrics(similarity, fold_size=4, num_folds=5)
    for key in folds[0]:
        assert got[key] == pytest.approx(np.mean([fold[key] for fold in folds])), key
    # A strong distractor outside fold 0 hurts the 5K protocol but not the 1K one.
    distracted = similarity.copy()
    distracted[10, :5] = 100.0
    assert coco_1k_metrics(distracted, fold_size=4, num_folds=5) == got
    full = coco_5k_metrics(distracted, num_images=20)
    assert full == retrieval_metrics(distracted)
    assert full["t2i_r1"] < retrieval_metrics(similarity)["t2i_r1"]


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="5 \\* num_images"):
        retrieval_metrics(torch.zeros(4, 19))
    nan = torch.zeros(4, 20)
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(nan)
    with pytest.raises(ValueError, match="5K protocol"):
        coco_5k_metrics(torch.zeros(4, 20))
    with pytest.raises(ValueError, match="folds"):
        coco_1k_metrics(torch.zeros(20, 100), fold_size=3, num_folds=5)
