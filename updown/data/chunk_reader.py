"""Batch reads of region features straight from the HDF5 chunks of our padded files, checksums verified here.

The writer (:class:`~updown.data.writers.RegionFeaturesWriter`) stores one image per chunk, ``(1, max_boxes, D)``
features and ``(1, max_boxes, 4)`` boxes, with HDF5's Fletcher-32 filter and nothing else. Read through h5py one
image at a time (``dataset[row]``), such a file gives about half of what its raw chunk reads do from the page
cache: HDF5's byte-at-a-time checksum and h5py's per-call overhead cost more than the read itself. This reader
looks every chunk up once (``chunk_iter``), then for a batch ``pread``s each image's two chunks into a small
staging buffer, verifies their checksums for a few images at once (:mod:`updown.data.fletcher32`) and converts
the features into the batch while they are still in the CPU's cache. A batch that keeps the file's dtype (float16
batches, converted on the accelerator) takes the features chunks straight into its own rows, with no staging copy
and no conversion.

Files it cannot read this way (other chunk shapes, compression or other filters, big-endian data, an HDF5 without
``chunk_iter``) get ``None`` from :func:`chunk_layout` and are read through h5py as before. A chunk that is not
allocated, has a size or filter mask the file's layout does not promise, or fails its checksum is reported back
(``bad``), and :class:`~updown.data.readers.RegionFeatures` re-reads that image through h5py, which either reads it
(HDF5's own check passes; the fast check is never the last word) or raises the reader's "damaged" error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from updown.data.fletcher32 import Fletcher32, checksum_matches, checksums, load_kernel, stored_checksums

# Images verified and converted together: their chunks (8 x 147 KB for COCO's 36 x 2048 float16) stay in the
# CPU's cache between the read, the checksum and the conversion into the batch.
GROUP = 8
_FLETCHER32 = h5py.h5z.FILTER_FLETCHER32


def copy_values(target: np.ndarray, source: np.ndarray) -> None:
    """``target[...] = source`` for a contiguous float32 or float16 ``target``; float16 is converted to float32 by
    one torch copy, 30x faster than numpy's (about 3 us against 100 us for one 36 x 2048 image; the read itself
    takes about 30 us)."""
    if source.dtype not in (np.float16, np.float32):
        target[...] = source
        return
    torch.from_numpy(target).copy_(torch.from_numpy(np.ascontiguousarray(source)))


@dataclass(frozen=True)
class ChunkLayout:
    """What a file promises about its chunks: one image each, checksummed or not, nothing else applied."""

    max_boxes: int
    feature_size: int
    feature_dtype: np.dtype
    checksummed: bool

    @property
    def feature_bytes(self) -> int:
        """Bytes of one image's features chunk on disk (checksum included)."""
        return self.max_boxes * self.feature_size * self.feature_dtype.itemsize + 4 * self.checksummed

    @property
    def box_bytes(self) -> int:
        return self.max_boxes * 4 * 4 + 4 * self.checksummed


def chunk_layout(h5: h5py.File) -> ChunkLayout | None:
    """The chunk layout of a padded file when :class:`ChunkReader` can read it, else None (read through h5py)."""
    if not hasattr(h5py.h5d.DatasetID, "chunk_iter"):
        return None
    features, boxes = h5["features"], h5["boxes"]
    n, max_boxes, feature_size = features.shape
    if features.chunks != (1, max_boxes, feature_size) or boxes.chunks != (1, max_boxes, 4):
        return None
    feature_dtype = np.dtype(features.dtype)
    if feature_dtype not in (np.dtype("<f2"), np.dtype("<f4")) or np.dtype(boxes.dtype) != np.dtype("<f4"):
        return None
    filters = [_filters(dataset) for dataset in (features, boxes)]
    if filters[0] != filters[1] or filters[0] not in ([], [_FLETCHER32]):
        return None
    return ChunkLayout(max_boxes, feature_size, feature_dtype, checksummed=bool(filters[0]))


def _filters(dataset: h5py.Dataset) -> list[int]:
    plist = dataset.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]


class ChunkReader:
    """Raw chunk reads of one padded file, for batches of images (one instance per file, reopened per process).

    Args:
        path: the HDF5 file.
        num_rows: images in the file.
        layout: from :func:`chunk_layout`.
    """

    def __init__(self, path: Path, num_rows: int, layout: ChunkLayout) -> None:
        self.path = path
        self.num_rows = num_rows
        self.layout = layout
        self._offsets: tuple[np.ndarray, np.ndarray] | None = None
        self._fd: int | None = None
        self._pid: int | None = None
        self._scratch: dict[str, Any] | None = None
        if layout.checksummed:
            load_kernel()

    def _open(self) -> None:
        """This process's descriptor and scratch memory, and (once) every chunk's byte offset."""
        if self._pid == os.getpid():
            return
        try:
            if self._offsets is None:
                self._offsets = self._chunk_offsets()
            self._fd = os.open(self.path, os.O_RDONLY)
        except (OSError, RuntimeError, KeyError, TypeError, ValueError):
            # The file changed after the reader opened it: every row goes through h5py, which says so.
            missing = np.full(self.num_rows, -1, dtype=np.int64)
            self._offsets, self._fd = (missing, missing), None
        self._pid = os.getpid()
        layout = self.layout
        data_bytes = layout.feature_bytes - 4 * layout.checksummed
        self._scratch = {
            # An image's features as the file stores them, its checksum apart (so that a batch in the file's
            # dtype can take the data straight from the file), and its boxes chunk whole.
            "features": np.empty((GROUP, data_bytes), dtype=np.uint8),
            "trailers": np.empty((GROUP, 4), dtype=np.uint8),
            "boxes": np.empty((GROUP, layout.box_bytes), dtype=np.uint8),
        }
        if layout.checksummed:
            features, boxes = Fletcher32(data_bytes), Fletcher32(layout.box_bytes - 4)
            self._scratch.update(
                feature_checksum=features,
                box_checksum=boxes,
                # Words per chunk, features' then boxes', for checksums() of a whole group.
                words=np.repeat([features.words, boxes.words], GROUP),
            )

    def _chunk_offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """Byte offsets of every row's features and boxes chunk; -1 where the chunk is missing or not as the
        layout promises (unfiltered size, or a filter skipped), so that row is read through h5py."""
        with h5py.File(self.path, "r") as h5:
            return tuple(
                _offsets(h5[name].id, self.num_rows, size)
                for name, size in (("features", self.layout.feature_bytes), ("boxes", self.layout.box_bytes))
            )

    def read_into(
        self,
        rows: np.ndarray,
        num_boxes: np.ndarray,
        slots: np.ndarray,
        features: np.ndarray,
        boxes: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read images ``rows`` into the batch arrays, checksums verified.

        Args:
            rows: ``(b,)`` rows of this file.
            num_boxes: ``(b,)`` their box counts.
            slots: ``(b,)`` their rows in the batch.
            features: ``(B, R, D)`` float32, or the file's dtype (a batch converted on the accelerator), R >= every
                count; ``features[slots[i]]`` gets image i's real boxes' features and zeros after.
            boxes: ``(B, R, 4)`` float32; ``boxes[slots[i]]`` gets image i's real boxes and zeros after.

        Returns:
            ``bad (B,)`` bool: images whose chunks could not be read or failed their checksum (their batch rows
            hold garbage: read them through h5py); ``padding (B,)`` bool: images with a non-zero box beyond their
            count (the writer leaves zeros there); ``peaks (B,)`` float64: the largest magnitude among each
            image's real features (NaN or inf when one is not finite; 0 when all are zero), taken while they were
            in the cache.
        """
        self._open()
        bad = np.zeros(len(rows), dtype=bool)
        padding = np.zeros(len(rows), dtype=bool)
        peaks = np.zeros(len(rows), dtype=np.float64)
        full = self.layout.max_boxes
        # A batch in the file's dtype, as wide as the file's chunks, takes the features chunks as they are.
        # (A contiguous batch only: a reshaped copy would take the reads instead of the batch.)
        same_rows = (
            features.dtype == self.layout.feature_dtype
            and features.shape[1] == full
            and features.flags.c_contiguous
        )
        for start in range(0, len(rows), GROUP):
            stop = min(len(rows), start + GROUP)
            g, group_slots, first = stop - start, slots[start:stop], int(slots[start])
            # Every box of every image is real and the images sit side by side in the batch (COCO's 36 boxes,
            # one file): the whole group in a few calls.
            whole = bool((num_boxes[start:stop] == full).all() and (np.diff(group_slots) == 1).all())
            # shape: (g, feature data bytes); the batch's own rows when the chunks can be read straight into it
            # (no staging copy), else the staging buffer.
            direct = (
                features[first : first + g].reshape(g, -1).view(np.uint8) if whole and same_rows else None
            )
            staged = self._scratch["features"][:g] if direct is None else direct
            bad[start:stop] = self._read_group(rows[start:stop], staged)
            if whole and not bad[start:stop].any():
                peaks[start:stop] = self._convert_group(
                    staged, features[first : first + g], boxes[first : first + g], copy=direct is None
                )
                continue
            for i in range(start, stop):
                if bad[i]:
                    continue
                k, n, slot = i - start, int(num_boxes[i]), int(slots[i])
                padding[i] = self._convert(staged[k], k, n, features[slot], boxes[slot], copy=direct is None)
                peaks[i] = self._peaks(staged[k : k + 1], n, features[slot : slot + 1, :n])[0]
        return bad, padding, peaks

    def _peaks(self, staged: np.ndarray, n: int, converted: np.ndarray) -> np.ndarray:
        """The largest magnitude among the ``n`` real features of each image of ``staged`` (``(g, bytes)``
        uint8, the features as the file stores them; ``converted``: the same features in the batch,
        ``(g, n, D)``), ``(g,)`` float64.

        Bottom-up features are rectified, so their sign bits are clear, and then the largest value's bit pattern
        is the largest unsigned integer among the patterns: one integer max over the file's bytes, at a fraction
        of two float reductions. Patterns from the infinity pattern up are inf or NaN. With a negative value (a
        sign bit set) the float reductions decide.
        """
        dtype = self.layout.feature_dtype
        data = staged[:, : n * self.layout.feature_size * dtype.itemsize]
        largest = data.view(f"<u{dtype.itemsize}").max(axis=1)
        infinity = 0x7C00 if dtype.itemsize == 2 else 0x7F800000
        peaks = largest.view(dtype).astype(np.float64)
        for k in np.flatnonzero(largest >= infinity).tolist():
            high, low = float(converted[k].max()), float(converted[k].min())
            peaks[k] = max(high, -low) if not (np.isnan(high) or np.isnan(low)) else float("nan")
        return peaks

    def _convert_group(
        self, staged: np.ndarray, features: np.ndarray, boxes: np.ndarray, copy: bool
    ) -> np.ndarray:
        """The ``g`` images of ``staged`` (``(g, bytes)``), every box real, into ``features (g, max_boxes, D)``
        (unless they were read straight into it: ``copy`` False) and ``boxes (g, max_boxes, 4)``; returns their
        :meth:`_peaks`."""
        layout = self.layout
        g = staged.shape[0]
        if copy:
            torch.from_numpy(features).view(g, -1).copy_(torch.from_numpy(staged.view(layout.feature_dtype)))
        boxes[...] = self._scratch["boxes"][:g, : layout.max_boxes * 16].view("<f4").reshape(boxes.shape)
        return self._peaks(staged, layout.max_boxes, features)

    def _read_group(self, rows: np.ndarray, staged: np.ndarray) -> np.ndarray:
        """``pread`` the chunks of up to GROUP rows, the features' data into ``staged`` ``(g, bytes)`` uint8 and
        the rest into the scratch buffers, and verify them; ``(g,)`` bad."""
        scratch = self._scratch
        feature_offsets, box_offsets = self._offsets
        layout = self.layout
        g = len(rows)
        bad = np.zeros(g, dtype=bool)
        fd, feature_bytes, expected = self._fd, layout.feature_bytes, layout.feature_bytes + layout.box_bytes
        # Python ints and row views made once per group: this loop runs for every image.
        places = zip(feature_offsets[rows].tolist(), box_offsets[rows].tolist())
        rows_of = zip(staged, scratch["trailers"], scratch["boxes"])
        for k, ((at, box_at), (data, trailer, box_chunk)) in enumerate(zip(places, rows_of)):
            if at < 0 or box_at < 0 or fd is None:
                bad[k] = True
                continue
            feature_chunk = [data, trailer] if layout.checksummed else [data]
            # The writer puts an image's boxes chunk right after its features chunk: one call reads both.
            if box_at == at + feature_bytes:
                got = os.preadv(fd, [*feature_chunk, box_chunk], at)
            else:
                got = os.preadv(fd, feature_chunk, at) + os.preadv(fd, [box_chunk], box_at)
            bad[k] = got != expected  # a file truncated after it was opened
        if layout.checksummed:
            # Both chunks of every image, finished and compared in one go.
            boxes = scratch["boxes"][:g]
            feature_sums = scratch["feature_checksum"].sums(staged)
            box_sums = scratch["box_checksum"].sums(boxes)  # the chunk's data: all but its last 4 bytes
            computed = checksums(
                np.concatenate([feature_sums[0], box_sums[0]]),
                np.concatenate([feature_sums[1], box_sums[1]]),
                scratch["words"][: 2 * g] if g == GROUP else np.repeat(scratch["words"][[0, GROUP]], g),
            )
            stored = np.concatenate([stored_checksums(scratch["trailers"][:g]), stored_checksums(boxes)])
            bad |= ~checksum_matches(computed, stored).reshape(2, g).all(axis=0)
        return bad

    def _convert(
        self, staged: np.ndarray, k: int, n: int, features: np.ndarray, boxes: np.ndarray, copy: bool
    ) -> bool:
        """Image ``k`` of the group into one batch row: its ``n`` real feature rows from ``staged`` (``(bytes,)``,
        as the file stores them; already in the row when ``copy`` is False) in the row's dtype, and its ``n``
        boxes, zeros after both. Returns whether a box beyond the ``n`` real ones is non-zero."""
        layout = self.layout
        if copy:
            data = staged[: n * layout.feature_size * layout.feature_dtype.itemsize]
            copy_values(features[:n], data.view(layout.feature_dtype).reshape(n, -1))
        features[n:] = 0
        staged_boxes = self._scratch["boxes"][k, : layout.max_boxes * 16].view("<f4").reshape(-1, 4)
        boxes[:n] = staged_boxes[:n]
        boxes[n:] = 0
        return bool(staged_boxes[n:].any())

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = self._scratch = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        # The offsets travel (the same file everywhere); the descriptor and scratch memory are per process.
        state = self.__dict__.copy()
        state.update(_fd=None, _pid=None, _scratch=None)
        return state


def _offsets(dataset: h5py.h5d.DatasetID, num_rows: int, size: int) -> np.ndarray:
    """Each row's chunk byte offset (``chunk_iter``: one pass over the chunk index), -1 where not usable."""
    offsets = np.full(num_rows, -1, dtype=np.int64)

    def visit(info) -> None:
        if info.filter_mask == 0 and info.size == size:
            offsets[info.chunk_offset[0]] = info.byte_offset

    dataset.chunk_iter(visit)
    return offsets
