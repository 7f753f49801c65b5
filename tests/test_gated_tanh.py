"""GatedTanh against y = tanh(W x + b) * sigmoid(W' x + b') computed by hand, scalar by scalar."""

from __future__ import annotations

import math

import pytest
import torch

from updown.modules.gated_tanh import GatedTanh, linear_layer


def _by_hand(
    x: list[float], weight: list[list[float]], bias: list[float], gate_weight, gate_bias
) -> list[float]:
    """The paper's formula with Python floats: no torch on this side of the comparison."""
    out = []
    for j in range(len(bias)):
        value = sum(w * xi for w, xi in zip(weight[j], x)) + bias[j]
        gate = sum(w * xi for w, xi in zip(gate_weight[j], x)) + gate_bias[j]
        out.append(math.tanh(value) * (1.0 / (1.0 + math.exp(-gate))))
    return out


def _set(layer: torch.nn.Linear, weight: list[list[float]], bias: list[float]) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))


def test_plain_gated_tanh_equals_formula():
    layer = GatedTanh(3, 2)
    weight, bias = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], [0.1, -0.2]
    gate_weight, gate_bias = [[-0.3, 0.8, 0.4], [2.0, -1.0, 0.5]], [0.3, 0.0]
    _set(layer.linear, weight, bias)
    _set(layer.gate, gate_weight, gate_bias)
    inputs = [[0.2, -0.4, 0.9], [1.0, 2.0, -3.0]]
    expected = [_by_hand(x, weight, bias, gate_weight, gate_bias) for x in inputs]
    actual = layer(torch.tensor(inputs, dtype=torch.float32))
    assert actual.shape == (2, 2)
    assert torch.allclose(actual, torch.tensor(expected), atol=1e-6)


def test_weight_norm_uses_one_scalar_norm_per_matrix():
    """W = g * V / ||V||_F (dim=None): the effective weights are set through g and V, then compared by hand."""
    layer = GatedTanh(2, 2, weight_norm=True)
    names = {name for name, _ in layer.named_parameters()}
    assert names == {
        "linear.bias",
        "linear.parametrizations.weight.original0",
        "linear.parametrizations.weight.original1",
        "gate.bias",
        "gate.parametrizations.weight.original0",
        "gate.parametrizations.weight.original1",
    }
    v, v_gate = [[3.0, 0.0], [0.0, 4.0]], [[1.0, 2.0], [2.0, 4.0]]
    with torch.no_grad():
        layer.linear.parametrizations.weight.original0.fill_(2.0)
        layer.linear.parametrizations.weight.original1.copy_(torch.tensor(v))
        layer.gate.parametrizations.weight.original0.fill_(-1.0)
        layer.gate.parametrizations.weight.original1.copy_(torch.tensor(v_gate))
        layer.linear.bias.copy_(torch.tensor([0.5, -0.5]))
        layer.gate.bias.copy_(torch.tensor([0.0, 1.0]))
    norm, norm_gate = 5.0, 5.0  # sqrt(9 + 16), sqrt(1 + 4 + 4 + 16)
    weight = [[2.0 * w / norm for w in row] for row in v]
    gate_weight = [[-1.0 * w / norm_gate for w in row] for row in v_gate]
    x = [0.7, -1.3]
    expected = _by_hand(x, weight, [0.5, -0.5], gate_weight, [0.0, 1.0])
    assert torch.allclose(layer(torch.tensor([x])), torch.tensor([expected]), atol=1e-6)


def test_weight_norm_starts_from_the_plain_initial_weight_and_adds_one_parameter():
    torch.manual_seed(0)
    plain = torch.nn.Linear(5, 4)
    torch.manual_seed(0)
    normed = linear_layer(5, 4, weight_norm=True)
    assert torch.allclose(normed.weight, plain.weight, atol=1e-6)
    count = sum(p.numel() for p in normed.parameters())
    assert count == 5 * 4 + 4 + 1


def test_context_broadcast_equals_concatenation():
    torch.manual_seed(0)
    layer = GatedTanh(6 + 4, 5, dropout=0.3, weight_norm=True).eval()
    # shape: (B=2, N=3, 6), context (2, 4)
    rows, context = torch.randn(2, 3, 6), torch.randn(2, 4)
    concatenated = torch.cat([rows, context.unsqueeze(1).expand(-1, 3, -1)], dim=-1)
    assert torch.allclose(layer(rows, context=context), layer(concatenated), atol=1e-6)


def test_dropout_acts_only_in_training():
    torch.manual_seed(0)
    layer = GatedTanh(8, 8, dropout=0.5)
    x = torch.randn(16, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer.eval()(x))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    layer = GatedTanh(3, 4, dropout=0.1, weight_norm=True)
    layer(torch.randn(2, 5, 2), context=torch.randn(2, 1)).sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_invalid_sizes_are_rejected():
    layer = GatedTanh(4, 2)
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="context"):
        layer(torch.randn(3, 2, 3), context=torch.randn(2, 1))
    with pytest.raises(ValueError, match="dropout"):
        GatedTanh(4, 2, dropout=1.0)
    with pytest.raises(ValueError, match="out_features"):
        GatedTanh(4, 0)


def test_relu_layer_equals_relu_of_linear_on_the_concatenation():
    from updown.modules.gated_tanh import ReLULayer

    torch.manual_seed(0)
    layer = ReLULayer(7, 5, weight_norm=True)
    x, context = torch.randn(3, 4, 4), torch.randn(3, 3)
    expected = torch.relu(layer.linear(torch.cat([x, context.unsqueeze(1).expand(3, 4, 3)], dim=-1)))
    assert torch.allclose(layer(x, context=context), expected, atol=1e-6)
    assert torch.allclose(
        layer(torch.cat([x, context.unsqueeze(1).expand(3, 4, 3)], -1)), expected, atol=1e-6
    )
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(2, 6))
