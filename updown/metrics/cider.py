"""Fast CIDEr-D for SCST rewards, equal to pycocoevalcap's CIDEr given the same document frequencies.

coco-caption's CIDEr (which is CIDEr-D) for a hypothesis ``c`` and references ``s_1..s_m`` of one image:

    CIDEr(c) = 10 / m * sum_j mean_{n=1..4} [ sum_g min(t_c(g), t_j(g)) * t_j(g) / (|t_c^n| |t_j^n|) ]
               * exp(-(l_c - l_j)^2 / (2 sigma^2))

with ``t(g) = tf(g) * (ref_len - log(max(1, df(g))))`` the tf-idf weight of n-gram ``g``, ``|t^n|`` the
norm over the n-grams of order n, ``ref_len = log(number of images in the document-frequency corpus)``,
sigma = 6. One coco-caption quirk is kept: the "length" ``l`` is the number of *bigrams*
(``len(words) - 1``), not of words; the difference is the same except for empty captions.

pycocoevalcap recomputes every reference vector for every hypothesis, in Python dictionaries. Here the
references of an image are turned into a dense tf-idf matrix once (:meth:`CiderD.add_references`) and a
batch of hypotheses is scored with a handful of numpy operations; only n-gram counting of the hypotheses
stays in Python. Document frequencies come from the training references, computed once by
``tools/build_cider_df.py`` and loaded at start (:meth:`CiderD.load`); pycocoevalcap instead computes them
from the references being scored, which :meth:`CiderD.from_references` reproduces.

``<eos>`` as a word: with ``eos_as_word=True`` the scorer appends ``"<eos>"`` to every reference and
hypothesis itself; callers always pass words without it (a list ending in ``"<eos>"`` is rejected, so the
setting cannot be applied twice). The document frequencies must be built the same way: the df file
records the setting and loading it with the other setting raises.
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from itertools import chain, repeat
from typing import NamedTuple

import numpy as np

from updown.io import read_json, write_json

EOS_TOKEN = "<eos>"
DF_FORMAT = "updown-cider-document-frequency"
NGram = tuple[str, ...]


def ngram_counts(words: Sequence[str], n: int = 4) -> Counter[NGram]:
    """Counts of all 1..n-grams of a word list (pycocoevalcap's ``precook``)."""
    shifted = [words[i:] for i in range(n)]
    # zip over shifted copies yields the k-grams without a Python-level loop over positions.
    return Counter(chain.from_iterable([zip(*shifted[:k]) for k in range(1, n + 1)]))


def _with_eos(words: Sequence[str], eos_as_word: bool, what: str) -> list[str]:
    if isinstance(words, str):
        raise ValueError(f"{what} is a string; pass a list of words (e.g. caption.split()).")
    if len(words) and words[-1] == EOS_TOKEN:
        raise ValueError(
            f"{what} ends with {EOS_TOKEN!r}; pass words without it and set eos_as_word=True to count it as a word."
        )
    return [*words, EOS_TOKEN] if eos_as_word else list(words)


def document_frequency(
    references: Mapping[Hashable, Sequence[Sequence[str]]], n: int = 4, eos_as_word: bool = False
) -> tuple[dict[NGram, float], int]:
    """Per n-gram, the number of images whose references contain it (pycocoevalcap's ``compute_doc_freq``).

    Args:
        references: image key -> that image's reference captions as word lists.
        n: largest n-gram order.
        eos_as_word: append ``"<eos>"`` to every reference first.

    Returns:
        ``(df, num_images)``; ``log(num_images)`` is the ``ref_len`` to pair with ``df``.
    """
    df: Counter[NGram] = Counter()
    for key, refs in references.items():
        grams: set[NGram] = set()
        for index, ref in enumerate(refs):
            grams.update(ngram_counts(_with_eos(ref, eos_as_word, f"references[{key!r}][{index}]"), n))
        df.update(grams)
    # Sorted: a set's order changes with PYTHONHASHSEED, and the n-gram order fixes CiderD's summation order, so
    # an unsorted table gave rewards (and SCST runs) that differed in the last bit from process to process.
    return {gram: float(df[gram]) for gram in sorted(df)}, len(references)


class _ImageReferences(NamedTuple):
    """Cached tf-idf vectors of one image's references, over the image's own n-gram columns."""

    gram_ids: np.ndarray  # (V,) int64, sorted global n-gram ids
    values: np.ndarray  # (num_refs, V) float64 tf-idf weights
    norms: np.ndarray  # (num_refs, n) float64 per-order vector norms
    lengths: np.ndarray  # (num_refs,) float64 bigram counts (coco-caption's "length")


class CiderD:
    """CIDEr-D with fixed document frequencies, cached reference vectors and batched scoring.

    Args:
        document_frequency: n-gram tuple -> number of images containing it, or the path of a JSON file
            written by :meth:`save` / ``tools/build_cider_df.py``.
        ref_len: ``log`` of the number of images the frequencies were counted over; read from the file
            when ``document_frequency`` is a path.
        n: largest n-gram order (4 in CIDEr-D).
        sigma: standard deviation of the length penalty (6 in CIDEr-D).
        eos_as_word: append ``"<eos>"`` to references and hypotheses (module doc). None: the file's
            setting, or False for a dict.

    Example:
        >>> cider = CiderD.load("data/captions/cider_df_train.json")
        >>> cider.add_references(42, [["a", "dog", "runs"], ["a", "running", "dog"]])
        >>> rewards = cider.score([["a", "dog"], ["dog", "runs"]], keys=[42, 42])  # (2,)
    """

    def __init__(
        self,
        document_frequency: Mapping[NGram, float] | str | os.PathLike,
        ref_len: float | None = None,
        n: int = 4,
        sigma: float = 6.0,
        eos_as_word: bool | None = None,
    ) -> None:
        if n < 1 or sigma <= 0:
            raise ValueError(f"CiderD: n must be >= 1 and sigma > 0, got n={n}, sigma={sigma}.")
        if isinstance(document_frequency, (str, os.PathLike)):
            document_frequency, ref_len, eos_as_word = _read_df_file(
                document_frequency, ref_len, n, eos_as_word
            )
        elif ref_len is None:
            raise ValueError(
                "CiderD: ref_len (log of the number of images behind the frequencies) is required."
            )
        self.ref_len = float(ref_len)
        self.n = n
        self.sigma = float(sigma)
        self.eos_as_word = bool(eos_as_word)
        # One table for every n-gram known (from the frequencies or from cached references): a dict to its
        # integer id and an array of frequencies by id, so a hypothesis n-gram costs one dict lookup.
        # Ids in sorted n-gram order, whatever the order of the table or file: the ids fix the order in which
        # score() sums, so the same table in another order gives bit-identical rewards.
        grams = sorted(document_frequency)
        self._gram_ids: dict[NGram, int] = {gram: index for index, gram in enumerate(grams)}
        self._df = np.fromiter(
            (document_frequency[gram] for gram in grams), dtype=np.float64, count=len(grams)
        )
        self._images: dict[Hashable, _ImageReferences] = {}

    @classmethod
    def from_references(
        cls,
        references: Mapping[Hashable, Sequence[Sequence[str]]],
        n: int = 4,
        sigma: float = 6.0,
        eos_as_word: bool = False,
        cache_references: bool = True,
    ) -> CiderD:
        """Count document frequencies over ``references`` (as pycocoevalcap does) and, by default, cache them.

        Args:
            references: image key -> reference captions as word lists.
            n, sigma, eos_as_word: as in the constructor.
            cache_references: also :meth:`add_references` every image (off for building a df file).
        """
        if not references:
            raise ValueError("CiderD.from_references: references is empty.")
        df, num_images = document_frequency(references, n, eos_as_word)
        cider = cls(df, ref_len=math.log(num_images), n=n, sigma=sigma, eos_as_word=eos_as_word)
        if cache_references:
            for key, refs in references.items():
                cider.add_references(key, refs)
        return cider

    @classmethod
    def load(
        cls, path: str | os.PathLike, n: int = 4, sigma: float = 6.0, eos_as_word: bool | None = None
    ) -> CiderD:
        """Load document frequencies written by :meth:`save` or ``tools/build_cider_df.py``."""
        return cls(path, n=n, sigma=sigma, eos_as_word=eos_as_word)

    @property
    def document_frequency(self) -> dict[NGram, float]:
        """n-gram -> number of images containing it (n-grams seen only in cached references are left out)."""
        df = self._df
        return {gram: float(df[index]) for gram, index in self._gram_ids.items() if df[index] > 0}

    def save(self, path: str | os.PathLike, force: bool = True) -> None:
        """Write the document frequencies, ``ref_len``, ``n`` and ``eos_as_word`` as JSON, atomically."""
        frequencies = {}
        for gram, count in self.document_frequency.items():
            if any(" " in word for word in gram):
                raise ValueError(
                    f"CiderD.save: n-gram {gram!r} has a word containing a space; words must be split."
                )
            frequencies[" ".join(gram)] = count
        payload = {
            "format": DF_FORMAT,
            "n": self.n,
            "eos_as_word": self.eos_as_word,
            "ref_len": self.ref_len,
            "document_frequency": frequencies,
        }
        write_json(path, payload, force=force)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._images

    def _idf(self, gram_ids: np.ndarray) -> np.ndarray:
        """``ref_len - log(max(1, df))`` per id; id -1 (an n-gram no reference has) has df 0."""
        frequencies = np.where(gram_ids >= 0, self._df[np.maximum(gram_ids, 0)], 0.0)
        return self.ref_len - np.log(np.maximum(1.0, frequencies))

    def _length(self, num_words: int) -> float:
        # coco-caption counts the bigrams (term frequencies of order 2), so n = 1 never penalises length.
        return float(max(num_words - 1, 0)) if self.n >= 2 else 0.0

    def _register(self, grams: Sequence[NGram]) -> np.ndarray:
        """Ids of ``grams``, giving new ones (df 0) to n-grams not seen before."""
        ids = self._gram_ids
        for gram in grams:
            if gram not in ids:
                ids[gram] = len(ids)
        if len(ids) > self._df.size:
            # Grow geometrically: references are added lazily, batch after batch, during training.
            grown = np.zeros(max(len(ids), 2 * self._df.size), dtype=np.float64)
            grown[: self._df.size] = self._df
            self._df = grown
        return np.array([ids[gram] for gram in grams], dtype=np.int64)

    def add_references(self, key: Hashable, references: Sequence[Sequence[str]]) -> None:
        """Cache the tf-idf vectors of one image's references (replacing any earlier ones for ``key``).

        Args:
            key: the image's key, as later passed to :meth:`score` (e.g. its COCO id).
            references: the image's reference captions as word lists, without ``"<eos>"``.
        """
        if len(references) == 0:
            raise ValueError(f"CiderD.add_references: image {key!r} has no reference captions.")
        refs = [
            _with_eos(ref, self.eos_as_word, f"references[{key!r}][{i}]") for i, ref in enumerate(references)
        ]
        counts = [ngram_counts(ref, self.n) for ref in refs]
        grams = list({gram: None for count in counts for gram in count})
        gram_ids = self._register(grams)
        # Columns in global-id order, so that score() can binary-search a batch's concatenated columns.
        order = np.argsort(gram_ids)
        grams, gram_ids = [grams[i] for i in order], gram_ids[order]
        column = {gram: index for index, gram in enumerate(grams)}
        idf = self._idf(gram_ids)
        # shape: (num_refs, V)
        values = np.zeros((len(refs), len(grams)), dtype=np.float64)
        for row, count in enumerate(counts):
            columns = [column[gram] for gram in count]
            values[row, columns] = (
                np.fromiter(count.values(), dtype=np.float64, count=len(count)) * idf[columns]
            )
        orders = np.array([len(gram) - 1 for gram in grams], dtype=np.int64)
        # shape: (num_refs, n)
        norms = np.stack([np.sqrt((values[:, orders == k] ** 2).sum(axis=1)) for k in range(self.n)], axis=1)
        lengths = np.array([self._length(len(ref)) for ref in refs], dtype=np.float64)
        self._images[key] = _ImageReferences(gram_ids, values, norms, lengths)

    def score(
        self,
        hypotheses: Sequence[Sequence[str]],
        keys: Sequence[Hashable],
        ended: Sequence[bool] | None = None,
    ) -> np.ndarray:
        """CIDEr-D of each hypothesis against the cached references of its image.

        Args:
            hypotheses: N captions as word lists, without ``"<eos>"`` (empty lists score 0).
            keys: N image keys registered with :meth:`add_references`; the k samples of one image share
                a key.
            ended: with ``eos_as_word``, which hypotheses ended with ``<eos>`` (a sampled caption cut at the
                maximum length did not): only those get ``"<eos>"`` appended, as self-critical.pytorch scores
                them. None: all of them.

        Returns:
            ``(N,)`` float64 scores (coco-caption scale: x10, so a good caption scores around 1).
        """
        if len(hypotheses) != len(keys) or (ended is not None and len(ended) != len(keys)):
            raise ValueError(
                f"CiderD.score: {len(hypotheses)} hypotheses but {len(keys)} keys; pass one key each."
            )
        slots = {key: slot for slot, key in enumerate(dict.fromkeys(keys))}
        missing = [key for key in slots if key not in self._images]
        if missing:
            raise ValueError(
                f"CiderD.score: no references for keys {missing[:5]}; call add_references(key, refs) first."
            )
        num_hyps, n = len(hypotheses), self.n
        if num_hyps == 0:
            return np.zeros(0, dtype=np.float64)
        images = [self._images[key] for key in slots]
        # shape: (N,)
        hyp_slot = np.array([slots[key] for key in keys], dtype=np.int64)

        entry_hyp: list[int] = []
        entry_order: list[int] = []
        entry_gram_id: list[int] = []
        entry_tf: list[int] = []
        hyp_lengths = np.zeros(num_hyps, dtype=np.float64)
        lookup = self._gram_ids.get
        # The only per-hypothesis Python work: count n-grams and look them up, in C-level iterators.
        for index, words in enumerate(hypotheses):
            append_eos = self.eos_as_word and (ended is None or bool(ended[index]))
            words = _with_eos(words, append_eos, f"hypotheses[{index}]")
            hyp_lengths[index] = self._length(len(words))
            counts = ngram_counts(words, n)
            entry_hyp.extend(repeat(index, len(counts)))
            entry_order.extend(map(len, counts))
            entry_gram_id.extend(map(lookup, counts, repeat(-1)))
            entry_tf.extend(counts.values())
        # shape: (E,) one entry per distinct n-gram of each hypothesis
        entry_hyp_array = np.array(entry_hyp, dtype=np.int64)
        entry_order_array = np.array(entry_order, dtype=np.int64) - 1
        gram_ids = np.array(entry_gram_id, dtype=np.int64)
        entry_value = np.array(entry_tf, dtype=np.float64) * self._idf(gram_ids)
        bins = entry_hyp_array * n + entry_order_array
        # shape: (N, n)
        hyp_norms = np.sqrt(np.bincount(bins, weights=entry_value**2, minlength=num_hyps * n)).reshape(
            num_hyps, n
        )

        # Lay the batch's images side by side: columns (slot, gram id), rows = references padded to the max.
        max_refs = max(image.values.shape[0] for image in images)
        widths = [image.gram_ids.size for image in images]
        # shape: (C + 1,) sorted (slots increase, gram ids are sorted within an image), then a sentinel
        # larger than any query, so every binary search lands on a real index even if C is 0
        batch_columns = np.concatenate(
            [
                (np.repeat(np.arange(len(images), dtype=np.int64), widths) << 32)
                | np.concatenate([image.gram_ids for image in images]),
                [np.iinfo(np.int64).max],
            ]
        )
        # shape: (max_refs, C + 1), (S, max_refs, n), (S, max_refs); padding stays zero and adds nothing
        batch_values = np.zeros((max_refs, batch_columns.size), dtype=np.float64)
        ref_norms = np.zeros((len(images), max_refs, n), dtype=np.float64)
        ref_lengths = np.zeros((len(images), max_refs), dtype=np.float64)
        start = 0
        for slot, image in enumerate(images):
            num_refs, width = image.values.shape
            batch_values[:num_refs, start : start + width] = image.values
            ref_norms[slot, :num_refs] = image.norms
            ref_lengths[slot, :num_refs] = image.lengths
            start += width

        query = np.where(gram_ids >= 0, (hyp_slot[entry_hyp_array] << 32) | gram_ids, -1)
        position = np.searchsorted(batch_columns, query)
        matched = batch_columns[position] == query
        # shape: (max_refs, M) reference weights of the hypothesis n-grams that the image's references have
        ref_values = batch_values[:, position[matched]]
        clipped = np.minimum(entry_value[matched], ref_values) * ref_values
        matched_bins = bins[matched]
        # shape: (N, max_refs, n)
        dot = np.stack([np.bincount(matched_bins, weights=row, minlength=num_hyps * n) for row in clipped])
        dot = dot.astype(np.float64, copy=False)  # bincount of no entries is int64
        dot = dot.reshape(max_refs, num_hyps, n).transpose(1, 0, 2)
        denominator = hyp_norms[:, None, :] * ref_norms[hyp_slot]
        cosine = np.divide(dot, denominator, out=np.zeros_like(dot), where=denominator != 0)
        # shape: (N, max_refs)
        delta = hyp_lengths[:, None] - ref_lengths[hyp_slot]
        penalty = np.exp(-(delta**2) / (2 * self.sigma**2))
        # shape: (N, n)
        per_order = (cosine * penalty[:, :, None]).sum(axis=1)
        num_refs = np.array([image.values.shape[0] for image in images], dtype=np.float64)[hyp_slot]
        return per_order.mean(axis=1) / num_refs * 10.0


def _read_df_file(
    path: str | os.PathLike, ref_len: float | None, n: int, eos_as_word: bool | None
) -> tuple[dict[NGram, float], float, bool]:
    """Read and check a df file against the requested settings; returns ``(df, ref_len, eos_as_word)``."""
    payload = read_json(path, what="CIDEr document-frequency JSON")
    if not isinstance(payload, dict) or payload.get("format") != DF_FORMAT:
        raise ValueError(
            f"{path}: not a CIDEr document-frequency file (no format {DF_FORMAT!r}). Build one with tools/build_cider_df.py."
        )
    for field, kind in (
        ("n", int),
        ("eos_as_word", bool),
        ("ref_len", (int, float)),
        ("document_frequency", dict),
    ):
        if not isinstance(payload.get(field), kind):
            raise ValueError(
                f"{path}: field {field!r} is missing or malformed. Rebuild it with tools/build_cider_df.py."
            )
    if ref_len is not None and not math.isclose(ref_len, payload["ref_len"]):
        raise ValueError(
            f"{path}: ref_len={ref_len} given but the file says {payload['ref_len']}; omit ref_len."
        )
    if n > payload["n"]:
        raise ValueError(
            f"{path}: counts n-grams up to n={payload['n']}, but n={n} was asked. Rebuild with --n {n}."
        )
    if eos_as_word is not None and eos_as_word != payload["eos_as_word"]:
        flag = "with" if eos_as_word else "without"
        raise ValueError(
            f"{path}: built with eos_as_word={payload['eos_as_word']}, but eos_as_word={eos_as_word} was asked. "
            f"Rebuild it {flag} --eos-as-word (tools/build_cider_df.py), or change the setting."
        )
    # Interning shares each word's string among the millions of n-grams of a training corpus.
    df = {
        tuple(map(sys.intern, text.split(" "))): float(count)
        for text, count in payload["document_frequency"].items()
    }
    return df, float(payload["ref_len"]), payload["eos_as_word"]
