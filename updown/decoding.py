"""Greedy decoding, sampling, batched beam search and constrained beam search over a step function.

Every function here drives a ``step(tokens, state) -> (logprobs, state, attention)`` callable, such as
:meth:`updown.models.captioner.UpDownCaptioner.step`:

- ``tokens``: ``(N,)`` int64, the previous token of each row (``<bos>`` first);
- ``state``: a dict of tensors whose first dimension is ``N``; decoding repeats and reorders its rows
  with ``index_select``, so it must hold nothing else;
- ``logprobs``: ``(N, V)`` log-probabilities of the next token (a normalised distribution, so every
  value is <= 0: beam search relies on scores never increasing when it stops early);
- ``attention``: ``(N, R)`` attention weights behind this prediction. A step may return only
  ``(logprobs, state)``; the output's ``attention`` is then None.

Generated sequences never contain ``<pad>`` or ``<bos>``. Every output holds ``max_length`` columns: the
tokens after ``<bos>``, ``<eos>`` included, then ``<pad>``; a row that has not produced ``<eos>`` after
``max_length`` tokens is cut there. Rows are processed independently, so a row's result does not depend
on which other images share its batch. Time steps are a Python loop; images and beams never are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from updown.config import Config, NonNegativeFloat, PositiveInt
from updown.constraints import BatchedAutomata, Constraint, ConstraintAutomaton

State = dict[str, torch.Tensor]
StepFunction = Callable[..., tuple]


@dataclass
class DecodingOutput:
    """Decoded sequences, one row per image (or per sample for :func:`sample_decode`).

    Attributes:
        tokens: ``(N, max_length)`` int64 tokens after ``<bos>``, ending with ``<eos>``, padded.
        logprobs: ``(N,)`` sum of ``token_logprobs`` over the sequence.
        token_logprobs: ``(N, max_length)`` log-probability of each token, 0 on padding.
        lengths: ``(N,)`` int64 number of tokens including ``<eos>``.
        scores: ``(N,)`` the score sequences were ranked by: ``logprobs`` divided by the length penalty
            for :func:`beam_search`, equal to ``logprobs`` otherwise.
        attention: ``(N, max_length, R)`` attention weights per generated token, 0 on padding; None
            when the step function returns no attention.
        constraints_satisfied: ``(N,)`` int64 number of its image's constraints each sequence satisfies
            (:func:`constrained_beam_search` only; None otherwise).
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    token_logprobs: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    attention: torch.Tensor | None
    constraints_satisfied: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """``(N, max_length)`` bool, True for the tokens up to and including ``<eos>``."""
        positions = torch.arange(self.tokens.size(1), device=self.tokens.device)
        return positions.unsqueeze(0) < self.lengths.unsqueeze(1)


# The words the Up-Down Caffe decoder lets repeat in a caption (peteanderson80/Up-Down-Captioner,
# experiments/caption_lstm/decoder.prototxt, allowed_multiple); every other word may appear once.
CAFFE_REPEATABLE_WORDS = (
    "a", "the", "of", ",", "on", "in", "and", "with", "is", "an", '"', "to", "some", "at", "are", "it", "that", "'", "by",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BeamSearchConfig(Config):
    """How a task decodes for validation, test and prediction (the paper's: beam 5, 20 tokens).

    Args:
        beam_size: hypotheses kept per image (1: greedy).
        max_length: most tokens decoded, ``<eos>`` included.
        length_penalty: GNMT length penalty alpha (0: rank by the plain log-probability).
        block_trigrams: forbid repeating a trigram within a caption.
        block_repeated_words: forbid repeating a word within a caption, except ``repeatable_words`` (the
            Up-Down Caffe decoder's test-time constraint, with its 19 function words: :data:`CAFFE_REPEATABLE_WORDS`).
        repeatable_words: words exempt from ``block_repeated_words``; words not in the vocabulary are ignored.
    """

    beam_size: PositiveInt = 5
    max_length: PositiveInt = 20
    length_penalty: NonNegativeFloat = 0.0
    block_trigrams: bool = False
    block_repeated_words: bool = False
    repeatable_words: tuple[str, ...] = ()


def state_batch_size(state: State) -> int:
    """Number of rows of a decoding state; raises ValueError when the state is empty or ragged."""
    sizes = {key: value.size(0) for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not state or len(sizes) != len(state) or len(set(sizes.values())) != 1:
        raise ValueError(
            f"decoding: the state must be a non-empty dict of tensors sharing their first (batch) dimension, "
            f"got sizes {sizes} for keys {list(state)}; keep other values out of the state."
        )
    return next(iter(sizes.values()))


def reorder_state(state: State, index: torch.Tensor) -> State:
    """Select (and repeat or reorder) rows of every tensor of ``state``; ``index`` is ``(N',)`` int64."""
    return {key: value.index_select(0, index) for key, value in state.items()}


def repeat_state(state: State, times: int) -> State:
    """Repeat every row ``times`` times, copies adjacent: row ``i`` becomes rows ``i * times .. (i + 1) * times - 1``."""
    return {key: value.repeat_interleave(times, dim=0) for key, value in state.items()}


def _call_step(
    step: StepFunction, tokens: torch.Tensor, state: State
) -> tuple[torch.Tensor, State, torch.Tensor | None]:
    result = step(tokens, state)
    if len(result) == 2:
        return result[0], result[1], None
    return result[0], result[1], result[2]


def _version(tensor: torch.Tensor) -> int | None:
    """The in-place modification counter of ``tensor`` (None for inference tensors, which have none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _banned_tokens(
    history: torch.Tensor,
    vocabulary_size: int,
    always_banned: Sequence[int],
    block_repeated_words: bool = False,
    repeatable_tokens: Sequence[int] = (),
    block_trigrams: bool = False,
) -> torch.Tensor:
    """``(N, V)`` bool, True for the tokens each row may not produce next, given its ``(N, t)`` history."""
    num_rows, length = history.shape
    banned = torch.zeros(num_rows, vocabulary_size, dtype=torch.bool, device=history.device)
    banned[:, list(always_banned)] = True
    if block_repeated_words and length > 0:
        repeated = torch.zeros_like(banned).scatter_(1, history, True)
        repeated[:, list(repeatable_tokens)] = False
        banned |= repeated
    if block_trigrams and length >= 3:
        # Trigram (h[j], h[j+1], h[j+2]) starts with the current last two tokens -> h[j+2] would repeat it.
        matches = (history[:, : length - 2] == history[:, length - 2 : length - 1]) & (
            history[:, 1 : length - 1] == history[:, length - 1 :]
        )
        # Non-matching positions point at an always-banned token, so scatter_ needs no second mask.
        targets = torch.where(matches, history[:, 2:], always_banned[0])
        banned.scatter_(1, targets, True)
    return banned


def _pad_columns(tensor: torch.Tensor, length: int, value: float) -> torch.Tensor:
    """Pad dimension 1 of ``tensor`` with ``value`` up to ``length``."""
    missing = length - tensor.size(1)
    if missing <= 0:
        return tensor
    padding = tensor.new_full((tensor.size(0), missing, *tensor.shape[2:]), value)
    return torch.cat([tensor, padding], dim=1)


def _check_lengths(max_length: int, **positive: int) -> None:
    for name, value in {"max_length": max_length, **positive}.items():
        if value < 1:
            raise ValueError(f"decoding: {name} must be at least 1, got {value}.")


def _decode_row_by_row(
    step: StepFunction,
    state: State,
    choose: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    max_length: int,
    bos_index: int,
    eos_index: int,
    pad_index: int,
) -> DecodingOutput:
    """Decode each row on its own; ``choose(logprobs (N, V), history (N, t))`` -> ``(tokens, logprobs)`` ``(N,)``."""
    num_rows = state_batch_size(state)
    device = next(iter(state.values())).device
    tokens = torch.full((num_rows,), bos_index, dtype=torch.long, device=device)
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
    history = torch.zeros(num_rows, 0, dtype=torch.long, device=device)
    all_logprobs, attentions = [], []
    for _ in range(max_length):
        logprobs, state, attention = _call_step(step, tokens, state)
        tokens, token_logprobs = choose(logprobs, history)
        tokens = tokens.masked_fill(finished, pad_index)
        all_logprobs.append(token_logprobs.masked_fill(finished, 0.0))
        attentions.append(None if attention is None else attention.masked_fill(finished.unsqueeze(1), 0.0))
        history = torch.cat([history, tokens.unsqueeze(1)], dim=1)
        finished = finished | (tokens == eos_index)
        if bool(finished.all()):
            break
    # shape: (N, max_length)
    history = _pad_columns(history, max_length, pad_index)
    # shape: (N, max_length)
    token_logprobs = _pad_columns(torch.stack(all_logprobs, dim=1), max_length, 0.0)
    attention = None
    if attentions[0] is not None:
        # shape: (N, max_length, R)
        attention = _pad_columns(torch.stack(attentions, dim=1), max_length, 0.0)
    lengths = (history != pad_index).sum(dim=1)
    sequence_logprobs = token_logprobs.sum(dim=1)
    return DecodingOutput(history, sequence_logprobs, token_logprobs, lengths, sequence_logprobs, attention)


@torch.no_grad()
def greedy_decode(
    step: StepFunction,
    state: State,
    *,
    max_length: int = 20,
    bos_index: int = 2,
    eos_index: int = 3,
    pad_index: int = 0,
    unk_index: int = 1,
    suppress_unk: bool = True,
    block_repeated_words: bool = False,
    repeatable_tokens: Sequence[int] = (),
    block_trigrams: bool = False,
) -> DecodingOutput:
    """Pick the most likely allowed token at every step (the SCST greedy baseline; beam size 1).

    Args:
        step: the step function (see the module docstring).
        state: the initial state, ``N`` rows (one per image).
        max_length: most tokens to generate, ``<eos>`` included.
        bos_index, eos_index, pad_index, unk_index: special token ids.
        suppress_unk: never produce ``<unk>``.
        block_repeated_words: never produce a token already in the sequence, except ``repeatable_tokens``.
        repeatable_tokens: ids exempt from ``block_repeated_words`` (pass function words: "a", "the", "of").
        block_trigrams: never produce a token that would repeat a trigram of the sequence.

    Returns:
        A :class:`DecodingOutput` with ``N`` rows; ``token_logprobs`` are the model's log-probabilities.
    """
    _check_lengths(max_length)
    always_banned = [pad_index, bos_index] + ([unk_index] if suppress_unk else [])

    def choose(logprobs: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        banned = _banned_tokens(
            history, logprobs.size(1), always_banned, block_repeated_words, repeatable_tokens, block_trigrams
        )
        best_logprobs, tokens = logprobs.float().masked_fill(banned, float("-inf")).max(dim=1)
        return tokens, best_logprobs

    return _decode_row_by_row(step, state, choose, max_length, bos_index, eos_index, pad_index)


def sample_decode(
    step: StepFunction,
    state: State,
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    max_length: int = 20,
    bos_index: int = 2,
    eos_index: int = 3,
    pad_index: int = 0,
    unk_index: int = 1,
    suppress_unk: bool = False,
    generator: torch.Generator | None = None,
) -> DecodingOutput:
    """Draw ``num_samples`` multinomial samples per image, keeping the graph for SCST.

    The policy is the model's distribution renormalised over the allowed tokens (``<pad>``, ``<bos>``
    and, if suppressed, ``<unk>`` removed); ``token_logprobs`` are that policy's log-probabilities at
    temperature 1, with gradients, whatever ``temperature`` the tokens were drawn at.

    Args:
        step: the step function (see the module docstring).
        state: the initial state, ``B`` rows (one per image).
        num_samples: samples per image, ``k``.
        temperature: divides the log-probabilities before sampling (< 1 sharpens, > 1 flattens).
        max_length: most tokens to generate, ``<eos>`` included.
        bos_index, eos_index, pad_index, unk_index: special token ids.
        suppress_unk: never produce ``<unk>`` (off by default: the reward already discourages it).
        generator: optional random generator, for reproducible samples.

    Returns:
        A :class:`DecodingOutput` with ``B * k`` rows, image-major (rows ``i * k .. i * k + k - 1`` are
        the samples of image ``i``).
    """
    _check_lengths(max_length, num_samples=num_samples)
    if not temperature > 0.0:
        raise ValueError(f"sample_decode: temperature must be positive, got {temperature}.")
    always_banned = [pad_index, bos_index] + ([unk_index] if suppress_unk else [])

    def choose(logprobs: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        banned = torch.zeros_like(logprobs, dtype=torch.bool)
        banned[:, always_banned] = True
        policy = torch.log_softmax(logprobs.float().masked_fill(banned, float("-inf")), dim=1)
        probabilities = torch.softmax(policy.detach() / temperature, dim=1)
        tokens = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
        return tokens, policy.gather(1, tokens.unsqueeze(1)).squeeze(1)

    state = repeat_state(state, num_samples)
    return _decode_row_by_row(step, state, choose, max_length, bos_index, eos_index, pad_index)


def gnmt_length_penalty(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT length penalty ``((5 + length) / 6) ** alpha`` (Wu et al. 2016); 1 everywhere when alpha is 0."""
    return ((5.0 + lengths.float()) / 6.0) ** alpha


@torch.no_grad()
def beam_search(
    step: StepFunction,
    state: State,
    *,
    beam_size: int = 5,
    max_length: int = 20,
    length_penalty: float = 0.0,
    block_repeated_words: bool = False,
    repeatable_tokens: Sequence[int] = (),
    block_trigrams: bool = False,
    suppress_unk: bool = True,
    bos_index: int = 2,
    eos_index: int = 3,
    pad_index: int = 0,
    unk_index: int = 1,
) -> DecodingOutput:
    """Batched beam search returning the best sequence per image.

    All images advance together as ``B * beam_size`` rows. A hypothesis that produced ``<eos>`` keeps
    its slot and continues with ``<pad>`` at no cost, so finished and unfinished hypotheses compete for
    the ``beam_size`` slots (as in AllenNLP and VirTex); with beam size 1 this is exactly greedy decoding.
    Hypotheses are ranked by ``sum of log-probabilities / ((5 + length) / 6) ** length_penalty`` (the
    GNMT penalty of Wu et al. 2016, ``length`` counting ``<eos>``): 0 ranks by the plain sum, which
    favours short captions; 1 is close to dividing by the length. Search stops once, for every image, a
    finished hypothesis scores at least what any unfinished one could still reach. The first step runs
    once per image, and state tensors that a step returns unchanged (the image context) are not copied
    when hypotheses are reordered: the step must not modify a state tensor in place and return it.

    Args:
        step: the step function (see the module docstring).
        state: the initial state, ``B`` rows (one per image).
        beam_size: hypotheses kept per image.
        max_length: most tokens to generate, ``<eos>`` included.
        length_penalty: GNMT ``alpha`` (see above).
        block_repeated_words: never produce a token already in the hypothesis, except ``repeatable_tokens``.
        repeatable_tokens: ids exempt from ``block_repeated_words`` (pass function words: "a", "the", "of").
        block_trigrams: never produce a token that would repeat a trigram of the hypothesis.
        suppress_unk: never produce ``<unk>``.
        bos_index, eos_index, pad_index, unk_index: special token ids.

    Returns:
        A :class:`DecodingOutput` with ``B`` rows: ``logprobs`` is the best hypothesis' sum of
        log-probabilities, ``scores`` its length-penalised score, ``attention`` the weights of each of its
        steps.
    """
    _check_lengths(max_length, beam_size=beam_size)
    num_images = state_batch_size(state)
    num_rows = num_images * beam_size
    device = next(iter(state.values())).device
    always_banned = [pad_index, bos_index] + ([unk_index] if suppress_unk else [])
    row_offsets = torch.arange(num_images, device=device).unsqueeze(1) * beam_size

    def penalised(sums: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return sums if length_penalty == 0.0 else sums / gnmt_length_penalty(lengths, length_penalty)

    # The first step runs once per image (all of its hypotheses are <bos> then); its result is repeated.
    tokens = torch.full((num_images,), bos_index, dtype=torch.long, device=device)
    # Only the first copy of each image starts alive, so the first step does not fill the beam with
    # beam_size copies of one hypothesis.
    # shape: (num_images, beam_size)
    sums = torch.full((num_images, beam_size), float("-inf"), device=device)
    sums[:, 0] = 0.0
    lengths = torch.zeros(num_images, beam_size, dtype=torch.long, device=device)
    finished = torch.zeros(num_images, beam_size, dtype=torch.bool, device=device)
    history = torch.zeros(num_rows, 0, dtype=torch.long, device=device)
    history_logprobs = torch.zeros(num_rows, 0, device=device)
    history_attention: torch.Tensor | None = None
    # Keys the step returns untouched (the image context: region features and their projections) hold the
    # same values in every hypothesis of an image, and hypotheses never move between images, so reordering
    # need not copy them (at paper sizes they are most of the state: 90 MB per step for 50 images).
    image_context: set[str] = set()
    for position in range(max_length):
        passed = {key: (value, _version(value)) for key, value in state.items()}
        logprobs, state, attention = _call_step(step, tokens, state)
        if position == 0:
            logprobs = logprobs.repeat_interleave(beam_size, dim=0)
            state = repeat_state(state, beam_size)
            attention = None if attention is None else attention.repeat_interleave(beam_size, dim=0)
        else:
            image_context = {
                key
                for key, (value, version) in passed.items()
                if state.get(key) is value and _version(value) == version
            }
        del passed
        vocabulary_size = logprobs.size(1)
        banned = _banned_tokens(
            history, vocabulary_size, always_banned, block_repeated_words, repeatable_tokens, block_trigrams
        )
        logprobs = logprobs.float().masked_fill(banned, float("-inf"))
        if bool(finished.any()):
            pad_only = torch.full((vocabulary_size,), float("-inf"), device=device)
            pad_only[pad_index] = 0.0
            logprobs = torch.where(finished.view(num_rows, 1), pad_only, logprobs)
        # shape: (num_images, beam_size, vocabulary_size)
        logprobs = logprobs.view(num_images, beam_size, -1)
        candidate_sums = sums.unsqueeze(2) + logprobs
        # shape: (num_images, beam_size, 1): a candidate's length is its parent's (the same for every token)
        candidate_lengths = (lengths + (~finished).long()).unsqueeze(2)
        candidate_scores = penalised(candidate_sums, candidate_lengths).view(num_images, -1)
        # shape: (num_images, beam_size)
        _, chosen = candidate_scores.topk(beam_size, dim=1)
        beams, tokens = chosen // vocabulary_size, chosen % vocabulary_size
        sums = candidate_sums.view(num_images, -1).gather(1, chosen)
        lengths = candidate_lengths.squeeze(2).gather(1, beams)
        was_finished = finished.gather(1, beams)
        # Hypotheses at -inf are placeholders (fewer allowed continuations than slots): mark them done.
        finished = was_finished | (tokens == eos_index) | torch.isinf(sums)

        rows = (beams + row_offsets).view(num_rows)
        tokens = tokens.view(num_rows)
        state = {
            key: value if key in image_context else value.index_select(0, rows)
            for key, value in state.items()
        }
        history = torch.cat([history.index_select(0, rows), tokens.unsqueeze(1)], dim=1)
        chosen_logprobs = logprobs.view(num_images, -1).gather(1, chosen).view(num_rows, 1)
        history_logprobs = torch.cat([history_logprobs.index_select(0, rows), chosen_logprobs], dim=1)
        if attention is not None:
            # shape: (num_rows, 1, num_boxes)
            step_attention = attention.index_select(0, rows).masked_fill(was_finished.view(num_rows, 1), 0.0)
            previous = [] if history_attention is None else [history_attention.index_select(0, rows)]
            history_attention = torch.cat([*previous, step_attention.unsqueeze(1)], dim=1)

        # Log-probabilities are <= 0, so an unfinished hypothesis can at best keep its sum and take the
        # most favourable length; once a finished one beats that bound everywhere, nothing can change.
        scores = penalised(sums, lengths)
        best_finished = scores.masked_fill(~finished, float("-inf")).amax(dim=1)
        most_favourable = torch.maximum(
            gnmt_length_penalty(lengths + 1, length_penalty),
            gnmt_length_penalty(torch.full_like(lengths, max_length), length_penalty),
        )
        bound = (sums / most_favourable).masked_fill(finished, float("-inf")).amax(dim=1)
        if bool((best_finished >= bound).all()):
            break

    scores = penalised(sums, lengths)
    best = scores.argmax(dim=1)
    rows = best + row_offsets.squeeze(1)
    attention_out = None
    if history_attention is not None:
        attention_out = _pad_columns(history_attention.index_select(0, rows), max_length, 0.0)
    return DecodingOutput(
        tokens=_pad_columns(history.index_select(0, rows), max_length, pad_index),
        logprobs=sums.gather(1, best.unsqueeze(1)).squeeze(1),
        token_logprobs=_pad_columns(history_logprobs.index_select(0, rows), max_length, 0.0),
        lengths=lengths.gather(1, best.unsqueeze(1)).squeeze(1),
        scores=scores.gather(1, best.unsqueeze(1)).squeeze(1),
        attention=attention_out,
    )


@torch.no_grad()
def constrained_beam_search(
    step: StepFunction,
    state: State,
    constraints: Sequence[Sequence[Constraint]],
    *,
    min_constraints_to_satisfy: int = 2,
    beam_size: int = 5,
    max_length: int = 20,
    length_penalty: float = 0.0,
    block_repeated_words: bool = False,
    repeatable_tokens: Sequence[int] = (),
    block_trigrams: bool = False,
    suppress_unk: bool = True,
    bos_index: int = 2,
    eos_index: int = 3,
    pad_index: int = 0,
    unk_index: int = 1,
) -> DecodingOutput:
    """Constrained beam search (Anderson et al. 2017, as in the nocaps baseline): a beam per automaton state.

    Each image's constraints define a :class:`updown.constraints.ConstraintAutomaton`; every state of it
    keeps its own beam of ``beam_size`` hypotheses, and a hypothesis extended by a token moves to the state
    that token leads to, where it competes with that state's other candidates. All images, states and beams
    advance together as rows of one ``step`` call; only hypotheses that are alive and unfinished are
    stepped, so empty beams (early steps, states an image lacks) cost nothing. Ranking, ``<eos>`` handling,
    the length penalty and the token blocking are :func:`beam_search`'s, so with no constraints the result
    equals :func:`beam_search`'s. A state tensor that ``step`` returns unchanged (the same object) is taken to
    be image context, identical for all hypotheses of an image, and is not copied when hypotheses are
    reordered within their images; ``step`` must not modify state tensors in place.

    The caption returned for an image is the best-scoring hypothesis among the states that satisfy at least
    ``min(min_constraints_to_satisfy, number of constraints of the image)`` constraints (the nocaps
    baseline's ``select_best_beam_with_constraints``: an image with fewer constraints must satisfy all of
    them, one with none is plain beam search). If no hypothesis reaches such a state (``max_length`` too
    short for the constraints, or blocking forbids them), the best one among those satisfying the most
    constraints is returned; ``constraints_satisfied`` tells which.

    Args:
        step: the step function (see the module docstring).
        state: the initial state, ``B`` rows (one per image).
        constraints: one entry per image, each a sequence of 0 to 3 :class:`updown.constraints.Constraint`.
        min_constraints_to_satisfy: constraints the returned caption must satisfy (2 in the nocaps baseline).
        beam_size: hypotheses kept per image and automaton state.
        max_length, length_penalty, block_repeated_words, repeatable_tokens, block_trigrams, suppress_unk,
        bos_index, eos_index, pad_index, unk_index: as in :func:`beam_search`.

    Returns:
        A :class:`DecodingOutput` with ``B`` rows, as :func:`beam_search`'s, whose ``constraints_satisfied``
        is ``(B,)`` int64, the number of its image's constraints each caption satisfies.
    """
    _check_lengths(max_length, beam_size=beam_size)
    minimum = min_constraints_to_satisfy
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
        raise ValueError(
            f"constrained_beam_search: min_constraints_to_satisfy must be a non-negative int, got "
            f"{min_constraints_to_satisfy!r}."
        )
    num_images = state_batch_size(state)
    is_sequence = isinstance(constraints, Sequence) and not isinstance(constraints, (str, bytes))
    if not is_sequence or len(constraints) != num_images:
        count = len(constraints) if is_sequence else type(constraints).__name__
        raise ValueError(
            f"constrained_beam_search: constraints must hold one sequence of Constraint per image, {num_images} "
            f"for this state, got {count}; pass [] for an image without constraints."
        )
    device = next(iter(state.values())).device
    always_banned = [pad_index, bos_index] + ([unk_index] if suppress_unk else [])
    special_tokens = {pad_index: "<pad>", bos_index: "<bos>", eos_index: "<eos>", unk_index: "<unk>"}

    def penalised(sums: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return sums if length_penalty == 0.0 else sums / gnmt_length_penalty(lengths, length_penalty)

    # Hypotheses live in slots (image, automaton state, beam), flattened image-major into num_slots rows.
    # The step function only sees the `active` slots (alive, unfinished): `state` and `tokens` are aligned
    # with them. A finished hypothesis keeps its slot and continues with <pad> at no cost, as in beam_search.
    tokens = torch.full((num_images,), bos_index, dtype=torch.long, device=device)
    # Keys whose tensor every step has returned untouched (image context such as region features) hold
    # the same values for all hypotheses of an image, so they need no copy while each image keeps as many
    # active hypotheses (copying them is most of the cost of reordering at paper sizes); when the counts
    # change they are rebuilt from the caller's row of each image, after the old copies are released.
    image_context = dict(state)
    for position in range(max_length):
        passed = {key: (value, _version(value)) for key, value in state.items()}
        logprobs, state, attention = _call_step(step, tokens, state)
        image_context = {
            key: value
            for key, value in image_context.items()
            if key in state and state[key] is passed[key][0] and _version(state[key]) == passed[key][1]
        }
        del passed
        if position == 0:
            vocabulary_size = logprobs.size(1)
            automata = BatchedAutomata.stack(
                [
                    ConstraintAutomaton(
                        image_constraints,
                        vocabulary_size,
                        forbidden_tokens=special_tokens,
                        name=f"constrained_beam_search: constraints[{image}]",
                    )
                    for image, image_constraints in enumerate(constraints)
                ],
                fill_token=pad_index,
                device=device,
            )
            num_states = automata.num_states
            slots_per_image = num_states * beam_size
            num_slots = num_images * slots_per_image
            # shape: (num_slots,)
            slot_state = torch.arange(num_slots, device=device) // beam_size % num_states
            required = automata.num_constraints.clamp(max=minimum)
            state_ids = torch.arange(num_states, device=device).view(1, num_states, 1)
            image_offsets = torch.arange(num_images, device=device).unsqueeze(1)
            # shape: (num_images, slots_per_image)
            slot_satisfied = automata.satisfied.repeat_interleave(beam_size, dim=1)
            valid_slot = (slot_satisfied >= required.unsqueeze(1)).view(num_slots)
            active = torch.arange(num_images, device=device) * slots_per_image
            sums = torch.full((num_slots,), -math.inf, device=device).index_fill_(0, active, 0.0)
            lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
            finished = torch.zeros(num_slots, dtype=torch.bool, device=device)
            history = torch.zeros(num_slots, 0, dtype=torch.long, device=device)
            history_logprobs = torch.zeros(num_slots, 0, device=device)
            history_attention: torch.Tensor | None = None

        # Candidates of each active hypothesis: its beam_size best tokens outside the image's alphabet
        # (they all lead to one state, so no other can make that state's beam) and every alphabet token.
        image = active // slots_per_image
        banned = _banned_tokens(
            history.index_select(0, active),
            vocabulary_size,
            always_banned,
            block_repeated_words,
            repeatable_tokens,
            block_trigrams,
        )
        # shape: (num_active, vocabulary_size)
        logprobs = logprobs.float().masked_fill(banned, -math.inf)
        # shape: (num_active, alphabet_size)
        alphabet = automata.alphabet.index_select(0, image)
        padding = ~automata.alphabet_mask.index_select(0, image)
        alphabet_logprobs = logprobs.gather(1, alphabet).masked_fill(padding, -math.inf)
        other_logprobs, other_tokens = logprobs.scatter_(1, alphabet, -math.inf).topk(
            min(beam_size, vocabulary_size), dim=1
        )
        # shape: (num_active, alphabet_size + 1)
        next_states = automata.transitions[image, slot_state[active]]
        # shape: (num_active, num_columns)
        active_logprobs = torch.cat([other_logprobs, alphabet_logprobs], dim=1)
        active_tokens = torch.cat([other_tokens, alphabet], dim=1)
        active_targets = torch.cat([next_states[:, -1:].expand_as(other_tokens), next_states[:, :-1]], dim=1)
        num_columns = active_logprobs.size(1)

        # The same columns for every slot: a finished hypothesis has one, <pad> at no cost into its own
        # state; an empty slot has none.
        # shape: (num_slots, num_columns)
        column_logprobs = torch.full((num_slots, num_columns), -math.inf, device=device)
        column_logprobs[active] = active_logprobs
        column_logprobs[:, 0].masked_fill_(finished, 0.0)
        column_tokens = torch.full((num_slots, num_columns), pad_index, dtype=torch.long, device=device)
        column_tokens[active] = active_tokens
        column_targets = slot_state.unsqueeze(1).repeat(1, num_columns)
        column_targets[active] = active_targets
        candidate_sums = sums.unsqueeze(1) + column_logprobs
        candidate_lengths = lengths + (~finished).long()
        candidate_scores = penalised(candidate_sums, candidate_lengths.unsqueeze(1))

        # Each state's new beam: the beam_size best candidates of its image that lead to it.
        candidates_per_image = slots_per_image * num_columns
        # shape: (num_images, num_states, candidates_per_image)
        leads_there = column_targets.view(num_images, 1, -1) == state_ids
        masked_scores = torch.where(leads_there, candidate_scores.view(num_images, 1, -1), -math.inf)
        # shape: (num_images, num_states, beam_size)
        best_scores, chosen = masked_scores.topk(beam_size, dim=2)
        # shape: (num_slots,), index into the flattened (num_slots, num_columns) candidates
        chosen = (chosen.view(num_images, -1) + image_offsets * candidates_per_image).view(-1)
        parents = chosen // num_columns
        sums = candidate_sums.view(-1)[chosen].masked_fill(best_scores.view(-1) == -math.inf, -math.inf)
        lengths = candidate_lengths[parents]
        new_tokens = column_tokens.view(-1)[chosen]
        was_finished = finished[parents]
        alive = sums > -math.inf
        finished = alive & (was_finished | (new_tokens == eos_index))

        # Parents that were stepped give their row; finished and empty ones give -1.
        row_of_slot = torch.full((num_slots,), -1, dtype=torch.long, device=device)
        row_of_slot[active] = torch.arange(active.numel(), device=device)
        parent_rows = row_of_slot[parents]
        history = torch.cat([history[parents], new_tokens.unsqueeze(1)], dim=1)
        chosen_logprobs = column_logprobs.view(-1)[chosen]
        history_logprobs = torch.cat([history_logprobs[parents], chosen_logprobs.unsqueeze(1)], dim=1)
        if attention is not None:
            # shape: (num_slots, num_boxes)
            step_attention = attention[parent_rows.clamp(min=0)] * (parent_rows >= 0).unsqueeze(1)
            previous = [] if history_attention is None else [history_attention[parents]]
            history_attention = torch.cat([*previous, step_attention.unsqueeze(1)], dim=1)
        active = (alive & ~finished).nonzero().squeeze(1)
        rows = parent_rows[active]
        active_images = active // slots_per_image
        if torch.equal(active_images, image):
            state = {key: value if key in image_context else value[rows] for key, value in state.items()}
        else:  # release the old copies of the image context before making the new ones
            state = {key: None if key in image_context else value[rows] for key, value in state.items()}
            state = {
                key: value if value is not None else image_context[key][active_images]
                for key, value in state.items()
            }
        tokens = new_tokens[active]

        # As in beam_search: stop once, for every image, a finished hypothesis in an acceptable state scores
        # at least what any unfinished one (in any state) could still reach.
        scores = penalised(sums, lengths)
        best_finished = scores.masked_fill(~(finished & valid_slot), -math.inf).view(num_images, -1).amax(1)
        most_favourable = torch.maximum(
            gnmt_length_penalty(lengths + 1, length_penalty),
            gnmt_length_penalty(torch.full_like(lengths, max_length), length_penalty),
        )
        bound = (sums / most_favourable).masked_fill(~(alive & ~finished), -math.inf)
        bound = bound.view(num_images, -1).amax(1)
        if active.numel() == 0 or bool((best_finished >= bound).all()):
            break

    # The best hypothesis among the acceptable states, else among those satisfying the most constraints.
    scores = penalised(sums, lengths).view(num_images, -1)
    rank = torch.minimum(slot_satisfied, required.unsqueeze(1)).masked_fill(~alive.view(num_images, -1), -1)
    best = scores.masked_fill(rank != rank.amax(dim=1, keepdim=True), -math.inf).argmax(dim=1)
    rows = best + torch.arange(num_images, device=device) * slots_per_image
    attention_out = None
    if history_attention is not None:
        attention_out = _pad_columns(history_attention[rows], max_length, 0.0)
    return DecodingOutput(
        tokens=_pad_columns(history[rows], max_length, pad_index),
        logprobs=sums[rows],
        token_logprobs=_pad_columns(history_logprobs[rows], max_length, 0.0),
        lengths=lengths[rows],
        scores=scores.gather(1, best.unsqueeze(1)).squeeze(1),
        attention=attention_out,
        constraints_satisfied=slot_satisfied.gather(1, best.unsqueeze(1)).squeeze(1),
    )


@torch.no_grad()
def beam_candidates(
    step: StepFunction,
    state: State,
    *,
    beam_size: int,
    max_length: int,
    bos_index: int,
    eos_index: int,
    pad_index: int = 0,
    unk_index: int | None = None,
    block_repeated_words: bool = False,
    repeatable_tokens: Sequence[int] = (),
) -> torch.Tensor:
    """All ``beam_size`` final hypotheses of a beam search (plain log-probability, ``<unk>`` suppressed).

    Finished hypotheses keep their slot and continue with ``<pad>`` at no cost, as in
    :func:`updown.decoding.beam_search`; the vocabulary must allow more than ``beam_size`` words so no slot
    is ever a placeholder. ``block_repeated_words`` and ``repeatable_tokens`` are :func:`beam_search`'s (the
    Caffe SCST beams carry the same repeated-word constraint as its test-time decoder).

    Returns:
        ``(B * beam_size, max_length)`` int64 tokens after ``<bos>``, image-major, ``<eos>`` then ``<pad>``.
    """
    num_images = state_batch_size(state)
    num_rows = num_images * beam_size
    state = repeat_state(state, beam_size)
    device = next(iter(state.values())).device
    pad, eos = pad_index, eos_index
    offsets = torch.arange(num_images, device=device).unsqueeze(1) * beam_size
    tokens = torch.full((num_rows,), bos_index, dtype=torch.long, device=device)
    # shape: (B, beam_size); only the first copy starts alive so the beam does not hold k equal hypotheses
    sums = torch.full((num_images, beam_size), float("-inf"), device=device)
    sums[:, 0] = 0.0
    finished = torch.zeros(num_images, beam_size, dtype=torch.bool, device=device)
    history = torch.zeros(num_rows, 0, dtype=torch.long, device=device)
    for _ in range(max_length):
        result = step(tokens, state)
        logprobs, state = result[0].float(), result[1]
        always_banned = [i for i in (pad, bos_index, unk_index) if i is not None]
        banned = _banned_tokens(
            history, logprobs.size(1), always_banned, block_repeated_words, repeatable_tokens
        )
        logprobs = logprobs.masked_fill(banned, float("-inf"))
        pad_only = torch.full_like(logprobs[0], float("-inf"))
        pad_only[pad] = 0.0
        # shape: (B, beam_size, V)
        logprobs = torch.where(finished.view(num_rows, 1), pad_only, logprobs).view(num_images, beam_size, -1)
        sums, chosen = (sums.unsqueeze(2) + logprobs).view(num_images, -1).topk(beam_size, dim=1)
        beams, next_tokens = chosen // logprobs.size(2), chosen % logprobs.size(2)
        finished = finished.gather(1, beams) | (next_tokens == eos)
        rows = (beams + offsets).view(num_rows)
        tokens = next_tokens.view(num_rows)
        state = reorder_state(state, rows)
        history = torch.cat([history.index_select(0, rows), tokens.unsqueeze(1)], dim=1)
        if bool(finished.all()):
            break
    padding = history.new_full((num_rows, max_length - history.size(1)), pad)
    return torch.cat([history, padding], dim=1)
