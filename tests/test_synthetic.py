from __future__ import annotations

import hashlib
import json
import multiprocessing

import numpy as np
import pytest

from updown.data.readers import RegionFeatures
from updown.data.synthetic import SyntheticSpec, SyntheticWorld, ensure_synthetic_world, write_raw_world
from updown.data.synthetic_scenes import CATEGORIES, COLOURS
from updown.io import read_json


def _digest(world: SyntheticWorld) -> str:
    h = hashlib.sha256()
    for path in sorted(world.root.rglob("*")):
        if path.is_file() and path.suffix == ".json":
            h.update(path.read_bytes())
    reader = RegionFeatures(world.features_h5path)
    for image_id in reader.image_ids:
        h.update(reader[image_id].features.tobytes())
    return h.hexdigest()


def test_same_seed_same_world_other_seed_other_world(tmp_path):
    spec = SyntheticSpec(num_train=8, num_val=2, num_test=2, feature_size=16)
    a, b = SyntheticWorld(tmp_path / "a"), SyntheticWorld(tmp_path / "b")
    write_raw_world(spec, a, progress=False)
    write_raw_world(spec, b, progress=False)
    assert _digest(a) == _digest(b)
    c = SyntheticWorld(tmp_path / "c")
    write_raw_world(
        SyntheticSpec(seed=1, num_train=8, num_val=2, num_test=2, feature_size=16), c, progress=False
    )
    assert _digest(a) != _digest(c)


def test_files_follow_the_public_formats(tiny_world):
    reader = RegionFeatures(tiny_world.features_h5path)
    assert reader.feature_size == 32 and reader.max_boxes == 36
    counts = [reader.num_boxes(i) for i in reader.image_ids]
    assert min(counts) >= 10 and max(counts) <= 36 and len(set(counts)) > 3
    assert all((reader[i].features >= 0).all() for i in reader.image_ids[:10])
    karpathy = read_json(tiny_world.dataset_coco_jsonpath)
    assert {im["split"] for im in karpathy["images"]} == {"train", "val", "test"}
    assert all(len(im["sentences"]) == 5 for im in karpathy["images"])
    questions = read_json(tiny_world.vqa_questions_jsonpath("val"))["questions"]
    annotations = read_json(tiny_world.vqa_annotations_jsonpath("val"))["annotations"]
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in annotations]
    assert all(len(a["answers"]) == 10 for a in annotations)
    assert {a["answer_type"] for a in annotations} == {"yes/no", "number", "other"}


def test_captions_talk_about_the_salient_object_and_differ_across_images(tiny_world):
    karpathy = read_json(tiny_world.dataset_coco_jsonpath)
    objects = read_json(tiny_world.objects_jsonpath)
    reader = RegionFeatures(tiny_world.features_h5path)
    distinct = set()
    for image in karpathy["images"]:
        salient = objects[str(image["cocoid"])][0]
        assert salient["size"] == "large"
        for sentence in image["sentences"]:
            assert (
                salient["category"] in sentence["tokens"] or salient["category"] + "s" in sentence["tokens"]
            )
        distinct.add(tuple(sorted(s["raw"] for s in image["sentences"])))
        # The region labels point at the salient object: some region of object 0 carries its category.
        owner = reader.extra(image["cocoid"], "region_object")
        category = reader.extra(image["cocoid"], "region_category")
        assert set(category[owner == 0].tolist()) == {CATEGORIES.index(salient["category"])}
    assert len(distinct) == len(karpathy["images"])


def test_the_world_needs_the_regions(tmp_path):
    """The salient object's colour is read off its region, not off the image mean (least-squares probes)."""
    spec = SyntheticSpec(num_train=300, num_val=80, num_test=1, feature_size=64)
    world = SyntheticWorld(tmp_path / "w")
    write_raw_world(spec, world, progress=False)
    reader = RegionFeatures(world.features_h5path)
    objects = read_json(world.objects_jsonpath)
    splits = {im["cocoid"]: im["split"] for im in read_json(world.dataset_coco_jsonpath)["images"]}
    data = {"train": ([], [], []), "val": ([], [], [])}
    for image_id, split in splits.items():
        if split == "test":
            continue
        item, owner = reader[image_id], reader.extra(image_id, "region_object")
        salient_rows = np.flatnonzero(owner == 0)
        strongest = salient_rows[np.argmax(item.features[salient_rows].sum(axis=1))]
        data[split][0].append(item.features.mean(axis=0))
        data[split][1].append(item.features[strongest])
        data[split][2].append(COLOURS.index(objects[str(image_id)][0]["colour"]))

    def probe(column: int) -> float:
        x, y = np.array(data["train"][column]), np.array(data["train"][2])
        x = np.c_[x, np.ones(len(x))]
        weights = np.linalg.lstsq(x, np.eye(len(COLOURS))[y], rcond=None)[0]
        xv = np.c_[np.array(data["val"][column]), np.ones(len(data["val"][2]))]
        return float((np.argmax(xv @ weights, axis=1) == np.array(data["val"][2])).mean())

    from_mean, from_region = probe(0), probe(1)
    assert from_region >= 0.9
    assert from_mean <= from_region - 0.25


def _ensure(root):
    return str(
        ensure_synthetic_world(
            SyntheticSpec(num_train=20, num_val=4, num_test=4, feature_size=16), root, False
        ).root
    )


def test_cache_is_reused_and_safe_when_two_processes_start_at_once(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        roots = pool.map(_ensure, [tmp_path, tmp_path])
    assert roots[0] == roots[1]
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert [e for e in entries if not e.endswith(".lock")] == [
        SyntheticSpec(num_train=20, num_val=4, num_test=4, feature_size=16).key()
    ]
    world = ensure_synthetic_world(
        SyntheticSpec(num_train=20, num_val=4, num_test=4, feature_size=16), tmp_path
    )
    assert str(world.root) == roots[0] and (world.captions_dir / "vocabulary.json").exists()


@pytest.mark.parametrize("grid", [True])
def test_grid_variant_tiles_the_image(tmp_path, grid):
    spec = SyntheticSpec(num_train=3, num_val=1, num_test=1, feature_size=16, grid=grid, grid_size=4)
    world = SyntheticWorld(tmp_path / "g")
    write_raw_world(spec, world, progress=False)
    reader = RegionFeatures(world.features_h5path)
    assert reader.grid_shape == (4, 4)
    item = reader[reader.image_ids[0]]
    assert item.num_boxes == 16
    # Row-major tiling: boxes cover the image exactly once.
    area = ((item.boxes[:, 2] - item.boxes[:, 0]) * (item.boxes[:, 3] - item.boxes[:, 1])).sum()
    assert area == pytest.approx(item.image_w * item.image_h, rel=1e-4)
    assert item.boxes[1, 0] > item.boxes[0, 0] and item.boxes[4, 1] > item.boxes[0, 1]
    assert json.loads((world.root / "raw" / "objects.json").read_text())
