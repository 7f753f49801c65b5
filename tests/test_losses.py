"""Tests for updown.losses against computations written out by hand with Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from updown.losses import hardest_negative_ranking_loss, scst_loss, sequence_cross_entropy, soft_score_bce


def log_softmax_by_hand(row: list[float]) -> list[float]:
    total = math.log(sum(math.exp(value) for value in row))
    return [value - total for value in row]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_sequence_cross_entropy_averages_over_real_tokens(smoothing: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6)
    targets = torch.tensor([[5, 2, 3, 0], [4, 3, 0, 0], [1, 1, 2, 3]])
    loss = sequence_cross_entropy(logits, targets, pad_index=0, label_smoothing=smoothing)

    terms = []
    for row in range(3):
        for position in range(4):
            target = int(targets[row, position])
            if target == 0:
                continue
            logprobs = log_softmax_by_hand(logits[row, position].tolist())
            # (1 - e) on the target plus e spread uniformly over all 6 tokens.
            terms.append(-(1 - smoothing) * logprobs[target] - smoothing / 6 * sum(logprobs))
    assert float(loss) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_sequence_cross_entropy_ignores_logits_at_padding_and_handles_empty_batches() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    targets = torch.tensor([[1, 2, 0], [3, 0, 0]])
    sequence_cross_entropy(logits, targets).backward()
    assert torch.all(logits.grad[targets == 0] == 0.0)

    empty = sequence_cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    assert float(empty) == 0.0
    with pytest.raises(ValueError, match="caption_tokens"):
        sequence_cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_scst_loss_is_mean_of_negative_advantage_times_sequence_logprob() -> None:
    token_logprobs = torch.tensor(
        [[-0.5, -1.0, -2.0, -9.0], [-0.1, -0.2, -7.0, -7.0], [-3.0, -9.0, -9.0, -9.0]]
    )
    token_logprobs.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    advantage = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    loss = scst_loss(token_logprobs, mask, advantage)
    expected = (-(0.5 * -3.5) - (-1.0 * -0.3) - (2.0 * -3.0)) / 3
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # d loss / d log p(w_nt) = -advantage_n / N on masked tokens, 0 elsewhere; nothing flows into the reward.
    expected_grad = -advantage.detach().unsqueeze(1) / 3 * mask
    torch.testing.assert_close(token_logprobs.grad, expected_grad)
    assert advantage.grad is None


def test_soft_score_bce_sums_over_answers_and_averages_over_questions() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 5)
    scores = torch.tensor([[1.0, 0.3, 0.0, 0.0, 0.6], [0.0] * 5, [0.0, 0.0, 0.9, 1.0, 0.0]])
    total = 0.0
    for question in range(3):
        for answer in range(5):
            x, y = float(logits[question, answer]), float(scores[question, answer])
            probability = 1 / (1 + math.exp(-x))
            total += -(y * math.log(probability) + (1 - y) * math.log(1 - probability))
    assert float(soft_score_bce(logits, scores)) == pytest.approx(total / 3, rel=1e-5)
    with pytest.raises(ValueError, match="answer"):
        soft_score_bce(logits, scores[:, :4])


def ranking_loss_by_hand(similarity: list[list[float]], margin: float, hardest: bool) -> float:
    size = len(similarity)
    total = 0.0
    for i in range(size):
        caption_costs = [
            max(0.0, margin - similarity[i][i] + similarity[i][j]) for j in range(size) if j != i
        ]
        image_costs = [max(0.0, margin - similarity[i][i] + similarity[j][i]) for j in range(size) if j != i]
        if hardest:
            total += max(caption_costs) + max(image_costs)
        else:
            total += sum(caption_costs) + sum(image_costs)
    return total


@pytest.mark.parametrize("hardest", [True, False])
def test_ranking_loss_matches_vsepp_by_hand(hardest: bool) -> None:
    torch.manual_seed(3)
    similarity = torch.rand(5, 5)
    similarity[1, 1] += 1.0  # one pair with no violation at all
    loss = hardest_negative_ranking_loss(similarity, margin=0.2, max_violation=hardest)
    assert float(loss) == pytest.approx(ranking_loss_by_hand(similarity.tolist(), 0.2, hardest), rel=1e-5)


def test_ranking_loss_is_zero_when_positives_win_by_the_margin() -> None:
    similarity = torch.full((4, 4), 0.1) + torch.eye(4) * 0.31
    assert float(hardest_negative_ranking_loss(similarity, margin=0.2)) == 0.0
    with pytest.raises(ValueError, match="square"):
        hardest_negative_ranking_loss(torch.rand(3, 4))
