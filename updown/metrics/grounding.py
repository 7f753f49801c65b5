"""Attention grounding: does the captioner look at a dog when it says "dog"?

For every generated word that names an object category, the word is *grounded* when its most-attended region
belongs to an object of that category. The synthetic world labels every region with its object's category
(background regions: -1), so grounding can be measured there (docs/design.md, section 4); it is the fraction
of grounded category words over a split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from updown.data.vocabulary import Vocabulary


def word_categories(vocabulary: Vocabulary, category_names: Sequence[str]) -> torch.Tensor:
    """``(V,)`` int64: the category index of each vocabulary word that names a category, -1 for other words."""
    categories = torch.full((len(vocabulary),), -1, dtype=torch.long)
    for category, name in enumerate(category_names):
        index = vocabulary.index(name)
        if index != vocabulary.unk_index:
            categories[index] = category
    return categories


def grounded_words(
    tokens: torch.Tensor,
    token_mask: torch.Tensor,
    attention: torch.Tensor,
    region_category: torch.Tensor,
    word_category: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The category each generated token names, and whether its most-attended region is of that category.

    Args:
        tokens: ``(B, T)`` generated token ids.
        token_mask: ``(B, T)`` bool, True for generated tokens (not padding).
        attention: ``(B, T, R)`` attention over regions behind each token.
        region_category: ``(B, R)`` category of each region, -1 for background and padding.
        word_category: ``(V,)`` from :func:`word_categories`.

    Returns:
        ``(categories, grounded)``: ``(B, T)`` int64, the named category (-1 for other tokens and padding), and
        ``(B, T)`` bool, True for a category word whose most-attended region belongs to that category.
    """
    categories = word_category.to(tokens.device)[tokens].masked_fill(~token_mask, -1)
    top_region = attention.argmax(dim=-1)
    top_category = region_category.to(top_region.device).gather(1, top_region)
    return categories, (top_category == categories) & (categories >= 0)


def grounding_counts(
    tokens: torch.Tensor,
    token_mask: torch.Tensor,
    attention: torch.Tensor,
    region_category: torch.Tensor,
    word_category: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grounded and all category words of each caption (arguments: :func:`grounded_words`).

    Returns:
        ``(grounded, total)``: two ``(B,)`` int64 tensors on the CPU.
    """
    categories, grounded = grounded_words(tokens, token_mask, attention, region_category, word_category)
    return grounded.sum(dim=1).cpu(), (categories >= 0).sum(dim=1).cpu()
