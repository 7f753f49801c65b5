"""Gated hyperbolic tangent layer (Teney et al., "Tips and Tricks for Visual Question Answering", 2018).

The non-linearity of every fully connected layer in the Anderson et al. (2018) VQA model::

    y = tanh(W x + b) * sigmoid(W' x + b')

The sigmoid branch acts as a learned, per-unit gate on the tanh branch (like the gates of an LSTM or a
highway network); the paper found it better than ReLU or plain tanh. Weight normalisation (Salimans and
Kingma, 2016) with one scalar norm per weight matrix (``dim=None``) is optional; the widely used
reproduction hengyuan-hu/bottom-up-attention-vqa applies it to every linear layer and trains with Adamax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm


def linear_layer(in_features: int, out_features: int, weight_norm: bool) -> nn.Linear:
    """A linear layer, weight-normalised with one scalar norm for the whole matrix when asked.

    With ``weight_norm=True`` the layer's weight is ``W = g * V / ||V||_F``; its parameters are the scalar
    ``g`` (``parametrizations.weight.original0``), the matrix ``V`` (``parametrizations.weight.original1``)
    and the bias, so it has one parameter more than a plain ``nn.Linear``. At initialisation ``W`` equals
    the plain layer's initial weight.
    """
    layer = nn.Linear(in_features, out_features)
    if weight_norm:
        layer = _weight_norm(layer, dim=None)
    return layer


class GatedTanh(nn.Module):
    """``y = tanh(W x + b) * sigmoid(W' x + b')``, with optional weight normalisation and input dropout.

    Args:
        in_features: size of the input's last dimension.
        out_features: size of the output's last dimension.
        dropout: dropout probability applied to the input (one mask shared by both branches).
        weight_norm: weight-normalise ``W`` and ``W'`` separately, each with one scalar norm.

    Parameters: ``2 * (in_features * out_features + out_features)``, plus 2 norms ``g`` with weight norm.
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0, weight_norm: bool = False):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"GatedTanh: in_features={in_features} and out_features={out_features} must both be >= 1."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"GatedTanh: dropout={dropout} must be in [0, 1).")
        self.in_features = in_features
        self.out_features = out_features
        self.dropout = nn.Dropout(dropout)
        # Two layers rather than one of twice the width, so that each branch gets its own weight norm.
        self.linear = linear_layer(in_features, out_features, weight_norm)
        self.gate = linear_layer(in_features, out_features, weight_norm)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the gated tanh to ``x``, or to ``[x; context]`` with ``context`` broadcast over ``x``.

        Args:
            x: ``(..., in_features)``; with ``context``, ``(..., N, in_x)`` (for example N regions).
            context: optional ``(..., in_features - in_x)``, one vector per item shared by its N rows of
                ``x``. The result equals the layer applied to ``torch.cat([x, context.unsqueeze(-2)
                .expand(..., N, -1)], -1)`` (up to dropout masks), but the context's product is computed
                once per item instead of once per row: for the top-down attention scorer on [v_i; q] with
                D=2048 and q of 1024 that removes a third of its arithmetic, the bulk of the model's.

        Returns:
            ``(..., out_features)``, or ``(..., N, out_features)`` with ``context``.
        """
        in_x = x.shape[-1]
        in_context = 0 if context is None else context.shape[-1]
        if in_x + in_context != self.in_features:
            raise ValueError(
                f"GatedTanh: input size {in_x} + context size {in_context} != in_features "
                f"{self.in_features}; pass inputs whose last dimensions add up to in_features."
            )
        # Both branches in one matrix product; `.weight` recomputes the weight-normalised matrices.
        # shape: (2 * out_features, in_features)
        weight = torch.cat([self.linear.weight, self.gate.weight])
        bias = torch.cat([self.linear.bias, self.gate.bias])
        if context is None:
            # shape: (..., 2 * out_features)
            pre_activation = F.linear(self.dropout(x), weight, bias)
        else:
            if context.shape[:-1] != x.shape[:-2]:
                raise ValueError(
                    f"GatedTanh: context batch shape {tuple(context.shape[:-1])} must equal x's leading "
                    f"shape {tuple(x.shape[:-2])} (x is (..., N, in_x), context is (..., in_context))."
                )
            rows = F.linear(self.dropout(x), weight[:, :in_x])
            # shape: (..., 1, 2 * out_features)
            shared = F.linear(self.dropout(context), weight[:, in_x:], bias).unsqueeze(-2)
            # shape: (..., N, 2 * out_features)
            pre_activation = rows + shared
        value, gate = pre_activation.chunk(2, dim=-1)
        return torch.tanh(value) * torch.sigmoid(gate)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class ReLULayer(nn.Module):
    """``y = ReLU(W x + b)``, the fully connected layer (``FCNet``) of hengyuan-hu/bottom-up-attention-vqa.

    A drop-in for :class:`GatedTanh` (same arguments, same ``context`` broadcast), so a model can swap the
    paper's gated tanh for the reproduction's ReLU from config.
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0, weight_norm: bool = False):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"ReLULayer: in_features={in_features} and out_features={out_features} must both be >= 1."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.dropout = nn.Dropout(dropout)
        self.linear = linear_layer(in_features, out_features, weight_norm)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(..., in_features)``, or ``x`` ``(..., N, in_x)`` with ``context`` ``(..., in_features - in_x)``
        broadcast over the N rows; returns ``(..., out_features)`` or ``(..., N, out_features)``."""
        if context is not None:
            context = context.unsqueeze(-2).expand(*x.shape[:-1], context.shape[-1])
            x = torch.cat([x, context], dim=-1)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"ReLULayer: input size {x.shape[-1]} != in_features {self.in_features}; pass inputs whose "
                "last dimensions add up to in_features."
            )
        return F.relu(self.linear(self.dropout(x)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


ACTIVATIONS = {"gated_tanh": GatedTanh, "relu": ReLULayer}
