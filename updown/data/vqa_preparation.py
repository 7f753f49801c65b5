"""Prepare VQA v2 data from the official JSON files (docs/design.md, section 2.3).

``tools/prepare_vqa.py`` is its CLI.

Inputs per split: the official questions JSON and, except for test-dev / test-std, the annotations JSON.
Outputs, in one folder:

- ``questions_<split>.json``: official-style ``{"questions": [...]}`` whose items also carry ``tokens``, the
  10 raw human ``answers`` (``[]`` without annotations), ``answer_type``, ``question_type`` and the sparse
  soft targets ``answer_scores`` (``{answer index: score}``, answers of the vocabulary only). It is a valid
  questions file for the official evaluation as it is;
- ``annotations_<split>.json`` for annotated splits: the split's official annotations, copied unchanged, so
  ``python -m updown.evaluate vqa --questions questions_val.json --annotations annotations_val.json``
  scores a split of the prepared folder without the original downloads;
- ``question_vocabulary.json`` (:class:`Vocabulary`, words of the vocabulary splits' questions) and
  ``answer_vocabulary.json`` (:class:`AnswerVocabulary`).

Choices, and where they come from:

- Question tokens follow hengyuan-hu/bottom-up-attention-vqa ``Dictionary.tokenize`` (lower-case, ``'s``
  split off as its own token, ``,`` and ``?`` dropped), and also drop every other punctuation mark, keeping
  apostrophes, hyphens and periods inside a word (``don't``, ``multi-purpose``, ``3.5``); at most 14 kept.
- The answer vocabulary follows that reproduction's ``compute_softscore.filter_answers``: an answer is a
  class if it is the normalised ``multiple_choice_answer`` (the most common human answer) of at least
  ``min_answer_count`` (9) distinct questions of ``answer_splits``. The normalisation is the official
  evaluation's (:func:`~updown.metrics.vqa_normalization.normalize_answer`), shared with the metric. The
  empty string (what ``"the"`` or ``"."`` normalise to) is never a class, so train+val should give 3128
  classes: the standard 3129 list (airsplay/lxmert ``trainval_label2ans.json``, made by that rule) holds
  ``""``. Classes are sorted by decreasing count, ties alphabetically.
- The soft target of an answer is exactly its official VQA accuracy given the human answers
  (:func:`~updown.metrics.vqa_accuracy.vqa_accuracy_per_question`, ``normalization="official"``: the mean
  over the leave-one-out subsets of ``min(1, matches / 3)``). With 10 humans this is the reproduction's
  0.3 / 0.6 / 0.9 / 1.0 table for 1 / 2 / 3 / 4+ matches, but *which* answers match is decided by the
  metric's rule (normalised answers, or verbatim ones when the humans are unanimous) rather than by raw
  string equality, so the loss and the metric always agree on the best answer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from updown.data.vocabulary import AnswerVocabulary, Vocabulary
from updown.io import atomic_outputs, read_json
from updown.metrics.vqa_accuracy import vqa_accuracy_per_question
from updown.metrics.vqa_normalization import normalize_answer, strip_whitespace

MAX_QUESTION_LENGTH = 14
MIN_ANSWER_COUNT = 9
# A possessive 's on its own, else a word of letters/digits, possibly joined by ' - or . inside it.
_QUESTION_TOKEN = re.compile(r"'s\b|[^\W_]+(?:[-'.][^\W_]+)*")


def tokenize_question(question: str, max_length: int = MAX_QUESTION_LENGTH) -> list[str]:
    """Lower-case question words, punctuation dropped, possessive ``'s`` split off; the first ``max_length``.

    >>> tokenize_question("How many photo's can you see? (Salisbury Rd.)")
    ['how', 'many', 'photo', "'s", 'can', 'you', 'see', 'salisbury', 'rd']
    """
    text = question.lower().replace("\u2019", "'").replace("'s", " 's")
    return _QUESTION_TOKEN.findall(text)[:max_length]


@dataclass
class VQAQuestion:
    """One question of a split, with its human answers and (once prepared) its soft targets.

    Attributes:
        question_id, image_id: the official ids.
        question: the raw question text.
        tokens: at most ``max_question_length`` tokens (:func:`tokenize_question`).
        answers: the raw human answers (10 in VQA v2), ``[]`` for annotation-less splits.
        answer_type, question_type: official categories (None without annotations).
        multiple_choice_answer: the official most common answer, raw (None without annotations).
        answer_scores: answer class index -> soft target in (0, 1] (empty without annotations).
    """

    question_id: int
    image_id: int
    question: str
    tokens: list[str]
    answers: list[str] = field(default_factory=list)
    answer_type: str | None = None
    question_type: str | None = None
    multiple_choice_answer: str | None = None
    answer_scores: dict[int, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        item = {k: v for k, v in self.__dict__.items() if k != "answer_scores"}
        item["answer_scores"] = {str(k): v for k, v in self.answer_scores.items()}
        return item


_HINT = "Use the official VQA v2 file."


def _items(data, key: str, path, what: str, tool_hint: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected a JSON object with a '{key}' list ({what}). {tool_hint}")
    return data[key]


def _ids(ids) -> str:
    ids = sorted(ids)
    return f"{len(ids)} (e.g. {ids[:5]})"


def load_vqa_split(
    questions_jsonpath: str | os.PathLike,
    annotations_jsonpath: str | os.PathLike | None = None,
    max_question_length: int = MAX_QUESTION_LENGTH,
) -> tuple[list[VQAQuestion], list[dict] | None]:
    """Read one split's official questions (and annotations), checking that they match one to one.

    Returns:
        The questions in file order, and the raw annotation dicts (None without an annotations file).

    Raises:
        ValueError: malformed files, duplicate ids, empty questions, questions without annotation or
            annotations without question, or mismatching image ids.
    """
    data = read_json(questions_jsonpath, "VQA questions JSON")
    questions = []
    for position, item in enumerate(
        _items(data, "questions", questions_jsonpath, "official VQA questions", _HINT)
    ):
        if not (
            isinstance(item, dict)
            and all(_is_int(item.get(k)) for k in ("question_id", "image_id"))
            and isinstance(item.get("question"), str)
        ):
            raise ValueError(
                f"{questions_jsonpath}: questions[{position}] lacks an integer 'question_id' or 'image_id', or a "
                f"string 'question'. {_HINT}"
            )
        question = VQAQuestion(item["question_id"], item["image_id"], item["question"], [])
        question.tokens = tokenize_question(question.question, max_question_length)
        if not question.tokens:
            raise ValueError(
                f"{questions_jsonpath}: question {question.question_id} has no words ({question.question!r}). "
                "Remove it or fix its text."
            )
        questions.append(question)
    repeated = [i for i, c in Counter(q.question_id for q in questions).items() if c > 1]
    if repeated:
        raise ValueError(f"{questions_jsonpath}: repeated question ids {_ids(repeated)}. {_HINT}")
    if annotations_jsonpath is None:
        return questions, None
    return questions, _attach_annotations(questions, questions_jsonpath, annotations_jsonpath)


def _attach_annotations(questions: list[VQAQuestion], questions_jsonpath, annotations_jsonpath) -> list[dict]:
    """Fill each question's answers and types from its annotation; return the annotations of ``questions``."""
    data = read_json(annotations_jsonpath, "VQA annotations JSON")
    annotations = _items(data, "annotations", annotations_jsonpath, "official VQA annotations", _HINT)
    by_id = {q.question_id: q for q in questions}
    annotated, orphans = set(), set()
    for position, annotation in enumerate(annotations):
        try:
            question_id, image_id, answers, types = _annotation_fields(annotation)
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{annotations_jsonpath}: annotations[{position}] lacks an integer 'question_id' or 'image_id', "
                f"'answers' (a list of {{'answer': str}}), a string 'answer_type', 'question_type' or "
                f"'multiple_choice_answer'. {_HINT}"
            ) from None
        question = by_id.get(question_id)
        if question is None:
            orphans.add(question_id)
            continue
        problem = None
        if question_id in annotated:
            problem = "is annotated twice"
        elif image_id != question.image_id:
            problem = f"is on image {question.image_id} but its annotation on image {image_id}"
        elif not answers:
            problem = "has an annotation without answers"
        if problem:
            raise ValueError(
                f"{annotations_jsonpath}: question {question_id} {problem}. Pass the annotations of the same "
                f"split as {questions_jsonpath}."
            )
        annotated.add(question_id)
        question.answers, (question.answer_type, question.question_type) = answers, types
        question.multiple_choice_answer = annotation.get("multiple_choice_answer")
    unannotated = set(by_id) - annotated
    if unannotated or orphans:
        problems = [
            f"{what} {_ids(ids)}"
            for ids, what in (
                (unannotated, "questions without annotation:"),
                (orphans, "annotations without question:"),
            )
            if ids
        ]
        raise ValueError(
            f"{questions_jsonpath} and {annotations_jsonpath} do not match: {'; '.join(problems)}. "
            "Pass the questions and annotations of the same split (and the full files, not a subset of one)."
        )
    return [a for a in annotations if a["question_id"] in by_id]


def _annotation_fields(annotation) -> tuple[int, int, list[str], tuple[str, str]]:
    """The ids, human answers and types of one official annotation; a wrong type is an error (a number as an
    answer would silently become another answer)."""
    question_id, image_id = annotation["question_id"], annotation["image_id"]
    answers = [a["answer"] for a in annotation["answers"]]
    types = annotation["answer_type"], annotation["question_type"]
    majority = annotation.get("multiple_choice_answer")
    if not (_is_int(question_id) and _is_int(image_id)) or not all(
        isinstance(a, str) for a in (*answers, *types)
    ):
        raise TypeError(annotation)
    if majority is not None and not isinstance(majority, str):
        raise TypeError(majority)
    return question_id, image_id, answers, types


def majority_answer(question: VQAQuestion) -> str:
    """The normalised most common human answer: ``multiple_choice_answer`` if present, else the normalised
    answer given most often (ties: the one given first)."""
    if question.multiple_choice_answer is not None:
        return normalize_answer(question.multiple_choice_answer)
    normalised = [normalize_answer(a) for a in question.answers]
    counts = Counter(normalised)
    return max(normalised, key=lambda a: (counts[a], -normalised.index(a)))


def build_answer_vocabulary(
    questions: Sequence[VQAQuestion], min_answer_count: int = MIN_ANSWER_COUNT
) -> AnswerVocabulary:
    """Answers that are the :func:`majority_answer` of at least ``min_answer_count`` distinct questions.

    Never the empty string; sorted by decreasing count, ties alphabetically.
    """
    counts = Counter(majority_answer(q) for q in {q.question_id: q for q in questions if q.answers}.values())
    kept = sorted(
        (a for a, c in counts.items() if c >= min_answer_count and a), key=lambda a: (-counts[a], a)
    )
    return AnswerVocabulary(kept)


class SoftScorer:
    """Soft targets of a question: each vocabulary answer's official VQA accuracy, non-zero ones only.

    Candidates are found through the answers' normalised forms (the only way an answer can match a human
    under the official rule), and each candidate is scored by the metric's own function.
    """

    def __init__(self, answer_vocabulary: AnswerVocabulary) -> None:
        self.answer_vocabulary = answer_vocabulary
        self._by_normalised: dict[str, list[str]] = {}
        for answer in answer_vocabulary.answers:
            self._by_normalised.setdefault(normalize_answer(answer), []).append(answer)

    def __call__(self, human_answers: Sequence[str]) -> dict[int, float]:
        if not human_answers:
            return {}
        stripped = {strip_whitespace(a) for a in human_answers}
        if len(stripped) == 1:
            # Unanimous humans: the official rule compares verbatim, so only that exact string can match.
            candidates = {a for a in stripped if a in self.answer_vocabulary}
        else:
            candidates = {c for a in stripped for c in self._by_normalised.get(normalize_answer(a), ())}
        scores = {}
        for candidate in sorted(candidates):
            score = vqa_accuracy_per_question(candidate, human_answers, "official")
            if score > 0:
                scores[self.answer_vocabulary.index(candidate)] = score
        return dict(sorted(scores.items()))


def prepare_vqa(
    splits: Mapping[str, tuple[str | os.PathLike, str | os.PathLike | None]],
    output_dir: str | os.PathLike,
    answer_splits: Sequence[str] = ("train",),
    min_answer_count: int = MIN_ANSWER_COUNT,
    max_question_length: int = MAX_QUESTION_LENGTH,
    vocabulary_splits: Sequence[str] | None = None,
    min_word_count: int = 1,
    force: bool = True,
) -> tuple[Vocabulary, AnswerVocabulary]:
    """Write the prepared VQA files (module doc) for ``splits`` into ``output_dir``.

    Args:
        splits: split name -> (questions JSON, annotations JSON or None for test-dev / test-std).
        output_dir: destination folder.
        answer_splits: annotated splits whose majority answers define the answer classes (``train`` for
            val evaluation; ``train val`` for test-dev submissions gives the standard list).
        min_answer_count: questions an answer must be the majority answer of (9 in the reproduction).
        max_question_length: tokens kept per question (14 in the paper).
        vocabulary_splits: splits whose question words form the question vocabulary (default:
            ``answer_splits``, the training splits).
        min_word_count: occurrences a word needs to enter the question vocabulary.
        force: overwrite existing output files.

    Raises:
        ValueError: bad inputs (see :func:`load_vqa_split`), unknown or unannotated answer / vocabulary
            splits, or an empty answer vocabulary. Everything is checked before the first file is written.
        FileExistsError: an output file exists and ``force`` is False.
    """
    output_dir = Path(output_dir)
    vocabulary_splits = list(answer_splits if vocabulary_splits is None else vocabulary_splits)
    if not splits:
        raise ValueError("No splits to prepare. Give at least one split with its questions file.")
    for name, wanted in (("answer", answer_splits), ("vocabulary", vocabulary_splits)):
        unknown = [s for s in wanted if s not in splits]
        if unknown or not wanted:
            raise ValueError(
                f"{name} splits {list(wanted)}: {unknown or 'none'} not among the splits given ({list(splits)}). "
                f"Name splits that are prepared, e.g. --answer-splits train."
            )
    loaded = {name: load_vqa_split(q, a, max_question_length) for name, (q, a) in splits.items()}
    unannotated = [s for s in answer_splits if loaded[s][1] is None]
    if unannotated:
        raise ValueError(
            f"answer splits {unannotated} have no annotations file; answers come from annotations."
        )
    answer_vocabulary = build_answer_vocabulary(
        [q for s in answer_splits for q in loaded[s][0]], min_answer_count
    )
    if not len(answer_vocabulary):
        raise ValueError(
            f"No answer is the most common answer of >= {min_answer_count} questions in {list(answer_splits)}. "
            "Lower --min-answer-count or add annotated splits."
        )
    counts = Counter(w for s in vocabulary_splits for q in loaded[s][0] for w in q.tokens)
    question_vocabulary = Vocabulary.from_counts(counts, min_word_count)
    scorer = SoftScorer(answer_vocabulary)
    for questions, _ in loaded.values():
        for question in questions:
            question.answer_scores = scorer(question.answers)
    outputs = [output_dir / n for n in ("question_vocabulary.json", "answer_vocabulary.json")]
    outputs += [output_dir / f"questions_{s}.json" for s in splits]
    outputs += [output_dir / f"annotations_{s}.json" for s in splits if loaded[s][1] is not None]
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(existing)}: output file(s) exist. Pass --force to overwrite, or choose another output."
        )
    # All or nothing: the files go to a staging folder and move into output_dir together.
    with atomic_outputs(output_dir, force=force) as staging:
        for name, (questions, raw_annotations) in loaded.items():
            _write_json_list(
                staging / f"questions_{name}.json",
                {"data_subtype": name, "task_type": "Open-Ended"},
                "questions",
                (q.to_json() for q in questions),
            )
            if raw_annotations is not None:
                _write_json_list(
                    staging / f"annotations_{name}.json",
                    {"data_subtype": name},
                    "annotations",
                    raw_annotations,
                )
        question_vocabulary.save(staging / "question_vocabulary.json")
        answer_vocabulary.save(staging / "answer_vocabulary.json")
    return question_vocabulary, answer_vocabulary


def _write_json_list(path: Path, head: dict, key: str, items: Iterable[dict]) -> None:
    """Write ``{**head, key: [*items]}`` item by item: the bytes ``json.dump`` writes, without building the list.

    ``json.dump`` of a whole object runs Python's pure encoder; ``json.dumps`` of each item runs the C one, which
    halved the time of preparing a tenth of VQA v2 (with the answer cache; docs/benchmarks.md).
    """
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(json.dumps(head)[:-1] + f", {json.dumps(key)}: [")
        for position, item in enumerate(items):
            stream.write((", " if position else "") + json.dumps(item))
        stream.write("]}")


def read_prepared_questions(questions_jsonpath: str | os.PathLike) -> list[VQAQuestion]:
    """The questions of a prepared ``questions_<split>.json``, checked.

    Raises:
        ValueError: malformed file, no questions, a question id listed twice, a question without tokens, or
            soft targets that do not fit the human answers (targets without answers, a score outside (0, 1]).
    """
    hint = "Write it with tools/prepare_vqa.py."
    items = _items(
        read_json(questions_jsonpath, "prepared VQA questions JSON"),
        "questions",
        questions_jsonpath,
        "prepared VQA questions",
        hint,
    )
    questions = []
    position_of: dict[int, int] = {}
    for position, item in enumerate(items):
        question = _prepared_question(item)
        if question is None:
            raise ValueError(
                f"{questions_jsonpath}: questions[{position}] is not a prepared question (integer 'question_id' and "
                "'image_id', string 'question', lists of strings 'tokens' and 'answers', 'answer_scores' mapping "
                f"answer indices to scores). {hint}"
            )
        if question.question_id in position_of:
            raise ValueError(
                f"{questions_jsonpath}: question {question.question_id} is listed twice (questions["
                f"{position_of[question.question_id]}] and questions[{position}]); each question must appear once. "
                f"{hint}"
            )
        position_of[question.question_id] = position
        if not question.tokens:
            raise ValueError(f"{questions_jsonpath}: question {question.question_id} has no tokens. {hint}")
        if question.answer_scores and not question.answers:
            raise ValueError(
                f"{questions_jsonpath}: question {question.question_id} has {len(question.answer_scores)} soft "
                f"target(s) but no human answers; the targets are computed from the answers. {hint}"
            )
        bad = [score for score in question.answer_scores.values() if not 0 < score <= 1]
        if bad:
            raise ValueError(
                f"{questions_jsonpath}: question {question.question_id} has a soft target {bad[0]!r} outside "
                f"(0, 1]; a target is the VQA accuracy of an answer. {hint}"
            )
        questions.append(question)
    if not questions:
        raise ValueError(f"{questions_jsonpath}: holds no questions. {hint}")
    return questions


def _prepared_question(item) -> VQAQuestion | None:
    """One entry of a prepared questions file, or None when a field is missing or of the wrong type."""
    if not isinstance(item, dict) or not set(item) <= _QUESTION_FIELDS:
        return None
    if not all(_is_int(item.get(k)) for k in ("question_id", "image_id")) or not isinstance(
        item.get("question"), str
    ):
        return None
    if not all(_is_strings(item.get(k, [])) for k in ("tokens", "answers")) or "tokens" not in item:
        return None
    if not all(item.get(k) is None or isinstance(item[k], str) for k in _OPTIONAL_STRINGS):
        return None
    scores = item.get("answer_scores", {})
    if not isinstance(scores, dict):
        return None
    answer_scores = {}
    for key, value in scores.items():
        if (
            not isinstance(key, str)
            or not key.isdigit()
            or not isinstance(value, (int, float))
            or isinstance(value, bool)
        ):
            return None
        answer_scores[int(key)] = float(value)
    fields = {k: v for k, v in item.items() if k != "answer_scores"}
    question = VQAQuestion(**fields)
    question.answer_scores = answer_scores
    return question


_QUESTION_FIELDS = {f.name for f in dataclasses.fields(VQAQuestion)}
_OPTIONAL_STRINGS = ("answer_type", "question_type", "multiple_choice_answer")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
