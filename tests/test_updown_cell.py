"""Tests for updown.modules.updown_cell: one step equals the paper's equations with plain LSTMCells."""

from __future__ import annotations

import pytest
import torch

from updown.modules.updown_cell import HIDDEN_KEYS, UpDownCell

FEATURES, EMBEDDING, HIDDEN, ATTENTION = 7, 5, 6, 4


@pytest.fixture
def cell() -> UpDownCell:
    torch.manual_seed(0)
    return UpDownCell(FEATURES, EMBEDDING, HIDDEN, ATTENTION)


def make_inputs(num_boxes: list[int], max_boxes: int = 4):
    generator = torch.Generator().manual_seed(3)
    batch_size = len(num_boxes)
    mask = torch.arange(max_boxes).unsqueeze(0) < torch.tensor(num_boxes).unsqueeze(1)
    features = torch.rand(batch_size, max_boxes, FEATURES, generator=generator) * mask.unsqueeze(-1)
    embedding = torch.randn(batch_size, EMBEDDING, generator=generator)
    hidden = {key: torch.randn(batch_size, HIDDEN, generator=generator) for key in HIDDEN_KEYS}
    return features, mask, embedding, hidden


def reference_step(cell: UpDownCell, features, num_boxes, embedding, hidden):
    """The paper's step written with the unmodified LSTMCells on the concatenated inputs, image by image."""
    outputs, weights_list = [], []
    for image, count in enumerate(num_boxes):
        real = features[image, :count]
        mean = real.mean(dim=0)
        h1, c1 = cell.attention_lstm(
            torch.cat([hidden["language_h"][image], mean, embedding[image]]).unsqueeze(0),
            (hidden["attention_h"][image : image + 1], hidden["attention_c"][image : image + 1]),
        )
        weights, attended = cell.attention(h1, real.unsqueeze(0), torch.ones(1, count, dtype=torch.bool))
        h2, c2 = cell.language_lstm(
            torch.cat([attended, h1], dim=1),
            (hidden["language_h"][image : image + 1], hidden["language_c"][image : image + 1]),
        )
        outputs.append((h1, c1, h2, c2))
        weights_list.append(weights.squeeze(0))
    return outputs, weights_list


def test_step_matches_lstmcells_on_concatenated_inputs(cell: UpDownCell) -> None:
    num_boxes = [2, 4, 1]
    features, mask, embedding, hidden = make_inputs(num_boxes)
    output, new_hidden, weights = cell(embedding, cell.precompute(features, mask), hidden)
    expected, expected_weights = reference_step(cell, features, num_boxes, embedding, hidden)
    for image, (h1, c1, h2, c2) in enumerate(expected):
        torch.testing.assert_close(new_hidden["attention_h"][image], h1.squeeze(0))
        torch.testing.assert_close(new_hidden["attention_c"][image], c1.squeeze(0))
        torch.testing.assert_close(new_hidden["language_h"][image], h2.squeeze(0))
        torch.testing.assert_close(new_hidden["language_c"][image], c2.squeeze(0))
        torch.testing.assert_close(output[image], h2.squeeze(0))
        count = num_boxes[image]
        torch.testing.assert_close(weights[image, :count], expected_weights[image])
        assert torch.all(weights[image, count:] == 0.0)


def test_precompute_mean_uses_real_boxes_only(cell: UpDownCell) -> None:
    features, mask, _, _ = make_inputs([3, 1])
    features[~mask] = 50.0
    image = cell.precompute(features, mask)
    assert torch.all(image["image_features"][~mask] == 0.0)
    mean_weight = cell.attention_lstm.weight_ih[:, HIDDEN : HIDDEN + FEATURES]
    expected_mean = torch.stack([features[0, :3].mean(0), features[1, :1].mean(0)])
    torch.testing.assert_close(image["mean_feature_gates"], expected_mean @ mean_weight.T)
    assert image["projected_features"].shape == (2, 4, ATTENTION)


def test_garbage_in_padded_rows_changes_nothing(cell: UpDownCell) -> None:
    features, mask, embedding, hidden = make_inputs([2, 3])
    clean = cell(embedding, cell.precompute(features, mask), hidden)
    dirty_features = features.clone()
    dirty_features[~mask] = float("nan")
    dirty = cell(embedding, cell.precompute(dirty_features, mask), hidden)
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[2], dirty[2])


def test_init_hidden_and_parameter_layout(cell: UpDownCell) -> None:
    reference = torch.zeros(1, dtype=torch.float64)
    hidden = cell.init_hidden(3, reference)
    assert set(hidden) == set(HIDDEN_KEYS)
    assert all(value.shape == (3, HIDDEN) and value.dtype == torch.float64 for value in hidden.values())
    assert not any(value.any() for value in hidden.values())
    assert cell.attention_lstm.input_size == HIDDEN + FEATURES + EMBEDDING
    assert cell.language_lstm.input_size == FEATURES + HIDDEN


def test_rejects_mask_of_wrong_shape(cell: UpDownCell) -> None:
    features, mask, _, _ = make_inputs([2, 3])
    with pytest.raises(ValueError, match="image_features_mask"):
        cell.precompute(features, mask[:, :2])
