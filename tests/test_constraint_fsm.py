"""Tests for updown.constraints: the automaton accepts exactly the captions a brute-force search accepts."""

from __future__ import annotations

import itertools

import pytest
import torch

from updown.constraints import BatchedAutomata, Constraint, ConstraintAutomaton

VOCABULARY = 9
# 4..7 occur in the forms below; 8 never does, so it stands for every other word.
ALPHABET = [4, 5, 6, 7, 8]


def occurs(form: tuple[int, ...], tokens: tuple[int, ...]) -> bool:
    """Brute force: does ``form`` occur contiguously in ``tokens``?"""
    return any(tokens[start : start + len(form)] == form for start in range(len(tokens) - len(form) + 1))


def satisfied_by(constraints: list[Constraint], tokens: tuple[int, ...]) -> int:
    """Bit mask of the constraints with some form occurring in ``tokens``."""
    return sum(
        1 << position
        for position, constraint in enumerate(constraints)
        if any(occurs(form, tokens) for form in constraint.word_forms)
    )


CONSTRAINT_SETS = {
    "one word": [Constraint(((5,),))],
    "two words": [Constraint(((4, 5),))],
    "three words with a repeated word": [Constraint(((4, 4, 5),))],
    "several forms of different lengths": [Constraint(((6,), (4, 5), (5, 5, 7)))],
    "three one-word": [Constraint(((4,),)), Constraint(((5,),)), Constraint(((6,),))],
    # Forms sharing words across constraints: "4 5 6" satisfies the first two at once, and progress
    # inside "4 5" must survive while "5 6" starts.
    "overlapping multi-word": [Constraint(((4, 5),)), Constraint(((5, 6), (7,))), Constraint(((6, 4, 5),))],
    "forms that are prefixes of each other": [Constraint(((4,), (4, 5))), Constraint(((4, 5, 6),))],
    "the same constraint twice": [Constraint(((5, 6),)), Constraint(((5, 6),))],
}


@pytest.mark.parametrize("name", sorted(CONSTRAINT_SETS))
def test_automaton_accepts_exactly_the_captions_containing_a_form(name: str) -> None:
    constraints = CONSTRAINT_SETS[name]
    automaton = ConstraintAutomaton(constraints, VOCABULARY)
    assert torch.equal(
        automaton.satisfied, torch.tensor([bin(int(mask)).count("1") for mask in automaton.satisfied_masks])
    )
    # Walk every caption of up to 6 words over the alphabet (and one other word) through the table that
    # decoding uses, extending each caption's state by one token.
    table, masks = automaton.transitions.tolist(), automaton.satisfied_masks.tolist()
    alphabet = automaton.alphabet.tolist()
    column = {token: alphabet.index(token) if token in alphabet else -1 for token in ALPHABET}
    masks_seen, frontier = set(), [((), 0)]
    for _ in range(7):
        for tokens, state in frontier:
            expected = satisfied_by(constraints, tokens)
            assert masks[state] == expected, (tokens, state)
            masks_seen.add(expected)
        frontier = [
            ((*tokens, token), table[state][column[token]])
            for tokens, state in frontier
            for token in ALPHABET
        ]
    # The per-token interface agrees (on shorter captions, it is slower).
    for tokens in itertools.product(ALPHABET, repeat=4):
        assert masks[automaton.final_state(tokens)] == satisfied_by(constraints, tokens)
    # Every combination of constraints the captions can reach was reached, so the check above covered it.
    assert len(masks_seen) > 1


def test_state_counts_are_small() -> None:
    assert ConstraintAutomaton([], VOCABULARY).num_states == 1
    assert ConstraintAutomaton(CONSTRAINT_SETS["one word"], VOCABULARY).num_states == 2
    assert ConstraintAutomaton(CONSTRAINT_SETS["two words"], VOCABULARY).num_states == 3
    assert ConstraintAutomaton(CONSTRAINT_SETS["three one-word"], VOCABULARY).num_states == 8
    # Three two-word constraints with distinct words: 8 masks, plus one partial state per unsatisfied
    # constraint of each mask (12).
    three_two_word = [Constraint(((4, 5),)), Constraint(((6, 7),)), Constraint(((8, 9),))]
    assert ConstraintAutomaton(three_two_word, 10).num_states == 20


def test_initial_state_is_zero_and_other_tokens_reset_progress() -> None:
    automaton = ConstraintAutomaton([Constraint(((4, 5),)), Constraint(((6,),))], VOCABULARY)
    assert automaton.final_state([]) == 0
    assert automaton.alphabet.tolist() == [4, 5, 6]
    after_4 = automaton.next_state(0, 4)
    assert after_4 != 0 and automaton.next_state(after_4, 8) == 0
    satisfied_6 = automaton.next_state(0, 6)
    assert automaton.next_state(automaton.next_state(satisfied_6, 4), 3) == satisfied_6


def test_dense_table_agrees_with_next_state() -> None:
    automaton = ConstraintAutomaton(CONSTRAINT_SETS["overlapping multi-word"], VOCABULARY)
    table = automaton.dense_transitions()
    assert table.shape == (automaton.num_states, VOCABULARY) and table.dtype == torch.long
    for state in range(automaton.num_states):
        assert table[state].tolist() == [automaton.next_state(state, token) for token in range(VOCABULARY)]


def test_batched_automata_pad_to_the_largest() -> None:
    automata = [
        ConstraintAutomaton([], VOCABULARY),
        ConstraintAutomaton(CONSTRAINT_SETS["overlapping multi-word"], VOCABULARY),
        ConstraintAutomaton(CONSTRAINT_SETS["one word"], VOCABULARY),
    ]
    batched = BatchedAutomata.stack(automata, fill_token=0)
    num_states = max(automaton.num_states for automaton in automata)
    assert batched.num_states == num_states
    assert batched.transitions.shape == (3, num_states, 5)
    assert batched.alphabet.tolist() == [[0, 0, 0, 0], [4, 5, 6, 7], [5, 0, 0, 0]]
    assert batched.alphabet_mask.tolist() == [[False] * 4, [True] * 4, [True, False, False, False]]
    assert batched.num_constraints.tolist() == [0, 3, 1]
    assert batched.satisfied[2].tolist() == [0, 1] + [-1] * (num_states - 2)
    for image, automaton in enumerate(automata):
        states, size = automaton.num_states, automaton.alphabet.numel()
        assert torch.equal(batched.transitions[image, :states, :size], automaton.transitions[:, :size])
        assert torch.equal(batched.transitions[image, :states, -1], automaton.transitions[:, -1])


def test_constraint_normalises_lists_and_builds_from_phrases() -> None:
    assert Constraint([[4], [5, 6]]).word_forms == ((4,), (5, 6))
    index = {"fire": 4, "hydrant": 5, "hydrants": 6}
    assert Constraint.from_phrases(["fire hydrant", "fire hydrants"], index).word_forms == ((4, 5), (4, 6))
    with pytest.raises(ValueError, match=r"\['truck'\] of 'fire truck' are not in the vocabulary"):
        Constraint.from_phrases(["fire truck"], index)


@pytest.mark.parametrize(
    ("word_forms", "message"),
    [
        ((), "non-empty sequence of token-id sequences"),
        ("dog", "non-empty sequence of token-id sequences"),
        (((),), r"word form \(\) must hold 1 to 3"),
        (((4, 5, 6, 7),), r"\(4, 5, 6, 7\) must hold 1 to 3"),
        (((-1,),), "non-negative int token ids"),
        (((4.0,),), "non-negative int token ids"),
        (("dog",), "'dog' is not a sequence of token ids"),
    ],
)
def test_bad_constraints_are_refused(word_forms: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Constraint(word_forms)  # type: ignore[arg-type]


def test_bad_automaton_inputs_are_refused() -> None:
    one = Constraint(((4,),))
    with pytest.raises(ValueError, match=r"image 2: 4 constraints given, at most 3 are supported"):
        ConstraintAutomaton([one] * 4, VOCABULARY, name="image 2")
    with pytest.raises(
        ValueError, match=r"constraints\[0\]: word form \(4, 12\) has ids \[12\] outside the "
    ):
        ConstraintAutomaton([Constraint(((4, 12),))], VOCABULARY)
    with pytest.raises(ValueError, match=r"special token ids \['3 \(<eos>\)'\]"):
        ConstraintAutomaton([Constraint(((3,),))], VOCABULARY, forbidden_tokens={3: "<eos>"})
    with pytest.raises(ValueError, match=r"constraints\[1\]: expected a Constraint, got tuple"):
        ConstraintAutomaton([one, (4,)], VOCABULARY)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="wrap a single constraint in a list"):
        ConstraintAutomaton(one, VOCABULARY)  # type: ignore[arg-type]
