"""Bit-identical reruns on CPU: a fixed number of intra-op threads for every training run.

Some CPU kernels split their work over the intra-op threads, and each split rounds differently, so one training
step gives weights that differ in the last bit between 1 and 2 threads. Over a run the difference grows, and the
final metrics differ in their second or third digit. Measured with torch 2.13 (OpenMP, MKL, oneDNN) on the
synthetic configs, by running every operator of a few training steps under 1 and then 2 threads:

- softmax backward (every attention: captioning, VQA, retrieval);
- LayerNorm backward and a full ``sum`` (VQA);
- MKL matrix products of the GRU's small matrices (retrieval).

Nothing else we measured changes a result: with the same thread count, two runs give bit-identical weights and
metrics whatever the machine's load (other jobs on the cores) and wherever the synthetic world comes from (the
cache or a fresh generation); DataLoader workers only copy data. ``torch.use_deterministic_algorithms`` does not
help: it covers ops with nondeterministic (atomic) implementations, mostly on CUDA, not thread-count-dependent
rounding.

So ``python -m updown.fit`` (and ``updown.validate``) set the number of intra-op threads from ``--threads``
(default :data:`DEFAULT_THREADS`) instead of taking it from ``OMP_NUM_THREADS`` or the number of cores; a run
records it in its ``config.yaml``. One thread is also the fastest choice for the synthetic models on a small or
busy machine (OpenMP threads spin while they wait for a core). ``--threads 0`` keeps torch's default, for
machines with cores to spare; its results then depend on that machine's thread count.
"""

from __future__ import annotations

import torch

#: Intra-op threads of a training run unless ``--threads`` says otherwise; results are bit-identical only for
#: the same number (and the same kind of CPU).
DEFAULT_THREADS = 1


def add_threads_argument(parser) -> None:
    """Add ``--threads`` to a LightningCLI parser (stored in the run's ``config.yaml``)."""
    from updown.config import NonNegativeInt

    parser.add_argument(
        "--threads",
        type=NonNegativeInt,
        default=DEFAULT_THREADS,
        help=(
            "Intra-op CPU threads (torch.set_num_threads). Some CPU kernels round differently for each thread "
            f"count, so a fixed number gives bit-identical reruns; default {DEFAULT_THREADS}. 0: torch's default "
            "(OMP_NUM_THREADS or the number of cores), whose results depend on the machine."
        ),
    )


def pin_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (0 or None: leave torch's setting); returns the number in use."""
    if threads is None or threads == 0:
        return torch.get_num_threads()
    if threads < 0:
        raise ValueError(
            f"--threads {threads}: must be a number of threads >= 1, or 0 for torch's default. Fix the value."
        )
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
