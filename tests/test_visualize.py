"""Every plot renders to a PNG that is not blank, and the entropy helper matches its definition."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.image import imread

from updown.visualize import (
    attention_entropy,
    attention_statistics_figure,
    caption_attention_figure,
    question_attention_figure,
    regions_figure,
)

BOXES = np.array(
    [[10, 10, 200, 150], [300, 50, 600, 400], [50, 200, 250, 470], [0, 0, 640, 480]], dtype=float
)


def _pixels(figure) -> np.ndarray:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=60)
    buffer.seek(0)
    return imread(buffer)


def _assert_drawn(figure) -> None:
    pixels = _pixels(figure)[..., :3]
    assert pixels.std() > 0.02  # not a single flat colour
    # Attention shading is orange-ish: some pixels have much more red than blue.
    assert ((pixels[..., 0] - pixels[..., 2]) > 0.3).mean() > 0.001


def test_regions_on_a_blank_canvas_and_on_an_image():
    weights = np.array([0.7, 0.2, 0.1, 0.0])
    _assert_drawn(regions_figure(BOXES, weights, image_size=(640, 480), labels=["dog", "bus", "cat", "sky"]))
    image = np.random.default_rng(0).random((480, 640, 3))
    _assert_drawn(regions_figure(BOXES, weights, image=image, top_k=2))
    with pytest.raises(ValueError, match="image_size"):
        regions_figure(BOXES, weights)


def test_caption_strip_has_one_panel_per_word():
    words = ["a", "brown", "dog", "<eos>"]
    attention = np.random.default_rng(1).dirichlet(np.ones(4), size=6)
    figure = caption_attention_figure(words, attention, BOXES, image_size=(640, 480), columns=3)
    assert len(figure.axes) == 4
    assert figure.axes[2].get_title() == f"dog ({attention[2].max():.2f})"
    _assert_drawn(figure)
    with pytest.raises(ValueError, match="5 words but attention for 4"):
        caption_attention_figure([*words, "x"], attention[:4], BOXES, image_size=(640, 480))


def test_question_figure():
    figure = question_attention_figure(
        "What color is the dog?", "brown", [0.9, 0.05, 0.05, 0.0], BOXES, image_size=(640, 480)
    )
    assert "A: brown" in figure.axes[0].get_title()
    _assert_drawn(figure)


def test_entropy_and_statistics():
    attention = np.zeros((2, 3, 4))
    attention[0, :, 0] = 1.0  # peaked: entropy 0
    attention[1, :, :2] = 0.5  # uniform over its 2 real boxes: log 2
    entropy = attention_entropy(attention, np.array([4, 2])[:, None])
    np.testing.assert_allclose(entropy, [[0, 0, 0], [np.log(2)] * 3], atol=1e-12)
    figure = attention_statistics_figure(
        attention,
        lengths=np.array([3, 2]),
        num_boxes=np.array([4, 2]),
        grounding={"dog": (8, 10), "bus": (3, 4)},
    )
    assert len(figure.axes) == 2
    _assert_drawn(figure)
