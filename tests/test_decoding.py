"""Tests for updown.decoding against brute-force enumeration on a toy second-order Markov model."""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
import toy_decoder

from updown.decoding import beam_search, gnmt_length_penalty, greedy_decode, sample_decode
from updown.models.captioner import CaptionerConfig, UpDownCaptioner

PAD, UNK, BOS, EOS = 0, 1, 2, 3
VOCABULARY = 7  # four specials and the words 4, 5, 6
WORDS = [4, 5, 6]
NUM_BOXES = 3


# shape of the toy model's table: (num_images, VOCABULARY, VOCABULARY, VOCABULARY)
ToyModel = partial(toy_decoder.ToyModel, vocabulary=VOCABULARY)


def has_repeated_trigram(sequence: list[int]) -> bool:
    trigrams = [tuple(sequence[i : i + 3]) for i in range(len(sequence) - 2)]
    return len(trigrams) != len(set(trigrams))


def brute_force_best(
    model: ToyModel, image: int, max_length: int, alpha: float = 0.0, allowed=lambda s: True
):
    """Enumerate every sequence: words then <eos>, or max_length words cut off without <eos>."""
    best_sequence, best_score = None, -math.inf
    for length in range(1, max_length + 1):
        for words in itertools.product(WORDS, repeat=length - 1):
            candidates = [[*words, EOS]] + (
                [[*words, word] for word in WORDS] if length == max_length else []
            )
            for sequence in candidates:
                if not allowed(sequence):
                    continue
                score = model.score(image, sequence) / ((5 + len(sequence)) / 6) ** alpha
                if score > best_score:
                    best_sequence, best_score = sequence, score
    return best_sequence, best_score


def unpadded(tokens: torch.Tensor) -> list[list[int]]:
    return [[int(token) for token in row if token != PAD] for row in tokens]


def test_large_beam_finds_the_exhaustive_best() -> None:
    max_length, num_images = 5, 8
    model = ToyModel(num_images, seed=2)
    model.table[:, :, :, EOS] -= 2.0  # so that the best sequences have varied lengths
    best = {}
    for alpha in (0.0, 1.0):
        output = beam_search(
            model.step,
            model.init_state(list(range(num_images))),
            beam_size=400,
            max_length=max_length,
            length_penalty=alpha,
        )
        best[alpha] = unpadded(output.tokens)
        for image, sequence in enumerate(best[alpha]):
            expected_sequence, expected_score = brute_force_best(model, image, max_length, alpha)
            assert sequence == expected_sequence
            assert float(output.scores[image]) == pytest.approx(expected_score, abs=1e-5)
            assert float(output.logprobs[image]) == pytest.approx(model.score(image, sequence), abs=1e-5)
    # The length penalty must matter for this model, or the comparison above proves little.
    assert best[0.0] != best[1.0]
    assert len({len(sequence) for sequence in best[0.0]}) >= 3


def test_large_beam_with_blocking_finds_the_best_allowed_sequence() -> None:
    max_length, num_images = 5, 8
    model = ToyModel(num_images, seed=1)
    model.table[:, :, :, EOS] -= 4.0  # long sequences make repeats likely
    images = list(range(num_images))
    no_repeated_trigram = lambda sequence: not has_repeated_trigram(sequence)  # noqa: E731
    words_once = lambda sequence: all(sequence.count(word) <= 1 for word in (5, 6))  # noqa: E731
    for options, allowed in (
        ({"block_trigrams": True}, no_repeated_trigram),
        ({"block_repeated_words": True, "repeatable_tokens": [4]}, words_once),
    ):
        output = beam_search(
            model.step, model.init_state(images), beam_size=400, max_length=max_length, **options
        )
        expected = [brute_force_best(model, image, max_length, allowed=allowed)[0] for image in images]
        assert unpadded(output.tokens) == expected
        # The constraint must change some answers, or the comparison above proves little.
        assert expected != [brute_force_best(model, image, max_length)[0] for image in images]


def test_early_stopping_keeps_hypotheses_a_length_penalty_would_prefer() -> None:
    model = ToyModel(1)
    model.table[:] = -20.0
    model.table[0, BOS, BOS, EOS] = -0.5  # a short caption finishes first...
    model.table[0, BOS, BOS, 4] = -1.0
    model.table[0, :, 4, 4] = -0.01  # ...but a long, cheap one wins once divided by ((5 + 6) / 6) ** 2
    model.table[0, :, 4, EOS] = -0.001
    expected, expected_score = brute_force_best(model, 0, 6, alpha=2.0)
    assert expected == [4, 4, 4, 4, 4, EOS]
    # Beam 3: finished hypotheses keep their slots, so a beam of 2 would prune the winner at step 2.
    output = beam_search(model.step, model.init_state([0]), beam_size=3, max_length=6, length_penalty=2.0)
    assert unpadded(output.tokens)[0] == expected
    assert float(output.scores[0]) == pytest.approx(expected_score, abs=1e-6)


def test_small_beam_matches_its_own_definition_of_pruning() -> None:
    # A beam of 2 is not exhaustive: check it does no worse than greedy and never better than the optimum.
    model = ToyModel(4, seed=9, sharpness=1.0)
    state = model.init_state([0, 1, 2, 3])
    beam = beam_search(model.step, state, beam_size=2, max_length=5)
    greedy = greedy_decode(model.step, state, max_length=5)
    for image in range(4):
        optimum = brute_force_best(model, image, 5)[1]
        assert float(greedy.logprobs[image]) - 1e-6 <= float(beam.logprobs[image]) <= optimum + 1e-6


@pytest.mark.parametrize(
    "blocking", [{}, {"block_trigrams": True, "block_repeated_words": True, "repeatable_tokens": [4]}]
)
def test_beam_size_one_equals_greedy_on_toy_model(blocking: dict) -> None:
    model = ToyModel(6, seed=2)
    model.table[:, :, :, EOS] -= 2.0
    state = model.init_state(list(range(6)))
    beam = beam_search(model.step, state, beam_size=1, max_length=8, **blocking)
    greedy = greedy_decode(model.step, state, max_length=8, **blocking)
    assert torch.equal(beam.tokens, greedy.tokens)
    torch.testing.assert_close(beam.token_logprobs, greedy.token_logprobs)
    torch.testing.assert_close(beam.attention, greedy.attention)
    assert torch.equal(beam.lengths, greedy.lengths)


def test_outputs_are_consistent_with_the_model() -> None:
    model = ToyModel(5, seed=3)
    model.table[:, :, :, EOS] -= 1.0
    for decode in (greedy_decode, beam_search):
        output = decode(model.step, model.init_state(list(range(5))), max_length=6)
        assert output.tokens.shape == (5, 6) and output.attention.shape == (5, 6, NUM_BOXES)
        for image, sequence in enumerate(unpadded(output.tokens)):
            length = len(sequence)
            assert int(output.lengths[image]) == length
            assert EOS not in sequence[:-1] and (sequence[-1] == EOS or length == 6)
            assert not set(sequence) & {PAD, BOS}
            assert output.mask[image].tolist() == [True] * length + [False] * (6 - length)
            previous, last = BOS, BOS
            for position, token in enumerate(sequence):
                assert float(output.token_logprobs[image, position]) == pytest.approx(
                    float(model.table[image, previous, last, token]), abs=1e-6
                )
                torch.testing.assert_close(
                    output.attention[image, position], model.attention_table[previous, last]
                )
                previous, last = last, token
            assert torch.all(output.attention[image, length:] == 0.0)
            assert torch.all(output.token_logprobs[image, length:] == 0.0)
        torch.testing.assert_close(output.logprobs, output.token_logprobs.sum(dim=1))


def test_results_do_not_depend_on_batch_composition() -> None:
    model = ToyModel(6, seed=5)
    model.table[:, :, :, EOS] -= 1.0
    options = {"beam_size": 4, "max_length": 7, "length_penalty": 0.6, "block_trigrams": True}
    batched = beam_search(model.step, model.init_state(list(range(6))), **options)
    for image in range(6):
        alone = beam_search(model.step, model.init_state([image]), **options)
        assert torch.equal(alone.tokens[0], batched.tokens[image])
        assert torch.equal(alone.scores[0], batched.scores[image])
        assert torch.equal(alone.attention[0], batched.attention[image])
    subset = beam_search(model.step, model.init_state([4, 1]), **options)
    assert torch.equal(subset.tokens, batched.tokens[[4, 1]])


def test_trigram_and_repeated_word_blocking_block() -> None:
    model = ToyModel(1)
    # A model that loves "4 5 4 5 4 5 ..." and never wants to stop.
    model.table[:] = -20.0
    model.table[0, :, :, 4] = -0.1
    model.table[0, :, 4, 5] = -0.05
    model.table[0, :, 4, 4] = -5.0
    model.table[0, :, :, 6] = -3.0
    for decode in (greedy_decode, beam_search):
        free = unpadded(decode(model.step, model.init_state([0]), max_length=8).tokens)[0]
        assert has_repeated_trigram(free)
        blocked = unpadded(
            decode(model.step, model.init_state([0]), max_length=8, block_trigrams=True).tokens
        )[0]
        assert not has_repeated_trigram(blocked) and len(blocked) >= 4

        assert len(set(free)) < len(free)
        no_repeats = unpadded(
            decode(model.step, model.init_state([0]), max_length=8, block_repeated_words=True).tokens
        )[0]
        assert len(set(no_repeats)) == len(no_repeats)
        some_repeats = unpadded(
            decode(
                model.step,
                model.init_state([0]),
                max_length=8,
                block_repeated_words=True,
                repeatable_tokens=[4],
            ).tokens
        )[0]
        assert some_repeats.count(4) > 1 and some_repeats.count(5) <= 1


def test_unk_is_never_produced_when_suppressed() -> None:
    model = ToyModel(2)
    model.table[:, :, :, UNK] = -0.01  # the favourite token everywhere
    model.table[:, :, :, PAD] = -0.02  # pad and bos are never produced, whatever the model says
    model.table[:, :, :, BOS] = -0.02
    state = model.init_state([0, 1])
    for decode in (greedy_decode, beam_search):
        assert not {UNK, BOS} & {int(t) for t in decode(model.step, state, max_length=5).tokens.flatten()}
        with_unk = decode(model.step, state, max_length=5, suppress_unk=False).tokens
        assert (with_unk == UNK).any() and not (with_unk == BOS).any()
    sampled = sample_decode(model.step, state, num_samples=20, max_length=5, suppress_unk=True).tokens
    assert not (sampled == UNK).any()


def test_sampling_follows_the_policy_and_is_reproducible() -> None:
    model = ToyModel(1, seed=6, sharpness=1.0)
    state = model.init_state([0])
    output = sample_decode(
        model.step, state, num_samples=4000, max_length=1, generator=torch.Generator().manual_seed(0)
    )
    assert output.tokens.shape == (4000, 1)
    first = model.table[0, BOS, BOS].clone()
    first[[PAD, BOS]] = -math.inf
    policy = torch.softmax(first, dim=0)
    frequencies = torch.bincount(output.tokens[:, 0], minlength=VOCABULARY).float() / 4000
    torch.testing.assert_close(frequencies, policy, atol=0.03, rtol=0)
    # Returned log-probabilities are the renormalised policy's.
    torch.testing.assert_close(output.token_logprobs[:, 0], torch.log(policy)[output.tokens[:, 0]])

    again = sample_decode(
        model.step, state, num_samples=4000, max_length=1, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(again.tokens, output.tokens)


def test_sampling_at_low_temperature_is_greedy() -> None:
    model = ToyModel(3, seed=8)
    state = model.init_state([0, 1, 2])
    cold = sample_decode(model.step, state, num_samples=2, temperature=1e-4, max_length=6, suppress_unk=True)
    greedy = greedy_decode(model.step, state, max_length=6)
    assert torch.equal(cold.tokens, greedy.tokens.repeat_interleave(2, dim=0))


def make_captioner() -> tuple[UpDownCaptioner, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = UpDownCaptioner(11, 6, CaptionerConfig(embedding_size=5, hidden_size=8, attention_size=4)).eval()
    num_boxes = torch.tensor([2, 5, 3, 4])
    mask = torch.arange(5).unsqueeze(0) < num_boxes.unsqueeze(1)
    features = torch.rand(4, 5, 6) * mask.unsqueeze(-1)
    return model, features, mask


def test_captioner_beam_one_equals_greedy_and_batching_does_not_matter() -> None:
    model, features, mask = make_captioner()
    state = model.init_state(features, mask)
    greedy = greedy_decode(model.step, state, max_length=6)
    beam_one = beam_search(model.step, state, beam_size=1, max_length=6)
    assert torch.equal(greedy.tokens, beam_one.tokens)
    torch.testing.assert_close(greedy.logprobs, beam_one.logprobs)

    batched = beam_search(model.step, state, beam_size=3, max_length=6, length_penalty=1.0)
    assert torch.all(batched.attention.masked_select(~mask.unsqueeze(1)) == 0.0)
    for image in range(4):
        boxes = int(mask[image].sum())
        alone_state = model.init_state(features[image : image + 1, :boxes], mask[image : image + 1, :boxes])
        alone = beam_search(model.step, alone_state, beam_size=3, max_length=6, length_penalty=1.0)
        assert torch.equal(alone.tokens[0], batched.tokens[image])
        torch.testing.assert_close(alone.scores[0], batched.scores[image])
        torch.testing.assert_close(alone.attention[0], batched.attention[image, :, :boxes])


def test_captioner_samples_carry_gradients_of_the_teacher_forced_logprobs() -> None:
    model, features, mask = make_captioner()
    output = sample_decode(
        model.step,
        model.init_state(features, mask),
        num_samples=3,
        max_length=6,
        generator=torch.Generator().manual_seed(1),
    )
    assert output.tokens.shape == (12, 6) and output.token_logprobs.requires_grad
    # Re-score the samples by teacher forcing (policy = model renormalised without <pad> and <bos>).
    caption_tokens = torch.cat([torch.full((12, 1), BOS), output.tokens], dim=1)
    logits = model(features, mask, caption_tokens, image_index=torch.arange(4).repeat_interleave(3))["logits"]
    logits[:, :, [PAD, BOS]] = -math.inf
    expected = torch.log_softmax(logits, dim=-1).gather(2, output.tokens.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(output.token_logprobs, torch.where(output.mask, expected, 0.0))
    (-output.logprobs.sum()).backward()
    assert model.output.weight.grad is not None and model.output.weight.grad.abs().sum() > 0


def test_gnmt_length_penalty_and_validation() -> None:
    torch.testing.assert_close(gnmt_length_penalty(torch.tensor([1, 7]), 1.0), torch.tensor([1.0, 2.0]))
    model = ToyModel(1)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model.step, model.init_state([0]), beam_size=0)
    with pytest.raises(ValueError, match="temperature"):
        sample_decode(model.step, model.init_state([0]), temperature=0.0)
    with pytest.raises(ValueError, match="state"):
        greedy_decode(model.step, {"image": torch.zeros(2), "previous": torch.zeros(3)})
