"""Where batch tensors live: in shared memory when a DataLoader worker makes them (:func:`batch_tensor`), in reused
buffers when the main process does (:class:`BatchBuffers`), in reused shared slots for the features a worker
collates (:class:`SharedBatchSlots`, :class:`SlotDataLoader`), and the small ones packed into one block of bytes
for the trip from a worker (:class:`PackedCollate`)."""

from __future__ import annotations

import math
import sys
import threading
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype, zero: bool = True) -> torch.Tensor:
    """A zero tensor (uninitialised with ``zero=False``, for a caller that writes every element); in a DataLoader
    worker, when it is large, in shared memory, so sending it to the main process copies nothing.

    (Lightning's and PyTorch's default collate do the same; without it every large batch tensor is copied once
    more.) A small one stays in the worker's own memory: :class:`PackedCollate` copies it into its block anyway,
    and new shared memory costs a file, a mapping and page faults, ~0.1 ms however small.
    """
    if get_worker_info() is None or math.prod(shape) * _itemsize(dtype) < _OWN_BLOCK:
        return torch.zeros(shape, dtype=dtype) if zero else torch.empty(shape, dtype=dtype)
    # Allocate straight in shared memory (as torch's default_collate does): share_memory_() on a tensor
    # would allocate, zero and then copy it.
    tensor = _shared_empty(shape, dtype)
    return tensor.zero_() if zero else tensor


class BatchBuffers:
    """Host memory for the batches a process collates itself (no DataLoader workers), reused once a batch is gone.

    A fresh batch of COCO features (50 x 36 x 2048 float32, 15 MB) is fresh memory from the operating system
    about as often as not, and faulting its 3,600 pages in costs more than reading the features from the page
    cache. A batch tensor made here shares its memory with a numpy buffer that it keeps referenced (through its
    storage, which every view of it shares), so a buffer nothing else refers to belongs to no live batch and is
    reused. In a DataLoader worker, batches go to shared memory instead (:func:`batch_tensor`).

    Args:
        keep: buffers kept for reuse (enough for the batches alive at once: the one trained on, one prefetched).
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._buffers: list[np.ndarray] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (the caller writes every element); in a DataLoader worker, a
        :func:`slot_tensor`."""
        if get_worker_info() is not None:
            return slot_tensor(shape, dtype)
        numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        size = math.prod(shape)
        free = self.free()
        for index in free:
            buffer = self._buffers[index]
            if buffer.dtype == numpy_dtype and buffer.size >= size:
                return torch.from_numpy(buffer[:size].reshape(shape))
        buffer = np.empty(size, dtype=numpy_dtype)
        if len(self._buffers) < self.keep:
            self._buffers.append(buffer)
        elif free:
            # Replace the smallest free buffer, so that the kept ones follow the batch sizes in use.
            self._buffers[min(free, key=lambda i: self._buffers[i].size)] = buffer
        return torch.from_numpy(buffer.reshape(shape))

    def free(self) -> list[int]:
        """Indices of the kept buffers that no live batch uses."""
        # A buffer in use is referred to by its batch's storage (through a view); a free one only by this list
        # (and getrefcount's argument).
        return [i for i in range(len(self._buffers)) if sys.getrefcount(self._buffers[i]) == 2]

    def __getstate__(self) -> dict:
        # Buffers belong to one process; a copy (a worker's reader) starts empty.
        return {"keep": self.keep, "_buffers": []}


def slot_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for one of a batch's large tensors (its features, VQA's answer scores; the caller
    writes every element and returns the tensor in its batch): in a worker of a :class:`SlotDataLoader`, in the
    batch's slot of its :class:`SharedBatchSlots` when there is room, otherwise a :func:`batch_tensor`."""
    slots = _worker_slots
    if slots is not None:
        tensor = slots.take(shape, dtype)
        if tensor is not None:
            return tensor
    return batch_tensor(shape, dtype, zero=False)


# The slots of the SlotDataLoader whose worker this process is (set by _InstallSlots in the worker).
_worker_slots: SharedBatchSlots | None = None
# Every SharedBatchSlots of this process by token, for the batches arriving from workers to find theirs.
_slots_by_token: weakref.WeakValueDictionary[str, SharedBatchSlots] = weakref.WeakValueDictionary()


class SharedBatchSlots:
    """Shared memory, made by the main process before its DataLoader workers start, that the workers write their
    batches' large tensors into (the features, and e.g. VQA's answer scores), a slot per batch, reused once the
    main process has let go of the batch.

    Without it every batch from a worker is new shared memory: a file made, mapped and faulted in page by page in
    the worker, its descriptor passed over a socket, then mapped and faulted in again in the main process, and
    both unmapped when the batch dies. For a COCO batch (50 x 36 x 2048 float32, 15 MB) that was ~13 ms of page
    faults on a small VM, more than reading it. A slot is faulted in once per process; a batch from a slot
    crosses as a few numbers (:class:`_SlotRef`).

    Ownership: worker ``w`` owns slots ``w * per_worker ... (w + 1) * per_worker - 1``. A shared flag per slot
    says it is free; the worker clears it when it takes the slot for a batch (its first :meth:`take` of the
    batch; the batch's later tensors go after the first in the same slot), the main process sets it again when
    no tensor of the batch it handed out is alive (checked each time a batch arrives). A worker that finds none
    of its slots free, or no room left in the batch's slot, makes a :func:`batch_tensor` as before, so a slot is
    never written while a batch uses it.

    Args:
        num_workers: the DataLoader's workers.
        per_worker: slots per worker; the DataLoader's ``prefetch_factor`` plus the batches the main process
            holds at once (the one trained on, the one prefetched).
        slot_bytes: bytes of a slot: a batch's large tensors at their largest (:func:`slot_nbytes`).
    """

    def __init__(self, num_workers: int, per_worker: int, slot_bytes: int) -> None:
        self.token = uuid.uuid4().hex
        self.num_workers, self.per_worker = num_workers, per_worker
        self.slot_bytes = _aligned(slot_bytes)
        # Made in shared memory without being written: pages are faulted in by the first batch that uses them.
        self.memory = _shared_empty((num_workers * per_worker * self.slot_bytes,), torch.uint8)
        self.free = _shared_empty((num_workers * per_worker,), torch.uint8).fill_(1)
        # Per worker: tensors written into a slot, and those that went to new shared memory.
        self.counts = _shared_empty((num_workers, 2), torch.int64).zero_()
        self._register()

    def _register(self) -> None:
        self._owners: list[_SlotMemory] | None = None
        self._handed_out: set[int] = set()
        self._lock = threading.Lock()
        # In a worker: the slot taken for the batch being collated (a list: empty before its first tensor) and
        # the bytes of it used so far.
        self._taken: list[int] = []
        self._used = 0
        _slots_by_token[self.token] = self

    @classmethod
    def for_loader(cls, loader: DataLoader) -> SharedBatchSlots | None:
        """Slots for ``loader``'s workers, sized by its dataset's ``batch_slot_nbytes(batch_size)`` when it has
        one (the large tensors of its batches, :func:`slot_nbytes`), else by its
        ``features.batch_features_nbytes(batch_size)`` (:class:`~updown.data.readers.RegionFeatures`); None when
        the loader has no workers, no fixed batch size, or a dataset without region features in its batches."""
        nbytes = getattr(loader.dataset, "batch_slot_nbytes", None)
        if nbytes is None:
            features = getattr(loader.dataset, "features", None)
            nbytes = getattr(features, "batch_features_nbytes", None)
        if loader.num_workers == 0 or loader.batch_size is None or nbytes is None:
            return None
        slot_bytes = nbytes(loader.batch_size)
        if slot_bytes == 0:
            return None
        return cls(loader.num_workers, loader.prefetch_factor + 2, slot_bytes)

    # -- in a worker

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor of ``shape`` in this worker's slot for the current batch (the first call of a batch takes a
        free slot, later ones the room after the tensors before), None when there is no room or no free slot
        (counted in :attr:`counts` either way)."""
        worker = get_worker_info().id
        nbytes = math.prod(shape) * _itemsize(dtype)
        counts = self.counts.numpy()[worker]
        if self._taken:
            slot, used = self._taken[-1], self._used
        else:
            first = worker * self.per_worker
            flags = self.free.numpy()[first : first + self.per_worker]
            free = int(flags.argmax())  # the first free slot, if any
            slot, used = (first + free, 0) if flags[free] else (None, 0)
        if slot is None or used + nbytes > self.slot_bytes:
            counts[1] += 1
            return None
        if not self._taken:
            self.free.numpy()[slot] = 0
            self._taken.append(slot)
        counts[0] += 1
        self._used = used + _aligned(nbytes)
        start = slot * self.slot_bytes + used
        return self.memory[start : start + nbytes].view(dtype).view(shape)

    def slot_of(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """The slot ``tensor`` was taken from (:meth:`take`) and its byte offset there, None if it lives
        elsewhere."""
        if (
            tensor.device.type != "cpu"
            or tensor.untyped_storage().data_ptr() != self.memory.data_ptr()
            or not tensor.is_contiguous()  # a slot reference rebuilds a contiguous tensor from its bytes
        ):
            return None
        return divmod(tensor.data_ptr() - self.memory.data_ptr(), self.slot_bytes)

    def begin_batch(self) -> None:
        """A worker starts collating a batch (see :meth:`give_back`)."""
        self._taken, self._used = [], 0

    def give_back(self) -> None:
        """Free the slot taken for a batch that failed to collate, which the main process will never see."""
        self.free.numpy()[self._taken] = 1
        self._taken, self._used = [], 0

    # -- in the main process

    def hand_out(self, slot: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor a worker wrote into ``slot`` at byte ``offset``, for the main process, first freeing the
        slots of the batches that are gone."""
        nbytes = math.prod(shape) * _itemsize(dtype)
        numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        # Under the lock up to the tensor's creation, so that no other thread's release sees the slot unused.
        with self._lock:
            owners = self._slot_owners()
            self._release_unused(owners)
            self._handed_out.add(slot)
            array = np.asarray(owners[slot])[offset : offset + nbytes].view(numpy_dtype).reshape(shape)
            return torch.from_numpy(array)

    def release_unused(self) -> None:
        """Mark free the slots of handed-out batches no tensor refers to any more."""
        with self._lock:
            self._release_unused(self._slot_owners())

    def _release_unused(self, owners: list[_SlotMemory]) -> None:
        # A handed-out tensor keeps its numpy array, which keeps the slot's owner; otherwise only the owners list
        # (and getrefcount's argument) refer to it.
        unused = [slot for slot in self._handed_out if sys.getrefcount(owners[slot]) == 2]
        if unused:
            self.free.numpy()[unused] = 1
            self._handed_out.difference_update(unused)

    def _slot_owners(self) -> list[_SlotMemory]:
        if self._owners is None:
            self._owners = [
                _SlotMemory(self.memory, slot * self.slot_bytes, self.slot_bytes)
                for slot in range(self.num_workers * self.per_worker)
            ]
        return self._owners

    def __getstate__(self) -> dict:
        # To a worker started with "spawn": the shared tensors (torch sends their memory, not a copy).
        return {
            key: getattr(self, key)
            for key in ("token", "num_workers", "per_worker", "slot_bytes", "memory", "free", "counts")
        }

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._register()


class _SlotMemory:
    """One slot's bytes as a numpy-readable object: every array made from it refers to it, so its reference
    count tells whether a batch still uses the slot."""

    def __init__(self, memory: torch.Tensor, start: int, nbytes: int) -> None:
        self.memory = memory
        self.__array_interface__ = {
            "data": (memory.data_ptr() + start, False),
            "shape": (nbytes,),
            "typestr": "|u1",
            "version": 3,
        }


class _SlotRef:
    """A batch tensor that stays in its worker's slot on the way to the main process."""

    def __init__(
        self, token: str, slot: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> None:
        self.token, self.slot, self.offset, self.dtype, self.shape = token, slot, offset, dtype, shape

    def tensor(self) -> torch.Tensor:
        slots = _slots_by_token.get(self.token)
        if slots is None:
            raise RuntimeError(
                "a batch arrived from a DataLoader worker whose loader's shared slots are gone"
            )
        return slots.hand_out(self.slot, self.offset, self.dtype, self.shape)


class _InstallSlots:
    """A DataLoader ``worker_init_fn`` that gives the worker its loader's slots, then calls the loader's own."""

    def __init__(self, slots: SharedBatchSlots, user_init: Callable[[int], None] | None) -> None:
        self.slots, self.user_init = slots, user_init

    def __call__(self, worker_id: int) -> None:
        global _worker_slots
        _worker_slots = self.slots
        if self.user_init is not None:
            self.user_init(worker_id)


class SlotDataLoader(DataLoader):
    """A ``DataLoader`` whose workers collate their batches' features into :class:`SharedBatchSlots` made for
    each set of workers it starts (every iterator, or once with ``persistent_workers``); with no workers, or a
    dataset without region features, a plain ``DataLoader``. Batches are the same either way."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        init = self.worker_init_fn
        user_init = init.user_init if isinstance(init, _InstallSlots) else init
        slots = SharedBatchSlots.for_loader(self)
        self.worker_init_fn = user_init if slots is None else _InstallSlots(slots, user_init)
        iterator = super()._get_iterator()
        iterator.shared_batch_slots = slots  # kept with the workers that write into them
        return iterator


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory (see :func:`batch_tensor`)."""
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).resize_(shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def slot_nbytes(*tensor_nbytes: int) -> int:
    """The slot size for a batch whose large tensors have (at most) these sizes in bytes: what a dataset's
    ``batch_slot_nbytes(batch_size)`` returns (each tensor starts on a 64-byte boundary)."""
    return sum(_aligned(n) for n in tensor_nbytes)


# Tensors of at least this many bytes cross from a worker on their own, in shared memory (features, in slots:
# megabytes); the smaller ones (ids, masks, boxes, tokens) are packed into one block of bytes in the pickle.
_OWN_BLOCK = 1 << 20
_ALIGN = 64


class PackedCollate:
    """A collate function whose batches cross from DataLoader workers to the main process with as little shared
    memory as possible: the features in the worker's shared slots (:class:`SharedBatchSlots`), the small tensors
    as one block of bytes in the batch's pickle, through the worker's pipe. Each piece of new shared memory costs a
    file, a mapping, and a descriptor the main process fetches over a connection to the worker, authenticated
    each time: 1-2.5 ms a batch on a small VM even for one block, and ~0.6 ms per tensor when each crossed
    alone (a captioning batch of 8 tensors paid ~5 ms, 2-3x its reading). Only tensors of 1 MB or more outside
    the slots still cross as shared memory. Batches made in the main process are returned as they are.

    Args:
        collate: the dataset's collate function (returns a dict).
    """

    def __init__(self, collate: Callable[[list], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list) -> Any:
        slots = _worker_slots
        if slots is None:
            batch = self.collate(items)
        else:
            slots.begin_batch()
            try:
                batch = self.collate(items)
            except BaseException:
                slots.give_back()
                raise
        if get_worker_info() is None or not isinstance(batch, dict):
            return batch
        return _PackedBatch(batch)


class _PackedBatch(dict):
    """A batch dict that pickles its small tensors as one block and its tensors in shared slots as
    :class:`_SlotRef`; unpickled, it is a plain dict again."""

    def __reduce__(self):
        in_slots = {}
        if _worker_slots is not None:
            for key, value in self.items():
                place = _worker_slots.slot_of(value) if isinstance(value, torch.Tensor) else None
                if place is not None:
                    in_slots[key] = _SlotRef(_worker_slots.token, *place, value.dtype, tuple(value.shape))
        small = [
            key
            for key, value in self.items()
            if isinstance(value, torch.Tensor)
            and value.device.type == "cpu"
            and value.nbytes < _OWN_BLOCK
            and key not in in_slots
        ]
        layout, offset = [], 0
        for key in small:
            tensor = self[key]
            layout.append((key, tensor.dtype, tuple(tensor.shape), offset))
            offset += _aligned(tensor.nbytes)
        # Plain bytes in the pickle, through the worker's pipe: new shared memory would cross as a descriptor,
        # which the main process fetches over an authenticated connection to the worker (~1-2 ms a batch).
        block = bytearray(offset)
        if offset:
            memory = torch.frombuffer(block, dtype=torch.uint8)
            for key, _, _, start in layout:
                data = self[key].contiguous().view(-1).view(torch.uint8)
                memory[start : start + data.numel()] = data
        rest = {key: value for key, value in self.items() if key not in set(small)}
        rest.update(in_slots)
        return _unpack, (list(self), block, layout, rest)


def _unpack(order: list, block: bytearray, layout: list, rest: dict) -> dict:
    """The batch dict again, its small tensors views of ``block``, keys in their original order."""
    values = {key: value.tensor() if isinstance(value, _SlotRef) else value for key, value in rest.items()}
    block = torch.frombuffer(block, dtype=torch.uint8) if block else torch.empty(0, dtype=torch.uint8)
    for key, dtype, shape, start in layout:
        nbytes = math.prod(shape) * _itemsize(dtype)
        values[key] = block[start : start + nbytes].view(dtype).view(shape)
    return {key: values[key] for key in order}
