from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import REALDATA

from updown.data.vocabulary import AnswerVocabulary, Vocabulary
from updown.data.vqa_preparation import (
    VQAQuestion,
    build_answer_vocabulary,
    load_vqa_split,
    prepare_vqa,
    read_prepared_questions,
    tokenize_question,
)
from updown.metrics.vqa_accuracy import evaluate_vqa, vqa_accuracy_per_question

VQA = REALDATA / "vqa"
VAL_QUESTIONS = VQA / "v2_OpenEnded_mscoco_val2014_questions.first100.json"
VAL_ANNOTATIONS = VQA / "v2_mscoco_val2014_annotations.first100.json"
TRAIN_ANNOTATIONS = VQA / "v2_mscoco_train2014_annotations.first100.json"
TOOL = Path(__file__).resolve().parents[1] / "tools" / "prepare_vqa.py"


def _hengyuan_tokenize(sentence: str) -> list[str]:
    """hengyuan-hu/bottom-up-attention-vqa dataset.py Dictionary.tokenize, as published."""
    sentence = sentence.lower()
    sentence = sentence.replace(",", "").replace("?", "").replace("'s", " 's")
    return sentence.split()


def _write_split(folder: Path, name: str, items: list[tuple[str, list[str], str]], first_id: int = 1):
    """Official-format files for hand-made questions: (question, 10 answers, multiple_choice_answer)."""
    questions, annotations = [], []
    for k, (text, answers, majority) in enumerate(items):
        question_id, image_id = first_id + k, 1000 + (first_id + k) // 3
        questions.append({"image_id": image_id, "question": text, "question_id": question_id})
        annotations.append(
            {
                "question_type": "what is",
                "answer_type": "other",
                "multiple_choice_answer": majority,
                "image_id": image_id,
                "question_id": question_id,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(answers)
                ],
            }
        )
    q_path, a_path = folder / f"{name}_questions.json", folder / f"{name}_annotations.json"
    q_path.write_text(json.dumps({"questions": questions}))
    a_path.write_text(json.dumps({"annotations": annotations}))
    return q_path, a_path


def test_tokenisation_cases():
    assert tokenize_question("How many photo's can you see?") == [
        "how",
        "many",
        "photo",
        "'s",
        "can",
        "you",
        "see",
    ]
    assert tokenize_question("What color is the Salisbury Rd. sign?!") == [
        "what",
        "color",
        "is",
        "the",
        "salisbury",
        "rd",
        "sign",
    ]
    assert tokenize_question("Could this be a multi-purpose room (or 3.5 rooms)?") == [
        "could",
        "this",
        "be",
        "a",
        "multi-purpose",
        "room",
        "or",
        "3.5",
        "rooms",
    ]
    assert tokenize_question("Don\u2019t the players' bats, left/right, look NEW?") == [
        "don't",
        "the",
        "players",
        "bats",
        "left",
        "right",
        "look",
        "new",
    ]
    long = " ".join(f"w{i}" for i in range(20)) + "?"
    assert tokenize_question(long) == [f"w{i}" for i in range(14)]
    assert tokenize_question(long, max_length=3) == ["w0", "w1", "w2"]
    assert tokenize_question("?!...") == []


def test_tokenisation_matches_the_reproduction_on_real_questions():
    """Where a real question has no punctuation beyond , ? and 's, the tokens equal hengyuan-hu's."""
    questions = json.loads(VAL_QUESTIONS.read_text())["questions"]
    compared = 0
    for item in questions:
        text = item["question"]
        if all(c.isalnum() or c in " ,?'" for c in text):
            assert tokenize_question(text, max_length=100) == _hengyuan_tokenize(text), text
            compared += 1
    assert compared >= 90


def test_answer_vocabulary_rule(tmp_path):
    items = [("What is it?", ["cat"] * 10, "cat")] * 9  # majority of exactly 9 questions: in
    items += [("What is it?", ["dog"] * 6 + ["cat"] * 4, "dog")] * 8  # of 8: out (though a human answer)
    items += [("What is it?", ["the"] * 10, "the")] * 12  # normalises to "": never a class
    items += [("How many?", ["Two"] * 5 + ["2"] * 5, "Two")] * 10  # normalised: "2"
    q_path, a_path = _write_split(tmp_path, "train", items)
    _, answer_vocabulary = prepare_vqa({"train": (q_path, a_path)}, tmp_path / "out")
    assert answer_vocabulary.answers == ["2", "cat"]  # decreasing count (10, 9)
    assert AnswerVocabulary.from_file(tmp_path / "out" / "answer_vocabulary.json") == answer_vocabulary
    # The count is over questions, not answers: one question answered "cat" 10 times counts once.
    questions, _ = load_vqa_split(q_path, a_path)
    assert "cat" not in build_answer_vocabulary(questions[1:9] + questions[9:17], 9)
    assert build_answer_vocabulary(questions, 8).answers == ["2", "cat", "dog"]


def test_soft_targets_equal_the_metric(tmp_path, tiny_world):
    hand = [
        ("What?", ["Two", "two", "2 ", "2", "3", "three", "a 3", "4", "red", "Red."], "2"),
        ("What?", ["yes"] * 9 + ["no"], "yes"),
        ("What?", ["Yes"] * 10, "Yes"),  # unanimous: compared verbatim, so the class "yes" scores 0
    ] + [("What?", [a] * 10, a) for a in ("2", "3", "4", "red", "yes", "no")] * 2
    q_path, a_path = _write_split(tmp_path, "train", hand)
    prepare_vqa({"train": (q_path, a_path)}, tmp_path / "hand", min_answer_count=2)
    vocabulary = AnswerVocabulary.from_file(tmp_path / "hand" / "answer_vocabulary.json")
    first, second, third = read_prepared_questions(tmp_path / "hand" / "questions_train.json")[:3]
    by_answer = {vocabulary.answers[i]: s for i, s in first.answer_scores.items()}
    # 4 humans say 2, 3 say 3, 1 says 4, 2 say red: 1 match 0.3, 2 match 0.6, 3 match 0.9, 4+ match 1.
    assert by_answer == pytest.approx({"2": 1.0, "3": 0.9, "4": 0.3, "red": 0.6})
    assert {vocabulary.answers[i]: s for i, s in second.answer_scores.items()} == pytest.approx(
        {"yes": 1.0, "no": 0.3}
    )
    assert third.answer_scores == {}

    real_dir, synthetic_dir = tmp_path / "real", tmp_path / "synthetic"
    prepare_vqa(
        {"val": (VAL_QUESTIONS, VAL_ANNOTATIONS)}, real_dir, answer_splits=["val"], min_answer_count=1
    )
    splits = {
        s: (tiny_world.vqa_questions_jsonpath(s), tiny_world.vqa_annotations_jsonpath(s))
        for s in ("train", "val")
    }
    prepare_vqa(splits, synthetic_dir)
    for folder, split in ((real_dir, "val"), (synthetic_dir, "train"), (synthetic_dir, "val")):
        vocabulary = AnswerVocabulary.from_file(folder / "answer_vocabulary.json")
        for question in read_prepared_questions(folder / f"questions_{split}.json"):
            for index, answer in enumerate(vocabulary.answers):
                expected = vqa_accuracy_per_question(answer, question.answers)
                assert question.answer_scores.get(index, 0.0) == expected, (question.question_id, answer)


def test_real_first100_files(tmp_path):
    question_vocabulary, answer_vocabulary = prepare_vqa(
        {"val": (VAL_QUESTIONS, VAL_ANNOTATIONS)}, tmp_path, answer_splits=["val"], min_answer_count=2
    )
    questions = read_prepared_questions(tmp_path / "questions_val.json")
    raw = json.loads(VAL_QUESTIONS.read_text())["questions"]
    assert [q.question_id for q in questions] == [q["question_id"] for q in raw]
    assert all(len(q.answers) == 10 and q.answer_type in ("yes/no", "number", "other") for q in questions)
    assert Vocabulary.from_file(tmp_path / "question_vocabulary.json") == question_vocabulary
    assert {"how", "many", "'s", "color"} <= set(question_vocabulary.tokens)
    # Frequent normalised majority answers of the real val and train annotations are standard classes.
    standard = set(json.loads((VQA / "lxmert" / "trainval_label2ans.json").read_text()))
    assert {"yes", "no", "1", "white", "green"} <= set(answer_vocabulary.answers) <= standard
    train_annotations = json.loads(TRAIN_ANNOTATIONS.read_text())["annotations"]
    train = [
        VQAQuestion(
            a["question_id"],
            a["image_id"],
            "",
            [],
            [x["answer"] for x in a["answers"]],
            multiple_choice_answer=a["multiple_choice_answer"],
        )
        for a in train_annotations
    ]
    both = build_answer_vocabulary(train + questions, 2)
    assert len(both) > len(answer_vocabulary) and set(both.answers) <= standard
    # The prepared folder scores results exactly as the official files do.
    for results_path in sorted(VQA.glob("results_*.json")):
        results = json.loads(results_path.read_text())
        official = evaluate_vqa(
            json.loads(VAL_QUESTIONS.read_text()), json.loads(VAL_ANNOTATIONS.read_text()), results
        )
        prepared = evaluate_vqa(
            json.loads((tmp_path / "questions_val.json").read_text()),
            json.loads((tmp_path / "annotations_val.json").read_text()),
            results,
        )
        assert prepared == official, results_path.name


def test_annotation_less_split(tmp_path, tiny_world):
    splits = {
        "train": (tiny_world.vqa_questions_jsonpath("train"), tiny_world.vqa_annotations_jsonpath("train")),
        "test-dev": (tiny_world.vqa_questions_jsonpath("test"), None),
    }
    prepare_vqa(splits, tmp_path)
    test = read_prepared_questions(tmp_path / "questions_test-dev.json")
    assert test and all(q.answers == [] and q.answer_scores == {} and q.answer_type is None for q in test)
    assert (
        not (tmp_path / "annotations_test-dev.json").exists()
        and (tmp_path / "annotations_train.json").exists()
    )
    with pytest.raises(ValueError, match=r"answer splits \['test-dev'\] have no annotations file"):
        prepare_vqa(splits, tmp_path / "x", answer_splits=["test-dev"])


def test_bad_inputs_raise_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "bad.json").write_text('{"questions": [')
    with pytest.raises(ValueError, match="bad.json: VQA questions JSON is not valid JSON"):
        prepare_vqa({"val": (tmp_path / "bad.json", VAL_ANNOTATIONS)}, out, answer_splits=["val"])
    with pytest.raises(
        ValueError,
        match=r"questions without annotation: 100 \(e.g. \[42000, .*annotations without question: 100",
    ):
        prepare_vqa({"val": (VAL_QUESTIONS, TRAIN_ANNOTATIONS)}, out, answer_splits=["val"])
    raw = json.loads(VAL_QUESTIONS.read_text())
    raw["questions"] = raw["questions"][2:]
    (tmp_path / "q98.json").write_text(json.dumps(raw))
    with pytest.raises(
        ValueError, match=r"annotations without question: 2 \(e.g. \[262148000, 262148001\]\)"
    ):
        prepare_vqa({"val": (tmp_path / "q98.json", VAL_ANNOTATIONS)}, out, answer_splits=["val"])
    q_path, a_path = _write_split(tmp_path, "empty", [("  ", ["cat"] * 10, "cat")])
    with pytest.raises(ValueError, match=r"question 1 has no words \('  '\)"):
        prepare_vqa({"train": (q_path, a_path)}, out)
    with pytest.raises(ValueError, match=r"answer splits \['train'\]: \['train'\] not among the splits"):
        prepare_vqa({"val": (VAL_QUESTIONS, VAL_ANNOTATIONS)}, out)
    with pytest.raises(ValueError, match="No answer is the most common answer of >= 9"):
        prepare_vqa(
            {"val": (VAL_QUESTIONS, VAL_ANNOTATIONS)}, out, answer_splits=["val"], min_answer_count=99
        )
    assert not out.exists()
    prepare_vqa({"val": (VAL_QUESTIONS, VAL_ANNOTATIONS)}, out, answer_splits=["val"])
    before = (out / "questions_val.json").read_bytes()
    with pytest.raises(FileExistsError, match="Pass --force"):
        prepare_vqa({"val": (VAL_QUESTIONS, VAL_ANNOTATIONS)}, out, answer_splits=["val"], force=False)
    assert (out / "questions_val.json").read_bytes() == before


def test_cli(tmp_path, capsys, tiny_world):
    spec = importlib.util.spec_from_file_location("prepare_vqa", TOOL)
    tool = importlib.util.module_from_spec(spec)
    sys.modules["prepare_vqa"] = tool
    spec.loader.exec_module(tool)
    world = tiny_world
    args = [
        f"--split={s}={world.vqa_questions_jsonpath(s)},{world.vqa_annotations_jsonpath(s)}"
        for s in ("train", "val")
    ]
    args += [f"--split=test-dev={world.vqa_questions_jsonpath('test')}", "--output", str(tmp_path / "out")]
    assert tool.main(args) == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {
        "question_vocabulary.json",
        "answer_vocabulary.json",
        "questions_train.json",
        "questions_val.json",
        "questions_test-dev.json",
        "annotations_train.json",
        "annotations_val.json",
    }
    before = (tmp_path / "out" / "questions_val.json").read_bytes()
    assert tool.main(args) == 2 and "Pass --force" in capsys.readouterr().err
    assert (tmp_path / "out" / "questions_val.json").read_bytes() == before
    assert tool.main([*args, "--force", "--answer-splits", "train", "val"]) == 0
    assert "answer classes" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert (
        tool.main(
            [
                "--split",
                f"val={tmp_path / 'bad.json'}",
                "--answer-splits",
                "val",
                "--output",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "bad.json: VQA questions JSON is not valid JSON" in err
        and "Traceback" not in err
    )
    assert tool.main(["--split", "val", "--output", str(tmp_path / "o2")]) == 2
    assert "expected NAME=QUESTIONS.json[,ANNOTATIONS.json]" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
