"""PickledList (updown/data/pickled_list.py): the items as they were, and forked readers that copy nothing."""

from __future__ import annotations

import os
import sys

import pytest

from updown.data.pickled_list import PickledList
from updown.data.vqa_preparation import VQAQuestion


def _questions(n: int) -> list[VQAQuestion]:
    return [
        VQAQuestion(
            question_id=1000 + i,
            image_id=i // 5,
            question=f"what colour is the thing number {i}?",
            tokens=["what", "colour", "is", "the", "thing", "number", str(i)],
            answers=[f"answer {i % 7} {k}" for k in range(10)],
            answer_type="other",
            question_type="what color is the",
            multiple_choice_answer=f"answer {i % 7} 0",
            answer_scores={i % 11: 1.0, (i + 3) % 11: 0.3},
        )
        for i in range(n)
    ]


def test_items_come_back_equal_and_as_new_objects():
    questions = _questions(50)
    pickled = PickledList((question, [i, i + 1]) for i, question in enumerate(questions))
    assert len(pickled) == 50
    assert pickled[7] == (questions[7], [7, 8]) and pickled[-1] == (questions[49], [49, 50])
    assert [item for item, _ in pickled] == questions
    first = pickled[3][0]
    first.answers.append("changed")
    assert pickled[3][0] == questions[3]  # a fetched item is a copy
    assert pickled.nbytes > 0
    with pytest.raises(IndexError):
        pickled[50]
    with pytest.raises(IndexError):
        pickled[-51]
    assert len(PickledList([])) == 0


def _private_growth_after_reading_all(items) -> float:
    """MiB of private memory a forked process gains by fetching every item once (as a DataLoader worker does)."""

    def private_kib() -> int:
        with open(f"/proc/{os.getpid()}/smaps_rollup") as rollup:
            fields = dict(line.split()[:2] for line in rollup if line.split()[1:2] != [])
        return int(fields["Private_Dirty:"]) + int(fields["Private_Clean:"])

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read, report, leave without running the parent's cleanup
        try:
            before = private_kib()
            for i in range(len(items)):
                question = items[i]
                list(question.answers), list(question.answer_scores.items())
            os.write(write_end, str(private_kib() - before).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as report:
        return int(report.read()) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/smaps_rollup")
def test_a_forked_reader_copies_the_pickled_list_but_not_its_pages():
    """What VQADataset keeps its questions in: a forked worker that fetches every item stays small, where the same
    items as a list of objects are copied into it page by page (their reference counts are written)."""
    questions = _questions(40_000)
    as_objects = _private_growth_after_reading_all(questions)
    pickled = _private_growth_after_reading_all(PickledList(questions))
    assert as_objects > 30  # MiB: the test can see the copying it guards against
    assert pickled < 8
