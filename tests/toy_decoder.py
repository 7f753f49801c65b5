"""A toy captioning model whose best captions a brute-force search can find: the decoding tests' reference."""

from __future__ import annotations

import torch

BOS, EOS = 2, 3
NUM_BOXES = 3


class ToyModel:
    """Next-token log-probabilities depend on the image and the last two tokens: table[image, y_{t-2}, y_{t-1}].

    Args:
        num_images: images the table covers.
        vocabulary: tokens (four specials first).
        seed: the table's random seed.
        sharpness: scale of the random logits (larger: more peaked distributions).
        eos_bias: subtracted from every ``<eos>`` logit, so that the best captions have varied lengths.
    """

    def __init__(
        self, num_images: int, vocabulary: int, seed: int = 0, sharpness: float = 2.0, eos_bias: float = 0.0
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        logits = sharpness * torch.randn(num_images, vocabulary, vocabulary, vocabulary, generator=generator)
        logits[..., EOS] -= eos_bias
        self.table = torch.log_softmax(logits, dim=-1)
        self.attention_table = torch.softmax(
            torch.randn(vocabulary, vocabulary, NUM_BOXES, generator=generator), dim=-1
        )
        self._table_lists: list | None = None

    def init_state(self, images: list[int]) -> dict[str, torch.Tensor]:
        images_tensor = torch.tensor(images)
        return {"image": images_tensor, "previous": torch.full_like(images_tensor, BOS)}

    def step(self, tokens, state):
        logprobs = self.table[state["image"], state["previous"], tokens]
        attention = self.attention_table[state["previous"], tokens]
        return logprobs, {"image": state["image"], "previous": tokens}, attention

    def score(self, image: int, sequence: list[int]) -> float:
        """The log-probability of ``sequence`` (after ``<bos>``) for ``image``; the table is read as it is at the
        first call (tests shape it first)."""
        if self._table_lists is None:  # plain lists: the exhaustive searches score thousands of captions
            self._table_lists = self.table.tolist()
        previous, last, total = BOS, BOS, 0.0
        for token in sequence:
            total += self._table_lists[image][previous][last][token]
            previous, last = last, token
        return total
