"""A read-only list of Python objects kept as one numpy byte array, for datasets read by forked DataLoader workers.

A worker forked from the main process shares its memory page by page until a page is written, and reading a
Python object writes its reference count. So a dataset that holds a list of objects (VQA v2's 443,757 training
questions: 1.1 GB of dataclasses, lists and dicts) is copied, page by page, into every worker as the epoch visits
it: a forked process that fetched every question once grew by 739 MiB of private memory. Pickled into one
byte array, the same items are read without writing a byte of the shared pages (about 180 MB for VQA v2, shared
by every worker), at the cost of unpickling an item when it is fetched (a few microseconds).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np


class PickledList:
    """``items`` pickled one by one into a single byte array; ``pickled[i]`` unpickles item ``i`` (a new object
    each time: changes to it do not reach the list).

    Args:
        items: picklable objects.
    """

    def __init__(self, items: Iterable[Any]) -> None:
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        # Item i is _bytes[_ends[i - 1] : _ends[i]] (from 0 for the first).
        self._ends = np.cumsum([len(blob) for blob in blobs], dtype=np.int64)
        self._bytes = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Any:
        n = len(self._ends)
        if not -n <= index < n:
            raise IndexError(f"PickledList index {index} out of range for {n} items")
        index %= n
        start = int(self._ends[index - 1]) if index else 0
        return pickle.loads(self._bytes[start : int(self._ends[index])])

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        """Bytes held: the pickles and their offsets."""
        return self._bytes.nbytes + self._ends.nbytes
