"""The prediction writers of ``python -m updown.predict``: ``Trainer.predict`` callbacks that write its files.

Each predicted batch (the dict of columns a task's ``predict_step`` returns, one entry per sample) is split
into per-sample records on the CPU, each tagged with its dataset index. At the end of the epoch the records of
every rank are gathered on global rank 0, which keeps one record per sample id (the distributed sampler can
give a sample to two ranks) in dataset order and writes the results JSON and, when asked, the attention
HDF5, and the scores of the results when asked (``score``). The files are written together, all or nothing
(:func:`~updown.io.atomic_outputs`): on any error, scoring included, none replaces an existing file and no
partial file is left. The formats are in the docstring of :mod:`updown.predict`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from updown.io import atomic_outputs
from updown.tasks.distributed import gather_outputs

# Rows of an attention file filled per HDF5 write (bounds the memory of the padded blocks).
BLOCK_ROWS = 4096


class PredictionWriter(BasePredictionWriter):
    """Collects the records of every predicted batch; global rank 0 writes them after the epoch.

    Args:
        output: the results JSON (``[{id_key: int, result_key: str}]``).
        attention: the attention HDF5 (None: not written, and no attention is kept in memory).
        force: replace existing files (otherwise :func:`~updown.io.atomic_outputs` refuses them).
        score_path: the scores JSON of the results (None: not scored).
        score: computes the scores from the results (``[{id_key, result_key}]``), on global rank 0, before any
            file is moved into place, so a failed scoring leaves no results file either.
    """

    #: The sample id of a record, what repeats are dropped by (``image_id`` / ``question_id``).
    id_key: ClassVar[str]
    #: The result of a record (``caption`` / ``answer``).
    result_key: ClassVar[str]
    #: Columns of a prediction that only the attention file needs.
    attention_keys: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        output: str,
        attention: str | None = None,
        force: bool = False,
        score_path: str | None = None,
        score: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__("batch")
        self.output, self.attention, self.force = output, attention, force
        self.score_path, self.score = score_path, score
        #: The scores written to ``score_path`` (rank 0, after the epoch).
        self.scores: dict[str, Any] | None = None
        self._records: list[dict[str, Any]] = []
        #: After the epoch, on global rank 0: one record per sample, in dataset order (None elsewhere).
        self.records: list[dict[str, Any]] | None = None

    @property
    def results(self) -> list[dict[str, Any]]:
        """The results JSON entries ``{id_key: int, result_key: str}`` of the written records (rank 0)."""
        if self.records is None:
            raise RuntimeError("PredictionWriter.results: no prediction epoch has ended on this rank.")
        return [{self.id_key: r[self.id_key], self.result_key: r[self.result_key]} for r in self.records]

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._records, self.records = [], None

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Mapping[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        skip = () if self.attention else self.attention_keys
        records = split_records(prediction, skip=skip)
        # Lightning tracks the dataset index of every predicted sample; without it, arrival order is kept.
        indices = list(batch_indices) if batch_indices else [None] * len(records)
        if len(indices) != len(records):
            raise RuntimeError(
                f"{type(self).__name__}: batch {batch_idx} has {len(records)} predictions for {len(indices)} samples."
            )
        for record, index in zip(records, indices):
            record["index"] = index
        self._records.extend(records)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gathered = gather_outputs(self._records)
        self._records = []
        if not trainer.is_global_zero:
            return
        self.records = unique_in_dataset_order(gathered, self.id_key)
        score_path = self.score_path if self.score is not None else None
        # Moved into place only when every file is complete, the scores included.
        with atomic_outputs([self.output, self.attention, score_path], force=self.force) as (
            output,
            attention,
            scores,
        ):
            with open(output, "w", encoding="utf-8") as f:
                json.dump(self.results, f)
            if attention is not None:
                self.write_attention(attention)
            if scores is not None:
                self.scores = self.score(self.results)
                with open(scores, "w", encoding="utf-8") as f:
                    json.dump(self.scores, f, indent=2)

    def write_attention(self, path) -> None:
        """Write the attention HDF5 of ``self.records`` to ``path``."""
        raise NotImplementedError


class CaptionWriter(PredictionWriter):
    """The COCO results JSON and per-word attention of :meth:`CaptioningTask.predict_step` outputs.

    Args:
        vocabulary: the caption vocabulary's tokens, saved as the attention file's ``vocabulary`` attribute.
    """

    id_key, result_key = "image_id", "caption"
    attention_keys = ("tokens", "lengths", "attention", "num_boxes", "boxes")

    def __init__(
        self, output: str, vocabulary: Sequence[str], attention: str | None = None, **kwargs
    ) -> None:
        super().__init__(output, attention, **kwargs)
        self.vocabulary = list(vocabulary)

    def write_attention(self, path) -> None:
        import h5py

        records = self.records
        total = len(records)
        max_length = max((len(r["tokens"]) for r in records), default=0)
        max_boxes = max((len(r["boxes"]) for r in records), default=0)
        with h5py.File(path, "w") as f:
            f.attrs["vocabulary"] = json.dumps(self.vocabulary)
            image_id = f.create_dataset("image_id", (total,), "int64")
            tokens = f.create_dataset("tokens", (total, max_length), "int64")
            lengths = f.create_dataset("lengths", (total,), "int64")
            attention = f.create_dataset("attention", (total, max_length, max_boxes), "float32")
            num_boxes = f.create_dataset("num_boxes", (total,), "int32")
            boxes = f.create_dataset("boxes", (total, max_boxes, 4), "float32")
            captions = f.create_dataset("captions", (total,), h5py.string_dtype())
            for start in range(0, total, BLOCK_ROWS):
                block = records[start : start + BLOCK_ROWS]
                end = start + len(block)
                image_id[start:end] = [r["image_id"] for r in block]
                tokens[start:end] = padded([r["tokens"] for r in block], (max_length,), np.int64)
                lengths[start:end] = [r["lengths"] for r in block]
                if all(r.get("attention") is not None for r in block):
                    attention[start:end] = padded(
                        [r["attention"] for r in block], (max_length, max_boxes), np.float32
                    )
                num_boxes[start:end] = [r["num_boxes"] for r in block]
                boxes[start:end] = padded([r["boxes"] for r in block], (max_boxes, 4), np.float32)
                captions[start:end] = np.array([r["caption"] for r in block], dtype=object)


class AnswerWriter(PredictionWriter):
    """The official VQA results JSON and per-question attention of :meth:`VQATask.predict_step` outputs.

    Args:
        questions: question id -> question string, saved in the attention file's ``questions``.
    """

    id_key, result_key = "question_id", "answer"
    attention_keys = ("image_id", "attention", "num_boxes", "boxes")

    def __init__(
        self, output: str, questions: Mapping[int, str], attention: str | None = None, **kwargs
    ) -> None:
        super().__init__(output, attention, **kwargs)
        self.questions = questions

    def write_attention(self, path) -> None:
        import h5py

        records = self.records
        total = len(records)
        max_boxes = max((len(r["boxes"]) for r in records), default=0)
        with h5py.File(path, "w") as f:
            question_id = f.create_dataset("question_id", (total,), "int64")
            image_id = f.create_dataset("image_id", (total,), "int64")
            attention = f.create_dataset("attention", (total, max_boxes), "float32")
            num_boxes = f.create_dataset("num_boxes", (total,), "int32")
            boxes = f.create_dataset("boxes", (total, max_boxes, 4), "float32")
            answers = f.create_dataset("answers", (total,), h5py.string_dtype())
            questions = f.create_dataset("questions", (total,), h5py.string_dtype())
            for start in range(0, total, BLOCK_ROWS):
                block = records[start : start + BLOCK_ROWS]
                end = start + len(block)
                question_id[start:end] = [r["question_id"] for r in block]
                image_id[start:end] = [r["image_id"] for r in block]
                attention[start:end] = padded([r["attention"] for r in block], (max_boxes,), np.float32)
                num_boxes[start:end] = [r["num_boxes"] for r in block]
                boxes[start:end] = padded([r["boxes"] for r in block], (max_boxes, 4), np.float32)
                answers[start:end] = np.array([r["answer"] for r in block], dtype=object)
                questions[start:end] = np.array(
                    [self.questions[r["question_id"]] for r in block], dtype=object
                )


def split_records(prediction: Mapping[str, Any], skip: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per-sample records of a batch's columns (lists, or tensors whose first dimension is the batch): tensors
    become numpy on the CPU (floats as float32), ids plain ints; None columns and ``skip`` are left out."""
    columns: dict[str, Any] = {}
    for key, value in prediction.items():
        if value is None or key in skip:
            continue
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = (value.float() if value.is_floating_point() else value).numpy()
        columns[key] = value
    sizes = {key: len(value) for key, value in columns.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"predict_step: columns of different lengths {sizes}; return one entry per sample.")
    size = next(iter(sizes.values()))
    records = [{key: value[row] for key, value in columns.items()} for row in range(size)]
    for record in records:
        for key, value in record.items():
            if isinstance(value, np.generic):
                record[key] = value.item()
    return records


def unique_in_dataset_order(records: list[dict[str, Any]], id_key: str) -> list[dict[str, Any]]:
    """The first record of each sample id, sorted by dataset index (records without one keep their order)."""
    unique: dict[Any, dict[str, Any]] = {}
    for record in records:
        unique.setdefault(record[id_key], record)
    return sorted(unique.values(), key=lambda r: -1 if r["index"] is None else r["index"])


def padded(rows: Sequence[np.ndarray], shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """``rows`` stacked into ``(len(rows), *shape)``, each row's array at the start of its slot, zeros after."""
    block = np.zeros((len(rows), *shape), dtype=dtype)
    for i, row in enumerate(rows):
        block[(i, *(slice(0, n) for n in row.shape))] = row
    return block
