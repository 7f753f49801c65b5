"""The scale tools at small sizes: tools/make_coco_shaped.py (updown/data/coco_shaped.py, a COCO-shaped world) and tools/time_recipe.py's
projection. The full sizes are benchmarks (docs/benchmarks.md), not tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import ROOT, load_tool

from updown.data import coco_shaped
from updown.data.caption_preparation import load_karpathy, prepare_captions
from updown.data.readers import RegionFeatures
from updown.data.vqa_preparation import load_vqa_split

make_coco_shaped = load_tool("make_coco_shaped")
time_recipe = load_tool("time_recipe")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_shaped") / "world"
    assert (
        make_coco_shaped.main(
            ["--output", str(root), "--images", "50", "--feature-size", "64", "--no-progress"]
        )
        == 0
    )
    return root


def test_full_size_counts_are_cocos():
    # Karpathy's split of COCO 2014 and VQA v2's question counts, exactly, at the default size.
    sizes = coco_shaped.split_sizes(123_287)
    assert sizes == {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000}
    train = coco_shaped.questions_per_image(443_757, sizes["train"])
    val = coco_shaped.questions_per_image(214_354, 123_287 - sizes["train"])
    assert train.sum() == 443_757 and val.sum() == 214_354
    assert set(train.tolist()) == {5, 6} and set(val.tolist()) == {5, 6}


def test_small_world_has_the_real_formats_and_scaled_counts(world):
    sizes = coco_shaped.split_sizes(50)
    with h5py.File(world / "features.h5") as h5:
        assert h5["features"].shape == (50, 36, 64) and h5["features"].dtype == np.float16
        assert (h5["num_boxes"][:] == 36).all()
    features = RegionFeatures(world / "features.h5")  # the reader accepts the file
    image = features[int(features.image_ids[0])]
    assert image.features.shape == (36, 64) and (np.asarray(image.features) >= 0).all()

    images = load_karpathy(world / "raw" / "dataset_coco.json")
    assert [i.image_id for i in images] == [int(i) for i in features.image_ids]
    assert {s: sum(i.split == s for i in images) for s in sizes} == sizes
    assert all(len(i.captions) == 5 for i in images)
    lengths = [len(t) for i in images for t in i.tokens]
    assert 8 <= np.mean(lengths) <= 13  # COCO's captions average about 10.5 words

    train2014 = {i.image_id for i in images if i.split == "train"}
    for subset, total, image_ids in (
        ("train2014", round(443_757 * 50 / 123_287), train2014),
        ("val2014", round(214_354 * 50 / 123_287), {i.image_id for i in images} - train2014),
    ):
        questions, annotations = load_vqa_split(
            world / "raw" / f"v2_OpenEnded_mscoco_{subset}_questions.json",
            world / "raw" / f"v2_mscoco_{subset}_annotations.json",
        )
        assert len(questions) == len(annotations) == total
        assert {q.image_id for q in questions} == image_ids
        assert all(len(q.answers) == 10 for q in questions)

    vocabulary = prepare_captions(images, world.parent / "captions")
    assert len(vocabulary) > 4


def test_images_do_not_depend_on_generation_order():
    # Why --workers cannot change the world: each image draws only from its own (seed, index) generator.
    world = coco_shaped.CocoShapedWorld(0, 10, 36, 16)
    jobs = [(index, 1000 + index, 5) for index in range(6)]
    forward = [world.image(*job) for job in jobs]
    backward = [world.image(*job) for job in reversed(jobs)][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a["features"], b["features"])
        assert a["captions"] == b["captions"] and a["questions"] == b["questions"]


@pytest.mark.slow  # spawns a worker process (about 10 s on a loaded 2-core machine)
def test_workers_make_the_same_world(world, tmp_path):
    other = tmp_path / "other"
    args = [
        "--output",
        str(other),
        "--images",
        "50",
        "--feature-size",
        "64",
        "--no-progress",
        "--workers",
        "1",
    ]
    assert make_coco_shaped.main(args) == 0
    for name in (
        "dataset_coco.json",
        "v2_mscoco_val2014_annotations.json",
        "v2_OpenEnded_mscoco_train2014_questions.json",
    ):
        assert (other / "raw" / name).read_bytes() == (world / "raw" / name).read_bytes()
    a, b = RegionFeatures(world / "features.h5"), RegionFeatures(other / "features.h5")
    for image_id in a.image_ids[:10]:
        np.testing.assert_array_equal(a[int(image_id)].features, b[int(image_id)].features)


def test_adaptive_boxes_variant(tmp_path):
    args = ["--output", str(tmp_path / "w"), "--images", "20", "--feature-size", "16", "--no-progress"]
    assert make_coco_shaped.main([*args, "--min-boxes", "10", "--max-boxes", "100"]) == 0
    with h5py.File(tmp_path / "w" / "features.h5") as h5:
        num_boxes = h5["num_boxes"][:]
        assert h5["features"].shape == (20, 100, 16)
    assert (num_boxes >= 10).all() and (num_boxes <= 100).all() and len(set(num_boxes.tolist())) > 1
    features = RegionFeatures(tmp_path / "w" / "features.h5")
    assert all(features.num_boxes(int(i)) == n for i, n in zip(features.image_ids, num_boxes))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--images", "3"], "too few"),
        (["--min-boxes", "50", "--max-boxes", "40"], "larger than --max-boxes"),
        (["--max-boxes", "12", "--min-boxes", "10"], "below 20"),
    ],
)
def test_bad_arguments_are_one_error_line(tmp_path, capsys, args, message):
    assert make_coco_shaped.main(["--output", str(tmp_path / "w"), "--no-progress", *args]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert not (tmp_path / "w").exists()


def test_zipf_sampler_matches_its_law():
    sampler = coco_shaped.ZipfSampler([f"w{i}" for i in range(100)], exponent=1.0)
    draws = sampler.draw(np.random.default_rng(0), 200_000)
    expected = (1 / np.arange(1, 101)) / (1 / np.arange(1, 101)).sum()
    observed = np.array([draws.count(f"w{i}") for i in range(3)]) / len(draws)
    np.testing.assert_allclose(observed, expected[:3], rtol=0.03)


def test_made_up_words_are_distinct():
    words = coco_shaped.made_up_words(5000)
    assert len(set(words)) == 5000 and not set(words) & set(coco_shaped.COMMON_WORDS)


def test_json_array_writer_writes_valid_json(tmp_path):
    path = tmp_path / "a.json"
    writer = coco_shaped.JSONArrayWriter(open(path, "w"), "items", {"info": {"x": 1}}, {"dataset": "coco"})
    for i in range(3):
        writer.add({"i": i})
    writer.close()
    assert json.loads(path.read_text()) == {
        "info": {"x": 1},
        "items": [{"i": 0}, {"i": 1}, {"i": 2}],
        "dataset": "coco",
    }


def _timer(step_ends, val_batches, scoring, warmup=1):
    timer = time_recipe.StepTimer(warmup)
    timer.step_ends = step_ends
    timer.val_batch_seconds = val_batches
    timer.scoring_seconds = scoring
    return timer


def test_projection_of_a_max_steps_recipe():
    # Steps 2 s apart after one warm-up step; 2 timed val batches of 3 s; scoring of those 2 batches 1 s.
    timer = _timer([0.0, 10.0, 12.0, 14.0], [3.0, 3.0], [1.0])
    settings = {"trainer": {"max_steps": 60_000, "max_epochs": -1}}
    result = time_recipe.project(settings, timer, train_batches=5665, val_batches=50, scst=False)
    assert result["seconds_per_step"] == pytest.approx(2.0)
    # Scoring: as measured (lower bound) or scaled from 2 batches to 50 (upper bound).
    low, high = 50 * 3.0 + 1.0, 50 * 3.0 + 1.0 * 50 / 2
    assert (result["validation_seconds_low"], result["validation_seconds_high"]) == pytest.approx((low, high))
    assert result["epoch_seconds_high"] == pytest.approx(5665 * 2.0 + high)
    assert result["epochs"] == pytest.approx(60_000 / 5665)
    assert result["validations"] == 11  # 10.6 epochs: 11 validations
    assert result["recipe_seconds_low"] == pytest.approx(60_000 * 2.0 + 11 * low)
    assert result["recipe_seconds_high"] == pytest.approx(60_000 * 2.0 + 11 * high)
    assert (
        "| 2.000 | 5,665 | 3.00 x 50 | 3.2 h | 33.8 h - 33.9 h (10.6 epochs) |"
        in time_recipe.markdown_row(["configs/captioning/updown_xe.yaml"], result)
    )


def test_projection_of_an_scst_epochs_recipe():
    # SCST decodes the validation set once before training, then validates after each epoch.
    timer = _timer([0.0, 1.0, 4.0, 7.0], [5.0, 5.0], [0.0])
    settings = {"trainer": {"max_epochs": 20, "max_steps": -1}}
    result = time_recipe.project(settings, timer, train_batches=100, val_batches=10, scst=True)
    assert result["seconds_per_val_batch"] == pytest.approx(5.0)
    assert result["total_steps"] == 2000 and result["validations"] == 21
    assert result["recipe_seconds_high"] == pytest.approx(2000 * 3.0 + 21 * 50.0)


def test_projection_without_validation_is_training_only():
    # --val-batches 0 (a machine without Java cannot score captions): no validation batch, no scoring.
    timer = _timer([0.0, 10.0, 12.0, 14.0], [], [])
    settings = {"trainer": {"max_steps": 60_000, "max_epochs": -1}}
    result = time_recipe.project(settings, timer, train_batches=5665, val_batches=50, scst=False)
    assert not result["validation_timed"]
    assert result["epoch_seconds_low"] == result["epoch_seconds_high"] == pytest.approx(5665 * 2.0)
    assert result["recipe_seconds_high"] == pytest.approx(60_000 * 2.0)
    row = time_recipe.markdown_row(["configs/captioning/updown_xe.yaml"], result)
    assert "| 2.000 | 5,665 | not timed (training only) | 3.1 h |" in row
    assert time_recipe.build_parser().parse_args(["--config", "a.yaml", "--val-batches", "0"]).val_batches == 0


@pytest.mark.slow  # generates a 600-image world and times 5 training steps: about 40 s
def test_gpu_scale_check_dry_runs_on_the_cpu(tmp_path):
    """tools/gpu_scale_check.sh, the one script a GPU session runs, end to end at a small size on the CPU, so
    that device time is never spent finding a mistake in it. Without pycocoevalcap or Java it times training only."""
    environment = dict(os.environ, ACCELERATOR="cpu", IMAGES="600", EPOCH_STEPS="4", WARMUP="1", VAL_BATCHES="1",
                       LOADER_WORKERS="2", WORKERS="1", PYTHON=sys.executable, OUT=str(tmp_path / "out"))  # fmt: skip
    done = subprocess.run(
        ["bash", "tools/gpu_scale_check.sh", str(tmp_path / "work")],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    timings = (tmp_path / "out" / "timings.txt").read_text()
    for stage in ("generate world (600 images)", "prepare_captions", "XE epoch (time_recipe)"):
        assert f"{stage}: " in timings and "(exit 0)" in timings.split(f"{stage}: ")[1].splitlines()[0]
    result = json.loads((tmp_path / "out" / "xe_epoch.json").read_text())
    assert result["device"] == "cpu" and result["measured_steps"] == 4 and result["seconds_per_step"] > 0


def test_recipe_settings_compose_configs(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(
        "trainer: {max_epochs: 30}\nmodel: {class_path: x.CaptioningTask}\ndata: {init_args: {batch_size: 10}}\n"
    )
    second.write_text("trainer: {max_epochs: 20}\nmodel: {class_path: x.SCSTCaptioningTask}\n")
    settings = time_recipe.recipe_settings([str(first), str(second)])
    assert settings["trainer"]["max_epochs"] == 20
    assert settings["model"]["class_path"] == "x.SCSTCaptioningTask"
    assert settings["data"]["init_args"]["batch_size"] == 10


def test_time_recipe_passes_arguments_after_double_dash_to_fit():
    args = time_recipe.build_parser().parse_args(
        ["--config", "a.yaml", "--world", "w", "--", "--trainer.accelerator", "gpu", "--trainer.devices", "1"]
    )
    assert args.fit_args == ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
    vqa = time_recipe.data_arguments({"data": {"class_path": "updown.data.vqa_data.VQADataModule"}}, args)
    assert vqa == ["--data.init_args.features_h5path", "w/features.h5", "--data.init_args.prepared_dir", "w/vqa",
                   "--model.init_args.glove_path", "null"]  # fmt: skip


def test_benchmark_data_reports_the_loader_against_both_ceilings(tmp_path, capsys):
    """tools/benchmark_data.py at a small size: every path it measures, in one table with numbers."""
    benchmark_data = load_tool("benchmark_data")
    path = tmp_path / "features.h5"
    benchmark_data.write_test_file(path, 260)
    arguments = ["--features", str(path), "--images", "60", "--batch-size", "10", "--rounds", "1"]
    assert benchmark_data.main([*arguments, "--workers", "0", "2", "--caches", "warm"]) == 0
    table = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line
    ]
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:3]): line for line in table[1:]}
    expected = {("h5py chunks (ceiling)", "warm", "-"), ("h5py reads, checksum verified", "warm", "-"),
                ("memcpy (ceiling)", "-", "-")}  # fmt: skip
    transfers = ("worker transfer, slots (ceiling)", "worker transfer, plain DataLoader")
    expected |= {("disk", "warm", w) for w in ("0", "2")} | {(name, "-", "2") for name in transfers}
    expected |= {(store, "in memory", w) for store in ("host", "device") for w in ("0", "2")}
    # Float16 batches, as an accelerator's Trainer gets them from this float16 file.
    expected |= {("disk, float16 batches", "warm", w) for w in ("0", "2")}
    expected |= {("host, float16 batches", "in memory", w) for w in ("0", "2")}
    assert set(rows) == expected
    for key, line in rows.items():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert float(cells[3].replace(",", "")) > 0, line
        if key[0].split(",")[0] in ("disk", "host", "device") or key[0] in transfers:  # also with the handoff copy
            assert 0 < float(cells[6].replace(",", "")) <= float(cells[3].replace(",", "")), line
