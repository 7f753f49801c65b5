"""Batch memory (updown/data/batch_memory.py): reused host buffers, workers' reused shared slots, and batches packed
for the trip from workers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from updown.data.batch_memory import (
    BatchBuffers,
    PackedCollate,
    SlotDataLoader,
    _PackedBatch,
    slot_tensor,
)


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
        # The small tensors came through the worker's pipe as bytes, not as shared memory whose descriptor
        # the main process would fetch over a connection to the worker.
        assert not b["index"].is_shared() and not b["mask"].is_shared()


# ------------------------------------------------------------------------------------- workers' shared slots

_ROW = 70_000  # floats per item: a batch of 6 is 1.7 MB


class _Numbered(Dataset):
    """Items 0 .. n-1, with the ``features`` a SlotDataLoader sizes its slots by; its collate fills a features
    tensor (slot_tensor, as the reader's collate does) with numbers that tell batches apart."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at, self.features = n, fail_at, self

    def batch_features_nbytes(self, batch_size: int) -> int:
        return batch_size * _ROW * 4

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, items: list[int]) -> dict:
        features = slot_tensor((len(items), _ROW), torch.float32)
        if self.fail_at in items:
            raise ValueError(f"item {self.fail_at} is broken")
        features.copy_(
            torch.arange(_ROW, dtype=torch.float32) + torch.tensor(items, dtype=torch.float32)[:, None]
        )
        return {"index": torch.tensor(items), "features": features}


def _expected(batch: dict) -> torch.Tensor:
    return torch.arange(_ROW, dtype=torch.float32) + batch["index"].float()[:, None]


def _slot_loader(dataset: _Numbered, **arguments) -> SlotDataLoader:
    arguments = {"batch_size": 6, "num_workers": 2, "persistent_workers": True, **arguments}
    return SlotDataLoader(dataset, collate_fn=PackedCollate(dataset.collate), **arguments)


def test_worker_batches_come_through_reused_slots_and_equal_in_process_batches():
    dataset = _Numbered(40)
    in_process = list(DataLoader(dataset, batch_size=6, collate_fn=dataset.collate))
    loader = _slot_loader(dataset)
    for _ in range(3):
        for k, batch in enumerate(loader):
            assert list(batch) == ["index", "features"]
            assert torch.equal(batch["index"], in_process[k]["index"])
            assert torch.equal(batch["features"], in_process[k]["features"])
    slots = loader._iterator.shared_batch_slots
    assert slots.per_worker == loader.prefetch_factor + 2
    # Every batch of the three epochs was written into a slot (the loop holds one batch at a time): the two
    # workers' 4 slots each served 21 batches.
    assert slots.counts[:, 0].sum() == 3 * 7 and slots.counts[:, 1].sum() == 0
    assert slots.memory.nbytes == 2 * slots.per_worker * slots.slot_bytes


def test_slots_reach_workers_started_with_spawn():
    """macOS and Windows start workers with "spawn": the slots travel to them pickled, as shared memory."""
    dataset = _Numbered(24)
    loader = _slot_loader(dataset, num_workers=1, multiprocessing_context="spawn")
    for _ in range(2):
        for batch in loader:
            assert torch.equal(batch["features"], _expected(batch))
    counts = loader._iterator.shared_batch_slots.counts
    assert counts[:, 0].sum() == 2 * 4 and counts[:, 1].sum() == 0


def test_a_slot_is_not_written_while_a_batch_from_it_is_alive():
    dataset = _Numbered(70)  # 12 batches: more than the 8 slots
    loader = _slot_loader(dataset)
    kept = list(loader)
    kept[3]["features"] = kept[3]["features"][2:]  # a view alone keeps its slot in use
    slots = loader._iterator.shared_batch_slots
    assert slots.counts[:, 1].sum() > 0  # some batches could not have a slot: they went to new shared memory
    second_epoch = [batch["features"].clone() for batch in loader]
    for batch in kept:  # nothing the second epoch wrote reached a batch still alive
        assert torch.equal(batch["features"], _expected(batch)[-len(batch["features"]) :])
    assert len(second_epoch) == 12
    del kept, batch
    slots.release_unused()
    before = slots.counts[:, 0].sum().item()
    for batch in loader:
        assert torch.equal(batch["features"], _expected(batch))
    assert slots.counts[:, 0].sum().item() == before + 12  # all free again: every batch from a slot


def test_a_batch_that_fails_to_collate_gives_its_slot_back():
    dataset = _Numbered(12, fail_at=7)
    loader = _slot_loader(dataset, num_workers=1, prefetch_factor=1, persistent_workers=False)
    iterator = iter(loader)
    next(iterator)
    with pytest.raises(ValueError, match="item 7 is broken"):
        next(iterator)
    slots = iterator.shared_batch_slots
    slots.release_unused()
    assert slots.free.tolist() == [1, 1, 1]  # the failed batch's slot is free again; the first batch is gone


def test_a_loader_without_region_features_or_workers_is_a_plain_dataloader():
    in_process = _slot_loader(_Numbered(12), num_workers=0, persistent_workers=False)
    assert not hasattr(iter(in_process), "shared_batch_slots")
    no_features = SlotDataLoader(
        list(range(12)), batch_size=6, num_workers=1, collate_fn=PackedCollate(_collate)
    )
    iterator = iter(no_features)
    assert iterator.shared_batch_slots is None
    assert torch.equal(next(iterator)["index"], torch.arange(6))


def test_a_user_worker_init_fn_still_runs_once_per_worker_start(tmp_path):
    dataset = _Numbered(24)
    calls = tmp_path / "calls"
    calls.mkdir()
    loader = _slot_loader(dataset, persistent_workers=False, worker_init_fn=_Touch(calls))
    for _ in range(2):  # a new set of workers (and slots) per epoch
        assert sum(len(batch["index"]) for batch in loader) == 24
    assert sorted(path.name for path in calls.iterdir()) == ["0-1", "0-2", "1-1", "1-2"]
    assert isinstance(loader.worker_init_fn.user_init, _Touch)  # wrapped once, not twice


class _Touch:
    """A worker_init_fn that leaves a file per call: ``<worker>-<call number>``."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def __call__(self, worker_id: int) -> None:
        number = 1 + sum(1 for p in self.folder.iterdir() if p.name.startswith(f"{worker_id}-"))
        (self.folder / f"{worker_id}-{number}").touch()
