"""Tests for updown.decoding.constrained_beam_search against an exhaustive search on a toy model."""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
import toy_decoder

from updown.constraints import Constraint, ConstraintAutomaton
from updown.decoding import beam_search, constrained_beam_search
from updown.models.captioner import CaptionerConfig, UpDownCaptioner

PAD, UNK, BOS, EOS = 0, 1, 2, 3
VOCABULARY = 8  # four special tokens and the words 4, 5, 6, 7
WORDS = [4, 5, 6, 7]
NUM_BOXES = 3


# <eos> made less likely, so that the best captions have varied lengths.
ToyModel = partial(toy_decoder.ToyModel, vocabulary=VOCABULARY, eos_bias=1.5)


def occurs(form: tuple[int, ...], sequence: list[int]) -> bool:
    return any(tuple(sequence[i : i + len(form)]) == form for i in range(len(sequence) - len(form) + 1))


def count_satisfied(constraints: list[Constraint], sequence: list[int]) -> int:
    return sum(any(occurs(form, sequence) for form in constraint.word_forms) for constraint in constraints)


def all_captions(max_length: int):
    """Every caption: words then <eos>, or max_length words cut off without <eos>."""
    for length in range(max_length):
        for words in itertools.product(WORDS, repeat=length):
            yield [*words, EOS]
    for words in itertools.product(WORDS, repeat=max_length):
        yield list(words)


def exhaustive_best(
    model: ToyModel,
    image: int,
    constraints: list[Constraint],
    minimum: int,
    max_length: int,
    alpha: float = 0.0,
    allowed=lambda sequence: True,
) -> tuple[list[int], float, int]:
    """The best allowed caption satisfying at least min(minimum, len(constraints)) constraints; when none
    does, the best among those satisfying the most. Returns (caption, score, constraints satisfied)."""
    required = min(minimum, len(constraints))
    best_key, best = (-1, -math.inf), (None, -math.inf, -1)
    for sequence in all_captions(max_length):
        if not allowed(sequence):
            continue
        satisfied = count_satisfied(constraints, sequence)
        score = model.score(image, sequence) / ((5 + len(sequence)) / 6) ** alpha
        key = (min(satisfied, required), score)
        if key > best_key:
            best_key, best = key, (sequence, score, satisfied)
    return best


def unpadded(tokens: torch.Tensor) -> list[list[int]]:
    return [[int(token) for token in row if token != PAD] for row in tokens]


# One entry per image of the batch below: one word, a two-word form, several forms, three constraints
# whose forms overlap ("4 5 6" satisfies two), a three-word form with a repeated word, none.
CONSTRAINTS = [
    [Constraint(((5,),))],
    [Constraint(((6, 4),))],
    [Constraint(((7,), (4, 6))), Constraint(((5, 5),))],
    [Constraint(((4, 5),)), Constraint(((5, 6),)), Constraint(((7,),))],
    [Constraint(((6, 6, 7),))],
    [],
]
# A beam per state at least as large as the number of hypotheses that can ever share a state: every
# prefix of up to max_length - 1 words (4 ** 4 = 256) plus the finished ones (85), so the search is exact.
EXACT_BEAM, MAX_LENGTH = 400, 5


@pytest.mark.parametrize("minimum", [1, 2, 3])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_large_beam_equals_exhaustive_search(minimum: int, alpha: float) -> None:
    model = ToyModel(len(CONSTRAINTS), seed=3)
    output = constrained_beam_search(
        model.step,
        model.init_state(list(range(len(CONSTRAINTS)))),
        CONSTRAINTS,
        min_constraints_to_satisfy=minimum,
        beam_size=EXACT_BEAM,
        max_length=MAX_LENGTH,
        length_penalty=alpha,
    )
    unconstrained = beam_search(
        model.step,
        model.init_state(list(range(len(CONSTRAINTS)))),
        beam_size=EXACT_BEAM,
        max_length=MAX_LENGTH,
        length_penalty=alpha,
    )
    for image, sequence in enumerate(unpadded(output.tokens)):
        expected, expected_score, satisfied = exhaustive_best(
            model, image, CONSTRAINTS[image], minimum, MAX_LENGTH, alpha
        )
        assert sequence == expected, image
        assert float(output.scores[image]) == pytest.approx(expected_score, abs=1e-5)
        assert float(output.logprobs[image]) == pytest.approx(model.score(image, sequence), abs=1e-5)
        assert int(output.constraints_satisfied[image]) == satisfied
        assert int(output.lengths[image]) == len(sequence)
    # The constraints must change the answers, or the comparison above proves little.
    changed = [a != b for a, b in zip(unpadded(output.tokens), unpadded(unconstrained.tokens))]
    assert sum(changed[:-1]) >= 3 and not changed[-1]


def test_large_beam_with_blocking_equals_exhaustive_search() -> None:
    model = ToyModel(len(CONSTRAINTS), seed=4)
    state = model.init_state(list(range(len(CONSTRAINTS))))
    words_once = lambda sequence: all(sequence.count(word) <= 1 for word in (5, 6, 7))  # noqa: E731

    def no_repeated_trigram(sequence: list[int]) -> bool:
        trigrams = [tuple(sequence[i : i + 3]) for i in range(len(sequence) - 2)]
        return len(trigrams) == len(set(trigrams))

    for options, allowed in (
        ({"block_repeated_words": True, "repeatable_tokens": [4]}, words_once),
        ({"block_trigrams": True}, no_repeated_trigram),
    ):
        output = constrained_beam_search(
            model.step, state, CONSTRAINTS, beam_size=EXACT_BEAM, max_length=MAX_LENGTH, **options
        )
        fallbacks = 0
        for image, sequence in enumerate(unpadded(output.tokens)):
            expected = exhaustive_best(model, image, CONSTRAINTS[image], 2, MAX_LENGTH, allowed=allowed)
            assert sequence == expected[0], (options, image)
            assert int(output.constraints_satisfied[image]) == expected[2]
            fallbacks += expected[2] < min(2, len(CONSTRAINTS[image]))
        # "5 5" and "6 6 7" cannot be produced when 5 and 6 may not repeat.
        assert fallbacks == (2 if "block_repeated_words" in options else 0)


def test_unsatisfiable_constraints_fall_back_to_the_most_satisfied() -> None:
    model = ToyModel(3, seed=5)
    # A two-word form cannot fit in one token, and "4 5" and "6 7" cannot both fit in three.
    constraints = [[Constraint(((4, 5),))], [Constraint(((4, 5),)), Constraint(((6, 7),))], []]
    for max_length, minimum, fallback in ((1, 1, [0, 0, 0]), (3, 2, [1, 1, 0])):
        output = constrained_beam_search(
            model.step,
            model.init_state([0, 1, 2]),
            constraints,
            min_constraints_to_satisfy=minimum,
            beam_size=100,
            max_length=max_length,
        )
        for image, sequence in enumerate(unpadded(output.tokens)):
            expected = exhaustive_best(model, image, constraints[image], fallback[image], max_length)
            assert sequence == expected[0] and int(output.constraints_satisfied[image]) == expected[2]
            assert expected[2] == fallback[image]


def test_small_beam_keeps_the_per_state_pruning_sound() -> None:
    # With a beam of 2 the search is not exhaustive; it must still return a caption that satisfies the
    # required constraints, whose score is what the model gives it and no better than the optimum.
    model = ToyModel(len(CONSTRAINTS), seed=6)
    output = constrained_beam_search(
        model.step, model.init_state(list(range(len(CONSTRAINTS)))), CONSTRAINTS, beam_size=2, max_length=6
    )
    for image, sequence in enumerate(unpadded(output.tokens)):
        required = min(2, len(CONSTRAINTS[image]))
        assert (
            count_satisfied(CONSTRAINTS[image], sequence)
            == int(output.constraints_satisfied[image])
            >= required
        )
        assert float(output.logprobs[image]) == pytest.approx(model.score(image, sequence), abs=1e-5)
        assert (
            float(output.logprobs[image]) <= exhaustive_best(model, image, CONSTRAINTS[image], 2, 6)[1] + 1e-6
        )


@pytest.mark.parametrize("beam_size", [1, 3, 5])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"length_penalty": 0.7},
        {"block_trigrams": True, "block_repeated_words": True, "repeatable_tokens": [4]},
    ],
)
def test_without_constraints_it_equals_beam_search(beam_size: int, options: dict) -> None:
    model = ToyModel(6, seed=7)
    state = model.init_state(list(range(6)))
    expected = beam_search(model.step, state, beam_size=beam_size, max_length=7, **options)
    output = constrained_beam_search(
        model.step, state, [[]] * 6, beam_size=beam_size, max_length=7, **options
    )
    for field in ("tokens", "logprobs", "token_logprobs", "lengths", "scores", "attention"):
        assert torch.equal(getattr(output, field), getattr(expected, field)), field
    assert output.constraints_satisfied.tolist() == [0] * 6
    assert expected.constraints_satisfied is None


def test_images_without_constraints_in_a_constrained_batch_equal_beam_search() -> None:
    model = ToyModel(6, seed=8)
    constraints = [[], [Constraint(((5, 6),)), Constraint(((7,),))], [], [Constraint(((4,),))], [], []]
    output = constrained_beam_search(model.step, model.init_state(list(range(6))), constraints, max_length=7)
    expected = beam_search(model.step, model.init_state(list(range(6))), max_length=7)
    for image in (0, 2, 4, 5):
        assert torch.equal(output.tokens[image], expected.tokens[image])
        assert torch.equal(output.attention[image], expected.attention[image])
    # Every image's result is the one it gets alone (whatever the other images' automata add to the batch).
    for image in range(6):
        alone = constrained_beam_search(
            model.step, model.init_state([image]), [constraints[image]], max_length=7
        )
        assert torch.equal(alone.tokens[0], output.tokens[image])
        assert torch.equal(alone.scores[0], output.scores[image])


def test_outputs_are_consistent_with_the_model() -> None:
    model = ToyModel(len(CONSTRAINTS), seed=9)
    output = constrained_beam_search(
        model.step, model.init_state(list(range(len(CONSTRAINTS)))), CONSTRAINTS, beam_size=3, max_length=6
    )
    assert output.tokens.shape == (6, 6) and output.attention.shape == (6, 6, NUM_BOXES)
    for image, sequence in enumerate(unpadded(output.tokens)):
        length = len(sequence)
        assert EOS not in sequence[:-1] and (sequence[-1] == EOS or length == 6)
        assert not set(sequence) & {PAD, BOS, UNK}
        previous, last = BOS, BOS
        for position, token in enumerate(sequence):
            assert float(output.token_logprobs[image, position]) == pytest.approx(
                float(model.table[image, previous, last, token]), abs=1e-6
            )
            assert torch.equal(output.attention[image, position], model.attention_table[previous, last])
            previous, last = last, token
        assert torch.all(output.attention[image, length:] == 0.0)
        assert torch.all(output.token_logprobs[image, length:] == 0.0)
    assert torch.allclose(output.logprobs, output.token_logprobs.sum(dim=1), atol=1e-6)


def test_unk_stays_suppressed_under_constraints() -> None:
    model = ToyModel(1, seed=10)
    model.table[..., UNK] = -0.01  # <unk> would win every step
    output = constrained_beam_search(model.step, model.init_state([0]), [[Constraint(((6,),))]], max_length=4)
    assert UNK not in unpadded(output.tokens)[0] and 6 in unpadded(output.tokens)[0]


def test_captioner_step_without_constraints_equals_beam_search() -> None:
    torch.manual_seed(0)
    model = UpDownCaptioner(
        12, 16, CaptionerConfig(embedding_size=8, hidden_size=16, attention_size=8), max_caption_length=6
    ).eval()
    features = torch.randn(3, 4, 16)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True] * 3 + [False]])
    state = model.init_state(features, mask)
    expected = beam_search(model.step, state, beam_size=3, max_length=6)
    output = constrained_beam_search(model.step, state, [[], [], []], beam_size=3, max_length=6)
    assert torch.equal(output.tokens, expected.tokens)
    assert torch.equal(output.attention, expected.attention)
    # And with constraints it returns captions that contain them.
    constrained = constrained_beam_search(
        model.step, state, [[Constraint(((7,),))], [Constraint(((8, 9),))], []], beam_size=3, max_length=6
    )
    sequences = unpadded(constrained.tokens)
    assert 7 in sequences[0] and occurs((8, 9), sequences[1]) and sequences[2] == unpadded(expected.tokens)[2]


def test_bad_arguments_are_refused() -> None:
    model = ToyModel(2)
    state = model.init_state([0, 1])
    one = [Constraint(((4,),))]
    with pytest.raises(ValueError, match=r"one sequence of Constraint per image, 2 for this state, got 1"):
        constrained_beam_search(model.step, state, [one])
    with pytest.raises(ValueError, match=r"min_constraints_to_satisfy must be a non-negative int, got -1"):
        constrained_beam_search(model.step, state, [one, one], min_constraints_to_satisfy=-1)
    with pytest.raises(ValueError, match=r"beam_size must be at least 1"):
        constrained_beam_search(model.step, state, [one, one], beam_size=0)
    with pytest.raises(ValueError, match=r"constraints\[1\]: 4 constraints given, at most 3"):
        constrained_beam_search(model.step, state, [one, one * 4])
    with pytest.raises(
        ValueError,
        match=r"constraints\[0\]\[0\]: word form \(4, 8\) has ids \[8\] outside the vocabulary of size 8",
    ):
        constrained_beam_search(model.step, state, [[Constraint(((4, 8),))], []])
    with pytest.raises(
        ValueError,
        match=r"constraints\[1\]\[0\]: word form \(1,\) contains the special token ids \['1 \(<unk>\)'\]",
    ):
        constrained_beam_search(model.step, state, [[], [Constraint(((UNK,),))]])


def test_one_batched_step_call_per_token_over_live_hypotheses_only() -> None:
    model = ToyModel(len(CONSTRAINTS), seed=11)
    rows = []

    def recording_step(tokens, state):
        rows.append(tokens.numel())
        return model.step(tokens, state)

    output = constrained_beam_search(
        recording_step,
        model.init_state(list(range(len(CONSTRAINTS)))),
        CONSTRAINTS,
        beam_size=3,
        max_length=8,
    )
    # One call per generated position, starting from one row per image; rows grow as hypotheses spread
    # over the automata's states, never beyond beam_size per state...
    assert int(output.lengths.max()) <= len(rows) <= 8
    assert rows[0] == len(CONSTRAINTS) and rows[0] < rows[1] < rows[2]
    states = sum(ConstraintAutomaton(constraints, VOCABULARY).num_states for constraints in CONSTRAINTS)
    assert max(rows) <= 3 * states
    # ...and hypotheses that finished are not stepped again.
    assert rows[-1] < max(rows)
