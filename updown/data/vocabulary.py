"""Vocabularies: caption words and VQA answers, saved as JSON beside the prepared data.

``<pad>`` is index 0 and distinct from ``<unk>`` (1), so padding never looks like an unknown word to a
loss or a metric; ``<bos>`` (2) and ``<eos>`` (3) follow. Words come after the special tokens by
decreasing count, ties broken alphabetically, so the same data always gives the same indices.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from updown.io import read_json, write_json

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize_caption(caption: str) -> list[str]:
    """Lower-case words of a raw caption, punctuation dropped (as in Karpathy's preprocessing).

    >>> tokenize_caption("A dog, sitting on the man's bed.")
    ['a', 'dog', 'sitting', 'on', 'the', "man's", 'bed']
    """
    return _WORD.findall(caption.lower())


class Vocabulary:
    """Word <-> index mapping with ``<pad>``=0, ``<unk>``=1, ``<bos>``=2, ``<eos>``=3.

    Args:
        tokens: all tokens in index order, starting with the four special tokens.
    """

    pad_index, unk_index, bos_index, eos_index = 0, 1, 2, 3

    def __init__(self, tokens: Sequence[str]) -> None:
        if tuple(tokens[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"A vocabulary must start with {list(SPECIAL_TOKENS)}, got {list(tokens[:4])}.")
        if len(set(tokens)) != len(tokens):
            raise ValueError("A vocabulary must not repeat a token.")
        self.tokens = list(tokens)
        self._index = {token: i for i, token in enumerate(self.tokens)}

    @classmethod
    def from_counts(cls, counts: Counter, min_count: int = 5, extra_words: Iterable[str] = ()) -> Vocabulary:
        """Words seen at least ``min_count`` times, most frequent first, then ``extra_words`` not yet in, sorted.

        ``extra_words`` (e.g. constraint words for nocaps) come last, so the indices of the counted words do
        not depend on them.
        """
        words = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
            key=lambda w: (-counts[w], w),
        )
        extra = sorted(set(extra_words) - set(words) - set(SPECIAL_TOKENS))
        return cls([*SPECIAL_TOKENS, *words, *extra])

    @classmethod
    def from_file(
        cls, vocabulary_path: str | os.PathLike, tool: str = "tools/prepare_captions.py"
    ) -> Vocabulary:
        data = read_json(vocabulary_path, "vocabulary JSON")
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise ValueError(
                f"{vocabulary_path}: expected a JSON object with a 'tokens' list. Write it with {tool}."
            )
        if not all(isinstance(token, str) and token for token in data["tokens"]):
            raise ValueError(
                f"{vocabulary_path}: every token must be a non-empty string. Write it with {tool}."
            )
        try:
            return cls(data["tokens"])
        except ValueError as error:
            raise ValueError(f"{vocabulary_path}: {error} Write it with {tool}.") from None

    def save(self, vocabulary_path: str | os.PathLike) -> None:
        write_json(vocabulary_path, {"tokens": self.tokens})

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def index(self, token: str) -> int:
        return self._index.get(token, self.unk_index)

    def encode(self, words: Iterable[str], add_bos_eos: bool = True) -> list[int]:
        """Indices of ``words``; unknown words map to ``<unk>``."""
        indices = [self.index(w) for w in words]
        return [self.bos_index, *indices, self.eos_index] if add_bos_eos else indices

    def decode(self, indices: Iterable[int]) -> list[str]:
        """Words up to the first ``<eos>``, skipping ``<bos>`` and ``<pad>``."""
        words = []
        for i in indices:
            i = int(i)
            if i == self.eos_index:
                break
            if i in (self.bos_index, self.pad_index):
                continue
            words.append(self.tokens[i])
        return words


class AnswerVocabulary:
    """VQA answer <-> class index (no special tokens; the empty string is never an answer).

    Args:
        answers: answers in class order.
    """

    def __init__(self, answers: Sequence[str]) -> None:
        if "" in answers:
            raise ValueError("The empty string cannot be a VQA answer class.")
        if len(set(answers)) != len(answers):
            raise ValueError("An answer vocabulary must not repeat an answer.")
        self.answers = list(answers)
        self._index = {a: i for i, a in enumerate(self.answers)}

    @classmethod
    def from_file(cls, vocabulary_path: str | os.PathLike) -> AnswerVocabulary:
        data = read_json(vocabulary_path, "answer vocabulary JSON")
        if not isinstance(data, dict) or not isinstance(data.get("answers"), list):
            raise ValueError(
                f"{vocabulary_path}: expected a JSON object with an 'answers' list. Write it with tools/prepare_vqa.py."
            )
        if not all(isinstance(answer, str) for answer in data["answers"]):
            raise ValueError(
                f"{vocabulary_path}: every answer must be a string. Write it with tools/prepare_vqa.py."
            )
        try:
            return cls(data["answers"])
        except ValueError as error:
            raise ValueError(f"{vocabulary_path}: {error} Write it with tools/prepare_vqa.py.") from None

    def save(self, vocabulary_path: str | os.PathLike) -> None:
        write_json(vocabulary_path, {"answers": self.answers})

    def __len__(self) -> int:
        return len(self.answers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnswerVocabulary) and self.answers == other.answers

    def __contains__(self, answer: str) -> bool:
        return answer in self._index

    def index(self, answer: str) -> int:
        """Class index of ``answer``, or -1 if it is not a class."""
        return self._index.get(answer, -1)
