"""Tests for updown.modules.blocks: SE, Non-local, GC, CoT and the feature-encoder wrapper."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from updown.modules.blocks import (
    ContextualTransformerBlock,
    FeatureEncoder,
    GlobalContextBlock,
    NonLocalBlock,
    SqueezeExcitation,
    build_feature_encoder,
    local_aggregation,
)


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero values everywhere, so identity initialisations cannot hide wiring mistakes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


def _masked_regions(batch_size=3, num_boxes=5, channels=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch_size, num_boxes, channels, generator=generator, dtype=torch.float64)
    mask = torch.arange(num_boxes)[None] < torch.tensor([5, 2, 4][:batch_size])[:, None]
    return features.masked_fill(~mask[..., None], 0.0), mask


# --- Hand-written references ------------------------------------------------------------------------


def _se_by_hand(block: SqueezeExcitation, features: torch.Tensor, count: int) -> torch.Tensor:
    fc1, fc2 = block.excitation[0], block.excitation[2]
    squeezed = torch.stack([features[:count, c].sum() / count for c in range(features.size(1))])
    gates = torch.sigmoid(fc2(torch.relu(fc1(squeezed))))
    return features[:count] * gates


def _nonlocal_by_hand(block: NonLocalBlock, features: torch.Tensor, count: int) -> torch.Tensor:
    x = features[:count]
    theta, phi, g = block.theta(x), block.phi(x), block.g(x)
    outputs = []
    for i in range(count):
        exps = [math.exp((theta[i] @ phi[j]).item()) for j in range(count)]
        y = sum(exps[j] / sum(exps) * g[j] for j in range(count))
        outputs.append(x[i] + block.output(y))
    return torch.stack(outputs)


class _ReferenceContextBlock(nn.Module):
    """The official GCNet ContextBlock2d (pool 'att', fusion 'channel_add'), transcribed."""

    def __init__(self, inplanes, planes):
        super().__init__()
        self.conv_mask = nn.Conv2d(inplanes, 1, kernel_size=1)
        self.channel_add_conv = nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=1),
            nn.LayerNorm([planes, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, inplanes, kernel_size=1),
        )

    def forward(self, x):
        batch, channel, height, width = x.size()
        input_x = x.view(batch, channel, height * width).unsqueeze(1)
        context_mask = torch.softmax(self.conv_mask(x).view(batch, 1, height * width), dim=2).unsqueeze(3)
        context = torch.matmul(input_x, context_mask).view(batch, channel, 1, 1)
        return x + self.channel_add_conv(context)


def _naive_local_aggregation(values, weights, kernel_size):
    """The CoT CUDA kernel (aggregation_zeropad forward) as explicit loops."""
    batch_size, channels, height, width = values.shape
    groups, pad = weights.size(1), kernel_size // 2
    out = torch.zeros_like(values)
    for n in range(batch_size):
        for c in range(channels):
            for h in range(height):
                for w in range(width):
                    value = 0.0
                    for kh in range(kernel_size):
                        for kw in range(kernel_size):
                            h_in, w_in = h - pad + kh, w - pad + kw
                            if 0 <= h_in < height and 0 <= w_in < width:
                                weight = weights[n, c % groups, kh * kernel_size + kw, h, w]
                                value += weight * values[n, c, h_in, w_in]
                    out[n, c, h, w] = value
    return out


class _ReferenceCotLayer(nn.Module):
    """The official CoTNet CotLayer.forward, with the CuPy aggregation replaced by the loop above."""

    def __init__(self, block: ContextualTransformerBlock):
        super().__init__()
        self.kernel_size, self.radix = block.kernel_size, 2
        self.key_embed, self.embed, self.conv1x1 = block.key_embed, block.attention_embed, block.value_embed
        self.bn, self.act, self.se = block.dynamic_norm, nn.SiLU(), block.fusion

    def forward(self, x):
        k = self.key_embed(x)
        qk = torch.cat([x, k], dim=1)
        b, c, qk_hh, qk_ww = qk.size()
        w = self.embed(qk)
        w = w.view(b, 1, -1, self.kernel_size * self.kernel_size, qk_hh, qk_ww)
        x = self.conv1x1(x)
        x = _naive_local_aggregation(x, w[:, 0], self.kernel_size)
        x = self.act(self.bn(x))
        B, C, H, W = x.shape
        x = torch.cat([x.view(B, C, 1, H, W), k.view(B, C, 1, H, W)], dim=2)
        x_gap = x.sum(dim=2).mean((2, 3), keepdim=True)
        x_attn = torch.softmax(self.se(x_gap).view(B, C, self.radix), dim=2)
        return (x * x_attn.reshape((B, C, self.radix, 1, 1))).sum(dim=2)


# --- Tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_class", [NonLocalBlock, GlobalContextBlock])
def test_identity_at_initialisation(block_class):
    torch.manual_seed(0)
    block = block_class(32)
    grid = torch.randn(2, 32, 3, 4)
    torch.testing.assert_close(block(grid), grid, rtol=0, atol=0)
    features, mask = _masked_regions(channels=32)
    torch.testing.assert_close(block.double()(features, mask), features, rtol=0, atol=0)


def test_squeeze_excitation_and_nonlocal_match_hand_computation_on_masked_sets():
    assert SqueezeExcitation(32).excitation[0].out_features == 2  # reduction 16
    assert NonLocalBlock(32).theta.out_features == 16  # inner C / 2
    features, mask = _masked_regions()
    garbage = features.masked_fill(~mask[..., None], 9.0)
    for block, by_hand in (
        (_randomise(SqueezeExcitation(32)).double(), _se_by_hand),
        (_randomise(NonLocalBlock(32)).double(), _nonlocal_by_hand),
    ):
        out = block(garbage, mask)
        for b, count in enumerate(mask.sum(1).tolist()):
            torch.testing.assert_close(out[b, :count], by_hand(block, features[b], count))
            assert bool((out[b, count:] == 0).all()), "padded rows must stay zero"


def test_global_context_block_matches_the_official_code():
    torch.manual_seed(0)
    block = _randomise(GlobalContextBlock(32)).double()
    assert block.transform[0].out_features == 2  # ratio 1/16
    reference = _ReferenceContextBlock(32, 2).double()
    with torch.no_grad():
        reference.conv_mask.weight.copy_(block.context_logit.weight[..., None, None])
        for index in (0, 3):
            reference.channel_add_conv[index].weight.copy_(block.transform[index].weight[..., None, None])
            reference.channel_add_conv[index].bias.copy_(block.transform[index].bias)
        reference.channel_add_conv[1].weight.copy_(block.transform[1].weight[:, None, None])
        reference.channel_add_conv[1].bias.copy_(block.transform[1].bias[:, None, None])
    grid = torch.randn(2, 32, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(block(grid), reference(grid))
    # On a masked set, real rows equal the official block on the real boxes alone (as a 1 x n grid).
    features, mask = _masked_regions()
    out = block(features.masked_fill(~mask[..., None], -4.0), mask)
    for b, count in enumerate(mask.sum(1).tolist()):
        expected = reference(features[b, :count].t()[None, :, None, :])[0, :, 0, :].t()
        torch.testing.assert_close(out[b, :count], expected)
        assert bool((out[b, count:] == 0).all())


def test_local_aggregation_matches_the_cuda_kernel_loop():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 8, 3, 4, generator=generator, dtype=torch.float64)
    weights = torch.randn(2, 2, 9, 3, 4, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        local_aggregation(values, weights, 3), _naive_local_aggregation(values, weights, 3)
    )


def test_cot_matches_the_official_forward():
    torch.manual_seed(0)
    block = _randomise(ContextualTransformerBlock(16)).double()
    grid = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    out = block(grid)
    assert out.shape == (2, 16, 3, 3)
    torch.testing.assert_close(out, _ReferenceCotLayer(block)(grid))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    features, mask = _masked_regions(channels=32)
    features = features.float()
    blocks = [SqueezeExcitation(32), NonLocalBlock(32), GlobalContextBlock(32)]
    for block in blocks:
        first = block(features, mask)
        first.pow(2).sum().backward()
        zero_initialised = isinstance(block, (NonLocalBlock, GlobalContextBlock))
        if zero_initialised:
            # The zero output layer blocks every gradient before it at step 0 (that is what makes the block
            # start as identity); one SGD step on the output layer opens the path.
            assert all(
                float(p.grad.abs().sum()) == 0
                for n, p in block.named_parameters()
                if "output" not in n and "transform.3" not in n
            )
            torch.optim.SGD(block.parameters(), lr=0.1).step()
            block.zero_grad()
            block(features, mask).pow(2).sum().backward()
        for name, parameter in block.named_parameters():
            assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0, name
    cot = ContextualTransformerBlock(16)
    cot(torch.randn(2, 16, 3, 3)).pow(2).sum().backward()
    for name, parameter in cot.named_parameters():
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("name", ["se", "nonlocal", "gc", "cot"])
def test_feature_encoder_grid_reshape_is_row_major(name):
    torch.manual_seed(0)
    encoder = build_feature_encoder(name, 32, grid_shape=(2, 3))
    _randomise(encoder)
    features = torch.randn(2, 6, 32)
    out = encoder(features, torch.ones(2, 6, dtype=torch.bool))
    grid = torch.zeros(2, 32, 2, 3)
    for h in range(2):
        for w in range(3):
            grid[:, :, h, w] = features[:, h * 3 + w]
    expected_grid = encoder.block(grid)
    for h in range(2):
        for w in range(3):
            torch.testing.assert_close(out[:, h * 3 + w], expected_grid[:, :, h, w])
    if name != "cot":
        # SE, Non-local and GC are set operations: the grid layout changes nothing.
        torch.testing.assert_close(encoder.block(features, torch.ones(2, 6, dtype=torch.bool)), out)


@pytest.mark.parametrize("name", ["se", "nonlocal", "gc"])
def test_feature_encoder_on_regions_ignores_padding(name):
    encoder = _randomise(build_feature_encoder(name, 32)).double()
    features, mask = _masked_regions()
    clean = encoder(features, mask)
    noisy = encoder(features.masked_fill(~mask[..., None], 5.0), mask)
    torch.testing.assert_close(noisy, clean)
    assert bool((clean[~mask] == 0).all())
    assert not torch.allclose(clean[mask], features[mask])


def test_factory_and_validation():
    assert build_feature_encoder(None, 16) is None and build_feature_encoder("none", 16) is None
    assert isinstance(build_feature_encoder("SE", 16, reduction=4).block.excitation[0], nn.Linear)
    assert build_feature_encoder("se", 16, reduction=4).block.excitation[0].out_features == 4
    with pytest.raises(ValueError, match="unknown"):
        build_feature_encoder("attention", 16)
    with pytest.raises(ValueError, match="grid_shape"):
        build_feature_encoder("cot", 16)
    with pytest.raises(ValueError, match="divisible"):
        ContextualTransformerBlock(12)
    with pytest.raises(ValueError, match="LayerNorm"):
        GlobalContextBlock(16)
    assert GlobalContextBlock(16, ratio=0.25).transform[0].out_features == 4
    encoder = build_feature_encoder("gc", 32, grid_shape=(2, 2))
    padded = torch.ones(1, 4, dtype=torch.bool)
    padded[0, 3] = False
    with pytest.raises(ValueError, match="real boxes"):
        encoder(torch.randn(1, 4, 32), padded)
    with pytest.raises(ValueError, match="real boxes"):
        encoder(torch.randn(1, 5, 32), torch.ones(1, 5, dtype=torch.bool))
    assert isinstance(encoder, FeatureEncoder)
