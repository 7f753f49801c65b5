"""Word forms of constraint words: which word sequences satisfy a constraint such as ``dog`` or ``fire hydrant``.

A constraint (one object class chosen by :class:`updown.data.detections.ConstraintFilter`) is satisfied when the
caption contains one of its *word forms*, each a sequence of words: ``dog`` is satisfied by ``("dog",)`` or
``("dogs",)``, ``fire hydrant`` by ``("fire", "hydrant")`` or ``("fire", "hydrants")``.

The word-forms file is nocaps' ``constraint_wordforms.tsv``: one row per *word* of the class names, the word, a
tab, and its comma-separated forms (singular, plural, close synonyms)::

    dog\tdog,dogs
    hydrant\thydrant,hydrants

A multi-word class takes, for each of its words, one of that word's forms, in order (the updown-baseline
finite-state machine accepts exactly these sequences). A form may itself hold several words. Words are
compared lower-cased, as the caption vocabulary is lower case.

The words of every form must be in the captioner's vocabulary, otherwise the model can never write them:
``python tools/prepare_captions.py ... --constraint-words constraint_wordforms.tsv`` builds the vocabulary with
them (the nocaps baseline trains with that vocabulary).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path

from updown.data.vocabulary import Vocabulary

# One constraint: its word forms, each a tuple of words (or of token ids after :func:`constraint_token_ids`).
WordConstraint = tuple[tuple[str, ...], ...]
TokenConstraint = tuple[tuple[int, ...], ...]


class WordForms:
    """Word -> its forms (each a tuple of words), read from a word-forms TSV.

    Args:
        forms: lower-case word -> non-empty tuple of forms.
        source: the file they came from, for messages.
    """

    def __init__(self, forms: dict[str, tuple[tuple[str, ...], ...]], source: str = "word forms") -> None:
        self.forms, self.source = forms, source

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> WordForms:
        """Read a word-forms TSV (module docstring); blank lines are skipped.

        Raises:
            FileNotFoundError: no such file.
            ValueError: a row without exactly one tab, a row with no forms, or a word given two different rows.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: word-forms TSV not found. Check the path (nocaps: constraint_wordforms.tsv)."
            )
        forms: dict[str, tuple[tuple[str, ...], ...]] = {}
        first_line: dict[str, int] = {}
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.split("\t")
                word = fields[0].strip().lower()
                if len(fields) != 2 or not word:
                    raise ValueError(
                        f"{path}, line {number}: expected a word, a tab and comma-separated forms "
                        f"(e.g. 'dog<TAB>dog,dogs'), got {line!r}."
                    )
                # Forms split into words on whitespace; empty entries (a trailing comma) are skipped.
                row = tuple(
                    dict.fromkeys(tuple(f.lower().split()) for f in fields[1].split(",") if f.strip())
                )
                if not row:
                    raise ValueError(
                        f"{path}, line {number}: the word {word!r} has no forms; list at least itself."
                    )
                if word in forms and forms[word] != row:
                    raise ValueError(
                        f"{path}, lines {first_line[word]} and {number}: the word {word!r} has two different rows; "
                        "keep one."
                    )
                forms[word] = row
                first_line.setdefault(word, number)
        if not forms:
            raise ValueError(f"{path}: the word-forms TSV has no rows.")
        return cls(forms, str(path))

    def vocabulary_words(self) -> list[str]:
        """Every word of every form, sorted: what the caption vocabulary must hold."""
        return sorted({word for row in self.forms.values() for form in row for word in form})

    def constraint(self, class_name: str) -> WordConstraint:
        """The word forms that satisfy the constraint ``class_name`` (e.g. ``"fire hydrant"``).

        Raises:
            KeyError: a word of the class has no row in the TSV.
        """
        words = class_name.lower().split()
        if not words:
            raise ValueError("a constraint class name must hold at least one word.")
        missing = [word for word in words if word not in self.forms]
        if missing:
            raise KeyError(
                f"{self.source}: no word forms for {missing} (from the constraint {class_name!r}). "
                f"Add a row per word, e.g. '{missing[0]}<TAB>{missing[0]},{missing[0]}s', or use nocaps' "
                "constraint_wordforms.tsv."
            )
        # One form per word, in order: the concatenation of every combination.
        combined = (sum(choice, ()) for choice in itertools.product(*(self.forms[word] for word in words)))
        return tuple(dict.fromkeys(combined))

    def image_constraints(self, class_names: Sequence[str]) -> list[WordConstraint]:
        """The constraints of one image, one per class name (as :class:`ConstraintFilter` returns them)."""
        return [self.constraint(name) for name in class_names]


def constraint_token_ids(
    constraints: Sequence[WordConstraint], vocabulary: Vocabulary, vocabulary_path: str = "the vocabulary"
) -> list[TokenConstraint]:
    """Word constraints -> the same constraints as token ids of ``vocabulary``.

    Args:
        constraints: per constraint, its word forms, each a tuple of words.
        vocabulary: the captioner's vocabulary.
        vocabulary_path: its file, for the message.

    Raises:
        KeyError: a word is not in the vocabulary (it would become ``<unk>``, which no caption should need).
    """
    missing = sorted(
        {
            word
            for constraint in constraints
            for form in constraint
            for word in form
            if vocabulary.index(word) == vocabulary.unk_index
        }
    )
    if missing:
        shown = ", ".join(repr(word) for word in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise KeyError(
            f"{vocabulary_path}: {len(missing)} constraint words are not in the vocabulary ({shown}). Rebuild the "
            "vocabulary with them (python tools/prepare_captions.py ... --constraint-words WORDFORMS.tsv) and "
            "train with it: a model can only write words of its vocabulary."
        )
    return [
        tuple(tuple(vocabulary.index(word) for word in form) for form in constraint)
        for constraint in constraints
    ]
