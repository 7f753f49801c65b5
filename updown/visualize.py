"""Attention plots: where the model looks, per generated word or per question.

Every function takes plain arrays (numpy or torch) and returns a :class:`matplotlib.figure.Figure`; nothing
here needs a model, a Trainer or a display. Figures are built with the object-oriented API (no pyplot state),
so they render the same in a notebook, a script or a headless test. :func:`load_caption_attention` reads the
per-word attention file written by ``python -m updown.predict captions --attention``.

Boxes are ``(R, 4)`` x1, y1, x2, y2 in pixels; attention weights are ``(R,)`` per word or question. Without an
image, boxes are drawn on a blank canvas of the image's size, which is enough to check a feature file's layout.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

ATTENTION_COLOUR = (1.0, 0.35, 0.0)


def _numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def draw_regions(
    ax,
    boxes,
    weights=None,
    image=None,
    image_size: tuple[float, float] | None = None,
    labels: Sequence[str] | None = None,
    top_k: int | None = None,
    title: str | None = None,
) -> None:
    """Draw an image (or a blank canvas) with its boxes, shaded by attention weight, on ``ax``.

    Args:
        ax: a matplotlib Axes.
        boxes: ``(R, 4)`` boxes in pixels.
        weights: ``(R,)`` attention weights; None draws every box's outline only.
        image: ``(H, W, 3)`` or ``(H, W)`` array; None draws a blank canvas of ``image_size``.
        image_size: ``(width, height)``; needed without an image.
        labels: ``R`` strings drawn at the top-left of the highlighted boxes (e.g. Visual Genome classes).
        top_k: highlight only the ``top_k`` most-attended boxes (all when None).
        title: axes title.
    """
    boxes = _numpy(boxes).astype(float)
    if image is not None:
        image = _numpy(image)
        height, width = image.shape[:2]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    else:
        if image_size is None:
            raise ValueError("draw_regions: give an image or its image_size (width, height).")
        width, height = image_size
        ax.add_patch(Rectangle((0, 0), width, height, facecolor=(0.93, 0.93, 0.93), edgecolor="black"))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if weights is None:
        order = np.arange(len(boxes))
        alphas = np.full(len(boxes), 0.0)
    else:
        weights = _numpy(weights).astype(float)[: len(boxes)]
        order = np.argsort(-weights)
        if top_k is not None:
            order = order[:top_k]
        # Shade relative to the largest weight, so a peaked and a flat distribution both stay readable.
        alphas = 0.45 * weights / max(float(weights.max()), 1e-12)
    for rank, index in enumerate(order[::-1]):
        x1, y1, x2, y2 = boxes[index]
        alpha = float(alphas[index])
        ax.add_patch(
            Rectangle(
                (x1, y1), x2 - x1, y2 - y1,
                facecolor=(*ATTENTION_COLOUR, alpha), edgecolor=(*ATTENTION_COLOUR, max(2 * alpha, 0.5)),
                linewidth=2.0 if weights is not None and rank == len(order) - 1 else 1.0,
            )
        )  # fmt: skip
        if labels is not None:
            text = labels[index] if weights is None else f"{labels[index]} {weights[index]:.2f}"
            ax.text(
                x1 + 2,
                y1 + 2,
                text,
                fontsize=7,
                va="top",
                color="white",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0},
            )
    if title:
        ax.set_title(title, fontsize=9)


def regions_figure(
    boxes, weights=None, image=None, image_size=None, labels=None, top_k=None, title=None
) -> Figure:
    """One image with its boxes (see :func:`draw_regions` for the arguments)."""
    figure = Figure(figsize=(5, 4), layout="constrained")
    draw_regions(figure.add_subplot(), boxes, weights, image, image_size, labels, top_k, title)
    return figure


def caption_attention_figure(
    words: Sequence[str],
    attention,
    boxes,
    image=None,
    image_size: tuple[float, float] | None = None,
    top_k: int = 3,
    columns: int = 5,
    labels: Sequence[str] | None = None,
) -> Figure:
    """A strip of panels, one per generated word, highlighting the word's most-attended boxes.

    Args:
        words: the generated words (``<eos>`` may be included as the last word).
        attention: ``(T, R)`` attention behind each word; only the first ``len(words)`` rows are drawn.
        boxes: ``(R, 4)``.
        image, image_size, labels: as in :func:`draw_regions`.
        top_k: boxes highlighted per word.
        columns: panels per row.

    Each panel's title is the word and the weight of its most-attended box.
    """
    attention = _numpy(attention)
    words = list(words)
    if attention.shape[0] < len(words):
        raise ValueError(
            f"caption_attention_figure: {len(words)} words but attention for {attention.shape[0]} steps."
        )
    rows = math.ceil(len(words) / columns)
    figure = Figure(figsize=(3.0 * min(columns, len(words)), 2.6 * rows), layout="constrained")
    for index, word in enumerate(words):
        ax = figure.add_subplot(rows, min(columns, len(words)), index + 1)
        weights = attention[index, : len(boxes)]
        draw_regions(ax, boxes, weights, image, image_size, labels, top_k, f"{word} ({weights.max():.2f})")
    return figure


def question_attention_figure(
    question: str, answer: str, attention, boxes, image=None, image_size=None, top_k: int = 3, labels=None
) -> Figure:
    """The question's attention over regions, titled with the question and the predicted answer."""
    figure = Figure(figsize=(5, 4.4), layout="constrained")
    draw_regions(
        figure.add_subplot(),
        boxes,
        _numpy(attention)[: len(boxes)],
        image,
        image_size,
        labels,
        top_k,
        f"Q: {question}\nA: {answer}",
    )
    return figure


def attention_entropy(attention, num_boxes) -> np.ndarray:
    """Entropy (nats) of each attention distribution over the real boxes.

    Args:
        attention: ``(..., R)`` weights.
        num_boxes: ``(...)`` or broadcastable: real boxes of each distribution.

    Returns:
        ``(...)`` entropies; ``log(num_boxes)`` is uniform attention, 0 a single box.
    """
    attention = _numpy(attention).astype(float)
    positions = np.arange(attention.shape[-1])
    real = positions < _numpy(num_boxes)[..., None]
    p = np.where(real, attention, 0.0)
    return -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(axis=-1)


def attention_statistics_figure(
    attention, lengths, num_boxes, grounding: dict[str, tuple[int, int]] | None = None
) -> Figure:
    """Summaries of decoded attention: entropy per decoding step, and (optionally) grounding per category.

    Args:
        attention: ``(N, T, R)`` per-word attention of N captions.
        lengths: ``(N,)`` generated tokens per caption (``<eos>`` included).
        num_boxes: ``(N,)`` real boxes per image.
        grounding: category -> (grounded words, object words): how often the most-attended box of a generated
            object word belongs to an object of that category (the synthetic world knows).
    """
    attention, lengths, num_boxes = _numpy(attention), _numpy(lengths), _numpy(num_boxes)
    entropy = attention_entropy(attention, num_boxes[:, None])
    steps = np.arange(attention.shape[1])
    valid = steps[None, :] < lengths[:, None]
    counts = valid.sum(axis=0)
    mean = np.where(counts > 0, (entropy * valid).sum(axis=0) / np.maximum(counts, 1), np.nan)
    uniform = float(np.log(num_boxes).mean())
    panels = 2 if grounding else 1
    figure = Figure(figsize=(5.5 * panels, 3.6), layout="constrained")
    ax = figure.add_subplot(1, panels, 1)
    ax.plot(steps[counts > 0] + 1, mean[counts > 0], marker="o", label="model")
    ax.axhline(uniform, color="grey", linestyle="--", label="uniform over boxes")
    ax.set_xlabel("decoding step")
    ax.set_ylabel("attention entropy (nats)")
    ax.set_title("How peaked is attention?")
    ax.legend(fontsize=8)
    if grounding:
        ax = figure.add_subplot(1, panels, 2)
        names = sorted(grounding)
        rates = [grounding[n][0] / max(grounding[n][1], 1) for n in names]
        ax.bar(names, rates, color=ATTENTION_COLOUR)
        ax.set_ylim(0, 1)
        ax.set_ylabel("top box is the named object")
        ax.set_title("Grounding per category")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    return figure


def load_caption_attention(attention_h5path: str | os.PathLike) -> dict:
    """Read ``python -m updown.predict captions --attention`` output into numpy arrays and a vocabulary list."""
    import h5py

    if not os.path.isfile(attention_h5path):
        raise FileNotFoundError(
            f"{attention_h5path}: attention file not found. Write it with updown.predict --attention."
        )
    with h5py.File(attention_h5path, "r") as f:
        missing = {"image_id", "tokens", "lengths", "attention", "num_boxes", "boxes", "captions"} - set(f)
        if missing:
            raise ValueError(
                f"{attention_h5path}: missing dataset(s) {sorted(missing)}; write it with updown.predict."
            )
        data = {name: f[name][()] for name in f}
        data["vocabulary"] = json.loads(f.attrs["vocabulary"])
    data["captions"] = [c.decode() if isinstance(c, bytes) else str(c) for c in data["captions"]]
    return data
