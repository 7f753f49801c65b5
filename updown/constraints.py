"""Lexical constraints for constrained beam search (Anderson et al. 2017) and the automaton that tracks them.

A :class:`Constraint` is one object to mention, such as "dog" or "fire hydrant": it is satisfied when any
of its word forms (a sequence of 1-3 token ids: ``("dog",)``, ``("dogs",)``, ``("fire", "hydrant")``)
occurs contiguously in the caption. An image has up to three constraints.

:class:`ConstraintAutomaton` is the finite-state machine of one image. A state records which constraints are
already satisfied and, for each one that is not, how far the caption's last tokens are into one of its
multi-word forms (the longest suffix of the caption that is a proper prefix of a form, as in Aho-Corasick).
This is exact: the automaton ends in a state satisfying constraint ``c`` if and only if a form of ``c`` occurs
in the caption, also for overlapping forms ("fire fire hydrant") and forms shared between constraints. Only
the states reachable from the empty caption are kept (8 for three one-word constraints, about 20 for three
two-word ones), numbered in breadth-first order from state 0, the empty caption.

A token that occurs in no form of the image ("other") sends every state to the same successor (satisfied
constraints kept, progress reset), so the transition table is stored over the image's *alphabet* (the
distinct ids of its forms, ``K`` of them) plus one "other" column: ``(S, K + 1)`` instead of ``(S, V)``.
:class:`BatchedAutomata` pads these tables over a batch for decoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

MAX_CONSTRAINTS = 3
MAX_FORM_LENGTH = 3

_Progress = tuple[tuple[int, ...], ...]
_State = tuple[int, _Progress]


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class Constraint:
    """One constraint: satisfied when any of ``word_forms`` occurs contiguously in the caption.

    Args:
        word_forms: one or more token-id sequences of 1-3 ids each, for example the ids of ``("dog",)`` and
            ``("dogs",)``, or of ``("fire", "hydrant")``. Lists are accepted and stored as tuples.
    """

    word_forms: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        forms = self.word_forms
        if isinstance(forms, (str, bytes)) or not isinstance(forms, Sequence) or len(forms) == 0:
            raise ValueError(
                f"Constraint: word_forms must be a non-empty sequence of token-id sequences, got {forms!r}; "
                f"pass for example ((12,), (13,)) for 'dog' and 'dogs'."
            )
        normalised = []
        for form in forms:
            if isinstance(form, (str, bytes)) or not isinstance(form, Sequence):
                raise ValueError(
                    f"Constraint: word form {form!r} is not a sequence of token ids; map words to ids with "
                    f"the vocabulary first (a form is a tuple such as (12,) or (40, 41))."
                )
            if not 1 <= len(form) <= MAX_FORM_LENGTH or not all(_is_token_id(token) for token in form):
                raise ValueError(
                    f"Constraint: word form {tuple(form)!r} must hold 1 to {MAX_FORM_LENGTH} non-negative int "
                    f"token ids; split longer phrases into separate constraints or drop them."
                )
            normalised.append(tuple(form))
        object.__setattr__(self, "word_forms", tuple(normalised))

    @classmethod
    def from_phrases(cls, phrases: Sequence[str], index: Mapping[str, int]) -> Constraint:
        """A constraint from whitespace-separated phrases (``["dog", "dogs"]``) and a word -> id mapping.

        Raises:
            ValueError: a word of a phrase is not in ``index`` (add constraint words to the vocabulary).
        """
        forms = []
        for phrase in phrases:
            missing = [word for word in phrase.split() if word not in index]
            if missing:
                raise ValueError(
                    f"Constraint: the words {missing} of {phrase!r} are not in the vocabulary; add every "
                    f"constraint word form to the vocabulary before training (Vocabulary.from_counts(..., "
                    f"extra_words=...))."
                )
            forms.append(tuple(index[word] for word in phrase.split()))
        return cls(tuple(forms))


def _matches(constraint: Constraint, text: tuple[int, ...]) -> bool:
    """Whether a form of ``constraint`` is a suffix of ``text``."""
    return any(
        text[len(text) - len(form) :] == form for form in constraint.word_forms if len(form) <= len(text)
    )


class ConstraintAutomaton:
    """The finite-state machine of one image's constraints (see the module docstring).

    Args:
        constraints: 0 to 3 constraints.
        vocabulary_size: ``V``; every id of every form must be below it.
        forbidden_tokens: ids no form may contain, with their names (the decoder's special tokens).
        name: how error messages refer to ``constraints`` (e.g. ``"constraints[4]"`` for image 4).

    Attributes:
        constraints: the constraints, in the order given (bit ``c`` of a state's mask is constraint ``c``).
        alphabet: ``(K,)`` int64, the sorted distinct ids of all forms.
        transitions: ``(S, K + 1)`` int64; ``transitions[s, k]`` is the state after ``alphabet[k]`` from
            state ``s``, ``transitions[s, K]`` the state after any other token.
        satisfied: ``(S,)`` int64, how many constraints each state satisfies.
        satisfied_masks: ``(S,)`` int64, bit ``c`` set when the state satisfies constraint ``c``.
    """

    def __init__(
        self,
        constraints: Sequence[Constraint],
        vocabulary_size: int,
        *,
        forbidden_tokens: Mapping[int, str] | None = None,
        name: str = "constraints",
    ) -> None:
        self.constraints = self._checked(constraints, vocabulary_size, forbidden_tokens or {}, name)
        self.vocabulary_size = vocabulary_size
        self._proper_prefixes = [
            {form[:length] for form in constraint.word_forms for length in range(len(form))}
            for constraint in self.constraints
        ]
        alphabet = sorted(
            {token for constraint in self.constraints for form in constraint.word_forms for token in form}
        )
        self.alphabet = torch.tensor(alphabet, dtype=torch.long)
        self._column = {token: column for column, token in enumerate(alphabet)}

        # Breadth-first enumeration of the reachable states; "other" tokens are symbol None.
        initial: _State = (0, ((),) * len(self.constraints))
        states, index = [initial], {initial: 0}
        rows: list[list[int]] = []
        for state in states:
            row = []
            for symbol in [*alphabet, None]:
                successor = self._advance(state, symbol)
                if successor not in index:
                    index[successor] = len(states)
                    states.append(successor)
                row.append(index[successor])
            rows.append(row)
        self._states = states
        self.transitions = torch.tensor(rows, dtype=torch.long).view(len(states), len(alphabet) + 1)
        self.satisfied_masks = torch.tensor([mask for mask, _ in states], dtype=torch.long)
        self.satisfied = torch.tensor([bin(mask).count("1") for mask, _ in states], dtype=torch.long)

    @staticmethod
    def _checked(
        constraints: Sequence[Constraint], vocabulary_size: int, forbidden: Mapping[int, str], name: str
    ) -> tuple[Constraint, ...]:
        if isinstance(constraints, Constraint) or not isinstance(constraints, Sequence):
            raise ValueError(
                f"{name}: expected a sequence of 0 to {MAX_CONSTRAINTS} Constraint, got {type(constraints).__name__}; "
                f"wrap a single constraint in a list."
            )
        if len(constraints) > MAX_CONSTRAINTS:
            raise ValueError(
                f"{name}: {len(constraints)} constraints given, at most {MAX_CONSTRAINTS} are supported (the "
                f"automaton has 2**{MAX_CONSTRAINTS} satisfaction states); keep the {MAX_CONSTRAINTS} most "
                f"confident ones."
            )
        for position, constraint in enumerate(constraints):
            if not isinstance(constraint, Constraint):
                raise ValueError(
                    f"{name}[{position}]: expected a Constraint, got {type(constraint).__name__} "
                    f"{constraint!r}; build it with Constraint(word_forms=((id,), ...))."
                )
            for form in constraint.word_forms:
                outside = [token for token in form if token >= vocabulary_size]
                if outside:
                    raise ValueError(
                        f"{name}[{position}]: word form {form} has ids {outside} outside the vocabulary of size "
                        f"{vocabulary_size}; add every constraint word to the vocabulary before training."
                    )
                special = [f"{token} ({forbidden[token]})" for token in form if token in forbidden]
                if special:
                    raise ValueError(
                        f"{name}[{position}]: word form {form} contains the special token ids {special}; a "
                        f"constraint must consist of words (an unknown word maps to <unk>: add it to the "
                        f"vocabulary)."
                    )
        return tuple(constraints)

    def _advance(self, state: _State, token: int | None) -> _State:
        """The state after reading ``token`` (None: a token outside the alphabet)."""
        mask, progress = state
        new_progress = []
        for position, constraint in enumerate(self.constraints):
            if mask >> position & 1 or token is None:
                new_progress.append(())
                continue
            text = (*progress[position], token)
            if _matches(constraint, text):
                mask |= 1 << position
                new_progress.append(())
                continue
            # The longest suffix of the text that can still grow into a form (() always can).
            prefixes = self._proper_prefixes[position]
            new_progress.append(
                next(text[start:] for start in range(len(text) + 1) if text[start:] in prefixes)
            )
        return mask, tuple(new_progress)

    @property
    def num_states(self) -> int:
        return self.transitions.size(0)

    def next_state(self, state: int, token: int) -> int:
        """The state after ``token`` from ``state``."""
        column = self._column.get(int(token), len(self._column))
        return int(self.transitions[state, column])

    def final_state(self, tokens: Sequence[int]) -> int:
        """The state after reading ``tokens`` from state 0."""
        state = 0
        for token in tokens:
            state = self.next_state(state, token)
        return state

    def dense_transitions(self) -> torch.Tensor:
        """``(S, V)`` int64 next-state table over the whole vocabulary (for inspection; decoding uses the
        compact ``transitions``)."""
        table = self.transitions[:, -1:].repeat(1, self.vocabulary_size)
        table[:, self.alphabet] = self.transitions[:, :-1]
        return table


@dataclass
class BatchedAutomata:
    """The automata of a batch of images padded to common sizes, for decoding.

    Attributes:
        alphabet: ``(B, K)`` int64, each image's alphabet padded with ``fill_token``.
        alphabet_mask: ``(B, K)`` bool, False on padding.
        transitions: ``(B, S, K + 1)`` int64, each image's table; padding columns and padding states lead
            to state 0 (padding states are never reached, padding columns are masked out).
        satisfied: ``(B, S)`` int64, constraints satisfied per state; -1 on padding states.
        num_constraints: ``(B,)`` int64, how many constraints each image has.
    """

    alphabet: torch.Tensor
    alphabet_mask: torch.Tensor
    transitions: torch.Tensor
    satisfied: torch.Tensor
    num_constraints: torch.Tensor

    @classmethod
    def stack(
        cls, automata: Sequence[ConstraintAutomaton], fill_token: int, device: torch.device | None = None
    ) -> BatchedAutomata:
        """Pad and stack ``automata``; ``fill_token`` pads alphabets (pass an id decoding never produces)."""
        num_images = len(automata)
        num_states = max(automaton.num_states for automaton in automata)
        alphabet_size = max(automaton.alphabet.numel() for automaton in automata)
        alphabet = torch.full((num_images, alphabet_size), fill_token, dtype=torch.long)
        alphabet_mask = torch.zeros(num_images, alphabet_size, dtype=torch.bool)
        transitions = torch.zeros(num_images, num_states, alphabet_size + 1, dtype=torch.long)
        satisfied = torch.full((num_images, num_states), -1, dtype=torch.long)
        for image, automaton in enumerate(automata):
            size, states = automaton.alphabet.numel(), automaton.num_states
            alphabet[image, :size] = automaton.alphabet
            alphabet_mask[image, :size] = True
            transitions[image, :states, :size] = automaton.transitions[:, :size]
            transitions[image, :states, -1] = automaton.transitions[:, -1]
            satisfied[image, :states] = automaton.satisfied
        num_constraints = torch.tensor(
            [len(automaton.constraints) for automaton in automata], dtype=torch.long
        )
        return cls(
            alphabet.to(device),
            alphabet_mask.to(device),
            transitions.to(device),
            satisfied.to(device),
            num_constraints.to(device),
        )

    @property
    def num_states(self) -> int:
        """``S``, the largest number of states in the batch."""
        return self.transitions.size(1)
