"""HDF5's Fletcher-32 chunk checksum, computed for several chunks at once by one compiled pass over each chunk.

Our feature files store a Fletcher-32 checksum at the end of every chunk (the writer turns on HDF5's
``fletcher32`` filter). HDF5 verifies it with a byte-at-a-time C loop, which costs more than reading the chunk from
the page cache (about 40 us for one 36 x 2048 float16 image); the batch reader
(:mod:`updown.data.chunk_reader`) reads raw chunks and verifies them here instead, in about 5 us.

HDF5's definition (``H5_checksum_fletcher32``, H5checksum.c), over the chunk's data bytes ``d`` as ``n``
big-endian 16-bit words ``w_i = d[2i] << 8 | d[2i + 1]`` (an odd last byte is the high byte of one more word)::

    sum1 = w_0 + ... + w_{n-1}                          folded into 16 bits every 360 words
    sum2 = sum1 after word 0 + ... + sum1 after word n-1 = sum over i of (n - i) * w_i
    checksum = fold(sum2) << 16 | fold(sum1)

Folding ``x -> (x & 0xffff) + (x >> 16)`` keeps ``x`` modulo 65535 and a positive ``x`` positive, and the last two
folds bring it into [1, 65535]; so each half is ``((s - 1) mod 65535) + 1`` of the exact sum ``s`` (0 when every
word is 0). That needs ``S = sum w_i`` and ``sum i * w_i`` modulo 65535 only:

- the little-endian words ``v`` a native view gives satisfy ``w = 256 * v (mod 65535)`` (as 65536 = 1 modulo
  65535), so the sums are taken over ``v`` and multiplied by 256 at the end;
- :func:`_word_sums` takes ``sum v_i`` and ``sum j * v_i`` over blocks of 2**16 words (``j`` the word's place in
  its block) in float64, compiled by numba with its additions reordered into SIMD lanes (``fastmath``). Every
  product and every partial sum, in whatever order, is an integer below 2**53 (``sum j * v_i < 65535 * 2**31``),
  so float64 holds them all exactly and the reordering cannot change the result. The blocks are combined in
  int64: ``sum i * v_i = sum over blocks of (block sum j * v + start * block sum v)``.

HDF5 also accepts the checksum with the bytes of each 16-bit half swapped (what versions before 1.6.3 wrote on
little-endian machines); so does :func:`checksum_matches`.
"""

from __future__ import annotations

import sys
from functools import cache

import numpy as np

_BYTE = 256  # w = 256 * v (mod 65535)
_MODULUS = 65535
# Words summed in float64 before the sums move to int64: sum j * v_j over a block stays below 2**53.
_BLOCK = 1 << 16


def words_of(nbytes: int) -> int:
    """The number of 16-bit words HDF5 sums over ``nbytes`` data bytes (an odd last byte makes one more)."""
    return (nbytes + 1) // 2


def _word_sums(words: np.ndarray, count: int, total: np.ndarray, weighted: np.ndarray) -> None:
    """``total[c] = sum v_i`` and ``weighted[c] = sum i * v_i`` over ``words[c, :count]`` (``(g, >= count)``
    uint16, C-contiguous), exactly (see the module's docstring). Compiled by :func:`_compiled_word_sums`."""
    for c in range(words.shape[0]):
        row = words[c]
        chunk_total = 0
        chunk_weighted = 0
        for start in range(0, count, _BLOCK):
            # A slice per block: indexing row[start + j] instead kept LLVM from vectorising the loop (29 us per
            # COCO image instead of 5).
            block = row[start : min(count, start + _BLOCK)]
            block_total = 0.0
            block_weighted = 0.0
            for j in range(block.shape[0]):
                value = np.float64(block[j])
                block_total += value
                block_weighted += np.float64(j) * value
            chunk_total += np.int64(block_total)
            chunk_weighted += np.int64(block_weighted) + start * np.int64(block_total)
        total[c] = chunk_total
        weighted[c] = chunk_weighted


@cache
def _compiled_word_sums():
    """:func:`_word_sums` compiled (on first use, then from numba's on-disk cache; about a second the first time).
    ``nogil``: a DataLoader's pinning thread runs meanwhile."""
    import numba

    try:
        return numba.njit(nogil=True, fastmath=True, cache=True, boundscheck=False)(_word_sums)
    except RuntimeError:
        # No writable cache directory (a read-only install, no writable home): compiled in every process instead.
        return numba.njit(nogil=True, fastmath=True, boundscheck=False)(_word_sums)


def load_kernel() -> None:
    """Compile (or load from numba's cache) the checksum kernel in this process now. A reader calls it when it is
    built, so that DataLoader workers forked later share the kernel, numba and LLVM with the main process instead
    of each loading them on its first batch (about 100 MB of private memory per worker)."""
    Fletcher32(2)(np.zeros((1, 2), dtype=np.uint8))


class Fletcher32:
    """HDF5's Fletcher-32 of chunks of ``nbytes`` data bytes each, several at a time.

    Args:
        nbytes: data bytes per chunk (the chunk without its 4 checksum bytes).
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.words = words_of(nbytes)

    def __call__(self, data: np.ndarray) -> np.ndarray:
        """The checksums of the first ``nbytes`` bytes of each row of ``data`` ``(g, >= nbytes)`` uint8.

        Returns:
            ``(g,)`` uint32, as HDF5 computes them.
        """
        return checksums(*self.sums(data), self.words)

    def sums(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``sum v_i`` and ``sum i * v_i`` of the little-endian words ``v`` of the first ``nbytes`` bytes of each
        row of ``data`` ``(g, >= nbytes)`` uint8 (int64, exact), what :func:`checksums` turns into HDF5's
        checksums."""
        g = data.shape[0]
        if self.nbytes % 2 or not (data.flags.c_contiguous and data.shape[1] % 2 == 0):
            # Rows a word view cannot cover (an odd byte count, strided rows; never our files' chunks): a
            # zero-padded copy. HDF5 takes an odd last byte as the high byte of one more word, which is the
            # little-endian word of that byte and a zero.
            padded = np.zeros((g, 2 * self.words), dtype=np.uint8)
            padded[:, : self.nbytes] = data[:, : self.nbytes]
            data = padded
        words = data.view(np.uint16)
        if sys.byteorder == "big":
            words = words.byteswap()  # the little-endian words v
        total, weighted = np.empty(g, dtype=np.int64), np.empty(g, dtype=np.int64)
        _compiled_word_sums()(words, self.words, total, weighted)
        return total, weighted


def checksums(total: np.ndarray, weighted: np.ndarray, words: int | np.ndarray) -> np.ndarray:
    """HDF5's checksums from :meth:`Fletcher32.sums` of chunks of ``words`` words (one count, or one per chunk:
    chunks of several sizes finish in one call). ``(g,)`` uint32."""
    # sum over i of (n - i) * v_i
    second = words * total - weighted
    # Big-endian words: w = 256 v (mod 65535).
    sum1 = _fold(_BYTE * (total % _MODULUS), total)
    sum2 = _fold(_BYTE * (second % _MODULUS), total)
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
