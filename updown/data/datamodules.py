"""Caption data: bottom-up region features with prepared captions (tools/prepare_captions.py).

The shared wiring (features, splits, loaders, the synthetic default) is :class:`~updown.data.base.RegionDataModule`'s.
:class:`CaptionFilesDataModule` adds the caption files, which captioning and retrieval
(:class:`~updown.data.retrieval_data.RetrievalDataModule`) share; :class:`CaptioningDataModule` adds its datasets.
"""

from __future__ import annotations

from pathlib import Path

from updown.config import PositiveInt
from updown.data.base import DataSpec, RegionDataModule, datamodule_from_checkpoint
from updown.data.caption_preparation import ImageCaptions, read_prepared_captions
from updown.data.datasets import CaptionEvaluationDataset, CaptionTrainingDataset
from updown.data.synthetic import SyntheticWorld
from updown.data.vocabulary import Vocabulary

__all__ = ["CaptionFilesDataModule", "CaptioningDataModule", "datamodule_from_checkpoint"]


class CaptionFilesDataModule(RegionDataModule):
    """Region features with the prepared caption files; subclasses build the datasets.

    Args:
        captions_jsonpath: prepared ``captions.json`` (tools/prepare_captions.py).
        vocabulary_path: ``vocabulary.json`` written beside it.
        max_caption_length: training captions are cut to this many words (the paper decodes up to 20).
        **kwargs: the arguments of :class:`~updown.data.base.RegionDataModule` (features, splits, batch
            sizes, workers, synthetic world); ``batch_size`` counts images, each with all its captions.
    """

    default_train_splits = ("train", "restval")

    def __init__(
        self,
        captions_jsonpath: str | None = None,
        vocabulary_path: str | None = None,
        max_caption_length: PositiveInt = 20,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if self.features_h5path is None and (captions_jsonpath or vocabulary_path):
            raise ValueError(
                "data: captions_jsonpath / vocabulary_path were given without features_h5path. Give all three "
                "for real data, or none for the synthetic world."
            )
        if self.features_h5path is not None and not (captions_jsonpath and vocabulary_path):
            raise ValueError(
                "data: features_h5path needs captions_jsonpath and vocabulary_path (from tools/prepare_captions.py)."
            )
        self.captions_jsonpath = captions_jsonpath
        self.vocabulary_path = vocabulary_path
        self.max_caption_length = self.hparams.max_caption_length
        self._vocabulary: Vocabulary | None = None

    def use_synthetic_world(self, world: SyntheticWorld) -> None:
        self.captions_jsonpath = str(world.captions_dir / "captions.json")
        self.vocabulary_path = str(world.captions_dir / "vocabulary.json")

    @property
    def vocabulary(self) -> Vocabulary:
        """The caption vocabulary (read on first use)."""
        if self._vocabulary is None:
            self.resolve_paths()
            self._vocabulary = Vocabulary.from_file(self.vocabulary_path)
        return self._vocabulary

    def data_spec(self) -> DataSpec:
        features = self.open_features()
        return DataSpec(
            features.feature_size,
            features.grid_shape,
            {"caption": self.vocabulary.tokens},
            source=f"the data ({self.vocabulary_path})",
        )

    def references_jsonpath(self, split: str) -> Path:
        """COCO-format raw references of ``split``, written beside the prepared captions."""
        self.resolve_paths()
        return Path(self.captions_jsonpath).parent / f"references_{split}.json"

    def cider_df_path(self, eos_as_word: bool = False) -> Path:
        """The CIDEr-D document frequencies of the training references, beside the prepared captions: where the
        synthetic world writes them and where ``tools/build_cider_df.py`` writes them for real data by default."""
        self.resolve_paths()
        return Path(self.captions_jsonpath).parent / ("cider_df_eos.json" if eos_as_word else "cider_df.json")

    def images(self, splits: list[str]) -> list[ImageCaptions]:
        """The prepared images of ``splits``, every id checked against the feature file."""
        images = read_prepared_captions(self.captions_jsonpath, splits)
        self.open_features().check_ids([i.image_id for i in images], self.captions_jsonpath)
        return images

    def training_references(self) -> dict[int, list[list[str]]]:
        """The tokenised training captions of each training image (SCST's reward references)."""
        return {image.image_id: image.tokens for image in self.images(self.train_splits)}


class CaptioningDataModule(CaptionFilesDataModule):
    """Captions with bottom-up region features: a training item is an image with all its captions, an
    evaluation item an image with its raw references (arguments: :class:`CaptionFilesDataModule`'s)."""

    def build_train_dataset(self, splits: list[str]) -> CaptionTrainingDataset:
        return CaptionTrainingDataset(
            self.features, self.images(splits), self.vocabulary, self.max_caption_length
        )

    def build_dataset(self, split: str) -> CaptionEvaluationDataset:
        """One item per image of ``split``, with raw references."""
        return CaptionEvaluationDataset(self.features, self.images([split]))
