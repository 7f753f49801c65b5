"""Sentence BLEU for the SCST reward, equal to pycocoevalcap's per-sentence BLEU (tests/test_scst.py checks it)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from updown.metrics.cider import ngram_counts


class SentenceBleu:
    """Per-sentence BLEU-4 exactly as pycocoevalcap's ``BleuScorer`` reports it (``option="closest"``).

    Each order's precision gets pycocoevalcap's smoothing ``(correct + 1e-15) / (guess + 1e-9)`` and the
    brevity penalty multiplies the geometric mean, with the reference length closest to the hypothesis'
    (ties: the shorter). References are cooked once per image (clipped n-gram counts and lengths).
    """

    def __init__(self, n: int = 4) -> None:
        self.n = n
        self._images: dict[Any, tuple[Counter, np.ndarray]] = {}

    def __contains__(self, key: Any) -> bool:
        return key in self._images

    def add_references(self, key: Any, references: list[list[str]]) -> None:
        max_counts: Counter = Counter()
        for reference in references:
            max_counts |= ngram_counts(reference, self.n)
        self._images[key] = (max_counts, np.array([len(r) for r in references], dtype=np.float64))

    def score(self, hypotheses: list[list[str]], keys: list[Any]) -> np.ndarray:
        """``(N,)`` BLEU-n of each hypothesis (word lists) against the references cached for its key."""
        # shape: (N, n)
        correct = np.zeros((len(hypotheses), self.n))
        test_lengths = np.array([len(words) for words in hypotheses], dtype=np.float64)
        ref_lengths = np.zeros(len(hypotheses))
        for row, (words, key) in enumerate(zip(hypotheses, keys)):
            max_counts, lengths = self._images[key]
            for gram, count in ngram_counts(words, self.n).items():
                correct[row, len(gram) - 1] += min(count, max_counts.get(gram, 0))
            distance = np.abs(lengths - test_lengths[row])
            ref_lengths[row] = lengths[distance == distance.min()].min()
        guess = np.maximum(test_lengths[:, None] - np.arange(self.n), 0.0)
        precision = np.prod((correct + 1e-15) / (guess + 1e-9), axis=1) ** (1.0 / self.n)
        ratio = (test_lengths + 1e-15) / (ref_lengths + 1e-9)
        with np.errstate(over="ignore"):
            brevity = np.where(ratio < 1.0, np.exp(1.0 - 1.0 / ratio), 1.0)
        return precision * brevity
