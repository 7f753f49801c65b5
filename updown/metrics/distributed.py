"""Metrics that stay exact under DDP: per-sample states gathered from every rank, one copy of each sample.

Lightning shards an evaluation split with ``DistributedSampler``, which pads a split whose size the world
size does not divide by repeating its first samples (so every rank runs the same number of batches). Sums
or means accumulated per rank would count those samples twice. The metrics here instead keep one entry per
sample id (``dist_reduce_fx="cat"``) and, at :meth:`~torchmetrics.Metric.compute`, drop repeated ids and
reduce in ascending id order, so the result is the same, to the bit, for any world size and batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def first_occurrences(ids: torch.Tensor) -> torch.Tensor:
    """Where each distinct id first occurs, ordered by ascending id.

    Args:
        ids: ``(N,)`` integer sample ids, possibly repeated.

    Returns:
        ``(U,)`` int64 positions into ``ids``, one per distinct id, ordered so that ``ids[result]`` ascends.
    """
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((unique_ids.numel(),), ids.numel(), dtype=torch.int64, device=ids.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin")


class MeanPerSample(Metric):
    """Mean of one value per sample (e.g. a per-question loss), each sample id counted once, exact under DDP.

    Example:
        >>> metric = MeanPerSample()
        >>> metric.update(torch.tensor([1.0, 3.0]), sample_ids=[7, 8])
        >>> metric.update(torch.tensor([1.0]), sample_ids=[7])  # a DDP padding repeat: ignored
        >>> metric.compute()
        tensor(2., dtype=torch.float64)
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sample_ids", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")
        #: Distinct samples the last :meth:`compute` averaged over (all ranks together).
        self.num_samples: int | None = None

    def update(self, values: torch.Tensor, sample_ids: Sequence[int] | torch.Tensor) -> None:
        """Add a batch.

        Args:
            values: ``(B,)`` one value per sample.
            sample_ids: ``(B,)`` the samples' ids (list or tensor).
        """
        ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1)
        values = values.detach().reshape(-1)
        if values.numel() != ids.numel():
            raise ValueError(
                f"MeanPerSample.update: {values.numel()} values for {ids.numel()} sample ids; pass one id per value."
            )
        self.sample_ids.append(ids.to(self.device))
        self.values.append(values.to(device=self.device, dtype=torch.float64))

    def compute(self) -> torch.Tensor:
        """The float64 mean over distinct sample ids (the first value seen for each)."""
        if len(self.sample_ids) == 0:
            raise ValueError("MeanPerSample.compute: no samples were added; call update() first.")
        ids = dim_zero_cat(self.sample_ids)
        first = first_occurrences(ids)
        self.num_samples = int(first.numel())
        return dim_zero_cat(self.values)[first].mean()
