"""Tests for updown.modules.focal against the BFAN reference code and brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from updown.modules.focal import bfan_similarity, focal_attention, focal_attention_weights

# --- A transcription of the reference code (CrossmodalGroup/BFAN, model.py), without masks. ---------


def _ref_l2norm(x, dim, eps=1e-8):
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def _ref_func_attention(query, context, lambda_softmax, focal_type):
    batch_size, query_length, source_length = context.size(0), query.size(1), context.size(1)
    attn = torch.bmm(context, query.transpose(1, 2))
    attn = F.leaky_relu(attn, 0.1)
    attn = _ref_l2norm(attn, 2)
    attn = attn.transpose(1, 2).contiguous().view(batch_size * query_length, source_length)
    attn = torch.softmax(attn * lambda_softmax, dim=1).view(batch_size, query_length, source_length)
    if focal_type == "equal":
        func_f = attn * source_length - attn.sum(dim=-1, keepdim=True)
    else:
        xi = attn.unsqueeze(-1).reshape(batch_size * query_length, source_length, 1)
        xj = attn.unsqueeze(2).reshape(batch_size * query_length, 1, source_length)
        xj_confidence = xj.sqrt()
        func_f = (torch.bmm(xi, xj_confidence) - xj * xj_confidence).sum(dim=-1)
        func_f = func_f.view(batch_size, query_length, source_length)
    func_h = torch.where(func_f > 0, torch.ones_like(attn), torch.zeros_like(attn))
    tmp = func_h * attn
    re_attn = tmp / tmp.sum(dim=-1, keepdim=True)
    return torch.bmm(re_attn, context)


def _ref_cosine(x1, x2, dim, eps=1e-8):
    return (x1 * x2).sum(dim) / (x1.norm(2, dim) * x2.norm(2, dim)).clamp(min=eps)


def _ref_xattn_score(images, captions, caption_lengths, lambda_softmax, focal_type):
    similarities = []
    for i in range(captions.size(0)):
        caption = captions[i, : caption_lengths[i]].unsqueeze(0).repeat(images.size(0), 1, 1)
        attended = _ref_func_attention(caption, images, lambda_softmax, focal_type)
        t2i = _ref_cosine(caption, attended, dim=2).mean(dim=1, keepdim=True)
        attended = _ref_func_attention(images, caption, lambda_softmax, focal_type)
        i2t = _ref_cosine(images, attended, dim=2).mean(dim=1, keepdim=True)
        similarities.append(t2i + i2t)
    return torch.cat(similarities, 1)


# --- Brute force, one row at a time in plain Python, for the masked weights. --------------------------


def _brute_weights(scores, query_length, context_length, lambda_softmax, focal_type, eps=1e-8):
    """Weights of the first query_length x context_length block of scores (padding simply dropped)."""
    s = [[max(v, 0.1 * v) for v in row[:context_length]] for row in scores[:query_length]]
    norms = [math.sqrt(sum(s[i][j] ** 2 for i in range(query_length))) + eps for j in range(context_length)]
    rows = []
    for i in range(query_length):
        exps = [math.exp(lambda_softmax * s[i][j] / norms[j]) for j in range(context_length)]
        a = [e / sum(exps) for e in exps]
        if focal_type == "equal":
            f = [sum(a[j] - a[k] for k in range(context_length)) for j in range(context_length)]
        else:
            f = [
                sum((a[j] - a[k]) * math.sqrt(a[k]) for k in range(context_length))
                for j in range(context_length)
            ]
        h = [1.0 if v > 0 else 0.0 for v in f]
        if sum(h) == 0:
            h = [1.0] * context_length
        total = sum(h[j] * a[j] for j in range(context_length))
        rows.append([h[j] * a[j] / total for j in range(context_length)])
    return rows


@pytest.mark.parametrize("focal_type", ["equal", "prob"])
def test_similarity_matches_reference_code(focal_type):
    torch.manual_seed(0)
    images = F.normalize(torch.randn(4, 6, 8, dtype=torch.float64), dim=-1)
    captions = F.normalize(torch.randn(5, 7, 8, dtype=torch.float64), dim=-1)
    lengths = [7, 3, 5, 1, 6]
    caption_mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    expected = _ref_xattn_score(images, captions, lengths, 20.0, focal_type)
    got = bfan_similarity(
        images, torch.ones(4, 6, dtype=torch.bool), captions, caption_mask, 20.0, focal_type
    )
    # The one-word caption is NaN in the reference (a single fragment never exceeds the mean, 0 / 0);
    # compare the others. test_no_nan_when_no_fragment_qualifies pins the guarded value.
    finite = torch.isfinite(expected)
    if focal_type == "equal":
        assert not bool(finite[:, 3].any())
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-9, atol=1e-9)
    assert bool(torch.isfinite(got).all())


@pytest.mark.parametrize("focal_type", ["equal", "prob"])
def test_weights_match_brute_force_with_masks(focal_type):
    torch.manual_seed(1)
    scores = torch.randn(3, 5, 6, dtype=torch.float64)
    query_lengths, context_lengths = [5, 2, 4], [6, 3, 1]
    query_mask = torch.arange(5)[None] < torch.tensor(query_lengths)[:, None]
    context_mask = torch.arange(6)[None] < torch.tensor(context_lengths)[:, None]
    garbage = scores.clone()
    garbage[~query_mask] = 1e3
    garbage.transpose(1, 2)[~context_mask] = -7e2
    weights = focal_attention_weights(garbage, query_mask, context_mask, 20.0, focal_type)
    for b in range(3):
        expected = _brute_weights(scores[b].tolist(), query_lengths[b], context_lengths[b], 20.0, focal_type)
        q, c = query_lengths[b], context_lengths[b]
        torch.testing.assert_close(weights[b, :q, :c], torch.tensor(expected, dtype=torch.float64))
        assert bool((weights[b, :, c:] == 0).all()), "padded context fragments received weight"


def test_equal_zeroes_fragments_at_or_below_the_mean_and_rows_sum_to_one():
    torch.manual_seed(2)
    scores = torch.randn(2, 4, 9)
    context_mask = torch.ones(2, 9, dtype=torch.bool)
    context_mask[1, 6:] = False
    query_mask = torch.ones(2, 4, dtype=torch.bool)
    weights = focal_attention_weights(scores, query_mask, context_mask, 20.0, "equal")
    # The pre-assigned weights, computed here from the paper's step 1, decide who is above the mean.
    relevance = F.leaky_relu(scores, 0.1)
    relevance = relevance / (relevance.norm(dim=1, keepdim=True) + 1e-8)
    pre = torch.softmax((20.0 * relevance).masked_fill(~context_mask[:, None, :], float("-inf")), dim=-1)
    mean = pre.sum(-1, keepdim=True) / context_mask.sum(-1)[:, None, None]
    below = (pre <= mean) & context_mask[:, None, :]
    assert bool(below.any()) and bool((weights[below] == 0).all())
    assert bool((weights[~below & context_mask[:, None, :]] > 0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4))


def test_no_nan_when_no_fragment_qualifies():
    # One box, one word, and identical regions: no fragment exceeds the mean.
    region = F.normalize(torch.randn(1, 1, 8), dim=-1)
    images = torch.cat([region, region.expand(1, 4, 8)], dim=1).requires_grad_(True)
    image_mask = torch.tensor([[True, False, False, False, False]])
    captions = F.normalize(torch.randn(2, 3, 8), dim=-1).requires_grad_(True)
    caption_mask = torch.tensor([[True, False, False], [True, True, True]])
    for focal_type in ("equal", "prob"):
        sim = bfan_similarity(images, image_mask, captions, caption_mask, 20.0, focal_type)
        sim.sum().backward()
        assert bool(torch.isfinite(sim).all())
        assert bool(torch.isfinite(images.grad).all()) and bool(torch.isfinite(captions.grad).all())
        # One box and one word: both directions attend to the single fragment, so the score is 2 cos.
        cosine = F.cosine_similarity(region[0, 0], captions[0, 0], dim=0)
        torch.testing.assert_close(sim[0, 0], 2 * cosine)
    identical = F.normalize(torch.randn(1, 8), dim=-1).expand(1, 5, 8)
    weights = focal_attention_weights(
        torch.einsum("qd,bcd->bqc", captions[1].detach(), identical),
        torch.ones(1, 3, dtype=torch.bool),
        torch.ones(1, 5, dtype=torch.bool),
    )
    assert bool(torch.isfinite(weights).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 3))


@pytest.mark.parametrize("focal_type", ["equal", "prob"])
def test_all_pairs_equal_explicit_attended_vectors_and_ignore_padding(focal_type):
    torch.manual_seed(3)
    image_lengths, caption_lengths = [6, 2, 4], [5, 3, 1, 4]
    images = F.normalize(torch.randn(3, 6, 8), dim=-1)
    captions = F.normalize(torch.randn(4, 5, 8), dim=-1)
    image_mask = torch.arange(6)[None] < torch.tensor(image_lengths)[:, None]
    caption_mask = torch.arange(5)[None] < torch.tensor(caption_lengths)[:, None]
    noisy_images = images.masked_fill(~image_mask[..., None], 5.0)
    noisy_captions = captions.masked_fill(~caption_mask[..., None], -3.0)
    got = bfan_similarity(noisy_images, image_mask, noisy_captions, caption_mask, 20.0, focal_type)
    for i, r in enumerate(image_lengths):
        for c, t in enumerate(caption_lengths):
            image, caption = images[i : i + 1, :r], captions[c : c + 1, :t]
            ones_r, ones_t = torch.ones(1, r, dtype=torch.bool), torch.ones(1, t, dtype=torch.bool)
            attended, _ = focal_attention(caption, ones_t, image, ones_r, 20.0, focal_type)
            t2i = F.cosine_similarity(caption, attended, dim=-1).mean()
            attended, _ = focal_attention(image, ones_r, caption, ones_t, 20.0, focal_type)
            i2t = F.cosine_similarity(image, attended, dim=-1).mean()
            torch.testing.assert_close(got[i, c], t2i + i2t, rtol=1e-5, atol=1e-5)


def test_unknown_focal_type_is_rejected():
    with pytest.raises(ValueError, match="focal_type"):
        focal_attention_weights(
            torch.zeros(1, 2, 2),
            torch.ones(1, 2, dtype=torch.bool),
            torch.ones(1, 2, dtype=torch.bool),
            focal_type="max",
        )
