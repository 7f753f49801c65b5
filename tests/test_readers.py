from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch
from conftest import write_features
from torch.utils.data import DataLoader, Dataset

from updown.data.datasets import collate_regions
from updown.data.readers import RegionFeatures, spatial_features
from updown.data.writers import RegionFeaturesWriter


def test_reads_back_what_was_written_with_spatial_features(tmp_path):
    written = write_features(tmp_path / "f.h5", [3, 6, 1])
    reader = RegionFeatures(tmp_path / "f.h5")
    assert len(reader) == 3 and reader.feature_size == 8 and reader.max_boxes == 6
    for image_id, (features, boxes) in written.items():
        item = reader[image_id]
        np.testing.assert_array_equal(item.features, features)
        np.testing.assert_array_equal(item.boxes, boxes)
        # Spatial features by hand: (x1/w, y1/h, x2/w, y2/h, area/(w*h)) with w=100, h=80.
        x1, y1, x2, y2 = boxes.T
        expected = np.stack([x1 / 100, y1 / 80, x2 / 100, y2 / 80, (x2 - x1) * (y2 - y1) / 8000], axis=1)
        np.testing.assert_allclose(item.spatial, expected, rtol=1e-6)


def test_float16_features_come_back_as_float32(tmp_path):
    written = write_features(tmp_path / "f.h5", [4], dtype="float16")
    item = RegionFeatures(tmp_path / "f.h5")[100]
    assert item.features.dtype == np.float32
    np.testing.assert_array_equal(item.features, written[100][0].astype(np.float16).astype(np.float32))


def test_in_memory_equals_lazy(tmp_path):
    write_features(tmp_path / "f.h5", [2, 5, 6])
    lazy, memory = RegionFeatures(tmp_path / "f.h5"), RegionFeatures(tmp_path / "f.h5", in_memory=True)
    for image_id in lazy.image_ids:
        np.testing.assert_array_equal(lazy[image_id].features, memory[image_id].features)
        np.testing.assert_array_equal(lazy[image_id].boxes, memory[image_id].boxes)


def test_reads_the_nocaps_variable_length_layout(tmp_path):
    rng = np.random.default_rng(0)
    rows = {11: rng.random((3, 8), dtype=np.float32), 12: rng.random((5, 8), dtype=np.float32)}
    boxes = {11: rng.random((3, 4), dtype=np.float32) * 50, 12: rng.random((5, 4), dtype=np.float32) * 50}
    vlen = h5py.vlen_dtype(np.float32)
    with h5py.File(tmp_path / "nocaps.h5", "w") as f:
        f["image_id"] = np.array([11, 12])
        f["num_boxes"] = np.array([3, 5])
        f["width"] = np.array([64.0, 32.0])
        f["height"] = np.array([48.0, 16.0])
        feats = f.create_dataset("features", (2,), dtype=vlen)
        bx = f.create_dataset("boxes", (2,), dtype=vlen)
        for i, image_id in enumerate((11, 12)):
            feats[i] = rows[image_id].reshape(-1)
            bx[i] = boxes[image_id].reshape(-1)
    for in_memory in (False, True):
        reader = RegionFeatures(tmp_path / "nocaps.h5", in_memory=in_memory)
        assert reader.feature_size == 8 and reader.max_boxes == 5
        np.testing.assert_array_equal(reader[12].features, rows[12])
        np.testing.assert_array_equal(reader[11].boxes, boxes[11])
        assert (reader[12].image_w, reader[12].image_h) == (32.0, 16.0)


def _write_ids(path, image_ids: list[int], value: float) -> None:
    """A feature file holding ``image_ids``, each with two boxes whose features all equal ``value``."""
    with RegionFeaturesWriter(path, max_boxes=2, feature_size=3, force=True) as writer:
        for image_id in image_ids:
            boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 30]], dtype=np.float32)
            writer.add(image_id, np.full((2, 3), value, np.float32), boxes, image_w=40.0, image_h=40.0)


def test_several_files_are_one_index_and_an_image_in_two_files_is_refused(tmp_path):
    _write_ids(tmp_path / "a.h5", [5, 9], value=1.0)
    _write_ids(tmp_path / "b.h5", [7], value=2.0)
    reader = RegionFeatures([tmp_path / "a.h5", tmp_path / "b.h5"])
    assert sorted(reader.image_ids) == [5, 7, 9] and len(reader) == 3
    assert (reader[9].features == 1.0).all() and (reader[7].features == 2.0).all()

    _write_ids(tmp_path / "c.h5", [3, 9], value=3.0)  # image 9 is in a.h5 too
    with pytest.raises(ValueError) as error:
        RegionFeatures([tmp_path / "a.h5", tmp_path / "c.h5"])
    message = str(error.value)
    assert "image 9 " in message and str(tmp_path / "a.h5") in message and str(tmp_path / "c.h5") in message
    assert "one file only" in message


class _Items(Dataset):
    def __init__(self, reader):
        self.reader = reader
        self.ids = reader.image_ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.reader[self.ids[i]]


def test_pickles_and_works_in_a_dataloader_with_two_workers(tmp_path):
    written = write_features(tmp_path / "f.h5", [1, 2, 3, 4, 5, 6])
    reader = RegionFeatures(tmp_path / "f.h5")
    reader[100]  # open the handle in this process first: it must not travel to the workers
    assert pickle.loads(pickle.dumps(reader))[107].num_boxes == 2
    loader = DataLoader(_Items(reader), batch_size=2, num_workers=2, collate_fn=collate_regions)
    seen = {}
    for batch in loader:
        for row, image_id in enumerate(batch["image_id"].tolist()):
            n = int(batch["image_features_mask"][row].sum())
            seen[image_id] = batch["image_features"][row, :n].numpy()
    assert set(seen) == set(written)
    for image_id, (features, _) in written.items():
        np.testing.assert_array_equal(seen[image_id], features)


def test_collate_pads_to_the_batch_maximum_and_masks_by_box_count(tmp_path):
    write_features(tmp_path / "f.h5", [2, 4])
    reader = RegionFeatures(tmp_path / "f.h5")
    first = reader[100]
    first.features[:] = 0.0  # a real box whose features are zero is still a real box
    batch = collate_regions([first, reader[107]])
    assert batch["image_features"].shape == (2, 4, 8)
    assert batch["image_features_mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert torch.all(batch["image_features"][0, 2:] == 0)


def _corrupt(path, mutate):
    with h5py.File(path, "a") as f:
        mutate(f)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.__delitem__("boxes"), r"missing dataset\(s\) \['boxes'\]"),
        (
            lambda f: (f.__delitem__("num_boxes"), f.create_dataset("num_boxes", data=[1, 2, 3, 4])),
            "num_boxes.*shape",
        ),
        (lambda f: f["num_boxes"].__setitem__(0, 9), "num_boxes.*out of range"),
        (lambda f: f["num_boxes"].__setitem__(1, 0), "num_boxes.*out of range"),
        (lambda f: f["image_id"].__setitem__(1, 100), "duplicate image ids"),
        (lambda f: f["image_w"].__setitem__(0, 0.0), "non-positive image size"),
        (
            lambda f: (f.__delitem__("boxes"), f.create_dataset("boxes", data=np.zeros((2, 6, 3)))),
            "boxes.*shape",
        ),
    ],
)
def test_schema_errors_name_the_file_and_the_field(tmp_path, mutate, message):
    path = tmp_path / "f.h5"
    write_features(path, [2, 3])
    _corrupt(path, mutate)
    with pytest.raises(ValueError, match=message) as error:
        RegionFeatures(path)
    assert str(path) in str(error.value) and "convert_features.py" in str(error.value)


def test_missing_truncated_and_nan_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        RegionFeatures(tmp_path / "absent.h5")
    path = tmp_path / "f.h5"
    write_features(path, [2, 3, 4])
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        RegionFeatures(truncated)
    _corrupt(path, lambda f: f["features"].__setitem__((1, 0, 3), np.nan))
    lazy = RegionFeatures(path)  # the scan is optional: the read of that image fails instead
    lazy[100]
    with pytest.raises(ValueError, match="NaN or inf for image 107"):
        lazy[107]
    with pytest.raises(ValueError, match="NaN or inf for image 107"):
        RegionFeatures(path, check_finite=True)
    # Loaded features are scanned once, when loaded.
    with pytest.raises(ValueError, match="NaN or inf for image 107"):
        RegionFeatures(path, in_memory=True)


def test_unknown_image_id_names_the_id_and_the_file(tmp_path):
    write_features(tmp_path / "f.h5", [2])
    reader = RegionFeatures(tmp_path / "f.h5")
    with pytest.raises(KeyError, match="image 5 is not in the region-feature file"):
        reader[5]
    with pytest.raises(ValueError, match=r"captions.json: 2 image id\(s\) have no region features"):
        reader.check_ids([100, 5, 6], "captions.json")


def test_spatial_features_of_a_full_image_box():
    out = spatial_features(np.array([[0, 0, 640, 480]], dtype=np.float32), 640, 480)
    np.testing.assert_allclose(out, [[0, 0, 1, 1, 1]])
