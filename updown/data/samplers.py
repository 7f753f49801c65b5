"""A training order that survives a restart in the middle of an epoch.

Lightning 2.6 restores the loop counters of a mid-epoch checkpoint (the resumed epoch continues at batch
``k``), but a ``DataLoader(shuffle=True)`` draws a new permutation from the global RNG and starts it from its
first batch, so the resumed epoch trains on some images twice and never on others. Lightning can also restore
a *stateful* DataLoader, but an iterator's own count runs ahead of training by the batch Lightning prefetches,
and by ``prefetch_factor * num_workers`` more with workers. The trainer's batch counter is exact, so
:class:`ResumableTrainingOrder` saves that counter with the datamodule's state (Lightning stores it in every
checkpoint) and the resumed :class:`ResumableShuffleSampler` skips that many batches of the same permutation.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from updown.checkpointing import run_seed
from updown.data.batch_memory import PackedCollate, SlotDataLoader


class ResumableShuffleSampler(DistributedSampler):
    """Shuffles indices by ``(seed, epoch)`` alone, shards them over ranks, and can start an epoch mid-way.

    A ``DistributedSampler`` (the same permutation and sharding), so Lightning keeps it under DDP instead of
    wrapping it in its own. Its length is always the whole epoch's: Lightning counts the resumed epoch's
    batches from where the checkpoint left off.

    Args:
        dataset_size: number of training items.
        seed: the shuffling seed; epoch ``e`` uses the permutation of ``seed + e``.
        num_replicas: number of ranks sharing the epoch.
        rank: this process's rank.
    """

    def __init__(self, dataset_size: int, *, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler reads only len() of its dataset.
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start_epoch: int | None = None
        self.start_index = 0

    def start_at(self, epoch: int, index: int) -> None:
        """Begin with ``epoch``, skipping its first ``index`` items of this rank (the ones already trained on)."""
        self.set_epoch(epoch)
        self.start_epoch, self.start_index = epoch, index

    def __iter__(self) -> Iterator[int]:
        indices = super().__iter__()
        if self.epoch == self.start_epoch and self.start_index:
            return islice(indices, self.start_index, None)
        return indices


class ResumableTrainingOrder:
    """Mixin for LightningDataModules: a shuffled training DataLoader that resumes exactly where it stopped.

    Datamodules using it have ``batch_size`` and ``num_workers`` attributes (see :meth:`shuffled_train_loader`).
    The datamodule's ``state_dict`` (stored in every checkpoint) holds the shuffling seed and the position of
    the next training batch, ``(epoch, batch)``, read from the trainer's progress when the checkpoint is taken;
    ``load_state_dict`` (before the training DataLoader is built) makes :meth:`resumable_train_loader` start
    there.
    """

    _shuffle_seed: int | None = None
    _resume_position: tuple[int, int] | None = None

    def resumable_train_loader(
        self, dataset: Dataset, batch_size: int, **loader_arguments: Any
    ) -> DataLoader:
        """A ``DataLoader`` over ``dataset`` in the resumable shuffled order (``loader_arguments``: workers, collate)."""
        trainer = getattr(self, "trainer", None)
        num_replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if self._shuffle_seed is None:
            self._shuffle_seed = run_seed()
        sampler = ResumableShuffleSampler(
            len(dataset), seed=self._shuffle_seed, num_replicas=num_replicas, rank=rank
        )
        # Lightning sets the epoch only after it has made the first iterator of a (re)loaded DataLoader.
        current_epoch = trainer.current_epoch if trainer is not None else 0
        sampler.set_epoch(current_epoch)
        if self._resume_position is not None and self._resume_position[0] >= current_epoch:
            epoch, batch = self._resume_position
            sampler.start_at(epoch, batch * batch_size)
        return SlotDataLoader(dataset, batch_size=batch_size, sampler=sampler, **loader_arguments)

    @property
    def pin_memory(self) -> bool:
        """Whether the loaders pin their batches: when the Trainer runs on a CUDA device. Lightning then copies a
        batch to the device with ``non_blocking=True`` as an asynchronous DMA, and the host copy into page-locked
        memory runs in the DataLoader's pinning thread instead of in the training loop (from pageable memory the
        CUDA driver makes that copy itself, synchronously)."""
        return self._trainer_device_type() == "cuda"

    @property
    def on_accelerator(self) -> bool:
        """Whether the Trainer runs on an accelerator (any device but the CPU); False without a Trainer."""
        return self._trainer_device_type() not in (None, "cpu")

    def _trainer_device_type(self) -> str | None:
        """``"cuda"``, ``"cpu"``, ``"mps"``, ... of the attached Trainer's root device; None without a Trainer."""
        trainer = getattr(self, "trainer", None)
        device = getattr(getattr(trainer, "strategy", None), "root_device", None)
        return getattr(device, "type", None)

    def loader_arguments(self, dataset: Dataset) -> dict[str, Any]:
        """What every loader of the datamodule shares: its ``num_workers`` (kept alive between epochs),
        :attr:`pin_memory`, and the dataset's ``collate`` packed for the trip from a worker."""
        return {
            "num_workers": self.num_workers,
            "collate_fn": PackedCollate(dataset.collate),
            "persistent_workers": self.num_workers > 0,
            "pin_memory": self.pin_memory,
        }

    def shuffled_train_loader(self, dataset: Dataset) -> DataLoader:
        """:meth:`resumable_train_loader` with the datamodule's ``batch_size`` and :meth:`loader_arguments`:
        every datamodule's ``train_dataloader``."""
        return self.resumable_train_loader(dataset, self.batch_size, **self.loader_arguments(dataset))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"shuffle_seed": self._shuffle_seed}
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            progress = trainer.fit_loop.epoch_loop.batch_progress
            # ``processed`` counts the batches trained on in this epoch, the one a checkpoint is taken after
            # included; once the last one is, the next batch is the first of the next epoch.
            if progress.is_last_batch:
                state["next_batch"] = (trainer.current_epoch + 1, 0)
            else:
                state["next_batch"] = (trainer.current_epoch, progress.current.processed)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("shuffle_seed") is not None:
            self._shuffle_seed = int(state_dict["shuffle_seed"])
        if state_dict.get("next_batch") is not None:
            epoch, batch = state_dict["next_batch"]
            self._resume_position = (int(epoch), int(batch))
