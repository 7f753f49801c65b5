"""Evaluation metrics: official COCO caption scores, fast CIDEr-D, official VQA accuracy.

- :mod:`updown.metrics.coco_caption`: pycocoevalcap protocol (PTB tokenisation, BLEU, METEOR, ROUGE-L,
  CIDEr, SPICE) on raw strings; :func:`score_captions`, :func:`human_consensus`.
- :mod:`updown.metrics.cider`: :class:`CiderD`, vectorised CIDEr-D with fixed document frequencies, for
  SCST rewards.
- :mod:`updown.metrics.vqa_normalization`: the official VQA answer normalisation.
- :mod:`updown.metrics.vqa_accuracy`: :func:`vqa_accuracy_per_question`, :func:`evaluate_vqa` and the
  :class:`VQAAccuracy` torchmetrics Metric.
- :mod:`updown.metrics.retrieval`: Recall@K for image-text retrieval (import it directly).

Names are imported lazily, so ``from updown.metrics.cider import CiderD`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "score_captions": "coco_caption",
    "human_consensus": "coco_caption",
    "MissingDependencyError": "coco_caption",
    "CiderD": "cider",
    "normalize_answer": "vqa_normalization",
    "vqa_accuracy_per_question": "vqa_accuracy",
    "evaluate_vqa": "vqa_accuracy",
    "VQAAccuracy": "vqa_accuracy",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'updown.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(f"updown.metrics.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
