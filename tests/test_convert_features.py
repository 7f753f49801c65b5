"""Tests for tools/convert_features.py: TSV (LXMERT and original layouts) to the region-feature HDF5."""

from __future__ import annotations

import base64
import importlib.util
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REALDATA, ROOT

from updown.data.tsv import LXMERT_FIELDS, TSVImage, write_original_tsv

LXMERT_TSV = REALDATA / "bottom-up-features" / "train2014_obj36.tsv"
IMAGES = REALDATA / "bottom-up-features" / "images"

_spec = importlib.util.spec_from_file_location("convert_features", ROOT / "tools" / "convert_features.py")
convert_features = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_features)


def make_images(seed: int, num_boxes: list[int], first_id: int, feature_size: int = 5) -> list[TSVImage]:
    rng = np.random.default_rng(seed)
    images = []
    for offset, count in enumerate(num_boxes):
        # Boxes inside the image (200 + offset) x 100, x1 <= x2 and y1 <= y2: converters refuse implausible ones.
        xs, ys = np.sort(rng.uniform(0, 100, size=(2, count, 2)), axis=2)
        boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float32)
        features = rng.gamma(1.0, size=(count, feature_size)).astype(np.float32)
        images.append(TSVImage(first_id + offset, 200.0 + offset, 100.0, boxes, features))
    return images


def run(capsys, *args: str) -> tuple[int, str]:
    code = convert_features.main([*map(str, args), "--quiet"])
    return code, capsys.readouterr().err


def listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ---------------------------------------------------------------- the real LXMERT file


@pytest.fixture(scope="module")
def real_outputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    for dtype in ("float32", "float16"):
        code = convert_features.main(
            ["--input", str(LXMERT_TSV), "--output", str(folder / f"{dtype}.h5"), "--dtype", dtype, "--quiet"]
        )
        assert code == 0
    return folder


def test_real_lxmert_file_is_converted_bit_exactly(real_outputs):
    from PIL import Image

    rows = [
        dict(zip(LXMERT_FIELDS, line.split("\t"))) for line in LXMERT_TSV.read_text().splitlines() if line
    ]
    assert len(rows) == 2  # two rows of the real file: see tests/data/README.md
    with h5py.File(real_outputs / "float32.h5", "r") as f:
        assert f["features"].shape == (2, 36, 2048) and f["features"].dtype == np.float32
        assert f["boxes"].shape == (2, 36, 4)
        np.testing.assert_array_equal(f["num_boxes"][:], np.full(2, 36))
        assert f.attrs["source_layout"] == "lxmert"
        for index, row in enumerate(rows):
            assert f["image_id"][index] == int(row["img_id"].removeprefix("COCO_train2014_"))
            features = np.frombuffer(base64.b64decode(row["features"]), dtype="<f4").reshape(36, 2048)
            boxes = np.frombuffer(base64.b64decode(row["boxes"]), dtype="<f4").reshape(36, 4)
            np.testing.assert_array_equal(f["features"][index].view(np.uint32), features.view(np.uint32))
            np.testing.assert_array_equal(f["boxes"][index].view(np.uint32), boxes.view(np.uint32))
            with Image.open(IMAGES / f"{row['img_id'].strip()}.jpg") as jpeg:
                assert (f["image_w"][index], f["image_h"][index]) == jpeg.size
            for name, dtype in (
                ("objects_id", "<i8"),
                ("objects_conf", "<f4"),
                ("attrs_id", "<i8"),
                ("attrs_conf", "<f4"),
            ):
                expected = np.frombuffer(base64.b64decode(row[name]), dtype=dtype)
                np.testing.assert_array_equal(f[name][index], expected)


def test_float16_output_equals_float32_values_cast(real_outputs):
    with (
        h5py.File(real_outputs / "float32.h5", "r") as f32,
        h5py.File(real_outputs / "float16.h5", "r") as f16,
    ):
        assert f16["features"].dtype == np.float16
        expected = f32["features"][:].astype(np.float16)
        np.testing.assert_array_equal(f16["features"][:].view(np.uint16), expected.view(np.uint16))
        np.testing.assert_array_equal(f16["boxes"][:], f32["boxes"][:])
        assert f16["boxes"].dtype == np.float32


# ---------------------------------------------------------------- original layout, several inputs


def test_two_original_files_with_stripped_padding_into_one_output(tmp_path, capsys):
    first, second = make_images(1, [3, 1, 2], first_id=10), make_images(2, [4, 2], first_id=20)
    write_original_tsv(tmp_path / "a.tsv", first, strip_padding=True)
    write_original_tsv(tmp_path / "b.tsv", second, strip_padding=True)
    assert b"=" not in (tmp_path / "a.tsv").read_bytes() + (tmp_path / "b.tsv").read_bytes()

    code, err = run(
        capsys, "--input", tmp_path / "a.tsv", tmp_path / "b.tsv", "--output", tmp_path / "out.h5"
    )
    assert code == 0, err
    images = first + second
    with h5py.File(tmp_path / "out.h5", "r") as f:
        # No --max-boxes: the scan finds the largest box count over both files.
        assert f["features"].shape == (5, 4, 5)
        assert "objects_id" not in f and f.attrs["source_layout"] == "original"
        np.testing.assert_array_equal(f["image_id"][:], [10, 11, 12, 20, 21])
        np.testing.assert_array_equal(f["num_boxes"][:], [3, 1, 2, 4, 2])
        for index, image in enumerate(images):
            count = image.num_boxes
            np.testing.assert_array_equal(f["features"][index, :count], image.features)
            np.testing.assert_array_equal(f["boxes"][index, :count], image.boxes)
            assert not f["features"][index, count:].any() and not f["boxes"][index, count:].any()
            assert (f["image_w"][index], f["image_h"][index]) == (image.image_w, image.image_h)


def test_max_boxes_pads_or_refuses(tmp_path, capsys):
    write_original_tsv(tmp_path / "a.tsv", make_images(3, [2, 3], first_id=1))
    code, err = run(
        capsys, "--input", tmp_path / "a.tsv", "--output", tmp_path / "wide.h5", "--max-boxes", "7"
    )
    assert code == 0, err
    with h5py.File(tmp_path / "wide.h5", "r") as f:
        assert f["features"].shape == (2, 7, 5)
    code, err = run(
        capsys, "--input", tmp_path / "a.tsv", "--output", tmp_path / "narrow.h5", "--max-boxes", "2"
    )
    assert code == 2
    assert "line 2 (image 2): 3 boxes, more than --max-boxes 2" in err
    assert not (tmp_path / "narrow.h5").exists()


# ---------------------------------------------------------------- refusals and errors leave no output


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    write_original_tsv(tmp_path / "a.tsv", make_images(4, [2], first_id=5))
    output = tmp_path / "out.h5"
    output.write_bytes(b"previous results")
    code, err = run(capsys, "--input", tmp_path / "a.tsv", "--output", output)
    assert code == 2 and "--force" in err and "Traceback" not in err
    assert output.read_bytes() == b"previous results"

    code, err = run(capsys, "--input", tmp_path / "a.tsv", "--output", output, "--force")
    assert code == 0, err
    with h5py.File(output, "r") as f:
        assert list(f["image_id"][:]) == [5]


def test_truncated_input_gives_clear_error_and_no_output(tmp_path, capsys):
    write_original_tsv(tmp_path / "a.tsv", make_images(5, [2, 3, 3], first_id=1))
    text = (tmp_path / "a.tsv").read_bytes()
    (tmp_path / "cut.tsv").write_bytes(text[: len(text) - 30])
    before = listing(tmp_path)
    code, err = run(
        capsys, "--input", tmp_path / "cut.tsv", "--output", tmp_path / "out.h5", "--max-boxes", "3"
    )
    assert code == 2
    assert f"{tmp_path / 'cut.tsv'}, line 3: the last line has no line end" in err and "truncated" in err
    assert "Traceback" not in err
    assert listing(tmp_path) == before  # neither the output nor its temporary file

    # A failed --force run leaves the previous output as it was.
    (tmp_path / "out.h5").write_bytes(b"previous results")
    code, _ = run(capsys, "--input", tmp_path / "cut.tsv", "--output", tmp_path / "out.h5", "--force")
    assert code == 2 and (tmp_path / "out.h5").read_bytes() == b"previous results"
    assert listing(tmp_path) == sorted([*before, "out.h5"])

    with pytest.raises(ValueError, match="line 3"):
        convert_features.main(
            ["--input", str(tmp_path / "cut.tsv"), "--output", str(tmp_path / "x.h5"), "--debug", "--quiet"]
        )


@pytest.mark.parametrize("problem", ["duplicate", "feature_size", "missing", "empty", "mixed"])
def test_bad_input_sets_are_refused(tmp_path, capsys, problem):
    write_original_tsv(tmp_path / "a.tsv", make_images(6, [2, 2], first_id=1))
    second = tmp_path / "b.tsv"
    expected = {
        "duplicate": "b.tsv, line 1 (image 2): image id already appeared at a.tsv, line 2",
        "feature_size": "b.tsv, line 1 (image 8): features are 7-d, but earlier rows are 5-d",
        "missing": "b.tsv: input TSV not found",
        "empty": "b.tsv: the file has no rows",
        "mixed": "files mix the original and LXMERT layouts",
    }[problem]
    if problem == "duplicate":
        write_original_tsv(second, make_images(7, [1], first_id=2))
    elif problem == "feature_size":
        write_original_tsv(second, make_images(7, [1], first_id=8, feature_size=7))
    elif problem == "empty":
        second.write_text("")
    elif problem == "mixed":
        second.write_text("\t".join(["COCO_x_000000000001"] + ["0"] * 9) + "\n")
    code, err = run(capsys, "--input", tmp_path / "a.tsv", second, "--output", tmp_path / "out.h5")
    assert code == 2 and expected in err, err
    assert not (tmp_path / "out.h5").exists()
    assert not [name for name in listing(tmp_path) if name.endswith(".tmp")]


def test_runs_as_a_script_from_the_repository_root(tmp_path):
    write_original_tsv(tmp_path / "a.tsv", make_images(8, [1, 2], first_id=3))
    command = [sys.executable, "tools/convert_features.py", "--input", str(tmp_path / "a.tsv"), "--output"]
    result = subprocess.run([*command, str(tmp_path / "out.h5")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "wrote 2 images" in result.stderr
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert list(f["image_id"][:]) == [3, 4]


def test_explicit_layout_must_match_the_file(tmp_path, capsys):
    write_original_tsv(tmp_path / "a.tsv", make_images(9, [1], first_id=1))
    code, err = run(
        capsys, "--input", tmp_path / "a.tsv", "--output", tmp_path / "out.h5", "--layout", "lxmert"
    )
    assert code == 2 and "--layout lxmert expects 10 fields, but the row has 6" in err
    assert "Pass --layout original" in err
    assert not (tmp_path / "out.h5").exists()
    code, err = run(
        capsys, "--input", tmp_path / "a.tsv", "--output", tmp_path / "out.h5", "--layout", "original"
    )
    assert code == 0, err


# ---------------------------------------------------------------- compressed inputs, implausible rows


def _h5_contents(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in f}


def test_gzip_and_zip_inputs_convert_like_the_plain_files(tmp_path, capsys):
    import gzip
    import zipfile

    write_original_tsv(tmp_path / "a.tsv", make_images(10, [2, 3], first_id=1))
    write_original_tsv(tmp_path / "b.tsv", make_images(11, [1, 4], first_id=5))
    assert (
        run(capsys, "--input", tmp_path / "a.tsv", tmp_path / "b.tsv", "--output", tmp_path / "plain.h5")[0]
        == 0
    )
    (tmp_path / "a.tsv.gz").write_bytes(gzip.compress((tmp_path / "a.tsv").read_bytes()))
    (tmp_path / "b.tsv.gz").write_bytes(gzip.compress((tmp_path / "b.tsv").read_bytes()))
    with zipfile.ZipFile(tmp_path / "ab.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(tmp_path / "b.tsv", "b.tsv")
        archive.write(tmp_path / "a.tsv", "a.tsv")
    expected = _h5_contents(tmp_path / "plain.h5")
    for inputs in ([tmp_path / "a.tsv.gz", tmp_path / "b.tsv.gz"], [tmp_path / "ab.zip"]):
        for extra in ([], ["--max-boxes", "4"]):  # with and without the num_boxes scan
            output = tmp_path / "out.h5"
            code, err = run(capsys, "--input", *inputs, "--output", output, "--force", *extra)
            assert code == 0, err
            contents = _h5_contents(output)
            assert contents.keys() == expected.keys()
            for name, values in expected.items():
                np.testing.assert_array_equal(contents[name], values)


def test_a_damaged_gzip_input_is_one_error_and_leaves_the_previous_output(tmp_path, capsys):
    import gzip

    write_original_tsv(tmp_path / "a.tsv", make_images(12, [2, 3, 1], first_id=1))
    data = bytearray(gzip.compress((tmp_path / "a.tsv").read_bytes()))
    data[-6] ^= 0x01  # the CRC: found only at the end of the stream, after every row was written
    (tmp_path / "a.tsv.gz").write_bytes(bytes(data))
    (tmp_path / "out.h5").write_bytes(b"previous results")
    before = listing(tmp_path)
    code, err = run(capsys, "--input", tmp_path / "a.tsv.gz", "--output", tmp_path / "out.h5", "--force")
    assert code == 2 and f"{tmp_path / 'a.tsv.gz'}: the archive is damaged" in err and "CRC" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert listing(tmp_path) == before and (tmp_path / "out.h5").read_bytes() == b"previous results"


@pytest.mark.parametrize(
    "box, message",
    [
        ([50, 10, 40, 20], "field 'boxes': has box 1 = (50, 10, 40, 20) inverted"),
        ([0, 0, 150, 20], "field 'boxes': has box 1 = (0, 0, 150, 20) outside the 100 x 100 image"),
        ([0, 0, 0, 0], "field 'boxes': has box 1 = (0, 0, 0, 0), a padding box"),
    ],
)
def test_implausible_rows_are_refused_naming_the_line(tmp_path, capsys, box, message):
    images = make_images(13, [2, 2], first_id=1)
    images[1] = TSVImage(2, 100.0, 100.0, images[1].boxes.copy(), images[1].features)
    images[1].boxes[1] = box
    write_original_tsv(tmp_path / "a.tsv", images)
    code, err = run(capsys, "--input", tmp_path / "a.tsv", "--output", tmp_path / "new" / "deeper" / "out.h5")
    assert code == 2 and f"a.tsv, line 2 (image 2), {message}" in err, err
    # No output, and not the folders the output would have gone to either.
    assert listing(tmp_path) == ["a.tsv"]


def test_an_implausible_image_size_is_refused(tmp_path, capsys):
    images = make_images(14, [2], first_id=1)
    images[0] = TSVImage(1, 25000.0, 100.0, images[0].boxes, images[0].features)
    write_original_tsv(tmp_path / "a.tsv", images)
    code, err = run(capsys, "--input", tmp_path / "a.tsv", "--output", tmp_path / "out.h5")
    assert code == 2 and "line 1 (image 1): implausible image size 25000 x 100" in err
