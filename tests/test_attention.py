"""Tests for updown.modules.attention: the paper's equations, exact masking of padded boxes."""

from __future__ import annotations

import pytest
import torch

from updown.modules.attention import TopDownAttention

FEATURE_SIZE, QUERY_SIZE, ATTENTION_SIZE = 6, 5, 4


@pytest.fixture
def attention() -> TopDownAttention:
    torch.manual_seed(0)
    return TopDownAttention(FEATURE_SIZE, QUERY_SIZE, ATTENTION_SIZE)


def make_inputs(num_boxes: list[int], max_boxes: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    batch_size = len(num_boxes)
    features = torch.rand(batch_size, max_boxes, FEATURE_SIZE, generator=generator)
    mask = torch.arange(max_boxes).unsqueeze(0) < torch.tensor(num_boxes).unsqueeze(1)
    features = features.masked_fill(~mask.unsqueeze(-1), 0.0)
    query = torch.randn(batch_size, QUERY_SIZE, generator=generator)
    return query, features, mask


def test_matches_paper_equations_per_image(attention: TopDownAttention) -> None:
    num_boxes = [3, 5, 1]
    query, features, mask = make_inputs(num_boxes)
    weights, attended = attention(query, features, mask)

    w_v = attention.image_projection.weight
    w_h = attention.query_projection.weight
    w_a = attention.score.weight.squeeze(0)
    for image, count in enumerate(num_boxes):
        # a_i = w_a^T tanh(W_v v_i + W_h h), one region at a time, real regions only.
        scores = torch.stack(
            [w_a @ torch.tanh(w_v @ features[image, box] + w_h @ query[image]) for box in range(count)]
        )
        expected = torch.exp(scores) / torch.exp(scores).sum()
        torch.testing.assert_close(weights[image, :count], expected)
        assert torch.all(weights[image, count:] == 0.0)
        expected_attended = sum(expected[box] * features[image, box] for box in range(count))
        torch.testing.assert_close(attended[image], expected_attended)


def test_padded_boxes_get_exactly_zero_weight_and_garbage_does_not_leak(attention: TopDownAttention) -> None:
    query, features, mask = make_inputs([2, 4, 5])
    weights, attended = attention(query, features, mask)
    garbage = features.clone()
    garbage[~mask] = 1e6 * torch.randn(int((~mask).sum()), FEATURE_SIZE)
    garbage_weights, garbage_attended = attention(query, garbage, mask)

    assert torch.all(weights[~mask] == 0.0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    assert torch.equal(weights, garbage_weights)
    assert torch.equal(attended, garbage_attended)


def test_no_gradient_reaches_padded_rows(attention: TopDownAttention) -> None:
    query, features, mask = make_inputs([2, 5])
    features.requires_grad_(True)
    _, attended = attention(query, features, mask)
    attended.sum().backward()
    assert torch.all(features.grad[~mask] == 0.0)
    assert features.grad[mask].abs().sum() > 0


def test_image_without_boxes_gives_zeros_not_nan(attention: TopDownAttention) -> None:
    query, features, mask = make_inputs([0, 3])
    weights, attended = attention(query, features, mask)
    assert torch.all(weights[0] == 0.0) and torch.all(attended[0] == 0.0)
    assert torch.isfinite(weights).all() and torch.isfinite(attended).all()


def test_precomputed_projection_gives_the_same_result(attention: TopDownAttention) -> None:
    query, features, mask = make_inputs([3, 5])
    expected = attention(query, features, mask)
    projected = attention.project_features(features)
    assert projected.shape == (2, 5, ATTENTION_SIZE)
    actual = attention(query, features, mask, projected_features=projected)
    assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])


def test_paper_has_no_biases(attention: TopDownAttention) -> None:
    expected = FEATURE_SIZE * ATTENTION_SIZE + QUERY_SIZE * ATTENTION_SIZE + ATTENTION_SIZE
    assert sum(parameter.numel() for parameter in attention.parameters()) == expected


def test_rejects_bad_mask(attention: TopDownAttention) -> None:
    query, features, mask = make_inputs([3, 5])
    with pytest.raises(ValueError, match="bool"):
        attention(query, features, mask.float())
    with pytest.raises(ValueError, match="shape"):
        attention(query, features, mask[:, :3])
    with pytest.raises(ValueError, match="positive"):
        TopDownAttention(0, 3, 3)
