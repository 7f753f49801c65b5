"""Official VQA accuracy: the leave-one-out rule by hand, both normalisations, real files, the Metric.

The real-file reference is a transcription of ``VQAEval.evaluate`` (GT-Vision-Lab/VQA vqaEval.py) in its
loop form, for the current code (master a013f00) and the legacy code (c4e6a0e), written here
independently of ``updown.metrics.vqa_accuracy``.
"""

from __future__ import annotations

import copy
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REALDATA

from updown.metrics.vqa_accuracy import VQAAccuracy, evaluate_vqa, vqa_accuracy_per_question
from updown.metrics.vqa_normalization import process_digit_article, process_punctuation

VQA_DIR = REALDATA / "vqa"
QUESTIONS = VQA_DIR / "v2_OpenEnded_mscoco_val2014_questions.first100.json"
ANNOTATIONS = VQA_DIR / "v2_mscoco_val2014_annotations.first100.json"
RESULTS = sorted(VQA_DIR.glob("results_*.json"))


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # leave out the match (1 of 10): 0; leave out another (9 of 10): 1/3 -> 9/30
        (2, 0.6),  # 2 * (1/3) + 8 * (2/3), over 10
        (3, 0.9),  # 3 * (2/3) + 7 * 1: three humans is not yet a sure 1.0
        (4, 1.0),  # any 9 of them still hold 3 matches
        (10, 1.0),
    ],
)
def test_leave_one_out_by_hand(matches: int, expected: float) -> None:
    answers = ["red"] * matches + [
        "blue",
        "green",
        "white",
        "black",
        "pink",
        "gray",
        "tan",
        "gold",
        "navy",
        "teal",
    ]
    answers = answers[:10]
    for normalization in ("official", "legacy"):
        assert vqa_accuracy_per_question("red", answers, normalization) == pytest.approx(expected, abs=1e-12)


def test_unanimous_answers_are_not_normalised() -> None:
    yes = ["yes"] * 10
    assert vqa_accuracy_per_question("yes", yes) == 1.0
    assert vqa_accuracy_per_question("Yes", yes) == 0.0  # official: verbatim match needed
    assert vqa_accuracy_per_question("yes.", yes) == 0.0
    assert vqa_accuracy_per_question("Yes.", yes, "legacy") == 1.0  # legacy normalises the prediction always
    # Official strips the humans' whitespace before checking unanimity; legacy compares them raw.
    assert vqa_accuracy_per_question("yes", ["yes\n"] * 10) == 1.0
    assert vqa_accuracy_per_question("yes", ["yes\n"] * 10, "legacy") == 0.0


def test_number_words_and_articles() -> None:
    humans = ["two"] * 4 + ["three"] * 6
    assert vqa_accuracy_per_question("2", humans) == 1.0  # both sides normalised: "two" -> "2"
    assert vqa_accuracy_per_question("The two.", humans) == 1.0
    # Legacy: the humans get punctuation processing only, so "two" stays "two" while "2"/"two" become "2".
    assert vqa_accuracy_per_question("two", humans, "legacy") == 0.0
    humans = ["the dog"] * 3 + ["cat"] * 7
    assert vqa_accuracy_per_question("dog", humans) == pytest.approx(0.9)
    assert vqa_accuracy_per_question("dog", humans, "legacy") == 0.0
    assert vqa_accuracy_per_question("dont know", ["don't know"] * 5 + ["no"] * 5) == 1.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="normalization"):
        vqa_accuracy_per_question("yes", ["yes"], "2017")
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy_per_question("yes", [])


# ---- the official evaluation loop, transcribed ----
def _official_evaluate(annotations: list[dict], results: list[dict], legacy: bool) -> tuple[dict, float]:
    """The official output dictionary, and the unrounded overall mean in [0, 1]."""
    gts = {a["question_id"]: copy.deepcopy(a) for a in annotations}
    res = {r["question_id"]: r for r in results}
    acc_qa, acc_ques_type, acc_ans_type = [], {}, {}
    for ques_id in [a["question_id"] for a in annotations]:
        if not legacy:
            for ans_dic in gts[ques_id]["answers"]:
                ans_dic["answer"] = ans_dic["answer"].replace("\n", " ").replace("\t", " ").strip()
        res_ans = res[ques_id]["answer"].replace("\n", " ").replace("\t", " ").strip()
        if legacy:
            res_ans = process_digit_article(process_punctuation(res_ans))
        gt_acc = []
        gt_answers = [ans["answer"] for ans in gts[ques_id]["answers"]]
        if len(set(gt_answers)) > 1:
            for ans_dic in gts[ques_id]["answers"]:
                ans_dic["answer"] = process_punctuation(ans_dic["answer"])
                if not legacy:
                    ans_dic["answer"] = process_digit_article(ans_dic["answer"])
            if not legacy:
                res_ans = process_digit_article(process_punctuation(res_ans))
        for gt_ans_datum in gts[ques_id]["answers"]:
            other_gt_ans = [item for item in gts[ques_id]["answers"] if item != gt_ans_datum]
            matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
            gt_acc.append(min(1, float(len(matching_ans)) / 3))
        avg = float(sum(gt_acc)) / len(gt_acc)
        acc_qa.append(avg)
        acc_ques_type.setdefault(gts[ques_id]["question_type"], []).append(avg)
        acc_ans_type.setdefault(gts[ques_id]["answer_type"], []).append(avg)
    official = {
        "overall": round(100 * float(sum(acc_qa)) / len(acc_qa), 2),
        "perQuestionType": {k: round(100 * float(sum(v)) / len(v), 2) for k, v in acc_ques_type.items()},
        "perAnswerType": {k: round(100 * float(sum(v)) / len(v), 2) for k, v in acc_ans_type.items()},
    }
    return official, float(sum(acc_qa)) / len(acc_qa)


@pytest.mark.parametrize("normalization", ["official", "legacy"])
def test_real_files_match_official_loop(normalization: str) -> None:
    questions = json.loads(QUESTIONS.read_text())
    annotations = json.loads(ANNOTATIONS.read_text())
    assert len(RESULTS) == 5
    scores = {}
    for results_path in RESULTS:
        results = json.loads(results_path.read_text())
        expected, _ = _official_evaluate(
            annotations["annotations"], results, legacy=normalization == "legacy"
        )
        assert evaluate_vqa(questions, annotations, results, normalization) == expected, results_path.name
        scores[results_path.stem] = expected
    decorated, plain = scores["results_mc_answer_decorated"], scores["results_mc_answer"]
    if normalization == "official":
        # The current rule normalises nothing where the humans agree, so "the down." misses a unanimous "down".
        assert 0 < decorated["overall"] < plain["overall"]
    else:
        # The legacy rule always normalises the prediction: the decorations vanish, so every score is the same.
        assert decorated == plain


def test_coverage_errors() -> None:
    questions = json.loads(QUESTIONS.read_text())
    annotations = json.loads(ANNOTATIONS.read_text())
    results = json.loads((VQA_DIR / "results_all_yes.json").read_text())
    first, second = results[0]["question_id"], results[1]["question_id"]
    with pytest.raises(ValueError, match=f"no result.*{first}"):
        evaluate_vqa(questions, annotations, results[1:])
    with pytest.raises(ValueError, match="not in the questions.*12345"):
        evaluate_vqa(questions, annotations, [*results, {"question_id": 12345, "answer": "yes"}])
    with pytest.raises(ValueError, match=f"several results.*{second}"):
        evaluate_vqa(questions, annotations, [*results, results[1]])
    with pytest.raises(ValueError, match="no annotation"):
        evaluate_vqa(questions, {"annotations": annotations["annotations"][1:]}, results)
    broken = copy.deepcopy(annotations)
    del broken["annotations"][0]["answers"]
    with pytest.raises(ValueError, match=f"question {first} lacks 'answers'"):
        evaluate_vqa(questions, broken, results)
    with pytest.raises(ValueError, match=r"results\[100\]: expected an object with an integer 'question_id'"):
        evaluate_vqa(questions, annotations, [*results, {"answer": "yes"}])


def _vqa_batches() -> tuple[list[dict], list[dict]]:
    annotations = json.loads(ANNOTATIONS.read_text())["annotations"]
    results = {
        r["question_id"]: r["answer"]
        for r in json.loads((VQA_DIR / "results_first_human_answer.json").read_text())
    }
    return annotations, [
        {"question_id": a["question_id"], "answer": results[a["question_id"]]} for a in annotations
    ]


def _update(metric: VQAAccuracy, annotations: list[dict], results: list[dict]) -> None:
    metric.update(
        [r["answer"] for r in results],
        [[x["answer"] for x in a["answers"]] for a in annotations],
        question_ids=[a["question_id"] for a in annotations],
        answer_types=[a["answer_type"] for a in annotations],
    )


def test_metric_equals_evaluation_and_drops_duplicates() -> None:
    annotations, results = _vqa_batches()
    expected, expected_mean = _official_evaluate(annotations, results, legacy=False)
    metric = VQAAccuracy()
    for start in range(0, 100, 32):
        _update(metric, annotations[start : start + 32], results[start : start + 32])
    values = metric.compute()
    assert values["overall"].item() == pytest.approx(expected_mean, abs=1e-12)
    assert round(100 * values["overall"].item(), 2) == expected["overall"]
    for answer_type, percent in expected["perAnswerType"].items():
        assert round(100 * values[answer_type].item(), 2) == percent

    # Two "ranks" whose shards overlap (DistributedSampler padding repeats questions) merge to the same value.
    rank0, rank1 = VQAAccuracy(), VQAAccuracy()
    _update(rank0, annotations[:60], results[:60])
    _update(rank1, annotations[50:] + annotations[:3], results[50:] + results[:3])
    rank0.merge_state(rank1)
    assert rank0.compute()["overall"].item() == pytest.approx(values["overall"].item(), abs=1e-12)


def _ddp_worker(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    annotations, results = _vqa_batches()
    # DistributedSampler-style shards of 100 questions over 2 ranks, with a padded repeat on rank 1.
    indices = list(range(rank, 100, 2)) + ([0] if rank == 1 else [])
    metric = VQAAccuracy()
    _update(metric, [annotations[i] for i in indices], [results[i] for i in indices])
    queue.put((rank, metric.compute()["overall"].item()))
    dist.destroy_process_group()


def test_metric_is_exact_under_ddp() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_ddp_worker, args=(port, queue), nprocs=2, join=True, start_method="spawn")
    values = dict(queue.get() for _ in range(2))
    annotations, results = _vqa_batches()
    _, expected = _official_evaluate(annotations, results, legacy=False)
    assert values[0] == pytest.approx(expected, abs=1e-12)
    assert values[1] == pytest.approx(expected, abs=1e-12)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric VQAAccuracy was called before")
def test_metric_validates_input() -> None:
    metric = VQAAccuracy()
    with pytest.raises(ValueError, match="unknown answer type"):
        metric.update(["yes"], [["yes"] * 10], question_ids=[1], answer_types=["colour"])
    with pytest.raises(ValueError, match="question ids"):
        metric.update(["yes", "no"], [["yes"] * 10], question_ids=[1])
    with pytest.raises(ValueError, match="no questions"):
        VQAAccuracy().compute()
    metric.update(["2", "two"], [["2"] * 10, ["2"] * 10], question_ids=torch.tensor([4, 5]))
    assert metric.compute()["overall"].item() == 0.5  # "two" vs unanimous "2": not normalised
    assert set(metric.compute()) == {"overall"}
