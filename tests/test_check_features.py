"""Tests for tools/check_features.py: every row scanned, problems counted per kind, exit 0 / 2."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import ROOT, write_features

from updown.data.readers import RegionFeatures
from updown.data.writers import RegionFeaturesWriter

_spec = importlib.util.spec_from_file_location("check_features", ROOT / "tools" / "check_features.py")
check_features = importlib.util.module_from_spec(_spec)
sys.modules["check_features"] = check_features  # its dataclass looks its module up
_spec.loader.exec_module(check_features)


def run(capsys, *paths) -> tuple[int, str, str]:
    code = check_features.main([*map(str, paths), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _edit(path, name: str, edit) -> None:
    with h5py.File(path, "r+") as f:
        values = f[name][()]
        edit(values)
        f[name][...] = values


def test_a_clean_file_exits_0(tmp_path, capsys):
    write_features(tmp_path / "f.h5", [2, 6, 1])
    code, out, err = run(capsys, tmp_path / "f.h5")
    assert code == 0 and err == ""
    assert out.strip() == f"{tmp_path / 'f.h5'}: 3 images, clean"


def test_every_kind_is_counted_with_the_first_image_ids(tmp_path, capsys):
    path = tmp_path / "f.h5"
    write_features(path, [2, 3, 4, 5, 6, 1, 2])  # ids 100, 107, ..., 142
    _edit(path, "features", lambda v: (v.__setitem__((0, 0, 0), np.nan), v.__setitem__((2, 1, 0), np.inf)))
    _edit(path, "features", lambda v: v.__setitem__((1, 2), 0.0))  # one zero feature row
    _edit(path, "features", lambda v: v.__setitem__((3, 0, 0), 1e7))
    _edit(path, "boxes", lambda v: v.__setitem__((4, 1), [9, 9, 3, 12]))  # inverted
    _edit(path, "boxes", lambda v: v.__setitem__((5, 0), [0, 0, 150, 10]))  # outside 100 x 80
    _edit(path, "features", lambda v: v.__setitem__((6, 4, 0), 1.0))  # padding
    _edit(path, "image_h", lambda v: v.__setitem__(6, 0.0))
    code, out, err = run(capsys, path)
    assert code == 2
    assert err.count("error:") == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("check_features.py: error: 1 of 1 file(s) are not clean")
    lines = out.strip().splitlines()
    assert lines[0] == f"{path}: 7 images, 7 kind(s) of problem:"
    report = {line.split(" (")[0].strip(): line for line in lines[1:]}
    assert report["non-finite features"].endswith(": 2 image(s), e.g. 100, 114")
    assert report["all-zero feature rows"].endswith(": 1 image(s), e.g. 107")
    assert report["huge features"].endswith("e.g. 121")
    assert report["inverted boxes"].endswith("e.g. 128")
    assert report["boxes outside the image"].endswith("1 image(s), e.g. 135")  # not 142, whose size is bad
    assert report["non-zero padding"].endswith("e.g. 142")
    assert report["non-positive image sizes"].endswith("e.g. 142")
    # The reader refuses each of these images too (bar the zero row and the padding, it does not read).
    for image_id in (100, 114, 121, 128, 135):
        with pytest.raises(ValueError):
            RegionFeatures(path)[image_id]


def test_examples_are_limited_and_counts_are_complete(tmp_path, capsys):
    path = tmp_path / "f.h5"
    write_features(path, [1] * 9)
    _edit(path, "features", lambda v: v.__setitem__((slice(None), 0, 0), np.nan))
    code = check_features.main([str(path), "--quiet", "--examples", "3"])
    out = capsys.readouterr().out
    assert (
        code == 2
        and "non-finite features (NaN or inf in the features of real boxes): 9 image(s), e.g. 100, 107, 114\n"
        in out
    )


def test_damaged_blocks_are_listed_per_image(tmp_path, capsys):
    path = tmp_path / "f.h5"
    write_features(path, [2, 3, 4])
    with h5py.File(path, "r") as f:
        offsets = [f["boxes"].id.get_chunk_info(i).byte_offset for i in (0, 2)]
    with open(path, "r+b") as file:
        for offset in offsets:
            file.seek(offset + 3)
            byte = file.read(1)[0]
            file.seek(offset + 3)
            file.write(bytes([byte ^ 0x10]))
    code, out, _ = run(capsys, path)
    assert (
        code == 2
        and "unreadable (blocks that fail their checksum or cannot be read): 2 image(s), e.g. 100, 114" in out
    )


def test_small_blocks_find_the_same_as_large_ones(tmp_path, capsys, monkeypatch):
    path = tmp_path / "f.h5"
    write_features(path, [2, 3, 4, 5, 6, 1, 2])
    _edit(path, "boxes", lambda v: (v.__setitem__((1, 0, 2), np.nan), v.__setitem__((5, 0), 0)))
    expected = run(capsys, path)
    monkeypatch.setattr(check_features._Scanner, "block_size", lambda self: 2)
    assert run(capsys, path) == expected
    assert "non-finite boxes" in expected[1] and "all-zero boxes" in expected[1]


def test_integer_features_and_bad_metadata(tmp_path, capsys):
    path = tmp_path / "int.h5"
    write_features(path, [2, 3])
    with h5py.File(path, "r+") as f:
        values = f["features"][()]
        del f["features"]
        f["features"] = (values * 100).astype(np.int16)
    code, out, _ = run(capsys, path)
    assert (
        code == 2 and "feature dtype (features stored as a non-float type): 2 image(s), e.g. 100, 107" in out
    )

    big = tmp_path / "big.h5"
    write_features(big, [2, 3])
    _edit(big, "image_w", lambda v: v.__setitem__(1, 30000))
    _edit(big, "image_id", lambda v: v.__setitem__(1, 100))
    _edit(big, "num_boxes", lambda v: v.__setitem__(0, 7))
    code, out, _ = run(capsys, big)
    assert "huge image sizes (larger than 20000 px): 1 image(s)" in out
    assert "duplicate image ids (an id on more than one row): 1 image(s), e.g. 100" in out
    assert "num_boxes out of range (not in 1..max_boxes): 1 image(s), e.g. 100" in out


def test_the_nocaps_layout(tmp_path, capsys):
    vlen = h5py.vlen_dtype(np.float32)
    path = tmp_path / "nocaps.h5"
    with h5py.File(path, "w") as f:
        f["image_id"], f["num_boxes"] = np.array([11, 12, 13]), np.array([2, 2, 1])
        f["width"], f["height"] = np.array([64.0, 64.0, 64.0]), np.array([48.0, 48.0, 48.0])
        features, boxes = (
            f.create_dataset("features", (3,), dtype=vlen),
            f.create_dataset("boxes", (3,), dtype=vlen),
        )
        features[0], boxes[0] = np.ones(16, np.float32), np.array([0, 0, 5, 5, 1, 1, 9, 9], np.float32)
        features[1], boxes[1] = np.ones(15, np.float32), np.array([0, 0, 5, 5, 1, 1, 9, 9], np.float32)
        features[2], boxes[2] = np.ones(8, np.float32), np.array([0, 0, 5, 500], np.float32)
    code, out, _ = run(capsys, path)
    assert code == 2
    assert (
        "feature row size (variable-length rows whose size is not num_boxes x D): 1 image(s), e.g. 12" in out
    )
    assert "boxes outside the image" in out and "e.g. 13" in out


def test_files_that_cannot_be_scanned_and_several_files(tmp_path, capsys):
    write_features(tmp_path / "good.h5", [2])
    (tmp_path / "text.h5").write_text("not hdf5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1]
    code, out, err = run(
        capsys, tmp_path / "good.h5", tmp_path / "text.h5", tmp_path / "other.h5", tmp_path / "no.h5"
    )
    assert code == 2
    assert f"{tmp_path / 'good.h5'}: 1 images, clean" in out
    assert f"{tmp_path / 'text.h5'}: not a readable HDF5 file" in out
    assert f"{tmp_path / 'other.h5'}: missing dataset(s)" in out
    assert f"{tmp_path / 'no.h5'}: file not found" in out
    assert err.startswith("check_features.py: error: 3 of 4 file(s) are not clean") and err.count("\n") == 1


def test_runs_as_a_script(tmp_path):
    write_features(tmp_path / "f.h5", [2, 3])
    with RegionFeaturesWriter(tmp_path / "g.h5", 2, 8, checksums=False) as writer:
        writer.add(1, np.ones((1, 8), np.float32), np.array([[0, 0, 5, 5]], np.float32), 10, 10)
    command = [sys.executable, "tools/check_features.py", str(tmp_path / "f.h5"), str(tmp_path / "g.h5")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("clean") == 2
