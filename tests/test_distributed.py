"""Distributed evaluation is exact: ``python -m updown.validate`` with ``--trainer.strategy ddp --trainer.devices 2``
(gloo, CPU) reports exactly the metrics of a single process on the same checkpoint and data.

The val split has an odd size, so Lightning's ``DistributedSampler`` pads rank 1 with a repeat of the first
sample, and the evaluation batch sizes leave a ragged last batch on one process and on each rank. Lightning
launches the second rank by re-running the command line, hence subprocesses of the real entry point.
Equality is exact (``==`` on the JSON floats): the tasks gather per-sample results, keep one copy of each
sample and reduce them in ascending id order, so no float sum depends on the world size. Exactness also
needs each sample's prediction to be independent of the batch it was decoded in, which holds on the CPU
for these models (each row's logits come from the same per-row arithmetic).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_SPEC, synthetic_world_args, tiny_captioning_args
from torch.utils.data import DistributedSampler

from updown.data.synthetic import ensure_synthetic_world
from updown.data.vqa_data import VQADataModule
from updown.metrics.distributed import MeanPerSample, first_occurrences
from updown.metrics.vqa_accuracy import VQAAccuracy
from updown.tasks.captioning import unique_by_image

# 11 val images: odd, so 2 ranks see 6 each (image 0 twice in all).
SPEC = dataclasses.replace(TINY_SPEC, num_val=11)
CAPTION_EVAL_BATCH = 4  # one process: 4 + 4 + 3 images; each rank: 4 + 2
VQA_EVAL_BATCH = 8  # the 49 val questions (checked below): one process 6 x 8 + 1; each rank 3 x 8 + 1
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


@pytest.fixture(scope="module")
def odd_world(tmp_path_factory) -> Path:
    """The data root of a tiny synthetic world with an odd number of val images."""
    root = tmp_path_factory.mktemp("odd_world")
    ensure_synthetic_world(SPEC, data_root=root, progress=False)
    return root


def synthetic_args(data_root: Path) -> list[str]:
    return synthetic_world_args(data_root, SPEC)


def fit(args: list[str]) -> Path:
    """Train in this process (no validation during training, to save time); returns the run directory."""
    from updown.fit import main

    assert main([*args, "--trainer.limit_val_batches", "0"]) == 0
    run = Path(args[args.index("--trainer.default_root_dir") + 1]) / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    return run


@pytest.fixture(scope="module")
def captioning_run(tmp_path_factory, odd_world) -> Path:
    # Enough updates (72) for varied captions that name objects (so val/grounding exists; the old code
    # counted the sampler's repeated image in it), every metric non-trivial.
    args = tiny_captioning_args(tmp_path_factory.mktemp("ddp_captioning"), odd_world)
    args += synthetic_args(odd_world)
    args += [
        "--trainer.max_epochs", "12",
        "--data.init_args.batch_size", "10",
        "--data.init_args.eval_batch_size", str(CAPTION_EVAL_BATCH),
        "--model.init_args.net.embedding_size", "32",
        "--model.init_args.optimizer.lr", "0.02",
    ]  # fmt: skip
    return fit(args)


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory, odd_world) -> Path:
    root = tmp_path_factory.mktemp("ddp_vqa")
    return fit([
        "--config", str(ROOT / "configs" / "vqa" / "synthetic.yaml"),
        "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "3",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.net.embedding_size", "8",
        "--model.init_args.net.hidden_size", "16",
        "--data.init_args.batch_size", "32",
        "--data.init_args.eval_batch_size", str(VQA_EVAL_BATCH),
        *synthetic_args(odd_world),
    ])  # fmt: skip


def validate(run: Path, output: Path, *extra: str) -> dict:
    """``python -m updown.validate`` on the run's config and last.ckpt, as a subprocess; returns its JSON report."""
    command = [
        sys.executable, "-m", "updown.validate",
        "--config", str(run / "config.yaml"),
        "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
        "--output", str(output),
        "--trainer.enable_progress_bar", "false",
        "--trainer.limit_val_batches", "1.0",  # the training runs above skipped validation
        *extra,
    ]  # fmt: skip
    # One thread per rank: the tiny models gain nothing from more, and the CI machine has 2 cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(output.read_text())


def val_metrics(report: dict) -> dict[str, float]:
    return {key: value for key, value in report.items() if key.startswith("val/")}


def assert_same_as_single_process(run: Path, tmp_path: Path, num_samples: int) -> dict[str, float]:
    single = validate(run, tmp_path / "single.json")
    ddp = validate(run, tmp_path / "ddp.json", *DDP)
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    # Every sample scored once: none missed, the sampler's repeat not counted.
    assert single["num_samples"] == ddp["num_samples"] == num_samples
    assert val_metrics(ddp) == val_metrics(single)
    return val_metrics(single)


def test_captioning_metrics_are_exact_under_ddp(captioning_run, tmp_path):
    metrics = assert_same_as_single_process(captioning_run, tmp_path, SPEC.num_val)
    expected = {f"val/{key}" for key in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")}
    assert expected | {"val/human_cider"} <= set(metrics)
    assert "val/grounding" in metrics, (
        "the tiny model named no object: retune captioning_run to cover grounding"
    )
    # A model that says something: equal zeros would prove little.
    assert metrics["val/cider"] > 0.1 and metrics["val/bleu4"] > 0 and metrics["val/grounding"] > 0


def test_vqa_accuracy_is_exact_under_ddp(vqa_run, odd_world, tmp_path):
    datamodule = VQADataModule(data_root=str(odd_world), synthetic=SPEC)
    num_questions = len(datamodule.dataset(datamodule.val_split))
    # The point of the test: an odd split (a padded repeat) and ragged last batches, in both settings.
    assert num_questions % 2 == 1
    assert num_questions % VQA_EVAL_BATCH and math.ceil(num_questions / 2) % VQA_EVAL_BATCH
    metrics = assert_same_as_single_process(vqa_run, tmp_path, num_questions)
    for prefix in ("val/vqa_accuracy", "val/question_only_accuracy"):
        assert {prefix, *(f"{prefix}_{t}" for t in ("yes_no", "number", "other"))} <= set(metrics)
    assert "val/loss" in metrics and metrics["val/vqa_accuracy"] > 0


# --------------------------------------------------------------------------------------- metric unit tests
def shards(num_samples: int, world_size: int) -> list[list[int]]:
    """The indices each rank validates, as Lightning's DistributedSampler (no shuffling) gives them."""
    return [
        list(DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank, shuffle=False))
        for rank in range(world_size)
    ]


@pytest.mark.parametrize(("num_samples", "world_size"), [(5, 2), (7, 3), (13, 4)])
def test_mean_per_sample_drops_the_samplers_repeats(num_samples, world_size):
    """Each rank scores its DistributedSampler shard, repeats included; the merged mean counts each sample once."""
    rank_indices = shards(num_samples, world_size)
    padded = [i for indices in rank_indices for i in indices]
    # The premise: an uneven split is padded with repeats, so some sample is scored on two ranks.
    assert len(padded) > num_samples and sorted(set(padded)) == list(range(num_samples))
    # Eighths add up exactly in float64, so the mean has one rounding however it is summed.
    values = [float((3 * i) % num_samples) / 8 for i in range(num_samples)]
    ids = [1000 - 7 * i for i in range(num_samples)]  # ids descend as indices ascend
    expected = sum(values) / num_samples

    ranks = []
    for indices in rank_indices:
        metric = MeanPerSample()
        for start in range(0, len(indices), 2):  # batches of two, the last one ragged
            batch = indices[start : start + 2]
            metric.update(
                torch.tensor([values[i] for i in batch], dtype=torch.float64), [ids[i] for i in batch]
            )
        ranks.append(metric)
    merged = ranks[0]
    for other in ranks[1:]:
        merged.merge_state(other)  # what compute() does with the states gathered from every rank
    assert merged.compute().item() == expected
    assert merged.num_samples == num_samples
    # Counting the repeats would have changed the mean: the data can tell.
    assert sum(values[i] for i in padded) / len(padded) != expected


def vqa_questions(num_questions: int) -> list[dict]:
    """Questions whose accuracies differ (so a counted repeat would change every mean)."""
    types = ("yes/no", "number", "other")
    questions = []
    for index in range(num_questions):
        humans = ["a"] * (index % 5) + ["b"] * (10 - index % 5)
        questions.append({"question_id": 1000 - 7 * index, "prediction": "a", "answers": humans,
                          "answer_type": types[index % 3]})  # fmt: skip
    return questions


def update(metric: VQAAccuracy, questions: list[dict], batch_size: int) -> None:
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        metric.update(
            [q["prediction"] for q in batch],
            [q["answers"] for q in batch],
            question_ids=torch.tensor([q["question_id"] for q in batch]),
            answer_types=[q["answer_type"] for q in batch],
        )


@pytest.mark.parametrize("world_size", [2, 3])
def test_vqa_metric_drops_the_samplers_repeats(world_size):
    questions = vqa_questions(13)
    single = VQAAccuracy()
    update(single, questions, batch_size=4)
    expected = single.compute()

    ranks = []
    for rank_indices in shards(len(questions), world_size):
        metric = VQAAccuracy()
        update(metric, [questions[i] for i in rank_indices], batch_size=3)
        ranks.append(metric)
    merged = ranks[0]
    for other in ranks[1:]:
        merged.merge_state(other)  # what compute() does with the states gathered from every rank
    result = merged.compute()
    assert result.keys() == expected.keys() == {"overall", "yes/no", "number", "other"}
    assert all(result[key].item() == expected[key].item() for key in expected)  # exact, not approximate
    assert merged.num_questions == single.num_questions == len(questions)

    # Counting the repeats would have changed the result: the test data can tell.
    padded = [questions[i] for rank_indices in shards(len(questions), world_size) for i in rank_indices]
    naive = VQAAccuracy()
    update(naive, padded, batch_size=3)
    naive_mean = torch.cat([a for a in naive.accuracies]).mean().item()
    assert naive_mean != expected["overall"].item()


def test_mean_per_sample_drops_repeats_and_ignores_order():
    values = torch.tensor([0.1, 0.7, 0.2, 0.9, 0.35], dtype=torch.float64)
    ids = [50, 10, 40, 20, 30]
    single = MeanPerSample()
    single.update(values, ids)
    rank0, rank1 = MeanPerSample(), MeanPerSample()
    rank0.update(values[[0, 2, 4]], [ids[i] for i in (0, 2, 4)])
    rank1.update(values[[1, 3, 0]], [ids[i] for i in (1, 3, 0)])  # the sampler's repeat of sample 0
    rank0.merge_state(rank1)
    assert rank0.compute().item() == single.compute().item() == pytest.approx(0.45)
    assert rank0.num_samples == 5
    with pytest.raises(ValueError, match="one id per value"):
        MeanPerSample().update(values, ids[:2])


def test_first_occurrences_orders_by_id():
    ids = torch.tensor([30, 10, 30, 20, 10])
    assert first_occurrences(ids).tolist() == [1, 3, 0]


def test_captions_keep_one_record_per_image_in_id_order():
    outputs = [
        {"image_id": 9, "caption": "a dog", "references": ["r"], "grounded": 1, "grounding_total": 2},
        {"image_id": 3, "caption": "a cat", "references": ["r"], "grounded": 0, "grounding_total": 1},
        {"image_id": 9, "caption": "a dog", "references": ["r"], "grounded": 1, "grounding_total": 2},
    ]
    by_image = unique_by_image(outputs)
    assert list(by_image) == [3, 9]
    assert sum(item["grounding_total"] for item in by_image.values()) == 3
