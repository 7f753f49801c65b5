"""What every datamodule shares, and the interface tasks reach data through.

:class:`RegionDataModule` holds the wiring once: one :class:`~updown.data.readers.RegionFeatures` reader that
all splits share, the train / val / test splits, the DataLoaders (a resumable shuffled order for training),
and the synthetic world as the default when no paths are given. A subclass adds its files and implements
three methods: :meth:`~RegionDataModule.use_synthetic_world` (where the world keeps its files),
:meth:`~RegionDataModule.build_dataset` (one split) and :meth:`~RegionDataModule.data_spec`.

:class:`DataSpec` is what a task needs from the data to build its model (feature size, grid shape, the
vocabularies); checkpoints store it, so a checkpoint rebuilds its model without the data, and a checkpoint
whose vocabularies differ from the data's is refused with both named (:func:`check_vocabulary`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from updown.config import NonNegativeInt, PositiveInt, check_arguments
from updown.data.batch_memory import SlotDataLoader
from updown.data.feature_store import FeatureStoreKind, resolve_feature_store
from updown.data.readers import RegionFeatures
from updown.data.samplers import ResumableTrainingOrder
from updown.data.synthetic import SyntheticSpec, SyntheticWorld, ensure_synthetic_world


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a model is built from: the data's feature size, grid shape and vocabularies.

    Args:
        image_feature_size: ``D``, the size of one region feature.
        grid_shape: ``(H, W)`` of grid features (2-D attention blocks need it), None for region features.
        vocabularies: token lists by name, e.g. ``{"caption": [...]}`` or ``{"question": [...], "answer":
            [...]}`` (answer vocabularies are lists of answer strings).
        source: where the vocabularies came from, named in mismatch errors (a file or folder).
    """

    image_feature_size: int
    grid_shape: tuple[int, int] | None
    vocabularies: dict[str, list[str]]
    source: str = "the data"

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "image_feature_size": self.image_feature_size,
            "grid_shape": None if self.grid_shape is None else list(self.grid_shape),
            "vocabularies": self.vocabularies,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], source: str) -> DataSpec | None:
        """The spec a checkpoint stores (also read from the keys that checkpoints before 0.4 used), or None."""
        stored = checkpoint.get("data_spec")
        if stored is None:
            vocabularies = {
                name: checkpoint[key]
                for name, key in (
                    ("caption", "vocabulary"), ("question", "question_vocabulary"), ("answer", "answer_vocabulary")
                )
                if key in checkpoint
            }  # fmt: skip
            if not vocabularies or "image_feature_size" not in checkpoint:
                return None
            stored = {**checkpoint, "vocabularies": vocabularies}
        grid = stored.get("grid_shape")
        return cls(
            int(stored["image_feature_size"]),
            None if grid is None else tuple(grid),
            stored["vocabularies"],
            source,
        )

    def check_matches(self, other: DataSpec) -> None:
        """Refuse ``other`` (the data) when its vocabularies differ from this spec's (a checkpoint's)."""
        for name, tokens in self.vocabularies.items():
            if name not in other.vocabularies:
                raise ValueError(
                    f"{self.source} has a {name} vocabulary but {other.source} has none: the checkpoint was "
                    "trained for another task. Pass a checkpoint of this task."
                )
            check_vocabulary(name, tokens, other.vocabularies[name], self.source, other.source)


def check_vocabulary(
    name: str, expected: Sequence[str], actual: Sequence[str], expected_source: str, actual_source: str
) -> None:
    """Refuse two different vocabularies (``name``: "caption", "question" or "answer"), naming both sources and
    the first difference."""
    if list(expected) == list(actual):
        return
    differing = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), None)
    files = {
        "caption": "vocabulary.json",
        "question": "question_vocabulary.json",
        "answer": "answer_vocabulary.json",
    }
    unit, title = ("answer classes", "Answer vocabulary") if name == "answer" else ("tokens", "Vocabulary")
    file = files.get(name, f"{name} vocabulary")
    position = "class" if name == "answer" else "index"
    where = (
        f"first difference at {position} {differing}: {expected[differing]!r} vs {actual[differing]!r}"
        if differing is not None
        else "one is a prefix of the other"
    )
    raise ValueError(
        f"{title} mismatch: {expected_source} has {len(expected)} {unit}, {actual_source} has {len(actual)} "
        f"({where}). Use the {file} the checkpoint was trained with, or retrain."
    )


class RegionDataModule(ResumableTrainingOrder, pl.LightningDataModule):
    """Base of the datamodules: region features shared by every split, splits, loaders, synthetic default.

    With ``features_h5path`` None the synthetic world is generated on first use (docs/design.md, section 4)
    and the subclass points its other paths into it (:meth:`use_synthetic_world`). Machine settings
    (``num_workers``, ``data_root``) are arguments too, but belong on the command line, not in experiment YAML.

    Args:
        features_h5path: region-feature HDF5 file(s) holding every image of the splits used. None: the
            synthetic world.
        train_splits: splits trained on (None: the subclass's ``default_train_splits``).
        val_split: split scored during training.
        test_split: split scored by ``test`` and decoded by prediction.
        batch_size: training items per batch (what an item is depends on the task).
        eval_batch_size: items per batch when evaluating or predicting.
        num_workers: DataLoader worker processes (a machine setting).
        feature_store: where the region features live (:mod:`updown.data.feature_store`; a machine setting):
            ``disk`` (read per item, bounded memory), ``host`` (all in host memory, in the file's dtype) or
            ``device`` (all on the accelerator, batches gathered there: no features cross the host-to-device
            link per batch). None: ``disk``, or ``host`` with the older ``in_memory: true``.
        in_memory: the older name of ``feature_store: host`` (still accepted; not together with another store).
        data_root: where the synthetic world is cached (default ``$UPDOWN_DATA`` or the user cache dir).
        synthetic: parameters of the synthetic world, used when ``features_h5path`` is None.
    """

    default_train_splits: tuple[str, ...] = ("train",)

    def __init__(
        self,
        features_h5path: str | list[str] | None = None,
        train_splits: list[str] | None = None,
        val_split: str = "val",
        test_split: str = "test",
        batch_size: PositiveInt = 20,
        eval_batch_size: PositiveInt = 50,
        num_workers: NonNegativeInt = 0,
        feature_store: FeatureStoreKind | None = None,
        in_memory: bool = False,
        data_root: str | None = None,
        synthetic: SyntheticSpec | None = None,
    ) -> None:
        super().__init__()
        # Stored in checkpoints (with the subclass's arguments), so prediction finds the data a checkpoint used.
        self.save_hyperparameters()
        # Every argument's range, as its annotation declares it (PositiveInt, ...): what LightningCLI checks at
        # parse time, checked here for datamodules built from Python (subclasses' arguments included).
        self.hparams.update(check_arguments(type(self), dict(self.hparams), "data.init_args"))
        self.features_h5path = features_h5path
        self.train_splits = list(train_splits or self.default_train_splits)
        self.val_split, self.test_split = val_split, test_split
        self.batch_size, self.eval_batch_size = self.hparams.batch_size, self.hparams.eval_batch_size
        self.num_workers = self.hparams.num_workers
        self.feature_store = resolve_feature_store(feature_store, in_memory, "data.init_args")
        self.in_memory = self.feature_store == "host"
        self.data_root = data_root
        # Checkpoints store the spec as a plain dict.
        self.synthetic = SyntheticSpec(**synthetic) if isinstance(synthetic, dict) else synthetic
        self.features: RegionFeatures | None = None
        self._datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------------------- what a subclass adds
    def use_synthetic_world(self, world: SyntheticWorld) -> None:
        """Point the subclass's own paths into the synthetic ``world`` (called once, before any read)."""
        raise NotImplementedError

    def build_dataset(self, split: str) -> Dataset:
        """The dataset of one evaluation split (one item per image or question, with what scoring needs)."""
        raise NotImplementedError

    def build_train_dataset(self, splits: list[str]) -> Dataset:
        """The training dataset over ``splits`` (default: :meth:`build_dataset` of the one split)."""
        if len(splits) != 1:
            raise NotImplementedError(f"{type(self).__name__} trains on one split, got {splits}.")
        return self.build_dataset(splits[0])

    def data_spec(self) -> DataSpec:
        """What a model is built from (:class:`DataSpec`)."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------- shared wiring
    def prepare_data(self) -> None:
        # Runs on one process per node before setup(): generate the synthetic world once.
        self.resolve_paths()

    def resolve_paths(self) -> None:
        """Generate (or find) the synthetic world when no features were given."""
        if self.features_h5path is None:
            world = ensure_synthetic_world(self.synthetic or SyntheticSpec(), self.data_root)
            self.use_synthetic_world(world)
            self.features_h5path = str(world.features_h5path)

    def open_features(self) -> RegionFeatures:
        """The region-feature reader every split shares (opened once). The ``device`` store loads onto the
        Trainer's device when one is attached (``setup`` runs after the Trainer chose it), else onto the CPU
        (moved on the first batch)."""
        if self.features is None:
            self.resolve_paths()
            trainer = getattr(self, "trainer", None)
            device = trainer.strategy.root_device if trainer is not None else "cpu"
            self.features = RegionFeatures(
                self.features_h5path, feature_store=self.feature_store, device=device
            )
        return self.features

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Finish the batch on its device (:meth:`~updown.data.readers.RegionFeatures.finish_batch`): with the
        ``device`` feature store, gather its features there (the collate function sent only their rows); on an
        accelerator, convert float16 features to float32 there. Any other batch passes unchanged."""
        if self.features is not None and isinstance(batch, dict):
            return self.features.finish_batch(batch)
        return batch

    def dataset(self, split: str) -> Dataset:
        """The evaluation dataset of ``split`` (built once)."""
        if split not in self._datasets:
            self.open_features()
            self._datasets[split] = self.build_dataset(split)
        return self._datasets[split]

    def train_dataset(self) -> Dataset:
        """The training dataset over ``train_splits`` (built once)."""
        key = "train:" + "+".join(self.train_splits)
        if key not in self._datasets:
            self.open_features()
            self._datasets[key] = self.build_train_dataset(self.train_splits)
        return self._datasets[key]

    def setup(self, stage: str | None = None) -> None:
        # On an accelerator, batches of float16 files stay float16 until they are on it: half the bytes to read
        # into, to move from the workers and to copy to the device, and no conversion on the host.
        self.open_features().convert_on_device = self.on_accelerator
        if stage in ("fit", None):
            self.train_dataset()
        if stage in ("fit", "validate", None):
            self.dataset(self.val_split)
        if stage in ("test", "predict", None):
            self.dataset(self.test_split)

    def evaluation_loader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """The DataLoader of ``split`` in its order (no shuffling), ``eval_batch_size`` items per batch."""
        dataset = self.dataset(split)
        return SlotDataLoader(
            dataset,
            batch_size=batch_size or self.eval_batch_size,
            shuffle=False,
            **self.loader_arguments(dataset),
        )

    def train_dataloader(self) -> DataLoader:
        # Shuffled by (seed, epoch), so a run resumed mid-epoch sees exactly the batches the epoch had left.
        return self.shuffled_train_loader(self.train_dataset())

    def val_dataloader(self) -> DataLoader:
        return self.evaluation_loader(self.val_split)

    def test_dataloader(self) -> DataLoader:
        return self.evaluation_loader(self.test_split)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


def datamodule_from_checkpoint(datamodule_class: type, checkpoint: dict, **overrides):
    """Rebuild the datamodule a checkpoint was trained with (its saved arguments), with ``overrides`` applied.

    Arguments that are None in ``overrides`` keep the saved value; LightningCLI's bookkeeping keys are dropped.
    """
    accepted = set()
    for cls in datamodule_class.__mro__:
        if "__init__" in vars(cls):
            accepted |= set(inspect.signature(cls.__init__).parameters)
    arguments = {
        k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items() if k in accepted
    }
    arguments.update({k: v for k, v in overrides.items() if v is not None})
    return datamodule_class(**arguments)
