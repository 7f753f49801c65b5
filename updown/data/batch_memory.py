"""Where batch tensors live: in shared memory when a DataLoader worker makes them (:func:`batch_tensor`), in reused
buffers when the main process does (:class:`BatchBuffers`), and packed into one block for the trip from a worker
(:class:`PackedCollate`)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype, zero: bool = True) -> torch.Tensor:
    """A zero tensor (uninitialised with ``zero=False``, for a caller that writes every element); in a DataLoader
    worker, in shared memory, so sending it to the main process copies nothing.

    (Lightning's and PyTorch's default collate do the same; without it every batch is copied once more.)
    """
    if get_worker_info() is None:
        return torch.zeros(shape, dtype=dtype) if zero else torch.empty(shape, dtype=dtype)
    # Allocate straight in shared memory (as torch's default_collate does): share_memory_() on a tensor
    # would allocate, zero and then copy it.
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    tensor = torch.empty(0, dtype=dtype).new(storage).resize_(shape)
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
        """An uninitialised tensor of ``shape`` (the caller writes every element)."""
        if get_worker_info() is not None:
            return batch_tensor(shape, dtype, zero=False)
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


# Tensors of at least this many bytes cross from a worker on their own (features: megabytes); the smaller ones
# (ids, masks, boxes, tokens, targets) are packed into one block.
_OWN_BLOCK = 1 << 20
_ALIGN = 64


class PackedCollate:
    """A collate function whose batches cross from DataLoader workers to the main process as few blocks of shared
    memory: each shared tensor costs a file descriptor passed over a socket and a mapping (about 0.6 ms on a small
    VM), so a captioning batch of 8 tensors paid ~5 ms in transfer alone, 2-3x its reading. Batches made in the
    main process are returned as they are.

    Args:
        collate: the dataset's collate function (returns a dict).
    """

    def __init__(self, collate: Callable[[list], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list) -> Any:
        batch = self.collate(items)
        if get_worker_info() is None or not isinstance(batch, dict):
            return batch
        return _PackedBatch(batch)


class _PackedBatch(dict):
    """A batch dict that pickles its small tensors as one block; unpickled, it is a plain dict again."""

    def __reduce__(self):
        small = [
            key
            for key, value in self.items()
            if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.nbytes < _OWN_BLOCK
        ]
        layout, offset = [], 0
        for key in small:
            tensor = self[key]
            layout.append((key, tensor.dtype, tuple(tensor.shape), offset))
            offset += -(-tensor.nbytes // _ALIGN) * _ALIGN
        block = torch.empty(offset, dtype=torch.uint8)
        for key, _, _, start in layout:
            data = self[key].contiguous().view(-1).view(torch.uint8)
            block[start : start + data.numel()] = data
        rest = {key: value for key, value in self.items() if key not in set(small)}
        return _unpack, (list(self), block, layout, rest)


def _unpack(order: list, block: torch.Tensor, layout: list, rest: dict) -> dict:
    """The batch dict again, its small tensors views of ``block``, keys in their original order."""
    values = dict(rest)
    for key, dtype, shape, start in layout:
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        values[key] = block[start : start + nbytes].view(dtype).view(shape)
    return {key: values[key] for key in order}
