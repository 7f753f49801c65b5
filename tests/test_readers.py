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


def _random_boxes(rng, n: int, image_w: float, image_h: float) -> np.ndarray:
    """``(n, 4)`` float32 boxes inside an ``image_w`` x ``image_h`` image, x1 < x2 and y1 < y2."""
    xs = np.sort(rng.uniform(0, image_w, size=(n, 2)), axis=1)
    ys = np.sort(rng.uniform(0, image_h, size=(n, 2)), axis=1)
    return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float32)


def test_reads_the_nocaps_variable_length_layout(tmp_path):
    rng = np.random.default_rng(0)
    rows = {11: rng.random((3, 8), dtype=np.float32), 12: rng.random((5, 8), dtype=np.float32)}
    boxes = {11: _random_boxes(rng, 3, 64, 48), 12: _random_boxes(rng, 5, 32, 16)}
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


# ---------------------------------------------------------------- integrity: checksums, damaged blocks


def _chunk(path, name: str, index: int = 0):
    """Byte offset and size on disk of chunk ``index`` of dataset ``name``."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(index)
    return info.byte_offset, info.size


def _patch_bytes(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def test_every_dataset_carries_a_checksum_per_chunk(tmp_path):
    with RegionFeaturesWriter(tmp_path / "f.h5", 4, 8, extras=("region_category",)) as writer:
        writer.add(1, np.ones((2, 8), np.float32), np.array([[0, 0, 5, 5], [1, 1, 9, 9]], np.float32), 10, 10,
                   region_category=np.array([3, -1]))  # fmt: skip
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert {name: f[name].fletcher32 for name in f} == dict.fromkeys(f, True)
        assert f["features"].chunks == (1, 4, 8)


@pytest.mark.parametrize(
    "mode", [{}, {"in_memory": True}, {"feature_store": "device"}, {"check_finite": True}]
)
def test_a_damaged_feature_block_names_the_file_the_image_and_the_fix(tmp_path, mode):
    path = tmp_path / "f.h5"
    written = write_features(path, [2, 3, 4])
    offset, _ = _chunk(path, "features", 1)
    _patch_bytes(path, offset + 5, b"\xff")
    if mode:
        with pytest.raises(ValueError) as error:
            RegionFeatures(path, **mode)
    else:
        reader = RegionFeatures(path)
        np.testing.assert_array_equal(reader[100].features, written[100][0])  # other images still read
        with pytest.raises(ValueError) as error:
            reader[107]
    message = str(error.value)
    assert message.startswith(f"{path}: dataset 'features' fails its checksum for image 107")
    assert "download it again" in message and "convert_features.py" in message and "\n" not in message


def test_a_damaged_metadata_block_is_refused_when_opened(tmp_path):
    path = tmp_path / "f.h5"
    write_features(path, [2, 3])
    offset, _ = _chunk(path, "image_w")
    _patch_bytes(path, offset, b"\x00\x00\x80\x7f")  # 640.0 -> inf, checksum unchanged
    with pytest.raises(ValueError, match="dataset 'image_w' fails its checksum.*download it again"):
        RegionFeatures(path)


def test_a_block_zeroed_with_its_checksum_is_caught_by_the_plausibility_checks(tmp_path):
    # Fletcher-32 of zeros is zero, so a chunk zeroed whole passes its checksum: the values give it away.
    for name, message in (
        ("features", "'features' is all zero in every real box"),
        ("boxes", r"'boxes' has box 0 = \(0, 0, 0, 0\)"),
    ):
        path = tmp_path / f"{name}.h5"
        write_features(path, [2, 3])
        offset, size = _chunk(path, name, 1)
        _patch_bytes(path, offset, bytes(size))
        with pytest.raises(ValueError, match=message + ".* for image 107; re-convert or re-download"):
            RegionFeatures(path)[107]
    path = tmp_path / "sizes.h5"
    write_features(path, [2, 3])
    offset, size = _chunk(path, "image_h")
    _patch_bytes(path, offset, bytes(size))
    with pytest.raises(
        ValueError, match="'image_h' has a non-positive image size for image 100.*download it again"
    ):
        RegionFeatures(path)


# ---------------------------------------------------------------- plausibility


def _edit(path, name: str, edit) -> None:
    """Rewrite dataset ``name`` with ``edit(values)`` (HDF5 recomputes the checksums: valid file, bad values)."""
    with h5py.File(path, "r+") as f:
        values = f[name][()]
        result = edit(values)
        f[name][...] = values if result is None else result


def _retype(path, name: str, dtype) -> None:
    with h5py.File(path, "r+") as f:
        values = f[name][()]
        del f[name]
        f.create_dataset(name, data=values.astype(dtype))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda p: _retype(p, "features", np.int32),
            "'features' has dtype int32, expected float32 or float16",
        ),
        (lambda p: _retype(p, "image_id", np.float64), "'image_id' has dtype float64, expected an integer"),
        (lambda p: _retype(p, "num_boxes", np.float32), "'num_boxes' has dtype float32, expected an integer"),
        (
            lambda p: _edit(p, "image_w", lambda v: v.__setitem__(1, np.nan)),
            "non-finite image size .* image 107",
        ),
        (
            lambda p: _edit(p, "image_h", lambda v: v.__setitem__(0, -80)),
            "'image_h' has a non-positive image size",
        ),
        (
            lambda p: _edit(p, "image_w", lambda v: v.__setitem__(0, 1e6)),
            "implausible image size .* 1e\\+06 x 80",
        ),
    ],
)
def test_implausible_files_are_refused_when_opened(tmp_path, change, message):
    path = tmp_path / "f.h5"
    write_features(path, [2, 3])
    change(path)
    for mode in ({}, {"in_memory": True}, {"feature_store": "device"}):
        with pytest.raises(ValueError, match=message) as error:
            RegionFeatures(path, **mode)
        assert str(path) in str(error.value)


def _set_box(row: int, box: int, value):
    return lambda v: v.__setitem__((row, box), value)


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("features", lambda v: v.__setitem__((1, 1, 2), np.inf), "'features' contains NaN or inf"),
        ("features", lambda v: v.__setitem__((1, 0, 0), -3e6), "'features' has values up to 3e\\+06"),
        ("boxes", _set_box(1, 1, [5, 5, np.nan, 9]), "'boxes' contains NaN or inf in box 1"),
        ("boxes", _set_box(1, 2, [30, 5, 20, 9]), r"'boxes' has box 2 = \(30, 5, 20, 9\) inverted"),
        ("boxes", _set_box(1, 0, [5, 5, 103, 9]), r"outside the 100 x 80 image by more than max\(2 px, 1%"),
        ("boxes", _set_box(1, 0, [-2.5, 5, 10, 9]), "outside the 100 x 80 image"),
        ("boxes", _set_box(1, 0, [0, 0, 0, 0]), r"has box 0 = \(0, 0, 0, 0\), a padding box counted as real"),
        # num_boxes of image 107 says 2 of its 3 boxes: the third shows in the padding.
        ("num_boxes", lambda v: v.__setitem__(1, 2), "non-zero boxes beyond num_boxes = 2"),
        # ... says 4: a padding box is counted as real.
        ("num_boxes", lambda v: v.__setitem__(1, 4), r"has box 3 = \(0, 0, 0, 0\)"),
    ],
)
def test_implausible_images_are_refused_when_read_or_scanned(tmp_path, name, edit, message):
    path = tmp_path / "f.h5"
    write_features(path, [2, 3])
    _edit(path, name, edit)
    lazy = RegionFeatures(path)
    lazy[100]
    with pytest.raises(ValueError, match=message + ".*for image 107; re-convert or re-download") as error:
        lazy[107]
    assert str(error.value).startswith(str(path))
    for mode in ({"in_memory": True}, {"feature_store": "device"}, {"check_finite": True}):
        with pytest.raises(ValueError, match=message):
            RegionFeatures(path, **mode)


def test_boxes_within_the_tolerance_are_accepted(tmp_path):
    # Detector rounding: up to max(2 px, 1% of the side) past the border.
    path = tmp_path / "f.h5"
    with RegionFeaturesWriter(path, max_boxes=2, feature_size=3) as writer:
        writer.add(
            1, np.ones((2, 3), np.float32), np.array([[-2, -2, 102, 82], [0, 0, 5, 5]], np.float32), 100, 80
        )
        boxes = np.array([[-9.9, 0, 1009.9, 500], [0, 0, 0, 7]], np.float32)  # 1% of 1000 = 10 px; zero width
        writer.add(2, np.ones((2, 3), np.float32), boxes, 1000, 500)
    reader = RegionFeatures(path, check_finite=True)
    np.testing.assert_array_equal(reader[2].boxes, boxes)
    assert reader[1].num_boxes == 2


def test_integer_boxes_and_sizes_are_read_as_floats(tmp_path):
    path = tmp_path / "f.h5"
    written = write_features(path, [2, 3])
    _edit(path, "boxes", np.round)
    _retype(path, "boxes", np.int32)
    _retype(path, "image_w", np.int64)
    item = RegionFeatures(path)[107]
    assert item.boxes.dtype == np.float32 and item.image_w == 100.0
    np.testing.assert_array_equal(item.boxes, np.round(written[107][1]))


def test_a_zeroed_extras_block_is_refused(tmp_path):
    path = tmp_path / "f.h5"
    boxes = np.array([[0, 0, 5, 5], [1, 1, 9, 9]], np.float32)
    with RegionFeaturesWriter(path, 4, 8, extras=("region_category",)) as writer:
        writer.add(1, np.ones((2, 8), np.float32), boxes, 10, 10, region_category=np.array([3, -1]))
    _edit(path, "region_category", lambda v: v * 0)
    with pytest.raises(ValueError, match="'region_category' has values beyond num_boxes for image 1"):
        RegionFeatures(path)


def test_nocaps_layout_rows_of_the_wrong_size_or_with_bad_boxes(tmp_path):
    vlen = h5py.vlen_dtype(np.float32)
    path = tmp_path / "nocaps.h5"
    with h5py.File(path, "w") as f:
        f["image_id"], f["num_boxes"] = np.array([11, 12, 13]), np.array([2, 2, 1])
        f["width"], f["height"] = np.array([64, 64, 64]), np.array([48, 48, 48])
        features, boxes = (
            f.create_dataset("features", (3,), dtype=vlen),
            f.create_dataset("boxes", (3,), dtype=vlen),
        )
        features[0], boxes[0] = np.ones(16, np.float32), np.array([0, 0, 5, 5, 1, 1, 9, 9], np.float32)
        features[1], boxes[1] = np.ones(15, np.float32), np.array([0, 0, 5, 5, 1, 1, 9, 9], np.float32)
        features[2], boxes[2] = np.ones(8, np.float32), np.array([9, 0, 5, 5], np.float32)
    reader = RegionFeatures(path)
    assert reader[11].features.shape == (2, 8)
    with pytest.raises(
        ValueError, match="'features' has 15 values, expected num_boxes x D = 2 x 8 for image 12"
    ):
        reader[12]
    with pytest.raises(ValueError, match="'boxes' has box 0 = .* inverted .* for image 13"):
        reader[13]
    with pytest.raises(ValueError, match="for image 12"):
        RegionFeatures(path, in_memory=True)


def test_the_fast_box_check_agrees_with_the_detailed_one():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from updown.data.readers import _boxes_plausible, box_problems

    special = st.sampled_from([0.0, -0.0, np.nan, np.inf, -np.inf, -2.0, 100.0, 102.0, 102.5, 80.0, 83.0])
    coordinate = st.one_of(special, st.floats(-20, 120, width=32))
    box = st.lists(coordinate, min_size=4, max_size=4)

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @given(st.lists(box, min_size=1, max_size=4))
    def check(rows):
        boxes = np.array(rows, dtype=np.float32)
        problems = box_problems(boxes, 100.0, 80.0)
        assert _boxes_plausible(boxes, 100.0, 80.0) == (not any(mask.any() for mask in problems.values()))

    check()


def test_a_worker_error_reaches_the_user_as_one_line(tmp_path):
    from updown.cli import error_message

    path = tmp_path / "f.h5"
    write_features(path, [2, 3])
    offset, _ = _chunk(path, "features", 1)
    _patch_bytes(path, offset + 5, b"\xff")
    loader = DataLoader(_Items(RegionFeatures(path)), batch_size=2, num_workers=1, collate_fn=collate_regions)
    with pytest.raises(ValueError) as error:
        list(loader)
    assert "Original Traceback" in str(error.value)
    assert error_message(error.value).startswith(
        f"{path}: dataset 'features' fails its checksum for image 107"
    )


def test_the_writer_refuses_what_the_reader_would_refuse(tmp_path):
    features, boxes = np.ones((2, 3), np.float32), np.array([[0, 0, 5, 5], [1, 1, 9, 9]], np.float32)
    for bad, message in (
        ({"features": features.astype(np.int64)}, "dtype int64"),
        ({"features": np.full((2, 3), np.nan, np.float32)}, "contains NaN or inf"),
        ({"features": np.full((2, 3), 70000, np.float32)}, "NaN or inf"),  # float16 overflows to inf
        ({"boxes": boxes[:, [2, 1, 0, 3]]}, "inverted"),
        ({"image_w": np.nan}, "implausible image size"),
        ({"image_h": 30000}, "implausible image size"),
    ):
        arguments = {"features": features, "boxes": boxes, "image_w": 10, "image_h": 10, **bad}
        with (
            pytest.raises(ValueError, match=message),
            RegionFeaturesWriter(tmp_path / "f.h5", 2, 3, "float16") as w,
        ):
            w.add(1, **arguments)
        assert list(tmp_path.iterdir()) == []
