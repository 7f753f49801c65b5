"""LightningDataModules. Each builds ONE :class:`RegionFeatures` reader that all its splits share.

With no paths given, a datamodule uses the synthetic world (generated on first use, DESIGN 4), so every
command runs out of the box; with paths, it reads prepared real data. Machine settings (``num_workers``,
``data_root``) are arguments too, but belong on the command line, not in experiment YAML.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from updown.data.caption_preparation import read_prepared_captions
from updown.data.datasets import CaptionEvaluationDataset, CaptionTrainingDataset
from updown.data.readers import RegionFeatures
from updown.data.samplers import ResumableTrainingOrder
from updown.data.synthetic import SyntheticSpec, ensure_synthetic_world
from updown.data.vocabulary import Vocabulary


def datamodule_from_checkpoint(datamodule_class: type, checkpoint: dict, **overrides):
    """Rebuild the datamodule a checkpoint was trained with (its saved arguments), with ``overrides`` applied.

    Arguments that are None in ``overrides`` keep the saved value; LightningCLI's bookkeeping keys are dropped.
    """
    import inspect

    accepted = inspect.signature(datamodule_class.__init__).parameters
    arguments = {
        k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items() if k in accepted
    }
    arguments.update({k: v for k, v in overrides.items() if v is not None})
    return datamodule_class(**arguments)


class CaptioningDataModule(ResumableTrainingOrder, pl.LightningDataModule):
    """Captions with bottom-up region features.

    Args:
        features_h5path: region-feature HDF5 file(s) holding every image of the splits used. None: the
            synthetic world.
        captions_jsonpath: prepared ``captions.json`` (tools/prepare_captions.py).
        vocabulary_path: ``vocabulary.json`` written beside it.
        train_splits: splits trained on (Karpathy: train + restval).
        val_split: split decoded and scored during training.
        test_split: split decoded by ``test`` / prediction.
        batch_size: training images per batch; each brings all its captions (COCO: 5).
        eval_batch_size: images per batch when decoding.
        max_caption_length: training captions are cut to this many words (the paper decodes up to 20).
        num_workers: DataLoader worker processes (a machine setting).
        in_memory: load all features into memory once (fast epochs, needs the RAM).
        data_root: where the synthetic world is cached (default ``$UPDOWN_DATA`` or the user cache dir).
        synthetic: parameters of the synthetic world, used when ``features_h5path`` is None.
    """

    def __init__(
        self,
        features_h5path: str | list[str] | None = None,
        captions_jsonpath: str | None = None,
        vocabulary_path: str | None = None,
        train_splits: list[str] | None = None,
        val_split: str = "val",
        test_split: str = "test",
        batch_size: int = 20,
        eval_batch_size: int = 50,
        max_caption_length: int = 20,
        num_workers: int = 0,
        in_memory: bool = False,
        data_root: str | None = None,
        synthetic: SyntheticSpec | None = None,
    ) -> None:
        super().__init__()
        # Stored in checkpoints, so prediction can find the data a checkpoint was trained on.
        self.save_hyperparameters()
        if features_h5path is None and (captions_jsonpath or vocabulary_path):
            raise ValueError(
                "data: captions_jsonpath / vocabulary_path were given without features_h5path. Give all three "
                "for real data, or none for the synthetic world."
            )
        if features_h5path is not None and not (captions_jsonpath and vocabulary_path):
            raise ValueError(
                "data: features_h5path needs captions_jsonpath and vocabulary_path (from tools/prepare_captions.py)."
            )
        self.features_h5path = features_h5path
        self.captions_jsonpath = captions_jsonpath
        self.vocabulary_path = vocabulary_path
        self.train_splits = train_splits or ["train", "restval"]
        self.val_split, self.test_split = val_split, test_split
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_caption_length = max_caption_length
        self.num_workers, self.in_memory = num_workers, in_memory
        # Checkpoints store the spec as a plain dict.
        self.data_root = data_root
        self.synthetic = SyntheticSpec(**synthetic) if isinstance(synthetic, dict) else synthetic
        self.features: RegionFeatures | None = None
        self._vocabulary: Vocabulary | None = None
        self._datasets: dict = {}

    def prepare_data(self) -> None:
        # Runs on one process per node before setup(): generate the synthetic world once.
        if self.features_h5path is None:
            self._resolve_paths()

    def _resolve_paths(self) -> None:
        if self.features_h5path is None:
            world = ensure_synthetic_world(self.synthetic or SyntheticSpec(), self.data_root)
            self.features_h5path = str(world.features_h5path)
            self.captions_jsonpath = str(world.captions_dir / "captions.json")
            self.vocabulary_path = str(world.captions_dir / "vocabulary.json")

    @property
    def vocabulary(self) -> Vocabulary:
        """The caption vocabulary (read on first use)."""
        if self._vocabulary is None:
            self._resolve_paths()
            self._vocabulary = Vocabulary.from_file(self.vocabulary_path)
        return self._vocabulary

    def references_jsonpath(self, split: str) -> Path:
        """COCO-format raw references of ``split``, written beside the prepared captions."""
        self._resolve_paths()
        return Path(self.captions_jsonpath).parent / f"references_{split}.json"

    def cider_df_path(self, eos_as_word: bool = False) -> Path:
        """Where the synthetic world keeps the CIDEr-D document frequencies of its training references (real data:
        write them with tools/build_cider_df.py and give the SCST task their path)."""
        self._resolve_paths()
        return Path(self.captions_jsonpath).parent / ("cider_df_eos.json" if eos_as_word else "cider_df.json")

    def setup(self, stage: str | None = None) -> None:
        self._resolve_paths()
        if self.features is None:
            self.features = RegionFeatures(self.features_h5path, in_memory=self.in_memory)
        if stage in ("fit", None) and "train" not in self._datasets:
            images = read_prepared_captions(self.captions_jsonpath, self.train_splits)
            self.features.check_ids([i.image_id for i in images], self.captions_jsonpath)
            self._datasets["train"] = CaptionTrainingDataset(
                self.features, images, self.vocabulary, self.max_caption_length
            )
        for split in (self.val_split, self.test_split):
            if split not in self._datasets and stage in ("fit", "validate", "test", "predict", None):
                if split == self.test_split and stage in ("fit", "validate"):
                    continue
                self._datasets[split] = self.evaluation_dataset(split)

    def evaluation_dataset(self, split: str) -> CaptionEvaluationDataset:
        """One item per image of ``split``, with raw references."""
        images = read_prepared_captions(self.captions_jsonpath, [split])
        self.features.check_ids([i.image_id for i in images], self.captions_jsonpath)
        return CaptionEvaluationDataset(self.features, images)

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=dataset.collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # Shuffled by (seed, epoch), so a run resumed mid-epoch sees exactly the batches the epoch had left.
        return self.shuffled_train_loader(self._datasets["train"])

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._datasets[self.val_split], self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._datasets[self.test_split], self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
