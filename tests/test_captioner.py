"""Tests for updown.models.captioner: paper parameter count, step vs teacher forcing, masking, image_index."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from updown.models.captioner import CaptionerConfig, UpDownCaptioner

VOCABULARY, FEATURES, EMBEDDING, HIDDEN, ATTENTION = 13, 8, 6, 7, 5


def make_model(**overrides) -> UpDownCaptioner:
    torch.manual_seed(0)
    fields = {k: overrides.pop(k) for k in ("dropout",) if k in overrides}
    config = CaptionerConfig(embedding_size=EMBEDDING, hidden_size=HIDDEN, attention_size=ATTENTION, **fields)
    return UpDownCaptioner(VOCABULARY, FEATURES, config, **overrides).eval()


def make_batch(num_boxes: list[int], max_boxes: int = 5, length: int = 6, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    batch_size = len(num_boxes)
    mask = torch.arange(max_boxes).unsqueeze(0) < torch.tensor(num_boxes).unsqueeze(1)
    features = torch.rand(batch_size, max_boxes, FEATURES, generator=generator) * mask.unsqueeze(-1)
    tokens = torch.randint(4, VOCABULARY, (batch_size, length), generator=generator)
    tokens[:, 0] = 2
    tokens[0, 3] = 3
    tokens[0, 4:] = 0
    return features, mask, tokens


def test_paper_configuration_parameter_count_matches_equations() -> None:
    vocabulary, features, embedding, hidden, attention = 10010, 2048, 1000, 1000, 512

    def lstm_cell(input_size: int, hidden_size: int) -> int:
        # nn.LSTMCell: W_ih (4h x in), W_hh (4h x h) and two biases b_ih, b_hh (4h each).
        return 4 * (input_size * hidden_size + hidden_size * hidden_size + 2 * hidden_size)

    expected = (
        vocabulary * embedding  # W_e
        + lstm_cell(hidden + features + embedding, hidden)  # attention LSTM on [h2; mean(v); W_e y]
        + features * attention  # W_v
        + hidden * attention  # W_h
        + attention  # w_a
        + lstm_cell(features + hidden, hidden)  # language LSTM on [v_hat; h1]
        + hidden * vocabulary
        + vocabulary  # W_p, b_p
    )
    with torch.device("meta"):
        model = UpDownCaptioner(vocabulary, features, CaptionerConfig(embedding, hidden, attention))
    assert sum(parameter.numel() for parameter in model.parameters()) == expected
    # By hand: 10,010,000 + 20,200,000 + 1,048,576 + 512,000 + 512 + 16,200,000 + 10,010,000 + 10,010.
    assert expected == 57_991_098


def test_output_shapes_and_padded_boxes_get_zero_attention() -> None:
    model = make_model()
    features, mask, tokens = make_batch([2, 5, 3])
    output = model(features, mask, tokens)
    assert output["logits"].shape == (3, 5, VOCABULARY)
    assert output["attention"].shape == (3, 5, 5)
    attention = output["attention"]
    assert torch.all(attention.masked_select(~mask.unsqueeze(1)) == 0.0)
    torch.testing.assert_close(attention.sum(dim=-1), torch.ones(3, 5))


def test_garbage_in_padded_rows_does_not_change_outputs() -> None:
    model = make_model()
    features, mask, tokens = make_batch([2, 5, 3])
    clean = model(features, mask, tokens)
    dirty_features = features.clone()
    dirty_features[~mask] = 1e4 * torch.randn(int((~mask).sum()), FEATURES)
    dirty = model(dirty_features, mask, tokens)
    assert torch.equal(clean["logits"], dirty["logits"])
    assert torch.equal(clean["attention"], dirty["attention"])


def test_step_reproduces_teacher_forced_logits() -> None:
    model = make_model()
    features, mask, tokens = make_batch([2, 5, 3])
    output = model(features, mask, tokens)
    state = model.init_state(features, mask)
    for time_step in range(tokens.size(1) - 1):
        logprobs, state, attention = model.step(tokens[:, time_step], state)
        expected = torch.log_softmax(output["logits"][:, time_step], dim=-1)
        torch.testing.assert_close(logprobs, expected)
        torch.testing.assert_close(attention, output["attention"][:, time_step])


def test_image_index_path_equals_copied_features() -> None:
    model = make_model()
    features, mask, _ = make_batch([2, 5, 3])
    image_index = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    _, _, tokens = make_batch([1] * 7, seed=5)
    indexed = model(features, mask, tokens, image_index=image_index)
    copied = model(features[image_index], mask[image_index], tokens)
    torch.testing.assert_close(indexed["logits"], copied["logits"])
    torch.testing.assert_close(indexed["attention"], copied["attention"])


def test_feature_encoder_is_applied_to_features_and_mask() -> None:
    class ScaleRealBoxes(nn.Module):
        def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return features * 3.0 + mask.unsqueeze(-1).float()

    features, mask, tokens = make_batch([2, 4])
    encoded = make_model(feature_encoder=ScaleRealBoxes())(features, mask, tokens)
    plain = make_model()(features * 3.0 + mask.unsqueeze(-1).float(), mask, tokens)
    torch.testing.assert_close(encoded["logits"], plain["logits"])


def test_scheduled_sampling_feeds_model_samples() -> None:
    model = make_model().train()
    features, mask, tokens = make_batch([2, 5, 3])
    other_tokens = tokens.clone()
    other_tokens[:, 1:] = torch.randint(4, VOCABULARY, (3, tokens.size(1) - 1))
    torch.manual_seed(7)
    first = model(features, mask, tokens, scheduled_sampling_probability=1.0)["logits"]
    torch.manual_seed(7)
    second = model(features, mask, other_tokens, scheduled_sampling_probability=1.0)["logits"]
    teacher_forced = model(features, mask, tokens)["logits"]
    # With probability 1 the ground truth after <bos> is never read.
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first[:, 0], teacher_forced[:, 0])
    assert not torch.allclose(first[:, 1:], teacher_forced[:, 1:])


def test_dropout_acts_only_in_training() -> None:
    model = make_model(dropout=0.5)
    features, mask, tokens = make_batch([2, 5])
    evaluated = model(features, mask, tokens)["logits"]
    torch.testing.assert_close(evaluated, make_model()(features, mask, tokens)["logits"])
    torch.manual_seed(0)
    assert not torch.allclose(model.train()(features, mask, tokens)["logits"], evaluated)


def test_a_few_steps_of_training_fit_a_tiny_batch() -> None:
    model = make_model().train()
    features, mask, tokens = make_batch([2, 5, 3])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(40):
        logits = model(features, mask, tokens)["logits"]
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, VOCABULARY), tokens[:, 1:].reshape(-1), ignore_index=0
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_rejects_bad_inputs() -> None:
    model = make_model()
    features, mask, tokens = make_batch([2, 5])
    with pytest.raises(ValueError, match="image_feature_size"):
        model(features[..., :4], mask, tokens)
    with pytest.raises(ValueError, match="vocabulary"):
        model(features, mask, tokens + VOCABULARY)
    with pytest.raises(ValueError, match="image_index"):
        model(features, mask, tokens, image_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="image_index"):
        model(features, mask, torch.cat([tokens, tokens]))
    with pytest.raises(ValueError, match="bool"):
        model(features, mask.long(), tokens)
    with pytest.raises(ValueError, match="eos_index"):
        UpDownCaptioner(VOCABULARY, eos_index=VOCABULARY)
