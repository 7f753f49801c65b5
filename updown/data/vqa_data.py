"""VQA v2 dataset, collate function and LightningDataModule over prepared data (tools/prepare_vqa.py).

One item is one question: its image's regions, its tokens, its sparse soft targets and its raw human
answers (for the official metric). With no paths, :class:`VQADataModule` uses the synthetic world's VQA
files, prepared on first use by the same code as real data (:func:`ensure_synthetic_vqa`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from updown.data.datasets import _batch_tensor, collate_regions, pad_sequences
from updown.data.readers import RegionFeature, RegionFeatures
from updown.data.samplers import ResumableTrainingOrder
from updown.data.synthetic import SPLITS, SyntheticSpec, SyntheticWorld, ensure_synthetic_world
from updown.data.vocabulary import AnswerVocabulary, Vocabulary
from updown.data.vqa_preparation import VQAQuestion, prepare_vqa, read_prepared_questions


class VQADataset(Dataset):
    """One item per question: regions, question token indices, soft targets and raw human answers.

    Args:
        features: the region-feature reader.
        questions: prepared questions (:func:`~updown.data.vqa_preparation.read_prepared_questions`).
        question_vocabulary: maps question words to indices; unknown words become ``<unk>``.
        answer_vocabulary: the answer classes the questions' ``answer_scores`` index into.

    Raises:
        ValueError: a question's targets index past the answer vocabulary (prepared with another one).
    """

    def __init__(
        self,
        features: RegionFeatures,
        questions: Sequence[VQAQuestion],
        question_vocabulary: Vocabulary,
        answer_vocabulary: AnswerVocabulary,
    ) -> None:
        num_answers = len(answer_vocabulary)
        for question in questions:
            if any(not 0 <= index < num_answers for index in question.answer_scores):
                raise ValueError(
                    f"question {question.question_id}: soft targets index answer classes past the answer "
                    f"vocabulary ({num_answers} classes). Use the answer_vocabulary.json prepared with the questions."
                )
        self.features = features
        self.questions = list(questions)
        self.tokens = [question_vocabulary.encode(q.tokens, add_bos_eos=False) for q in self.questions]
        self.num_answers = num_answers
        self.pad_index = question_vocabulary.pad_index

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> tuple[RegionFeature, VQAQuestion, list[int]]:
        question = self.questions[index]
        return self.features[question.image_id], question, self.tokens[index]

    def collate(self, items) -> dict:
        """Batch questions into a :class:`~updown.types.VQABatch`.

        Returns:
            :func:`~updown.data.datasets.collate_regions` keys (one row per question) plus ``question_id (B,)``,
            ``question_tokens (B, T)`` right-padded with ``<pad>``, ``question_lengths (B,)``,
            ``answer_scores (B, A)`` float32 dense soft targets, and ``answers``: B lists of raw human answers.
        """
        batch = collate_regions([regions for regions, _, _ in items])
        questions = [question for _, question, _ in items]
        batch["question_id"] = torch.tensor([q.question_id for q in questions], dtype=torch.long)
        batch["question_tokens"], batch["question_lengths"] = pad_sequences(
            [t for _, _, t in items], self.pad_index
        )
        # shape: (B, A)
        scores = _batch_tensor((len(items), self.num_answers), torch.float32)
        for row, question in enumerate(questions):
            if question.answer_scores:
                columns = torch.tensor(list(question.answer_scores), dtype=torch.long)
                scores[row, columns] = torch.tensor(
                    list(question.answer_scores.values()), dtype=torch.float32
                )
        batch["answer_scores"] = scores
        batch["answers"] = [list(q.answers) for q in questions]
        batch["answer_types"] = [q.answer_type for q in questions]
        return batch


def ensure_synthetic_vqa(world: SyntheticWorld) -> Path:
    """Prepare the synthetic world's VQA files into ``world.root / "prepared" / "vqa"`` once; return that folder.

    Several processes may call this at once: one prepares under a file lock into a temporary folder and
    renames it into place, so a half-prepared folder is never visible.
    """
    target = world.root / "prepared" / "vqa"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(world.root / "prepared" / ".vqa.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return target
        staging = target.with_name(f".vqa.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            splits = {s: (world.vqa_questions_jsonpath(s), world.vqa_annotations_jsonpath(s)) for s in SPLITS}
            prepare_vqa(splits, staging, answer_splits=("train",))
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


class VQADataModule(ResumableTrainingOrder, pl.LightningDataModule):
    """VQA v2 questions with bottom-up region features.

    Args:
        features_h5path: region-feature HDF5 file(s) holding every image of the splits used. None: the
            synthetic world.
        prepared_dir: folder written by tools/prepare_vqa.py (``questions_<split>.json``, vocabularies).
        train_splits: splits trained on (``["train"]`` for val evaluation; ``["train", "val"]`` for test-dev).
        val_split: split scored during training (needs annotations).
        test_split: split scored by ``test`` / answered by prediction (test-dev needs no annotations).
        batch_size: training questions per batch (the reproduction: 512).
        eval_batch_size: questions per batch when evaluating.
        num_workers: DataLoader worker processes (a machine setting).
        in_memory: load all features into memory once (fast epochs, needs the RAM).
        data_root: where the synthetic world is cached (default ``$UPDOWN_DATA`` or the user cache dir).
        synthetic: parameters of the synthetic world, used when ``features_h5path`` is None.
    """

    def __init__(
        self,
        features_h5path: str | list[str] | None = None,
        prepared_dir: str | None = None,
        train_splits: list[str] | None = None,
        val_split: str = "val",
        test_split: str = "test",
        batch_size: int = 512,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        in_memory: bool = False,
        data_root: str | None = None,
        synthetic: SyntheticSpec | None = None,
    ) -> None:
        super().__init__()
        # Stored in checkpoints, so prediction and notebooks can find the data a checkpoint was trained on.
        self.save_hyperparameters()
        if (features_h5path is None) != (prepared_dir is None):
            raise ValueError(
                "data: give features_h5path and prepared_dir (from tools/prepare_vqa.py) together for real data, "
                "or neither for the synthetic world."
            )
        self.features_h5path, self.prepared_dir = features_h5path, prepared_dir
        self.train_splits = train_splits or ["train"]
        self.val_split, self.test_split = val_split, test_split
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.in_memory = num_workers, in_memory
        self.data_root = data_root
        # Checkpoints store the spec as a plain dict.
        self.synthetic = SyntheticSpec(**synthetic) if isinstance(synthetic, dict) else synthetic
        self.features: RegionFeatures | None = None
        self._question_vocabulary: Vocabulary | None = None
        self._answer_vocabulary: AnswerVocabulary | None = None
        self._datasets: dict[str, VQADataset] = {}

    def prepare_data(self) -> None:
        # Runs on one process per node before setup(): generate and prepare the synthetic world once.
        self._resolve_paths()

    def _resolve_paths(self) -> None:
        if self.features_h5path is None:
            world = ensure_synthetic_world(self.synthetic or SyntheticSpec(), self.data_root)
            self.prepared_dir = str(ensure_synthetic_vqa(world))
            self.features_h5path = str(world.features_h5path)

    @property
    def question_vocabulary(self) -> Vocabulary:
        """The question-word vocabulary (read on first use)."""
        if self._question_vocabulary is None:
            self._resolve_paths()
            self._question_vocabulary = Vocabulary.from_file(
                Path(self.prepared_dir) / "question_vocabulary.json"
            )
        return self._question_vocabulary

    @property
    def answer_vocabulary(self) -> AnswerVocabulary:
        """The answer classes (read on first use)."""
        if self._answer_vocabulary is None:
            self._resolve_paths()
            self._answer_vocabulary = AnswerVocabulary.from_file(
                Path(self.prepared_dir) / "answer_vocabulary.json"
            )
        return self._answer_vocabulary

    def questions_jsonpath(self, split: str) -> Path:
        """Prepared questions of ``split``; also a valid official questions file for the evaluation."""
        self._resolve_paths()
        return Path(self.prepared_dir) / f"questions_{split}.json"

    def annotations_jsonpath(self, split: str) -> Path | None:
        """Official-format annotations of ``split`` (None for annotation-less splits such as test-dev).

        With :meth:`questions_jsonpath` this scores a results file:
        ``python -m updown.evaluate vqa --questions Q --annotations A --results R``.
        """
        self._resolve_paths()
        path = Path(self.prepared_dir) / f"annotations_{split}.json"
        return path if path.is_file() else None

    def dataset(self, split: str) -> VQADataset:
        """The questions of one prepared split (built once)."""
        if split not in self._datasets:
            self._resolve_paths()
            if self.features is None:
                self.features = RegionFeatures(self.features_h5path, in_memory=self.in_memory)
            path = self.questions_jsonpath(split)
            questions = read_prepared_questions(path)
            self.features.check_ids(sorted({q.image_id for q in questions}), str(path))
            self._datasets[split] = VQADataset(
                self.features, questions, self.question_vocabulary, self.answer_vocabulary
            )
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self.train_dataset()
        if stage in ("fit", "validate", None):
            self.dataset(self.val_split)
        if stage in ("test", "predict", None):
            self.dataset(self.test_split)

    def _loader(self, dataset: VQADataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=dataset.collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataset(self) -> VQADataset:
        """The questions of all ``train_splits`` as one dataset (built once)."""
        key = "+".join(self.train_splits)
        if key not in self._datasets:
            parts = [self.dataset(split) for split in self.train_splits]
            questions = [question for part in parts for question in part.questions]
            self._datasets[key] = VQADataset(
                self.features, questions, self.question_vocabulary, self.answer_vocabulary
            )
        return self._datasets[key]

    def train_dataloader(self) -> DataLoader:
        # Shuffled by (seed, epoch), so a run resumed mid-epoch sees exactly the batches the epoch had left.
        return self.shuffled_train_loader(self.train_dataset())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.val_split), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.test_split), self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
