"""Dropout whose mask is drawn with ``torch.rand`` on the CPU, 2.6x cheaper there than ``bernoulli_``.

``torch.nn.Dropout`` draws its CPU mask with ``bernoulli_``, about 6 ns per element on the development machine
against 2 ns for ``torch.rand``; the VQA attention drops elements of a ``(B, R, hidden)`` tensor (19 M at batch
512, hidden 1024), where that difference is 3 % of a float32 training step and 7 % of a bf16 one. The mask is
the same random variable (keep with probability ``1 - p``, scale kept elements by ``1 / (1 - p)``); only the
random stream it is drawn from differs. On CUDA, ``torch.nn.functional.dropout`` (one fused kernel) is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Dropout(nn.Module):
    """``nn.Dropout`` with a cheaper CPU mask (see the module docstring); same arguments, same expectation.

    Args:
        p: probability of zeroing an element, in ``[0, 1)``.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p={p} must lie in [0, 1); p=1 would zero every element.")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.is_cuda:
            return F.dropout(x, self.p, training=True)
        # u < 1 - p with u uniform in [0, 1): keep with probability 1 - p. The float32 draw keeps the
        # probability exact to 2^-24 whatever the dtype of x (bf16 under autocast).
        noise = torch.rand(x.shape, device=x.device)
        noise = noise.lt_(1.0 - self.p).div_(1.0 - self.p).to(x.dtype)
        return x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}"
