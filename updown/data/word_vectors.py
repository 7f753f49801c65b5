"""Frozen caption word vectors (CaptionerConfig.word_vectors): GloVe rows, with the nocaps baseline's fallback.

The nocaps baseline's CBS captioner embeds words with frozen GloVe vectors and scores them with the same vectors;
a word GloVe lacks (the special tokens, rare spellings) gets a random vector ``2 * N(0, I) - 1`` instead. Here the
random vector of a word is drawn from a generator seeded by the word itself, so it is the same in every run and
does not move when other words join or leave the vocabulary.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import torch

from updown.data.glove import load_glove


def missing_word_vector(word: str, dim: int) -> torch.Tensor:
    """The reference's vector for a word the file lacks, ``2 * N(0, I) - 1`` of size ``dim``, seeded by ``word``."""
    generator = torch.Generator().manual_seed(zlib.crc32(word.encode("utf-8")))
    return 2 * torch.randn(dim, generator=generator) - 1


def load_caption_word_vectors(
    path: str | os.PathLike, tokens: Sequence[str], embedding_size: int
) -> tuple[torch.Tensor, list[str]]:
    """The frozen word vectors of a caption vocabulary, read from a GloVe-format text file.

    Args:
        path: GloVe text file (``word v_1 ... v_E`` a line, ``.gz`` ok).
        tokens: the vocabulary in index order.
        embedding_size: ``E``; must equal the file's dimension.

    Returns:
        ``(vectors, missing)``: ``vectors`` ``(len(tokens), E)`` float32, and the tokens the file lacks (their rows
        are :func:`missing_word_vector`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed file, or its dimension differs from ``embedding_size`` (the message names both).
    """
    initial = torch.stack([missing_word_vector(token, embedding_size) for token in tokens])
    vectors, _ = load_glove(path, tokens, initial)
    # load_glove keeps the initial row of every token it did not find; compare rows to name them.
    missing = [token for token, row, start in zip(tokens, vectors, initial) if torch.equal(row, start)]
    return vectors, missing
