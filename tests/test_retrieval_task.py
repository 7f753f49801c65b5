"""RetrievalTask and RetrievalDataModule: the masked ranking loss against a brute-force loop, the 1K protocol
against the metric module, batch layouts against captions.json, and `updown.fit` end to end on a tiny world,
whose validation recalls must equal those of a similarity matrix computed directly from the model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import REALDATA, ROOT, TINY_SPEC, synthetic_world_args

from updown.data.caption_preparation import ImageCaptions, read_prepared_captions, read_split_list
from updown.data.readers import RegionFeatures
from updown.data.retrieval_data import RetrievalDataModule, RetrievalEvaluationDataset
from updown.data.vocabulary import Vocabulary
from updown.fit import main
from updown.losses import retrieval_loss
from updown.metrics.retrieval import (
    COCO_FOLD_SIZE,
    COCO_NUM_FOLDS,
    check_protocol,
    coco_1k_metrics,
    collect_embeddings,
    protocol_metrics,
    retrieval_metrics,
)
from updown.models.retrieval import BFANConfig
from updown.tasks.retrieval import RetrievalTask

CONFIG = ROOT / "configs" / "retrieval" / "synthetic.yaml"
BATCH_SIZE = 64
EVAL_BATCH_SIZE = 5  # several evaluation batches with different paddings


def tiny_args(root: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        "--config", str(CONFIG),
        "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.net.word_embedding_size", "8",
        "--model.init_args.net.joint_embedding_size", "16",
        "--data.init_args.batch_size", str(BATCH_SIZE),
        "--data.init_args.eval_batch_size", str(EVAL_BATCH_SIZE),
        *synthetic_world_args(data_root),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory, tiny_world) -> Path:
    """One 2-epoch fit of the synthetic retrieval config; returns its run directory."""
    root = tmp_path_factory.mktemp("retrieval_run")
    assert main(tiny_args(root, tiny_world.root.parent)) == 0
    return root / "lightning_logs" / "version_0"


@pytest.fixture(scope="module")
def datamodule(tiny_world) -> RetrievalDataModule:
    module = RetrievalDataModule(
        data_root=str(tiny_world.root.parent),
        synthetic=TINY_SPEC,
        batch_size=8,
        eval_batch_size=EVAL_BATCH_SIZE,
    )
    module.setup("fit")
    return module


# ------------------------------------------------------------------------------------------------------ loss
def brute_force_loss(
    similarity: torch.Tensor, image_id: list[int], margin: float, max_violation: bool
) -> float:
    """VSE++'s loss written pair by pair, a caption of the same image never counting as a negative."""
    size = len(image_id)
    total = 0.0
    for i in range(size):
        caption_hinges = [
            max(0.0, margin - float(similarity[i, i]) + float(similarity[i, j]))
            for j in range(size)
            if image_id[j] != image_id[i]
        ]
        image_hinges = [
            max(0.0, margin - float(similarity[i, i]) + float(similarity[j, i]))
            for j in range(size)
            if image_id[j] != image_id[i]
        ]
        for hinges in (caption_hinges, image_hinges):
            total += (max(hinges) if hinges else 0.0) if max_violation else sum(hinges)
    return total


@pytest.mark.parametrize("max_violation", [True, False])
def test_loss_ignores_captions_of_the_same_image(max_violation):
    torch.manual_seed(0)
    similarity = torch.randn(7, 7).requires_grad_()
    image_id = [4, 9, 4, 2, 9, 4, 5]
    loss = retrieval_loss(similarity, torch.tensor(image_id), 0.2, max_violation)
    assert float(loss) == pytest.approx(
        brute_force_loss(similarity.detach(), image_id, 0.2, max_violation), rel=1e-6
    )
    loss.backward()
    assert torch.isfinite(similarity.grad).all()
    same_image = (torch.tensor(image_id)[:, None] == torch.tensor(image_id)[None, :]) & ~torch.eye(
        7, dtype=torch.bool
    )
    assert (similarity.grad[same_image] == 0).all()
    assert similarity.grad.abs().sum() > 0


def test_a_caption_of_the_same_image_scoring_highest_costs_nothing():
    # Pair 0 and pair 1 share an image; caption 1 outscores caption 0 for it, which is no violation.
    similarity = torch.tensor([[0.5, 0.9, 0.0], [0.9, 0.5, 0.0], [0.0, 0.0, 0.5]])
    assert float(retrieval_loss(similarity, torch.tensor([1, 1, 2]), 0.2)) == 0.0
    assert float(retrieval_loss(similarity, torch.tensor([1, 3, 2]), 0.2)) == pytest.approx(4 * 0.6)


# -------------------------------------------------------------------------------------------------- protocols
def test_1k_protocol_scores_only_the_folds_and_equals_coco_1k_metrics():
    torch.manual_seed(1)
    fold_size, num_folds, per_image = 4, 3, 5
    similarity = torch.randn(fold_size * num_folds, fold_size * num_folds * per_image)
    requested = []

    def score(images: slice, captions: slice) -> torch.Tensor:
        requested.append((images.start, images.stop, captions.start, captions.stop))
        return similarity[images, captions]

    metrics = protocol_metrics(score, fold_size * num_folds, "1k", per_image, fold_size, num_folds)
    expected = coco_1k_metrics(similarity, per_image, fold_size, num_folds)
    assert metrics == pytest.approx(expected)
    assert requested == [(4 * f, 4 * f + 4, 20 * f, 20 * f + 20) for f in range(num_folds)]
    full = protocol_metrics(score, fold_size * num_folds, "full", per_image)
    assert full == pytest.approx(retrieval_metrics(similarity, per_image))
    assert full["rsum"] != pytest.approx(metrics["rsum"])  # the protocols really differ


def test_coco_protocols_need_5000_images():
    check_protocol("full", 12, "val")
    check_protocol("5k", 5000, "test")
    with pytest.raises(ValueError, match="needs the 5000 images.*has 12.*protocol: full"):
        check_protocol("1k", 12, "val")
    with pytest.raises(ValueError, match=r"protocol='2k' is not one of \('full', '1k', '5k'\)"):
        RetrievalTask(protocol="2k")


def test_the_real_karpathy_splits_fit_the_coco_protocols():
    for name in ("karpathy_test_images.txt", "karpathy_val_images.txt"):
        image_ids = read_split_list(REALDATA / "karpathy" / name)
        assert len(set(image_ids)) == len(image_ids) == COCO_FOLD_SIZE * COCO_NUM_FOLDS
        check_protocol("1k", len(image_ids), name)
        check_protocol("5k", len(image_ids), name)


def test_collected_embeddings_are_in_split_order_once_each_whatever_the_ranks_sent():
    torch.manual_seed(2)
    num_images, per_image, size = 7, 2, 3
    boxes = [3, 5, 2, 4, 1, 5, 3]
    words = [[2, 4], [3, 1], [5, 2], [1, 1], [4, 3], [2, 2], [3, 5]]
    regions = [torch.randn(n, size) for n in boxes]
    captions = [[torch.randn(t, size) for t in image_words] for image_words in words]

    def batch(indices: list[int]) -> dict:
        longest_r = max(boxes[i] for i in indices)
        longest_t = max(t for i in indices for t in words[i])
        output = {
            "dataset_index": torch.tensor(indices),
            "image_embeddings": torch.zeros(len(indices), longest_r, size),
            "image_mask": torch.zeros(len(indices), longest_r, dtype=torch.bool),
            "word_embeddings": torch.zeros(len(indices) * per_image, longest_t, size),
            "caption_mask": torch.zeros(len(indices) * per_image, longest_t, dtype=torch.bool),
        }
        for row, i in enumerate(indices):
            output["image_embeddings"][row, : boxes[i]] = regions[i]
            output["image_mask"][row, : boxes[i]] = True
            for k in range(per_image):
                output["word_embeddings"][row * per_image + k, : words[i][k]] = captions[i][k]
                output["caption_mask"][row * per_image + k, : words[i][k]] = True
        return output

    # Two ranks of a DistributedSampler: interleaved indices, image 0 repeated to even them out.
    collected = collect_embeddings([batch([0, 2]), batch([4, 6]), batch([1, 3]), batch([5, 0])])
    assert collected["image_embeddings"].shape == (num_images, max(boxes), size)
    assert collected["word_embeddings"].shape == (num_images * per_image, 5, size)
    for i in range(num_images):
        assert torch.equal(collected["image_embeddings"][i, : boxes[i]], regions[i])
        assert (
            collected["image_mask"][i].sum() == boxes[i]
            and not collected["image_embeddings"][i, boxes[i] :].any()
        )
        for k in range(per_image):
            row = i * per_image + k
            assert torch.equal(collected["word_embeddings"][row, : words[i][k]], captions[i][k])
            assert collected["caption_mask"][row].sum() == words[i][k]


# ------------------------------------------------------------------------------------------------------- data
def test_training_batches_pair_each_image_with_one_of_its_captions(datamodule, tiny_world):
    images = {
        i.image_id: i for i in read_prepared_captions(datamodule.captions_jsonpath, ["train", "restval"])
    }
    dataset = datamodule.train_dataloader().dataset
    assert len(dataset) == 5 * len(images) == 5 * TINY_SPEC.num_train
    batch = next(iter(datamodule.train_dataloader()))
    vocabulary = datamodule.vocabulary
    # Item by item, every image's captions in order (the dataset keeps them as flat arrays).
    items = [dataset[i] for i in range(len(dataset))]
    expected = [(i.image_id, vocabulary.encode(t)) for i in images.values() for t in i.tokens[:5]]
    assert [(regions.image_id, caption) for regions, caption in items] == expected
    for row, image_id in enumerate(batch["image_id"].tolist()):
        length = int(batch["caption_lengths"][row])
        tokens = batch["caption_tokens"][row, :length].tolist()
        assert tokens in [vocabulary.encode(t) for t in images[image_id].tokens]
        assert int(batch["image_features_mask"][row].sum()) == datamodule.features.num_boxes(image_id)


def test_evaluation_batches_list_five_captions_per_image_in_image_order(datamodule):
    images = read_prepared_captions(datamodule.captions_jsonpath, ["val"])
    batches = list(datamodule.val_dataloader())
    assert [i for b in batches for i in b["dataset_index"].tolist()] == list(range(TINY_SPEC.num_val))
    vocabulary = datamodule.vocabulary
    for batch in batches:
        assert batch["caption_tokens"].size(0) == 5 * batch["image_id"].numel()
        for j in range(batch["caption_tokens"].size(0)):
            image = images[int(batch["dataset_index"][j // 5])]
            assert int(batch["image_id"][j // 5]) == image.image_id
            tokens = batch["caption_tokens"][j, : int(batch["caption_lengths"][j])].tolist()
            assert tokens == vocabulary.encode(image.tokens[j % 5])


def test_an_image_with_too_few_captions_is_refused(datamodule):
    image_id = datamodule.features.image_ids[0]
    images = [ImageCaptions(image_id, "val", ["a dog"] * 4, [["a", "dog"]] * 4)]
    with pytest.raises(ValueError, match="fewer than 5 captions.*captions_per_image"):
        RetrievalEvaluationDataset(datamodule.features, images, datamodule.vocabulary, 5)


# --------------------------------------------------------------------------------------------- end to end
def test_fit_writes_recall_metrics_and_a_self_contained_checkpoint(fitted_run):
    metrics = json.loads((fitted_run / "metrics.json").read_text())
    for key in ("val/rsum", "best/val/rsum", *(f"val/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))):
        assert isinstance(metrics[key], float)
    recalls = [metrics[f"val/{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert metrics["val/rsum"] == pytest.approx(sum(recalls))
    assert metrics["global_step"] == 2 * math.ceil(
        5 * TINY_SPEC.num_train / BATCH_SIZE
    )  # every pair, 2 epochs
    checkpoint = torch.load(fitted_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["data_spec"]["vocabularies"]["caption"][:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert checkpoint["data_spec"]["image_feature_size"] == TINY_SPEC.feature_size
    assert checkpoint["datamodule_hyper_parameters"]["captions_per_image"] == 5
    # last.ckpt follows every epoch (for --ckpt_path last), not only the epochs that improved rsum.
    assert checkpoint["global_step"] == metrics["global_step"]
    assert Path(metrics["best_checkpoint"]).name.startswith("best-")


def direct_similarity(model, features: RegionFeatures, images: list[ImageCaptions], vocabulary: Vocabulary):
    """All images against all 5N captions in ONE forward call, tensors padded here by hand."""
    regions = [features[i.image_id] for i in images]
    max_boxes = max(r.num_boxes for r in regions)
    image_features = torch.zeros(len(images), max_boxes, features.feature_size)
    mask = torch.zeros(len(images), max_boxes, dtype=torch.bool)
    for row, r in enumerate(regions):
        image_features[row, : r.num_boxes] = torch.from_numpy(np.asarray(r.features))
        mask[row, : r.num_boxes] = True
    captions = [vocabulary.encode(tokens) for image in images for tokens in image.tokens[:5]]
    lengths = torch.tensor([len(c) for c in captions])
    tokens = torch.zeros(len(captions), int(lengths.max()), dtype=torch.long)
    for row, caption in enumerate(captions):
        tokens[row, : len(caption)] = torch.tensor(caption)
    with torch.no_grad():
        return model.eval()(image_features, mask, tokens, lengths)


def test_validation_recalls_equal_those_of_the_model_similarity(fitted_run, datamodule):
    task = RetrievalTask.load_from_checkpoint(fitted_run / "checkpoints" / "last.ckpt", map_location="cpu")
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    logged = trainer.validate(task, datamodule=datamodule, verbose=False)[0]

    images = read_prepared_captions(datamodule.captions_jsonpath, ["val"])
    similarity = direct_similarity(task.model, datamodule.features, images, datamodule.vocabulary)
    assert similarity.shape == (TINY_SPEC.num_val, 5 * TINY_SPEC.num_val)
    expected = retrieval_metrics(similarity)
    for key, value in expected.items():
        assert logged[f"val/{key}"] == pytest.approx(value, abs=1e-4), key
    # The last checkpoint holds the weights of the run's last validation.
    metrics = json.loads((fitted_run / "metrics.json").read_text())
    assert metrics["val/rsum"] == pytest.approx(expected["rsum"], abs=1e-4)

    tested = trainer.test(task, datamodule=datamodule, verbose=False)[0]
    test_images = read_prepared_captions(datamodule.captions_jsonpath, ["test"])
    similarity = direct_similarity(task.model, datamodule.features, test_images, datamodule.vocabulary)
    assert tested["test/rsum"] == pytest.approx(retrieval_metrics(similarity)["rsum"], abs=1e-4)


def test_a_coco_protocol_on_a_small_split_fails_before_training(tmp_path, tiny_world, capsys):
    args = tiny_args(tmp_path, tiny_world.root.parent, "--model.init_args.protocol", "1k")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "protocol='1k' needs the 5000 images" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_feature_encoder_goes_in_front_of_the_model(datamodule):
    task = RetrievalTask(net=BFANConfig(word_embedding_size=8, joint_embedding_size=16, feature_encoder="se"))
    task.setup_model(datamodule.data_spec())
    assert task.model.feature_encoder is not None
    batch = next(iter(datamodule.train_dataloader()))
    similarity = task.model(
        batch["image_features"],
        batch["image_features_mask"],
        batch["caption_tokens"],
        batch["caption_lengths"],
    )
    retrieval_loss(similarity, batch["image_id"]).backward()
    assert task.model.feature_encoder.block.excitation[0].weight.grad.abs().sum() > 0
