"""Reading GloVe word vectors from the text files Stanford distributes (``glove.6B.300d.txt``, ``.gz`` ok)."""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import torch


def load_glove(
    glove_path: str | os.PathLike, tokens: Sequence[str], initial: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Read GloVe vectors for ``tokens`` from a GloVe text file (``word v_1 ... v_N`` per line; ``.gz`` ok).

    Only lines whose word is one of ``tokens`` are parsed and validated, so a 2 GB file costs one pass of
    string splitting. Words containing spaces (glove.840B has a few) are handled; a word2vec-style header
    line (``count dim``) is skipped.

    Args:
        glove_path: the text file, e.g. ``glove.6B.300d.txt``.
        tokens: vocabulary in index order.
        initial: optional ``(len(tokens), N)`` float tensor whose rows are kept for tokens not in the file
            (default: zeros).

    Returns:
        ``(vectors, num_found)``: ``vectors`` ``(len(tokens), N)`` float32, and how many tokens were found.

    Raises:
        FileNotFoundError: ``glove_path`` does not exist.
        ValueError: the file is empty or malformed, or ``initial`` has the wrong shape.
    """
    path = Path(glove_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: GloVe file not found. Download glove.6B.zip from https://nlp.stanford.edu/projects/glove/, "
            "unzip it and pass glove.6B.300d.txt as glove_path, or set glove_path to None for random embeddings."
        )
    positions: dict[str, list[int]] = {}
    for index, token in enumerate(tokens):
        positions.setdefault(token, []).append(index)
    vectors: dict[str, list[float]] = {}
    dim = None
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as file:
        for line_number, line in enumerate(file, start=1):
            line = line.rstrip()
            if not line:
                continue
            if dim is None:
                fields = line.split(" ")
                if line_number == 1 and len(fields) == 2 and all(field.isdigit() for field in fields):
                    continue
                dim = len(fields) - 1
                if dim < 1:
                    raise ValueError(
                        f"{path}, line {line_number}: no vector after the word; expected a GloVe "
                        "text file with one 'word v_1 ... v_N' per line."
                    )
            # Cheap test on the first field before splitting the whole line.
            if line.partition(" ")[0] not in positions:
                continue
            fields = line.split(" ")
            if len(fields) - 1 < dim:
                raise ValueError(
                    f"{path}, line {line_number}: {len(fields) - 1} values, but the first vector has {dim}; "
                    "the file is truncated or not a GloVe text file."
                )
            word = " ".join(fields[: len(fields) - dim])
            if word not in positions or word in vectors:
                continue
            try:
                vectors[word] = [float(value) for value in fields[-dim:]]
            except ValueError:
                raise ValueError(
                    f"{path}, line {line_number}: the vector of {word!r} holds a non-number; expected a GloVe "
                    "text file with one 'word v_1 ... v_N' per line."
                ) from None
    if dim is None:
        raise ValueError(f"{path}: the GloVe file is empty.")
    if initial is None:
        result = torch.zeros(len(tokens), dim)
    elif initial.shape != (len(tokens), dim):
        raise ValueError(
            f"{path}: vectors have {dim} dimensions, but the embedding to initialise is "
            f"{tuple(initial.shape)} for {len(tokens)} tokens; set embedding_size={dim}, or use the GloVe file "
            f"of {initial.shape[-1]} dimensions (e.g. glove.6B.{initial.shape[-1]}d.txt)."
        )
    else:
        result = initial.detach().to(torch.float32).clone()
    num_found = 0
    for word, vector in vectors.items():
        result[positions[word]] = torch.tensor(vector)
        num_found += len(positions[word])
    return result, num_found
