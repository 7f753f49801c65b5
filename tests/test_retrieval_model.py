"""Tests for updown.models.retrieval.BFANRetrieval."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from updown.models.retrieval import BFANConfig, BFANRetrieval
from updown.modules.focal import bfan_similarity


def _model(**kwargs) -> BFANRetrieval:
    torch.manual_seed(0)
    config = dict(word_embedding_size=6, joint_embedding_size=8, lambda_softmax=9.0)
    model_arguments = {k: kwargs.pop(k) for k in ("feature_encoder", "grid_shape") if k in kwargs}
    vocabulary_size = kwargs.pop("vocabulary_size", 20)
    return BFANRetrieval(vocabulary_size, 12, BFANConfig(**{**config, **kwargs}), **model_arguments)


def _batch(num_images=3, num_boxes=5, num_captions=4, max_length=6):
    generator = torch.Generator().manual_seed(1)
    features = torch.rand(num_images, num_boxes, 12, generator=generator)
    box_counts = torch.tensor([5, 2, 4, 1, 3][:num_images])
    mask = torch.arange(num_boxes)[None] < box_counts[:, None]
    features = features.masked_fill(~mask[..., None], 0.0)
    lengths = torch.tensor([6, 2, 4, 1, 5, 3][:num_captions])
    tokens = torch.randint(4, 20, (num_captions, max_length), generator=generator)
    tokens = tokens.masked_fill(torch.arange(max_length)[None] >= lengths[:, None], 0)
    return features, mask, tokens, lengths


def test_parameter_count_of_the_paper_configuration():
    model = BFANRetrieval(vocabulary_size=100)
    words, hidden, features = 300, 1024, 2048
    # Embedding + bidirectional single-layer GRU (3 gates, two biases each, per direction) + projection.
    expected = (
        100 * words + 2 * 3 * (words * hidden + hidden * hidden + 2 * hidden) + features * hidden + hidden
    )
    assert sum(p.numel() for p in model.parameters()) == expected


def test_caption_encoding_equals_a_per_caption_unpadded_gru():
    model = _model()
    _, _, tokens, lengths = _batch()
    embeddings, mask = model.encode_captions(tokens, lengths)
    assert mask.tolist() == (torch.arange(6)[None] < lengths[:, None]).tolist()
    for c, length in enumerate(lengths.tolist()):
        outputs, _ = model.gru(model.word_embedding(tokens[c : c + 1, :length]))
        hidden = model.joint_embedding_size
        averaged = (outputs[..., :hidden] + outputs[..., hidden:]) / 2
        expected = averaged / averaged.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(embeddings[c, :length], expected[0], rtol=1e-5, atol=1e-6)
        assert bool((embeddings[c, length:] == 0).all())


def test_image_encoding_is_normalised_projection_and_zero_on_padding():
    model = _model()
    features, mask, _, _ = _batch()
    embeddings = model.encode_images(features, mask)
    expected = model.image_projection(features)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(embeddings[mask], expected[mask])
    assert bool((embeddings[~mask] == 0).all())


def test_forward_is_bfan_similarity_and_ignores_padding_garbage():
    model = _model(focal_type="prob")
    features, mask, tokens, lengths = _batch()
    similarity = model(features, mask, tokens, lengths)
    assert similarity.shape == (3, 4)
    images = model.encode_images(features, mask)
    words, caption_mask = model.encode_captions(tokens, lengths)
    torch.testing.assert_close(similarity, bfan_similarity(images, mask, words, caption_mask, 9.0, "prob"))
    noisy_features = features.masked_fill(~mask[..., None], 3.0)
    noisy_tokens = tokens.masked_fill(torch.arange(6)[None] >= lengths[:, None], 7)
    torch.testing.assert_close(model(noisy_features, mask, noisy_tokens, lengths), similarity)


def test_chunked_similarity_equals_one_chunk():
    features, mask, tokens, lengths = _batch(num_images=5, num_captions=6)
    whole = _model(similarity_chunk_size=100)(features, mask, tokens, lengths)
    chunked = _model(similarity_chunk_size=2)(features, mask, tokens, lengths)
    assert whole.shape == (5, 6)
    torch.testing.assert_close(chunked, whole)


def test_feature_encoder_runs_before_the_projection():
    class AddOne(nn.Module):
        def forward(self, features, mask):
            return (features + 1.0).masked_fill(~mask[..., None], 0.0)

    features, mask, _, _ = _batch()
    plain = _model()
    encoded = _model(feature_encoder=AddOne())
    torch.testing.assert_close(
        encoded.encode_images(features, mask), plain.encode_images(features + 1.0, mask)
    )
    assert not torch.allclose(encoded.encode_images(features, mask), plain.encode_images(features, mask))


def test_ranking_loss_training_learns_to_match_pairs():
    from updown.losses import hardest_negative_ranking_loss

    torch.manual_seed(0)
    # Each image's first box carries its caption's identity; the other boxes are noise.
    num_pairs = 6
    model = _model(vocabulary_size=num_pairs + 4)
    tokens = torch.arange(4, 4 + num_pairs)[:, None].repeat(1, 3)
    lengths = torch.full((num_pairs,), 3)
    features = torch.rand(num_pairs, 4, 12)
    features[:, 0, :num_pairs] = 3 * torch.eye(num_pairs)
    mask = torch.ones(num_pairs, 4, dtype=torch.bool)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        loss = hardest_negative_ranking_loss(model(features, mask, tokens, lengths), margin=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    similarity = model(features, mask, tokens, lengths)
    assert losses[-1] < 0.1 * losses[0]
    assert similarity.argmax(dim=1).tolist() == list(range(num_pairs))


def test_invalid_inputs_raise_clear_errors():
    model = _model()
    features, mask, tokens, lengths = _batch()
    with pytest.raises(ValueError, match="image_feature_size"):
        model(features[..., :10], mask, tokens, lengths)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="no real box"):
        model(features, empty, tokens, lengths)
    with pytest.raises(ValueError, match="caption_lengths"):
        model(features, mask, tokens, torch.tensor([6, 0, 4, 1]))
    with pytest.raises(ValueError, match="focal_type"):
        _model(focal_type="mean")
