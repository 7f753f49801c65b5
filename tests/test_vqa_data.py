from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REALDATA, TINY_SPEC
from torch.utils.data import DataLoader

from updown.data.batch_memory import PackedCollate, SlotDataLoader
from updown.data.readers import RegionFeatures
from updown.data.synthetic import SyntheticWorld
from updown.data.vocabulary import AnswerVocabulary, Vocabulary
from updown.data.vqa_data import VQADataModule, VQADataset, ensure_synthetic_vqa
from updown.data.vqa_preparation import prepare_vqa, read_prepared_questions
from updown.data.writers import RegionFeaturesWriter
from updown.metrics.vqa_accuracy import evaluate_vqa, vqa_accuracy_per_question
from updown.types import VQABatch

VQA = REALDATA / "vqa"


def _dataset(world, split: str) -> VQADataset:
    folder = ensure_synthetic_vqa(world)
    return VQADataset(
        RegionFeatures(world.features_h5path),
        read_prepared_questions(folder / f"questions_{split}.json"),
        Vocabulary.from_file(folder / "question_vocabulary.json"),
        AnswerVocabulary.from_file(folder / "answer_vocabulary.json"),
    )


def test_batches_hold_the_prepared_questions(tiny_world):
    dataset = _dataset(tiny_world, "val")
    folder = ensure_synthetic_vqa(tiny_world)
    vocabulary = Vocabulary.from_file(folder / "question_vocabulary.json")
    answers = AnswerVocabulary.from_file(folder / "answer_vocabulary.json")
    raw = {
        a["question_id"]: a
        for a in json.loads(tiny_world.vqa_annotations_jsonpath("val").read_text())["annotations"]
    }
    reader = RegionFeatures(tiny_world.features_h5path)
    batch = dataset.collate([dataset[i] for i in range(5)])
    assert set(batch) == set(VQABatch.__required_keys__) | set(VQABatch.__optional_keys__)
    b, t = batch["question_tokens"].shape
    assert (
        b == 5
        and batch["answer_scores"].shape == (5, len(answers))
        and batch["answer_scores"].dtype == torch.float32
    )
    for row in range(5):
        question = dataset.questions[row]
        assert int(batch["question_id"][row]) == question.question_id
        assert int(batch["image_id"][row]) == question.image_id
        length = int(batch["question_lengths"][row])
        words = [vocabulary.tokens[i] for i in batch["question_tokens"][row, :length].tolist()]
        assert words == [w if w in vocabulary.tokens else "<unk>" for w in question.tokens]
        assert torch.all(batch["question_tokens"][row, length:] == vocabulary.pad_index)
        # Raw answers from the official file, and dense targets equal to the metric for every class.
        assert batch["answers"][row] == [a["answer"] for a in raw[question.question_id]["answers"]]
        expected = [vqa_accuracy_per_question(a, batch["answers"][row]) for a in answers.answers]
        assert batch["answer_scores"][row].tolist() == pytest.approx(expected, abs=1e-7)
        regions = reader[question.image_id]
        n = regions.num_boxes
        assert batch["image_features_mask"][row].sum() == n and bool(
            batch["image_features_mask"][row, :n].all()
        )
        np.testing.assert_array_equal(batch["image_features"][row, :n].numpy(), regions.features)
    assert int(batch["question_lengths"].max()) == t


def test_dataloader_with_two_workers_sees_every_question_once(tiny_world):
    dataset = _dataset(tiny_world, "train")
    loader = DataLoader(
        dataset,
        batch_size=64,
        shuffle=True,
        num_workers=2,
        collate_fn=dataset.collate,
        generator=torch.Generator().manual_seed(0),
    )
    seen, total = [], 0.0
    for batch in loader:
        seen += batch["question_id"].tolist()
        total += float(batch["answer_scores"].double().sum())
    assert sorted(seen) == sorted(q.question_id for q in dataset.questions)
    # Every sparse target reached the dense batches built in the workers.
    expected = sum(s for q in dataset.questions for s in q.answer_scores.values())
    assert expected > 0.5 * len(seen) and total == pytest.approx(expected, rel=1e-6)


def _assert_same_batch(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


def test_worker_batches_keep_features_and_answer_scores_in_their_slot_and_equal_in_process_ones(tiny_world):
    """Both large tensors of a VQA batch (features, dense answer scores) are written into the batch's shared slot
    in a worker, and reused buffers in one process: the batches equal fresh ones, epoch after epoch (a reused
    buffer that kept an earlier batch's targets would show)."""
    dataset = _dataset(tiny_world, "val")
    order = list(range(len(dataset)))[::-1]
    batches = [order[k : k + 16] for k in range(0, len(order), 16)]
    fresh = [_dataset(tiny_world, "val").collate([dataset[i] for i in batch]) for batch in batches]
    for _ in range(2):  # in one process, the second pass reuses the first pass's buffers
        for indices, expected in zip(batches, fresh):
            _assert_same_batch(dataset.collate([dataset[i] for i in indices]), expected)
    loader = SlotDataLoader(
        dataset,
        batch_size=16,
        sampler=order,
        num_workers=2,
        collate_fn=PackedCollate(dataset.collate),
        persistent_workers=True,
    )
    for _ in range(2):
        for batch, expected in zip(loader, fresh, strict=True):
            _assert_same_batch(batch, expected)
    counts = loader._iterator.shared_batch_slots.counts
    assert counts[:, 0].sum() == 2 * 2 * len(batches) and counts[:, 1].sum() == 0


def test_wrong_answer_vocabulary_is_refused(tiny_world):
    folder = ensure_synthetic_vqa(tiny_world)
    questions = read_prepared_questions(folder / "questions_train.json")
    with pytest.raises(ValueError, match="past the answer vocabulary"):
        VQADataset(
            RegionFeatures(tiny_world.features_h5path),
            questions,
            Vocabulary.from_file(folder / "question_vocabulary.json"),
            AnswerVocabulary(["yes"]),
        )


def _prepare_in_child(root: str) -> None:
    ensure_synthetic_vqa(SyntheticWorld(Path(root)))


def test_synthetic_preparation_is_atomic_under_concurrency(tiny_world, tmp_path):
    root = tmp_path / "world"
    shutil.copytree(tiny_world.root, root, ignore=shutil.ignore_patterns("vqa", ".vqa*"))
    assert not (root / "prepared" / "vqa").exists()
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_prepare_in_child, args=(str(root),)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0]
    names = sorted(p.name for p in (root / "prepared").iterdir())
    assert names == [".vqa.lock", "captions", "vqa"]  # no temporary folder left behind
    assert len(list((root / "prepared" / "vqa").iterdir())) == 2 + 3 + 3


def test_datamodule_on_the_synthetic_world(tiny_world):
    datamodule = VQADataModule(
        data_root=str(tiny_world.root.parent), synthetic=TINY_SPEC, batch_size=32, eval_batch_size=16
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    prepared = ensure_synthetic_vqa(tiny_world)
    assert datamodule.answer_vocabulary == AnswerVocabulary.from_file(prepared / "answer_vocabulary.json")
    assert len(datamodule.question_vocabulary) > 4
    train = next(iter(datamodule.train_dataloader()))
    val = next(iter(datamodule.val_dataloader()))
    assert train["question_tokens"].shape[0] == 32 and val["question_tokens"].shape[0] == 16
    assert train["answer_scores"].shape[1] == len(datamodule.answer_vocabulary)
    # The official-format files of a split score exactly like the synthetic world's raw files.
    annotations = json.loads(tiny_world.vqa_annotations_jsonpath("val").read_text())
    results = [
        {"question_id": a["question_id"], "answer": a["answers"][0]["answer"]}
        for a in annotations["annotations"]
    ]
    official = evaluate_vqa(
        json.loads(tiny_world.vqa_questions_jsonpath("val").read_text()), annotations, results
    )
    prepared_scores = evaluate_vqa(
        json.loads(datamodule.questions_jsonpath("val").read_text()),
        json.loads(datamodule.annotations_jsonpath("val").read_text()),
        results,
    )
    assert prepared_scores == official
    two = VQADataModule(
        data_root=str(tiny_world.root.parent), synthetic=TINY_SPEC, train_splits=["train", "val"]
    )
    two.setup("fit")
    assert len(two.train_dataloader().dataset) == len(two.dataset("train")) + len(two.dataset("val")) > 0
    with pytest.raises(ValueError, match="give features_h5path and prepared_dir"):
        VQADataModule(features_h5path="features.h5")


def test_datamodule_on_real_questions_without_annotations(tmp_path):
    """Real first-100 val questions as train, and the same questions without annotations as test-dev."""
    questions = json.loads((VQA / "v2_OpenEnded_mscoco_val2014_questions.first100.json").read_text())[
        "questions"
    ]
    rng = np.random.default_rng(0)
    with RegionFeaturesWriter(tmp_path / "features.h5", 10, 8, force=True) as writer:
        for image_id in sorted({q["image_id"] for q in questions}):
            n = int(rng.integers(1, 11))
            boxes = np.tile(np.array([[0, 0, 10, 10]], dtype=np.float32), (n, 1))
            writer.add(image_id, rng.random((n, 8)).astype(np.float32), boxes, image_w=640.0, image_h=480.0)
    prepare_vqa(
        {
            "train": (
                VQA / "v2_OpenEnded_mscoco_val2014_questions.first100.json",
                VQA / "v2_mscoco_val2014_annotations.first100.json",
            ),
            "test-dev": (VQA / "v2_OpenEnded_mscoco_val2014_questions.first100.json", None),
        },
        tmp_path / "prepared",
        min_answer_count=2,
    )
    datamodule = VQADataModule(
        features_h5path=str(tmp_path / "features.h5"),
        prepared_dir=str(tmp_path / "prepared"),
        val_split="train",
        test_split="test-dev",
        eval_batch_size=100,
    )
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["question_id"].tolist() == [q["question_id"] for q in questions]
    assert batch["answers"] == [[]] * 100 and float(batch["answer_scores"].abs().sum()) == 0.0
    assert datamodule.annotations_jsonpath("test-dev") is None
    assert datamodule.annotations_jsonpath("train").is_file()
