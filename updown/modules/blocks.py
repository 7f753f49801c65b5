"""Attention blocks for image features: SE, Non-local, GC and CoT, plus a feature-encoder wrapper.

- :class:`SqueezeExcitation` (Hu et al., CVPR 2018): channel gates from the mean feature.
- :class:`NonLocalBlock`, embedded Gaussian (Wang et al., CVPR 2018): ``z = x + W_z softmax(theta^T phi) g``.
- :class:`GlobalContextBlock` (Cao et al., ICCVW 2019): one softmax-pooled context vector,
  bottleneck transform with LayerNorm, added to every position.
- :class:`ContextualTransformerBlock`, CoT (Li et al., TPAMI 2022): static 3x3 key context fused with a
  dynamic local attention; pure PyTorch (the reference uses a CuPy kernel).

SE, Non-local and GC are defined on sets of positions, so they take either grid features
``(B, C, H, W)`` or region sets ``(B, R, D)`` with a mask ``(B, R)`` (True = real box): means and
softmaxes run over real boxes only and padded rows come out zero. CoT needs a grid.
:class:`FeatureEncoder` gives all of them the ``forward(features (B, R, D), mask (B, R))`` signature
the captioner, VQA and retrieval models accept as ``feature_encoder``.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from updown.config import FeatureEncoderName

# The names a config may give (updown.config.FeatureEncoderName); BLOCKS below maps each to its class.
FEATURE_ENCODERS: tuple[str, ...] = get_args(FeatureEncoderName)


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


class SetBlock(nn.Module):
    """Runs :meth:`forward_set` on region sets ``(B, R, D)`` or on grids ``(B, C, H, W)`` as H*W positions."""

    def forward_set(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block.

        Args:
            x: grid features ``(batch_size, channels, height, width)`` or region features
                ``(batch_size, num_boxes, channels)``.
            mask: for region features, ``(batch_size, num_boxes)`` bool, True for a real box (None: all
                real). Must be None for grid features.

        Returns:
            A tensor shaped like ``x``; padded boxes are zero.
        """
        if x.dim() == 4:
            if mask is not None:
                raise ValueError(
                    f"{type(self).__name__}: grid features (B, C, H, W) take no mask; pass mask=None."
                )
            batch_size, channels, height, width = x.shape
            # shape: (batch_size, height * width, channels)
            positions = x.flatten(2).transpose(1, 2)
            full = torch.ones(positions.shape[:2], dtype=torch.bool, device=x.device)
            # shape: (batch_size, channels, height, width)
            return (
                self.forward_set(positions, full).transpose(1, 2).reshape(batch_size, channels, height, width)
            )
        if x.dim() != 3:
            raise ValueError(
                f"{type(self).__name__}: expected (B, C, H, W) grid or (B, R, D) region features, got shape "
                f"{tuple(x.shape)}."
            )
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        elif mask.shape != x.shape[:2]:
            raise ValueError(
                f"{type(self).__name__}: mask has shape {tuple(mask.shape)}, expected {tuple(x.shape[:2])}."
            )
        return self.forward_set(x, mask).masked_fill(~mask.unsqueeze(-1), 0.0)


class SqueezeExcitation(SetBlock):
    """Squeeze-and-excitation: ``x * sigmoid(W_2 relu(W_1 mean(x)))``.

    Args:
        channels: feature size C.
        reduction: bottleneck ratio (the paper uses 16); the hidden size is ``max(1, C // reduction)``.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.excitation = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward_set(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(features.dtype)
        # shape: (batch_size, channels)
        squeezed = (features * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return features * self.excitation(squeezed).unsqueeze(1)


class NonLocalBlock(SetBlock):
    """Embedded-Gaussian non-local block; the output projection starts at zero, so the block starts as identity.

    Args:
        channels: feature size C.
        inner_channels: size of theta, phi and g (default C // 2, as in the paper).
        use_scale: divide the affinities by sqrt(inner_channels) (as mmcv does by default); the paper
            does not.
    """

    def __init__(self, channels: int, inner_channels: int | None = None, use_scale: bool = False) -> None:
        super().__init__()
        inner_channels = inner_channels or max(1, channels // 2)
        self.scale = 1.0 / math.sqrt(inner_channels) if use_scale else 1.0
        self.theta = nn.Linear(channels, inner_channels)
        self.phi = nn.Linear(channels, inner_channels)
        self.g = nn.Linear(channels, inner_channels)
        self.output = nn.Linear(inner_channels, channels)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward_set(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # shape: (batch_size, num_positions, num_positions)
        affinity = torch.bmm(self.theta(features), self.phi(features).transpose(1, 2)) * self.scale
        attention = _masked_softmax(affinity, mask.unsqueeze(1))
        # shape: (batch_size, num_positions, inner_channels)
        aggregated = torch.bmm(attention, self.g(features))
        return features + self.output(aggregated)


class GlobalContextBlock(SetBlock):
    """Global context block (channel-add fusion); the last layer starts at zero, so the block starts as identity.

    Args:
        channels: feature size C.
        ratio: bottleneck ratio (the paper uses 1/16); the hidden size ``int(C * ratio)`` must be at least
            2, since LayerNorm over a single channel outputs a constant.
    """

    def __init__(self, channels: int, ratio: float = 1.0 / 16) -> None:
        super().__init__()
        hidden = int(channels * ratio)
        if hidden < 2:
            raise ValueError(
                f"GlobalContextBlock: channels={channels} * ratio={ratio} gives a bottleneck of {hidden} "
                "channels; LayerNorm needs at least 2. Raise ratio (e.g. ratio=0.25) for small features."
            )
        # No bias: the softmax over positions ignores a constant shift, so it would never learn.
        self.context_logit = nn.Linear(channels, 1, bias=False)
        self.transform = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )
        # The reference initialisation: Kaiming (fan-in) context logits, zero last layer.
        nn.init.kaiming_normal_(self.context_logit.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward_set(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # shape: (batch_size, num_positions)
        pooling = _masked_softmax(self.context_logit(features).squeeze(-1), mask)
        # shape: (batch_size, channels)
        context = torch.bmm(pooling.unsqueeze(1), features).squeeze(1)
        return features + self.transform(context).unsqueeze(1)


def local_aggregation(values: torch.Tensor, weights: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Position-dependent k x k aggregation with zero padding (CoT's ``LocalConvolution``).

    ``out[b, c, h, w] = sum_{i,j} weights[b, c % G, i*k + j, h, w] * values[b, c, h + i - k//2, w + j - k//2]``.

    Args:
        values: ``(batch_size, channels, height, width)``.
        weights: ``(batch_size, G, kernel_size**2, height, width)``; channel ``c`` uses weight group
            ``c % G``, so G must divide channels.
        kernel_size: odd window size k.

    Returns:
        ``(batch_size, channels, height, width)``.
    """
    batch_size, channels, height, width = values.shape
    groups = weights.size(1)
    # shape: (batch_size, channels // groups, groups, kernel_size**2, height, width)
    patches = F.unfold(values, kernel_size, padding=kernel_size // 2).view(
        batch_size, channels // groups, groups, kernel_size * kernel_size, height, width
    )
    # shape: (batch_size, channels, height, width)
    return (patches * weights.unsqueeze(1)).sum(dim=3).view(batch_size, channels, height, width)


class ContextualTransformerBlock(nn.Module):
    """CoT layer: static context ``K1`` from a grouped k x k conv, dynamic context from local attention.

    The attention for each position comes from ``[x; K1]`` through two 1x1 convolutions; it aggregates
    the values (a 1x1 conv of x) over the k x k window into ``K2``; ``K1`` and ``K2`` are fused by a
    split-attention (softmax over the two) computed from their pooled sum. Sizes follow the reference
    (share_planes 8, factor 2, radix 2, attention channels ``max(C / 2, 32)``). Not residual: in CoTNet it
    replaces the 3x3 convolution inside a ResNet bottleneck. Like the reference, it batch-normalises
    pooled vectors, so training needs more than one image per batch.

    Args:
        channels: feature size C; must be divisible by ``key_groups``, ``share_planes`` and 2.
        kernel_size: odd window size (3 in the paper).
        key_groups: groups of the static key convolution (4 in the reference).
        share_planes: channels sharing one attention map (8 in the reference).
    """

    def __init__(
        self, channels: int, kernel_size: int = 3, key_groups: int = 4, share_planes: int = 8
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"ContextualTransformerBlock: kernel_size={kernel_size} must be odd.")
        if channels % key_groups or channels % share_planes or channels % 2:
            raise ValueError(
                f"ContextualTransformerBlock: channels={channels} must be divisible by key_groups={key_groups}, "
                f"share_planes={share_planes} and 2; project the features to such a size first."
            )
        self.kernel_size = kernel_size
        window = kernel_size * kernel_size
        self.key_embed = nn.Sequential(
            nn.Conv2d(
                channels, channels, kernel_size, padding=kernel_size // 2, groups=key_groups, bias=False
            ),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.attention_embed = nn.Sequential(
            nn.Conv2d(2 * channels, channels // 2, 1, bias=False),
            nn.BatchNorm2d(channels // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, window * channels // share_planes, 1),
            nn.GroupNorm(channels // share_planes, window * channels // share_planes),
        )
        self.value_embed = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)
        )
        self.dynamic_norm = nn.BatchNorm2d(channels)
        fusion_channels = max(channels // 2, 32)
        self.fusion = nn.Sequential(
            nn.Conv2d(channels, fusion_channels, 1),
            nn.BatchNorm2d(fusion_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(fusion_channels, 2 * channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply CoT to grid features.

        Args:
            x: ``(batch_size, channels, height, width)``.

        Returns:
            ``(batch_size, channels, height, width)``.
        """
        if x.dim() != 4:
            raise ValueError(
                f"ContextualTransformerBlock needs grid features (B, C, H, W), got shape {tuple(x.shape)}; "
                "for (B, H*W, C) features use build_feature_encoder('cot', ..., grid_shape=(H, W))."
            )
        batch_size, channels, height, width = x.shape
        static_context = self.key_embed(x)
        # shape: (batch_size, channels // share_planes, kernel_size**2, height, width)
        attention = self.attention_embed(torch.cat([x, static_context], dim=1)).view(
            batch_size, -1, self.kernel_size * self.kernel_size, height, width
        )
        dynamic_context = local_aggregation(self.value_embed(x), attention, self.kernel_size)
        dynamic_context = F.silu(self.dynamic_norm(dynamic_context))

        # shape: (batch_size, channels, 2, height, width)
        contexts = torch.stack([dynamic_context, static_context], dim=2)
        pooled = contexts.sum(dim=2).mean(dim=(2, 3), keepdim=True)
        # shape: (batch_size, channels, 2)
        split_attention = torch.softmax(self.fusion(pooled).view(batch_size, channels, 2), dim=2)
        return (contexts * split_attention[..., None, None]).sum(dim=2)


class FeatureEncoder(nn.Module):
    """Wraps a block as ``forward(image_features (B, R, D), image_features_mask (B, R)) -> (B, R, D)``.

    Args:
        block: :class:`SqueezeExcitation`, :class:`NonLocalBlock`, :class:`GlobalContextBlock` or
            :class:`ContextualTransformerBlock`.
        grid_shape: ``(H, W)`` for grid features whose R = H * W boxes tile the image row-major (the
            HDF5 ``grid_shape`` attribute); the block then sees ``(B, D, H, W)``. Required for CoT.
    """

    def __init__(self, block: nn.Module, grid_shape: tuple[int, int] | None = None) -> None:
        super().__init__()
        if grid_shape is None and isinstance(block, ContextualTransformerBlock):
            raise ValueError("FeatureEncoder: CoT needs grid features; pass grid_shape=(H, W).")
        self.block = block
        self.grid_shape = tuple(grid_shape) if grid_shape is not None else None

    def forward(self, image_features: torch.Tensor, image_features_mask: torch.Tensor) -> torch.Tensor:
        """Encode features; padded boxes stay zero.

        Args:
            image_features: ``(batch_size, num_boxes, feature_size)``.
            image_features_mask: ``(batch_size, num_boxes)`` bool, True for a real box.

        Returns:
            ``(batch_size, num_boxes, feature_size)``.
        """
        if self.grid_shape is None:
            return self.block(image_features, image_features_mask)
        height, width = self.grid_shape
        batch_size, num_boxes, feature_size = image_features.shape
        if num_boxes != height * width or not bool(image_features_mask.all()):
            raise ValueError(
                f"FeatureEncoder: grid_shape={self.grid_shape} needs exactly {height * width} real boxes per "
                f"image, got {num_boxes} boxes ({int((~image_features_mask).sum())} padded). Use grid features "
                "(HDF5 attribute grid_shape) or drop grid_shape for region features."
            )
        # shape: (batch_size, feature_size, height, width)
        grid = image_features.transpose(1, 2).reshape(batch_size, feature_size, height, width)
        # shape: (batch_size, num_boxes, feature_size)
        return self.block(grid).flatten(2).transpose(1, 2)


def build_feature_encoder(
    name: str | None, feature_size: int, grid_shape: tuple[int, int] | None = None, **kwargs
) -> FeatureEncoder | None:
    """Build an optional feature encoder by name.

    Args:
        name: ``"se"``, ``"nonlocal"``, ``"gc"``, ``"cot"``, or None / ``"none"`` for no encoder.
        feature_size: D, the size of the image features.
        grid_shape: ``(H, W)`` for grid features (required for ``"cot"``).
        **kwargs: passed to the block (``reduction``, ``inner_channels``, ``use_scale``, ``ratio``,
            ``kernel_size``, ``key_groups``, ``share_planes``).

    Returns:
        A :class:`FeatureEncoder`, or None.
    """
    if name is None or name.lower() == "none":
        return None
    if name.lower() not in BLOCKS:
        raise ValueError(f"feature_encoder={name!r} is unknown; use one of {FEATURE_ENCODERS} or None.")
    return FeatureEncoder(BLOCKS[name.lower()](feature_size, **kwargs), grid_shape=grid_shape)


# One entry per FeatureEncoderName: a new block adds its name there and its class here.
BLOCKS: dict[str, type[nn.Module]] = {
    "se": SqueezeExcitation,
    "nonlocal": NonLocalBlock,
    "gc": GlobalContextBlock,
    "cot": ContextualTransformerBlock,
}
assert set(BLOCKS) == set(FEATURE_ENCODERS), (
    "updown.config.FeatureEncoderName and BLOCKS must name the same blocks"
)
