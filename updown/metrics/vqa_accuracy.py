"""VQA accuracy as the official GT-Vision-Lab evaluation computes it, plus a torchmetrics Metric.

Per question, a prediction is compared with each of the 10 leave-one-out subsets of 9 human answers and
scores ``min(1, matches / 3)`` in each; the question's accuracy is the mean over the 10 subsets (so one
matching human gives 0.3, two give 0.6, three or more give 1.0).

Two normalisation rules (``normalization=``), both from GT-Vision-Lab/VQA ``vqaEval.py``:

``"official"`` (the current code, master commit a013f00; the rule since the 2021 revision)
    Every human answer and the prediction get their newlines/tabs turned into spaces and are stripped.
    Only if the 10 human answers are *not* all identical are the answers *and* the prediction normalised
    (:func:`~updown.metrics.vqa_normalization.normalize_answer`: punctuation, then digits/articles/
    contractions). With unanimous humans the prediction must match them verbatim (the evaluation's
    authors did this to leave OCR-style answers alone), so ``"Yes"`` scores 0 against ten ``"yes"``.

``"legacy"`` (the earlier code, e.g. commit c4e6a0e, which most pre-2021 papers used)
    The prediction is *always* fully normalised (whitespace, punctuation, digits/articles/contractions).
    The human answers are not whitespace-stripped; if they are not all identical they get
    ``process_punctuation`` only, never ``process_digit_article``. So a human answer such as
    ``"two"`` or ``"the dog"`` can never be matched (the prediction becomes ``"2"`` / ``"dog"``), while
    with unanimous humans a prediction like ``"Yes."`` still scores (it is normalised to ``"yes"``).

Averages per answer type and question type are means of the per-question accuracies; the official output
reports them as percentages rounded to 2 decimals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from updown.metrics.distributed import first_occurrences
from updown.metrics.vqa_normalization import normalize_answer, process_punctuation, strip_whitespace

NORMALIZATIONS = ("official", "legacy")
VQA_ANSWER_TYPES = ("yes/no", "number", "other")


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r} is not known; use one of {NORMALIZATIONS}.")


def vqa_accuracy_per_question(
    prediction: str, human_answers: Sequence[str], normalization: str = "official"
) -> float:
    """Official VQA accuracy of one predicted answer.

    Args:
        prediction: the predicted answer, raw.
        human_answers: the human answers of the question, raw (10 in VQA v1/v2).
        normalization: ``"official"`` (current rule) or ``"legacy"`` (pre-2021 rule); see the module doc.

    Returns:
        The mean over leave-one-out subsets of ``min(1, matches / 3)``, in ``[0, 1]``.
    """
    _check_normalization(normalization)
    if len(human_answers) == 0:
        raise ValueError("human_answers is empty: a question needs its human answers to be scored.")
    if normalization == "official":
        answers = [strip_whitespace(answer) for answer in human_answers]
        predicted = strip_whitespace(prediction)
        if len(set(answers)) > 1:
            answers = [normalize_answer(answer) for answer in answers]
            predicted = normalize_answer(predicted)
    else:
        answers = list(human_answers)
        predicted = normalize_answer(prediction)
        if len(set(answers)) > 1:
            answers = [process_punctuation(answer) for answer in answers]
    num_answers = len(answers)
    num_matches = sum(answer == predicted for answer in answers)
    # Leaving out a matching human leaves num_matches - 1 matches; leaving out any other leaves num_matches.
    left_out_match = min(1.0, (num_matches - 1) / 3) if num_matches else 0.0
    left_out_other = min(1.0, num_matches / 3)
    return (num_matches * left_out_match + (num_answers - num_matches) * left_out_other) / num_answers


def _items(obj: Any, key: str, what: str) -> list[dict]:
    """Accept an official JSON object (``{"questions": [...]}``) or its bare list."""
    items = obj.get(key) if isinstance(obj, Mapping) else obj
    if not isinstance(items, list):
        raise ValueError(
            f"{what}: expected a list of {key} or an object with a {key!r} list, got {type(obj).__name__}."
        )
    return items


def _question_id(item: Any, what: str, index: int) -> int:
    if not isinstance(item, Mapping) or not isinstance(item.get("question_id"), int):
        raise ValueError(f"{what}[{index}]: expected an object with an integer 'question_id', got {item!r}.")
    return item["question_id"]


def _ids_message(ids: set, what: str) -> str:
    shown = ", ".join(str(i) for i in sorted(ids)[:5])
    return f"{len(ids)} {what} (e.g. {shown})"


def evaluate_vqa(
    questions: Any, annotations: Any, results: Sequence[Mapping[str, Any]], normalization: str = "official"
) -> dict[str, Any]:
    """Score a results file like the official ``VQAEval.evaluate``.

    Args:
        questions: the official questions JSON (or its ``"questions"`` list); defines the question set.
        annotations: the official annotations JSON (or its ``"annotations"`` list): per question
            ``question_id``, ``answers`` (``[{"answer": str, ...}]``), ``answer_type``, ``question_type``.
        results: ``[{"question_id": int, "answer": str}]``, exactly one per question.
        normalization: ``"official"`` or ``"legacy"``.

    Returns:
        ``{"overall": float, "perQuestionType": {type: float}, "perAnswerType": {type: float}}``, in percent
        rounded to 2 decimals as the official code prints them.

    Raises:
        ValueError: malformed input, questions without annotations, or results that do not cover the
            question set exactly (missing, extra or duplicate question ids).
    """
    _check_normalization(normalization)
    question_ids = {
        _question_id(q, "questions", i) for i, q in enumerate(_items(questions, "questions", "questions"))
    }
    if not question_ids:
        raise ValueError("questions: the question list is empty.")
    annotation_by_id = {
        _question_id(a, "annotations", i): a
        for i, a in enumerate(_items(annotations, "annotations", "annotations"))
    }
    unannotated = question_ids - set(annotation_by_id)
    if unannotated:
        raise ValueError(
            f"annotations: {_ids_message(unannotated, 'questions have no annotation')}. "
            "Use the annotation file of the same split as the questions."
        )
    answer_by_id: dict[int, str] = {}
    duplicates = set()
    for index, result in enumerate(results):
        question_id = _question_id(result, "results", index)
        if not isinstance(result.get("answer"), str):
            raise ValueError(f"results[{index}]: the answer must be a string, got {result!r}.")
        if question_id in answer_by_id:
            duplicates.add(question_id)
        answer_by_id[question_id] = result["answer"]
    missing, extra = question_ids - set(answer_by_id), set(answer_by_id) - question_ids
    if missing or extra or duplicates:
        found = (
            (missing, "questions have no result"),
            (extra, "results are not in the questions"),
            (duplicates, "questions have several results"),
        )
        problems = [_ids_message(ids, what) for ids, what in found if ids]
        raise ValueError(f"results: {'; '.join(problems)}. Give exactly one answer per question.")

    accuracies: list[float] = []
    by_question_type: dict[str, list[float]] = {}
    by_answer_type: dict[str, list[float]] = {}
    # The official code iterates in annotation-file order; keep it so float sums match bit for bit.
    for question_id, annotation in annotation_by_id.items():
        if question_id not in question_ids:
            continue
        try:
            human_answers = [answer["answer"] for answer in annotation["answers"]]
            question_type, answer_type = annotation["question_type"], annotation["answer_type"]
            if not human_answers or not all(
                isinstance(a, str) for a in (*human_answers, question_type, answer_type)
            ):
                raise TypeError(question_id)
        except (KeyError, TypeError):
            raise ValueError(
                f"annotations: question {question_id} lacks 'answers' [{{'answer': str}}], or a string "
                "'question_type' or 'answer_type'. Use the official VQA annotations file."
            ) from None
        accuracy = vqa_accuracy_per_question(answer_by_id[question_id], human_answers, normalization)
        accuracies.append(accuracy)
        by_question_type.setdefault(question_type, []).append(accuracy)
        by_answer_type.setdefault(answer_type, []).append(accuracy)

    def percent(values: list[float]) -> float:
        return round(100 * float(sum(values)) / len(values), 2)

    return {
        "overall": percent(accuracies),
        "perQuestionType": {key: percent(values) for key, values in by_question_type.items()},
        "perAnswerType": {key: percent(values) for key, values in by_answer_type.items()},
    }


class VQAAccuracy(Metric):
    """Official VQA accuracy accumulated over batches, overall and per answer type, exact under DDP.

    States are per-question lists (question id, accuracy, answer-type index) gathered with
    ``dist_reduce_fx="cat"``; :meth:`compute` keeps one entry per question id. This costs a few bytes per
    question (about 5 MB for VQA v2 val) but makes the result exact: ``DistributedSampler`` pads the last
    batches by repeating questions, and summed states would count those twice. With ids deduplicated and
    averaged in ascending id order (:mod:`updown.metrics.distributed`) the result equals, bit for bit, a
    single-process run on the same questions, and :func:`evaluate_vqa` up to its rounding.

    Args:
        normalization: ``"official"`` or ``"legacy"`` (module doc).
        answer_types: the answer types to report separately; others raise in :meth:`update`.

    Example:
        >>> metric = VQAAccuracy()
        >>> metric.update(["2"], [["2"] * 10], question_ids=[7], answer_types=["number"])
        >>> metric.compute()["overall"]
        tensor(1., dtype=torch.float64)
    """

    full_state_update = False

    def __init__(
        self, normalization: str = "official", answer_types: Sequence[str] = VQA_ANSWER_TYPES, **kwargs
    ):
        super().__init__(**kwargs)
        _check_normalization(normalization)
        self.normalization = normalization
        self.answer_types = tuple(answer_types)
        self.add_state("question_ids", default=[], dist_reduce_fx="cat")
        self.add_state("accuracies", default=[], dist_reduce_fx="cat")
        self.add_state("answer_type_indices", default=[], dist_reduce_fx="cat")
        #: Distinct questions the last :meth:`compute` scored (all ranks together).
        self.num_questions: int | None = None

    def update(
        self,
        predictions: Sequence[str],
        human_answers: Sequence[Sequence[str]],
        question_ids: Sequence[int] | torch.Tensor,
        answer_types: Sequence[str] | None = None,
    ) -> None:
        """Score a batch.

        Args:
            predictions: B predicted answer strings.
            human_answers: B lists of raw human answers.
            question_ids: B question ids (list or ``(B,)`` tensor), used to drop DDP padding duplicates.
            answer_types: B answer types, or None to accumulate only the overall accuracy.
        """
        ids = torch.as_tensor(question_ids, dtype=torch.int64).reshape(-1)
        if not len(predictions) == len(human_answers) == ids.numel():
            raise ValueError(
                f"VQAAccuracy.update: got {len(predictions)} predictions, {len(human_answers)} answer lists "
                f"and {ids.numel()} question ids; pass one of each per question."
            )
        if answer_types is not None and len(answer_types) != len(predictions):
            raise ValueError(
                f"VQAAccuracy.update: {len(answer_types)} answer types for {len(predictions)} predictions."
            )
        type_indices = []
        for answer_type in answer_types if answer_types is not None else [None] * len(predictions):
            if answer_type is not None and answer_type not in self.answer_types:
                raise ValueError(
                    f"VQAAccuracy.update: unknown answer type {answer_type!r}; expected one of {self.answer_types}. "
                    "Pass answer_types=... to the constructor."
                )
            type_indices.append(-1 if answer_type is None else self.answer_types.index(answer_type))
        scores = [
            vqa_accuracy_per_question(prediction, answers, self.normalization)
            for prediction, answers in zip(predictions, human_answers)
        ]
        self.question_ids.append(ids.to(self.device))
        self.accuracies.append(torch.tensor(scores, dtype=torch.float64, device=self.device))
        self.answer_type_indices.append(torch.tensor(type_indices, dtype=torch.int64, device=self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        """Mean accuracy in ``[0, 1]``: key ``"overall"``, plus one key per answer type that was seen."""
        ids = dim_zero_cat(self.question_ids) if len(self.question_ids) else torch.zeros(0, dtype=torch.int64)
        if ids.numel() == 0:
            raise ValueError("VQAAccuracy.compute: no questions were scored; call update() first.")
        accuracies = dim_zero_cat(self.accuracies).double()
        type_indices = dim_zero_cat(self.answer_type_indices)
        # One copy of each question (DDP padding repeats whole questions), in ascending question id order so
        # that the float sums below do not depend on how the questions were sharded or batched.
        first = first_occurrences(ids)
        accuracies, type_indices = accuracies[first], type_indices[first]
        self.num_questions = int(first.numel())
        result = {"overall": accuracies.mean()}
        for index, answer_type in enumerate(self.answer_types):
            selected = type_indices == index
            if bool(selected.any()):
                result[answer_type] = accuracies[selected].mean()
        return result
