"""A new task on the base classes: multi-label object tagging (docs/extending.md, tests/test_extending.py)."""

import dataclasses

import torch
from torch import nn
from torch.utils.data import Dataset

from updown.config import Config, FeatureEncoderName
from updown.data.base import DataSpec, RegionDataModule
from updown.data.caption_preparation import read_prepared_captions
from updown.data.datasets import collate_regions
from updown.data.readers import RegionFeatures
from updown.data.synthetic import SyntheticWorld
from updown.modules.blocks import build_feature_encoder
from updown.tasks.base import Task
from updown.tasks.optim import OptimizerConfig
from updown.types import RegionBatch


# ----------------------------------------------------------------------- the model: updown/models/tagger.py
@dataclasses.dataclass(frozen=True)
class TaggerConfig(Config):
    """The tagger's hyper-parameters.

    Args:
        attention_size: size of the space where queries meet regions.
        feature_encoder: optional attention block applied to the region features first.
    """

    attention_size: int = 64
    feature_encoder: FeatureEncoderName | None = None


class RegionTagger(nn.Module):
    """Category logits ``(B, C)`` from region features ``(B, R, D)`` and their mask ``(B, R)``: category c pools the
    regions by top-down attention with a learned query, ``a_ci = softmax_i(q_c . W v_i)``, and classifier row c
    reads the result."""

    def __init__(self, image_feature_size: int, num_categories: int, config: TaggerConfig, grid_shape=None):
        super().__init__()
        self.feature_encoder = build_feature_encoder(config.feature_encoder, image_feature_size, grid_shape)
        self.projection = nn.Linear(image_feature_size, config.attention_size, bias=False)
        self.queries = nn.Parameter(0.1 * torch.randn(num_categories, config.attention_size))
        self.classifier = nn.Linear(image_feature_size, num_categories)

    def forward(self, image_features: torch.Tensor, image_features_mask: torch.Tensor) -> torch.Tensor:
        if self.feature_encoder is not None:
            image_features = self.feature_encoder(image_features, image_features_mask)
        # shape: (B, C, R) every category's query against every region
        scores = (self.projection(image_features) @ self.queries.T).transpose(1, 2)
        weights = scores.masked_fill(~image_features_mask[:, None], float("-inf")).softmax(dim=-1)
        # shape: (B, C, D) each category's own view of the image
        pooled = weights @ image_features
        return (pooled * self.classifier.weight).sum(dim=-1) + self.classifier.bias


# --------------------------------------------------------------- the datamodule: updown/data/tagging_data.py
class TaggingBatch(RegionBatch):
    """:class:`RegionBatch` plus ``category_targets (B, C)`` float32: 1 for each category the image shows."""

    category_targets: torch.Tensor


class TaggingDataset(Dataset):
    """One item per image: its regions and their object categories (-1: background)."""

    def __init__(self, features: RegionFeatures, image_ids: list[int], num_categories: int) -> None:
        self.features, self.image_ids, self.num_categories = features, image_ids, num_categories

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        return self.features.pending(image_id), self.features.extra(image_id, "region_category")

    def collate(self, items) -> TaggingBatch:
        batch = collate_regions([regions for regions, _ in items])
        targets = batch["category_targets"] = torch.zeros(len(items), self.num_categories)
        for row, (_, categories) in enumerate(items):
            targets[row, categories[categories >= 0]] = 1.0
        return batch


class TaggingDataModule(RegionDataModule):
    """Images whose regions are labelled with object categories (the synthetic world's are).

    Args:
        captions_jsonpath: a prepared ``captions.json`` (tools/prepare_captions.py): the images of each split.
        **kwargs: the arguments of :class:`~updown.data.base.RegionDataModule`.
    """

    def __init__(self, captions_jsonpath: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.captions_jsonpath = captions_jsonpath

    def use_synthetic_world(self, world: SyntheticWorld) -> None:
        self.captions_jsonpath = str(world.captions_dir / "captions.json")

    def data_spec(self) -> DataSpec:
        if (names := self.open_features().region_category_names) is None:
            raise ValueError(f"{self.features_h5path}: the regions have no region_category labels to tag.")
        return DataSpec(self.features.feature_size, self.features.grid_shape, {"category": names})

    def build_dataset(self, split: str) -> TaggingDataset:
        image_ids = [image.image_id for image in read_prepared_captions(self.captions_jsonpath, [split])]
        self.features.check_ids(image_ids, self.captions_jsonpath)
        return TaggingDataset(self.features, image_ids, len(self.features.region_category_names))


# ---------------------------------------------------------------------------- the task: updown/tasks/tagging.py
ADAM = OptimizerConfig("adam", 1e-3)


class TaggingTask(Task):
    """Train :class:`RegionTagger` with binary cross-entropy per category; validate by mean average precision.

    Args:
        net: the tagger's hyper-parameters.
        optimizer: the optimiser and schedule (Adam 1e-3, constant, by default).
    """

    datamodule_class = TaggingDataModule
    vocabulary_names = ("category",)
    monitor, monitor_mode = "val/map", "max"

    def __init__(self, net: TaggerConfig = TaggerConfig(), optimizer: OptimizerConfig = ADAM) -> None:
        super().__init__(optimizer)
        self.net_config = TaggerConfig.coerce(net)
        self._outputs: list[dict] = []

    def build_model(self, spec: DataSpec) -> None:
        categories = spec.vocabularies["category"]
        self.model = RegionTagger(spec.image_feature_size, len(categories), self.net_config, spec.grid_shape)

    def training_step(self, batch: TaggingBatch, batch_index: int) -> torch.Tensor:
        logits = self.model(batch["image_features"], batch["image_features_mask"])
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["category_targets"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: TaggingBatch, batch_index: int) -> None:
        logits = self.model(batch["image_features"], batch["image_features_mask"]).cpu()
        # One record per image: under DDP the sampler repeats images, and score_outputs keeps one of each.
        targets = batch["category_targets"].cpu()
        for row, image_id in enumerate(batch["image_id"].tolist()):
            self._outputs.append({"image_id": image_id, "logits": logits[row], "targets": targets[row]})

    def on_validation_epoch_end(self) -> None:
        outputs, self._outputs = self._outputs, []
        self.log_scores("val", self.score_on_rank_zero(outputs, self.score_outputs))

    def score_outputs(self, outputs: list[dict]) -> dict[str, float]:
        """Mean average precision over the categories the split shows, one copy of each image."""
        by_image = {item["image_id"]: item for item in outputs}
        self.validation_num_samples = len(by_image)
        logits = torch.stack([item["logits"] for item in by_image.values()])
        targets = torch.stack([item["targets"] for item in by_image.values()])
        # shape: (N, C) each category's targets in the order of its scores, highest first
        hits = targets.gather(0, logits.argsort(dim=0, descending=True))
        precision = hits.cumsum(dim=0) / torch.arange(1, len(hits) + 1)[:, None]
        average_precision = (precision * hits).sum(dim=0) / hits.sum(dim=0).clamp_min(1)
        return {"map": float(average_precision[hits.sum(dim=0) > 0].mean())}
