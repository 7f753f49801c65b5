"""VQA v2 dataset, collate function and LightningDataModule over prepared data (tools/prepare_vqa.py).

One item is one question: its image's regions, its tokens, its sparse soft targets and its raw human
answers (for the official metric). With no paths, :class:`VQADataModule` uses the synthetic world's VQA
files, prepared on first use by the same code as real data (:func:`ensure_synthetic_vqa`).
"""

from __future__ import annotations

import fcntl
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from updown.config import PositiveInt
from updown.data.base import DataSpec, RegionDataModule
from updown.data.batch_memory import BatchBuffers, slot_nbytes
from updown.data.datasets import collate_regions, pad_sequences
from updown.data.pickled_list import PickledList
from updown.data.readers import PendingRegions, RegionFeatures
from updown.data.synthetic import SPLITS, SyntheticWorld
from updown.data.vocabulary import AnswerVocabulary, Vocabulary
from updown.data.vqa_preparation import VQAQuestion, prepare_vqa, read_prepared_questions
from updown.types import VQABatch


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
        # Each question with its token indices, pickled into one byte array that forked workers share without
        # copying it (pickled_list.py: a list of objects grew a worker by ~740 MB over a VQA v2 epoch).
        self._items = PickledList(
            (question, question_vocabulary.encode(question.tokens, add_bos_eos=False))
            for question in questions
        )
        self.question_ids = np.array([question.question_id for question in questions], dtype=np.int64)
        self.num_answers = num_answers
        self.pad_index = question_vocabulary.pad_index
        # The dense answer scores of a batch (512 x 3,129 float32 for VQA v2: 6.4 MB) are memory reused batch
        # after batch: in one process these buffers, in a worker the batch's shared slot, after its features.
        self._score_buffers = BatchBuffers()

    def batch_slot_nbytes(self, batch_size: int) -> int:
        """Bytes of a batch's large tensors at their largest, the features and the answer scores: what a
        :class:`~updown.data.batch_memory.SlotDataLoader` sizes its workers' slots by."""
        return slot_nbytes(self.features.batch_features_nbytes(batch_size), batch_size * self.num_answers * 4)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def questions(self) -> list[VQAQuestion]:
        """Every question, unpickled (new objects each call: for the main process, not for per-item use)."""
        return [question for question, _ in self._items]

    def __getitem__(self, index: int) -> tuple[PendingRegions, VQAQuestion, list[int]]:
        question, tokens = self._items[index]
        return self.features.pending(question.image_id), question, tokens

    def collate(self, items) -> VQABatch:
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
        scores = self._score_buffers.empty((len(items), self.num_answers), torch.float32).zero_()
        # Every question's sparse targets in one assignment.
        rows = [row for row, question in enumerate(questions) for _ in question.answer_scores]
        if rows:
            columns = [column for question in questions for column in question.answer_scores]
            values = [value for question in questions for value in question.answer_scores.values()]
            scores.numpy()[rows, columns] = values
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
        splits = {s: (world.vqa_questions_jsonpath(s), world.vqa_annotations_jsonpath(s)) for s in SPLITS}
        prepare_vqa(splits, target, answer_splits=("train",))
    return target


class VQADataModule(RegionDataModule):
    """VQA v2 questions with bottom-up region features: one item per question.

    Args:
        prepared_dir: folder written by tools/prepare_vqa.py (``questions_<split>.json``, vocabularies).
        batch_size: training questions per batch (the reproduction: 512).
        eval_batch_size: questions per batch when evaluating.
        **kwargs: the arguments of :class:`~updown.data.base.RegionDataModule` (features, splits, workers,
            synthetic world); ``train_splits`` ``["train"]`` for val evaluation, ``["train", "val"]`` for
            test-dev; ``val_split`` needs annotations; ``test_split`` test-dev needs none.
    """

    def __init__(
        self,
        prepared_dir: str | None = None,
        batch_size: PositiveInt = 512,
        eval_batch_size: PositiveInt = 512,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, **kwargs)
        if (self.features_h5path is None) != (prepared_dir is None):
            raise ValueError(
                "data: give features_h5path and prepared_dir (from tools/prepare_vqa.py) together for real data, "
                "or neither for the synthetic world."
            )
        self.prepared_dir = prepared_dir
        self._question_vocabulary: Vocabulary | None = None
        self._answer_vocabulary: AnswerVocabulary | None = None

    def use_synthetic_world(self, world: SyntheticWorld) -> None:
        self.prepared_dir = str(ensure_synthetic_vqa(world))

    @property
    def question_vocabulary(self) -> Vocabulary:
        """The question-word vocabulary (read on first use)."""
        if self._question_vocabulary is None:
            self.resolve_paths()
            self._question_vocabulary = Vocabulary.from_file(
                Path(self.prepared_dir) / "question_vocabulary.json", tool="tools/prepare_vqa.py"
            )
        return self._question_vocabulary

    @property
    def answer_vocabulary(self) -> AnswerVocabulary:
        """The answer classes (read on first use)."""
        if self._answer_vocabulary is None:
            self.resolve_paths()
            self._answer_vocabulary = AnswerVocabulary.from_file(
                Path(self.prepared_dir) / "answer_vocabulary.json"
            )
        return self._answer_vocabulary

    def data_spec(self) -> DataSpec:
        features = self.open_features()
        return DataSpec(
            features.feature_size,
            features.grid_shape,
            {"question": self.question_vocabulary.tokens, "answer": self.answer_vocabulary.answers},
            source=f"the data ({self.prepared_dir})",
        )

    def questions_jsonpath(self, split: str) -> Path:
        """Prepared questions of ``split``; also a valid official questions file for the evaluation."""
        self.resolve_paths()
        return Path(self.prepared_dir) / f"questions_{split}.json"

    def annotations_jsonpath(self, split: str) -> Path | None:
        """Official-format annotations of ``split`` (None for annotation-less splits such as test-dev).

        With :meth:`questions_jsonpath` this scores a results file:
        ``python -m updown.evaluate vqa --questions Q --annotations A --results R``.
        """
        self.resolve_paths()
        path = Path(self.prepared_dir) / f"annotations_{split}.json"
        return path if path.is_file() else None

    def build_dataset(self, split: str) -> VQADataset:
        """The questions of one prepared split."""
        path = self.questions_jsonpath(split)
        if not path.is_file() and Path(self.prepared_dir).is_dir():
            # A split name with a typo: name the splits the folder has.
            have = sorted(
                p.name[len("questions_") : -len(".json")]
                for p in Path(self.prepared_dir).glob("questions_*.json")
            )
            raise ValueError(
                f"{self.prepared_dir}: no prepared split {split!r} (no {path.name}); the folder has the splits "
                f"{', '.join(have) or 'none'}. Check the split name (--data.init_args.val_split, test_split, "
                "train_splits, or --split), or prepare that split with tools/prepare_vqa.py."
            )
        questions = read_prepared_questions(path)
        self.features.check_ids(sorted({q.image_id for q in questions}), str(path))
        return VQADataset(self.features, questions, self.question_vocabulary, self.answer_vocabulary)

    def build_train_dataset(self, splits: list[str]) -> VQADataset:
        """The questions of all ``splits`` as one dataset (one split: that split's dataset itself)."""
        if len(splits) == 1:
            return self.dataset(splits[0])
        seen: dict[int, str] = {}
        for split in splits:
            for question_id in self.dataset(split).question_ids.tolist():
                if question_id in seen:
                    raise ValueError(
                        f"{self.prepared_dir}: question {question_id} is in the training splits "
                        f"{seen[question_id]!r} and {split!r}; it would be trained on twice. Give each split "
                        "once in train_splits, and prepare splits whose questions do not overlap."
                    )
                seen[question_id] = split
        questions = [question for split in splits for question in self.dataset(split).questions]
        return VQADataset(self.features, questions, self.question_vocabulary, self.answer_vocabulary)
