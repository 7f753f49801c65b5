"""HDF5's Fletcher-32 chunk checksum, computed for several chunks at once with vectorised float32 sums.

Our feature files store a Fletcher-32 checksum at the end of every chunk (the writer turns on HDF5's
``fletcher32`` filter). HDF5 verifies it with a byte-at-a-time C loop, which costs more than reading the chunk from
the page cache (about 40 us for one 36 x 2048 float16 image); the batch reader
(:mod:`updown.data.chunk_reader`) reads raw chunks and verifies them here instead, in about a quarter of that.

HDF5's definition (``H5_checksum_fletcher32``, H5checksum.c), over the chunk's data bytes ``d`` as ``n``
big-endian 16-bit words ``w_i = d[2i] << 8 | d[2i + 1]`` (an odd last byte is the high byte of one more word)::

    sum1 = w_0 + ... + w_{n-1}                          folded into 16 bits every 360 words
    sum2 = sum1 after word 0 + ... + sum1 after word n-1 = sum over i of (n - i) * w_i
    checksum = fold(sum2) << 16 | fold(sum1)

Folding ``x -> (x & 0xffff) + (x >> 16)`` keeps ``x`` modulo 65535 and a positive ``x`` positive, and the last two
folds bring it into [1, 65535]; so each half is ``((s - 1) mod 65535) + 1`` of the exact sum ``s`` (0 when every
word is 0). That needs ``S = sum w_i`` and ``sum i * w_i`` modulo 65535 only, which this module gets exactly from
float32 row and column sums whose every partial sum is an integer below 2**24:

- the little-endian words ``v`` a native view gives satisfy ``w = 256 * v (mod 65535)`` (as 65536 = 1 modulo
  65535), so the sums are taken over ``v`` and multiplied by 256 at the end;
- ``v``, zero-padded to ``m`` rows of 256 words, is ``V[q, r] = v[256 q + r]``; ``sum i * v_i =
  256 * sum_q q * rowsum_q + sum_r r * colsum_r``. A row sum is at most 256 * 65535 < 2**24, and column sums are
  taken over at most 256 rows at a time, so float32 holds every partial sum exactly whatever the order of
  summation; the weighted sums are then taken in int64.

HDF5 also accepts the checksum with the bytes of each 16-bit half swapped (what versions before 1.6.3 wrote on
little-endian machines); so does :func:`checksum_matches`.
"""

from __future__ import annotations

import numpy as np
import torch

_ROW = 256  # words per row: a row sum is at most 256 * 65535 < 2**24, exact in float32
# Chunks of at most this many words (a boxes chunk) are summed in int64 directly: fewer calls, and exact as long as
# sum i * v_i < 2**63.
_SMALL = 4096
_MODULUS = 65535


def words_of(nbytes: int) -> int:
    """The number of 16-bit words HDF5 sums over ``nbytes`` data bytes (an odd last byte makes one more)."""
    return (nbytes + 1) // 2


class Fletcher32:
    """HDF5's Fletcher-32 of up to ``capacity`` chunks of ``nbytes`` data bytes each (scratch memory reused).

    Args:
        nbytes: data bytes per chunk (the chunk without its 4 checksum bytes).
        capacity: the most chunks one call checks.
    """

    def __init__(self, nbytes: int, capacity: int) -> None:
        self.nbytes = nbytes
        self.words = words_of(nbytes)
        rows = -(-self.words // _ROW)
        # Column sums are taken over blocks of at most 256 rows, all in one call: the rows are padded to
        # `blocks` equal blocks.
        self.blocks = -(-rows // _ROW)
        self.rows = self.blocks * -(-rows // self.blocks)
        # shape: (capacity, rows * 256); the zero padding past the data is never written, so it stays zero.
        self._scratch = torch.zeros((capacity, self.rows * _ROW if self.words > _SMALL else 0))
        self._row_weights = np.arange(self.rows, dtype=np.int64)
        self._column_weights = np.arange(_ROW, dtype=np.int64)
        self._word_weights = np.arange(self.words, dtype=np.int64)

    def __call__(self, data: np.ndarray) -> np.ndarray:
        """The checksums of ``data`` ``(g, nbytes)`` uint8 (``g <= capacity``; rows may be strided views).

        Returns:
            ``(g,)`` uint32, as HDF5 computes them.
        """
        return checksums(*self.sums(data), self.words)

    def sums(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``sum v_i`` and ``sum i * v_i`` of each chunk's little-endian words ``v`` (int64, exact), what
        :func:`checksums` turns into HDF5's checksums."""
        return self._small_sums(data) if self.words <= _SMALL else self._sums(data)

    def _small_sums(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sums in int64 directly (a boxes chunk: 144 words)."""
        if self.nbytes % 2:
            words = np.zeros((data.shape[0], self.words), dtype=np.int64)
            words[:, :-1] = data[:, :-1].view("<u2")
            words[:, -1] = data[:, -1]
        else:
            words = data.view("<u2").astype(np.int64)
        return words.sum(axis=1), words @ self._word_weights

    def _sums(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sums from exact float32 row and column sums."""
        g = data.shape[0]
        scratch = self._scratch[:g]
        words = scratch.numpy()
        even = self.nbytes - self.nbytes % 2
        # uint16 -> float32 is exact; '<u2' reads the little-endian words v whatever the machine's byte order.
        np.copyto(words[:, : even // 2], data[:, :even].view("<u2"), casting="unsafe")
        if self.nbytes % 2:
            # HDF5: an odd last byte is the high byte of one more word, i.e. v = that byte (little-endian view).
            words[:, even // 2] = data[:, even]
        grid = scratch.view(g, self.rows, _ROW)
        # shape: (g, rows); exact (each < 2**24), then int64 for the weighted sums.
        row_sums = grid.sum(dim=2).numpy().astype(np.int64)
        # shape: (g, blocks, 256): column sums over blocks of at most 256 rows, each exact in float32.
        column_sums = grid.view(g, self.blocks, -1, _ROW).sum(dim=2).numpy().astype(np.int64).sum(axis=1)
        total = row_sums.sum(axis=1)
        return total, _ROW * (row_sums @ self._row_weights) + column_sums @ self._column_weights


def checksums(total: np.ndarray, weighted: np.ndarray, words: int | np.ndarray) -> np.ndarray:
    """HDF5's checksums from :meth:`Fletcher32.sums` of chunks of ``words`` words (one count, or one per chunk:
    chunks of several sizes finish in one call). ``(g,)`` uint32."""
    # sum over i of (n - i) * v_i
    second = words * total - weighted
    # Big-endian words: w = 256 v (mod 65535).
    sum1 = _fold(_ROW * (total % _MODULUS), total)
    sum2 = _fold(_ROW * (second % _MODULUS), total)
    return ((sum2 << 16) | sum1).astype(np.uint32)


def _fold(value: np.ndarray, total: np.ndarray) -> np.ndarray:
    """HDF5's folded 16-bit sum: ``((value - 1) mod 65535) + 1``, or 0 for an all-zero chunk (``total`` 0)."""
    return np.where(total > 0, (value + _MODULUS - 1) % _MODULUS + 1, 0).astype(np.int64)


def stored_checksums(chunks: np.ndarray) -> np.ndarray:
    """The checksums stored in the last 4 bytes of ``chunks`` ``(g, nbytes + 4)`` uint8 (little-endian, as HDF5
    writes them), ``(g,)`` uint32."""
    return np.ascontiguousarray(chunks[:, -4:]).view("<u4").reshape(-1).astype(np.uint32)


def checksum_matches(computed: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Which stored checksums HDF5 would accept for the computed ones: equal, or with the two bytes of each
    16-bit half swapped (the checksums of HDF5 before 1.6.3 on little-endian machines). ``(g,)`` bool."""
    computed = computed.astype(np.uint32)
    swapped = ((computed & 0x00FF00FF) << 8) | ((computed >> 8) & 0x00FF00FF)
    return (stored == computed) | (stored == swapped)


def reference_fletcher32(data: bytes) -> int:
    """HDF5's ``H5_checksum_fletcher32``, line for line in Python (slow; the tests' independent reference)."""
    length = len(data) // 2
    sum1 = sum2 = 0
    position = 0
    while length:
        block = min(length, 360)
        length -= block
        for _ in range(block):
            sum1 = (sum1 + ((data[position] << 8) | data[position + 1])) & 0xFFFFFFFF
            position += 2
            sum2 = (sum2 + sum1) & 0xFFFFFFFF
        sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
        sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    if len(data) % 2:
        sum1 = (sum1 + (data[position] << 8)) & 0xFFFFFFFF
        sum2 = (sum2 + sum1) & 0xFFFFFFFF
        sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
        sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
    sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    return (sum2 << 16) | sum1
