"""Batch memory (updown/data/batch_memory.py): reused host buffers, and batches packed for the trip from workers."""

from __future__ import annotations

import pickle

import numpy as np
import torch
from torch.utils.data import DataLoader

from updown.data.batch_memory import BatchBuffers, PackedCollate, _PackedBatch


def test_a_buffer_is_reused_only_once_no_batch_uses_it():
    buffers = BatchBuffers(keep=2)
    first = buffers.empty((3, 4), torch.float32)
    first.fill_(1.0)
    view = first[1:]  # a view alone keeps the memory in use
    del first
    second = buffers.empty((3, 4), torch.float32)
    second.fill_(2.0)
    assert torch.all(view == 1.0)  # not overwritten: its buffer was not handed out again
    del view
    third = buffers.empty((2, 4), torch.float32)  # smaller: fits the first, now free, buffer
    third.fill_(3.0)
    assert torch.all(second == 2.0)
    assert buffers.free() == []  # both kept buffers are in use
    del second, third
    assert buffers.free() == [0, 1]


def test_buffers_follow_dtype_and_size():
    buffers = BatchBuffers(keep=1)
    small = buffers.empty((2,), torch.float32)
    del small
    larger = buffers.empty((5,), torch.float32)  # the free one is too small: a new one replaces it
    assert larger.shape == (5,) and larger.dtype == torch.float32
    del larger
    assert buffers.empty((5,), torch.int64).dtype == torch.int64


def test_a_packed_batch_unpickles_as_the_same_dict():
    batch = {
        "image_id": torch.arange(4),
        "image_features": torch.rand(4, 300, 300),  # large: crosses on its own
        "image_features_mask": torch.tensor([[True, False]] * 4),
        "caption_tokens": torch.randint(0, 9, (7, 5)),
        "image_spatial": torch.rand(4, 2, 5)[:, :, 1:],  # not contiguous
        "empty": torch.empty(0, 3),
        "references": [["a cat"], ["a dog"], [], ["x"]],
    }
    copy = pickle.loads(pickle.dumps(_PackedBatch(batch)))
    assert type(copy) is dict and list(copy) == list(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert copy[key].dtype == value.dtype and torch.equal(copy[key], value), key
        else:
            assert copy[key] == value


def _collate(items: list[int]) -> dict:
    return {
        "index": torch.tensor(items),
        "features": torch.arange(len(items) * 70_000, dtype=torch.float32).reshape(len(items), -1) + items[0],
        "mask": torch.tensor([i % 2 == 0 for i in items]),
        "names": [f"item {i}" for i in items],
    }


def test_worker_batches_equal_in_process_batches():
    in_process = list(DataLoader(list(range(20)), batch_size=6, collate_fn=PackedCollate(_collate)))
    workers = list(
        DataLoader(list(range(20)), batch_size=6, collate_fn=PackedCollate(_collate), num_workers=2)
    )
    assert len(in_process) == len(workers) == 4
    for a, b in zip(in_process, workers):
        assert type(b) is dict and list(a) == list(b)
        assert all(
            torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in ("index", "features", "mask")
        )
        assert a["names"] == b["names"]
        np.testing.assert_array_equal(b["features"].numpy(), a["features"].numpy())
