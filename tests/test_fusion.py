"""CrossAttentionFusion against a per-question, per-token, per-head loop, and its masks."""

from __future__ import annotations

import math

import pytest
import torch

from updown.modules.fusion import CrossAttentionFusion

B, T, R, Q, D, H, HEADS = 3, 4, 5, 8, 6, 7, 2


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    question_states = torch.randn(B, T, Q, generator=generator, dtype=torch.float64)
    question_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    image_features = torch.randn(B, R, D, generator=generator, dtype=torch.float64)
    image_features_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return question_states, question_mask, image_features, image_features_mask


def _fusion(dropout: float = 0.0) -> CrossAttentionFusion:
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(Q, D, H, num_heads=HEADS, dropout=dropout).double()
    with torch.no_grad():
        # Non-zero biases so that a forgotten bias in either computation would show.
        fusion.attention.in_proj_bias.normal_()
        fusion.attention.out_proj.bias.normal_()
    return fusion.eval()


def _loop_reference(fusion, question_states, question_mask, image_features, image_features_mask):
    """Scaled dot-product attention per head, written out over tokens and boxes."""
    attention = fusion.attention
    w_q, w_k, w_v = attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight
    b_q, b_k, b_v = attention.in_proj_bias.split(Q)
    head_size = Q // HEADS
    joints, weights = [], []
    for b in range(B):
        real_boxes = [r for r in range(R) if image_features_mask[b, r]]
        keys = [w_k @ image_features[b, r] + b_k for r in real_boxes]
        values = [w_v @ image_features[b, r] + b_v for r in real_boxes]
        fused_sum, weight_sum, num_tokens = 0.0, torch.zeros(R, dtype=torch.float64), 0
        for t in range(T):
            if not question_mask[b, t]:
                continue
            query = w_q @ question_states[b, t] + b_q
            heads = []
            for h in range(HEADS):
                part = slice(h * head_size, (h + 1) * head_size)
                scores = [float(query[part] @ key[part]) / math.sqrt(head_size) for key in keys]
                exps = [math.exp(s - max(scores)) for s in scores]
                probs = [e / sum(exps) for e in exps]
                heads.append(sum(p * value[part] for p, value in zip(probs, values)))
                for p, r in zip(probs, real_boxes):
                    weight_sum[r] += p / HEADS
            attended = attention.out_proj(torch.cat(heads))
            fused = fusion.question_projection(question_states[b, t]) * fusion.attended_projection(attended)
            fused_sum = fused_sum + fused
            num_tokens += 1
        joints.append(fused_sum / num_tokens)
        weights.append(weight_sum / num_tokens)
    return torch.stack(joints), torch.stack(weights)


def test_matches_per_head_loop():
    fusion = _fusion()
    inputs = _inputs()
    with torch.no_grad():
        joint, attention = fusion(*inputs)
        expected_joint, expected_attention = _loop_reference(fusion, *inputs)
    assert joint.shape == (B, H) and attention.shape == (B, R)
    assert torch.allclose(joint, expected_joint, atol=1e-10)
    assert torch.allclose(attention, expected_attention, atol=1e-10)


def test_padded_boxes_get_zero_weight_and_garbage_in_them_changes_nothing():
    fusion = _fusion()
    question_states, question_mask, image_features, image_features_mask = _inputs()
    with torch.no_grad():
        joint, attention = fusion(question_states, question_mask, image_features, image_features_mask)
        garbage = image_features.clone()
        garbage[~image_features_mask] = 1e3 * torch.randn(
            int((~image_features_mask).sum()), D, dtype=torch.float64
        )
        joint_garbage, _ = fusion(question_states, question_mask, garbage, image_features_mask)
    assert torch.all(attention[~image_features_mask] == 0)
    assert torch.allclose(attention.sum(dim=1), torch.ones(B, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(joint, joint_garbage, atol=1e-12)


def test_padded_question_tokens_change_nothing():
    fusion = _fusion()
    question_states, question_mask, image_features, image_features_mask = _inputs()
    with torch.no_grad():
        joint, attention = fusion(question_states, question_mask, image_features, image_features_mask)
        garbage = question_states.clone()
        garbage[~question_mask] = 50 * torch.randn(int((~question_mask).sum()), Q, dtype=torch.float64)
        joint_garbage, attention_garbage = fusion(garbage, question_mask, image_features, image_features_mask)
    assert torch.allclose(joint, joint_garbage, atol=1e-12)
    assert torch.allclose(attention, attention_garbage, atol=1e-12)
    # ... while a real token does matter, so the test above could fail.
    garbage[0, 0] += 1.0
    with torch.no_grad():
        joint_changed, _ = fusion(garbage, question_mask, image_features, image_features_mask)
    assert not torch.allclose(joint[0], joint_changed[0])


def test_image_without_boxes_gives_zeros_not_nan():
    fusion = _fusion()
    question_states, question_mask, image_features, image_features_mask = _inputs()
    image_features_mask[2] = False
    with torch.no_grad():
        joint, attention = fusion(question_states, question_mask, image_features, image_features_mask)
    assert torch.isfinite(joint).all()
    assert torch.all(attention[2] == 0)


def test_gradients_reach_every_parameter():
    fusion = _fusion(dropout=0.1).train()
    joint, _ = fusion(*_inputs())
    joint.sum().backward()
    for name, parameter in fusion.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_heads"):
        CrossAttentionFusion(10, D, H, num_heads=4)
    fusion = _fusion()
    question_states, question_mask, image_features, image_features_mask = _inputs()
    with pytest.raises(ValueError, match="question_mask"):
        fusion(question_states, question_mask[:, :2], image_features, image_features_mask)
    with pytest.raises(ValueError, match="image_features_mask"):
        fusion(question_states, question_mask, image_features, image_features_mask[:, :2])
