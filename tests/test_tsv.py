"""Tests for updown.data.tsv: decoding both bottom-up TSV layouts, padding repair, errors, the writer."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from conftest import REALDATA

from updown.data.tsv import (
    LXMERT_FIELDS,
    ORIGINAL_FIELDS,
    TSVImage,
    decode_base64_array,
    detect_layout,
    iter_tsv,
    parse_image_id,
    write_original_tsv,
)

LXMERT_TSV = REALDATA / "bottom-up-features" / "train2014_obj36.tsv"
IMAGES = REALDATA / "bottom-up-features" / "images"


def b64(values: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode("ascii")


def random_images(seed: int, count: int, feature_size: int = 5, first_id: int = 1) -> list[TSVImage]:
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        # 1, 2 and 3 boxes of 5 floats (20n bytes) give every base64 padding case: 1, 2 and 0 "=".
        num_boxes = index % 3 + 1
        boxes = rng.uniform(0, 300, size=(num_boxes, 4)).astype(np.float32)
        features = rng.gamma(1.0, size=(num_boxes, feature_size)).astype(np.float32)
        image_w, image_h = (640.0, 480.0) if index % 2 else (333.5, 500.0)
        images.append(TSVImage(first_id + index, image_w, image_h, boxes, features))
    return images


def original_row(image_id="7", width="640", height="480", num_boxes=None, boxes=None, features=None) -> str:
    rng = np.random.default_rng(0)
    boxes = b64(rng.uniform(size=(2, 4)), "<f4") if boxes is None else boxes
    features = b64(rng.uniform(size=(2, 5)), "<f4") if features is None else features
    num_boxes = "2" if num_boxes is None else num_boxes
    return "\t".join([image_id, width, height, num_boxes, boxes, features]) + "\r\n"


# ---------------------------------------------------------------- parse_image_id, decode_base64_array


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("COCO_train2014_000000132417", 132417),
        ("COCO_val2014_000000000042", 42),
        ("132417", 132417),
        (" 9 ", 9),
    ],
)
def test_parse_image_id(text, expected):
    assert parse_image_id(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "COCO_train2014_", "-3", "12.5", "COCO_train2014_00012x"])
def test_parse_image_id_rejects_other_text(text):
    with pytest.raises(ValueError, match="PREFIX_DIGITS"):
        parse_image_id(text)


@pytest.mark.parametrize("count", [1, 2, 3, 6])
def test_decode_restores_missing_padding(count):
    values = np.random.default_rng(count).normal(size=(count,)).astype(np.float32)
    padded = b64(values, "<f4")
    stripped = padded.rstrip("=")
    # 4n bytes need (3 - 4n mod 3) mod 3 padding characters; check the case is really exercised.
    assert len(padded) - len(stripped) == (-4 * count) % 3
    expected = np.frombuffer(base64.b64decode(padded), dtype="<f4")
    for text in (padded, stripped, f"b'{padded}'"):
        decoded = decode_base64_array(text, "float32", (count,))
        assert decoded.dtype == np.float32 and decoded.flags.writeable
        np.testing.assert_array_equal(decoded.view(np.uint32), expected.view(np.uint32))


def test_decode_infers_one_dimension_and_reads_little_endian_int64():
    ids = np.arange(6, dtype="<i8") * 1000003
    decoded = decode_base64_array(b64(ids, "<i8"), "int64", (2, -1))
    assert decoded.shape == (2, 3) and decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded.ravel(), ids)


@pytest.mark.parametrize(
    ("text", "shape", "message"),
    [
        ("AAAA!AAA", (1,), "not valid base64"),
        ("AAAAA", (1,), "truncated"),
        (b64(np.zeros(3), "<f4"), (2,), "do not fit"),
        (b64(np.zeros(3), "<f4"), (2, -1), "do not fit"),
        (base64.b64encode(b"\x00" * 6).decode(), (-1,), "whole number"),
    ],
)
def test_decode_rejects_bad_text(text, shape, message):
    with pytest.raises(ValueError, match=message):
        decode_base64_array(text, "float32", shape)


# ---------------------------------------------------------------- the real LXMERT file


def test_real_lxmert_file_matches_an_independent_decode():
    from PIL import Image

    assert detect_layout(LXMERT_TSV) == "lxmert"
    images = list(iter_tsv(LXMERT_TSV))
    raw_rows = [line.rstrip("\r\n").split("\t") for line in LXMERT_TSV.read_text().splitlines() if line]
    assert len(images) == len(raw_rows) == 2  # two rows of the real file: see tests/data/README.md
    for image, raw in zip(images, raw_rows):
        row = dict(zip(LXMERT_FIELDS, raw))
        assert image.image_id == int(row["img_id"].rsplit("_", 1)[1])
        with Image.open(IMAGES / f"{row['img_id']}.jpg") as jpeg:
            assert (image.image_w, image.image_h) == jpeg.size
        features = np.frombuffer(base64.b64decode(row["features"]), dtype="<f4").reshape(36, 2048)
        boxes = np.frombuffer(base64.b64decode(row["boxes"]), dtype="<f4").reshape(36, 4)
        assert image.features.shape == (36, 2048) and image.features.dtype == np.float32
        np.testing.assert_array_equal(image.features.view(np.uint32), features.view(np.uint32))
        np.testing.assert_array_equal(image.boxes.view(np.uint32), boxes.view(np.uint32))
        # Boxes must lie inside the image: a width/height swap would push some outside.
        assert (image.boxes[:, 2] <= image.image_w).all() and (image.boxes[:, 3] <= image.image_h).all()
        for name, dtype in (
            ("objects_id", "<i8"),
            ("objects_conf", "<f4"),
            ("attrs_id", "<i8"),
            ("attrs_conf", "<f4"),
        ):
            np.testing.assert_array_equal(
                image.extras[name], np.frombuffer(base64.b64decode(row[name]), dtype=dtype)
            )
    assert len({image.image_id for image in images}) == 2
    # Non-square images in both orientations, so equal sizes cannot hide a swap.
    assert any(image.image_w > image.image_h for image in images)
    assert any(image.image_w < image.image_h for image in images)


# ---------------------------------------------------------------- the original layout, written and read back


def test_original_round_trip_with_stripped_padding(tmp_path):
    images = random_images(seed=1, count=5)
    path = tmp_path / "features.tsv"
    assert write_original_tsv(path, images, strip_padding=True) == 5
    raw = path.read_bytes()
    lines = raw.split(b"\r\n")
    assert lines[-1] == b"" and len(lines) == 6
    fields = [line.split(b"\t") for line in lines[:-1]]
    assert all(len(row) == len(ORIGINAL_FIELDS) for row in fields)
    assert b"=" not in raw
    assert {len(row[5]) % 4 for row in fields} == {0, 2, 3}
    assert fields[0][1:3] == [b"333.5", b"500"] and fields[1][1:3] == [b"640", b"480"]

    assert detect_layout(path) == "original"
    for written, read in zip(images, iter_tsv(path), strict=True):
        assert read.image_id == written.image_id
        assert (read.image_w, read.image_h) == (written.image_w, written.image_h)
        np.testing.assert_array_equal(read.features, written.features)
        np.testing.assert_array_equal(read.boxes, written.boxes)
        assert read.extras == {}


def test_write_original_refuses_overwrite_and_bad_shapes(tmp_path):
    path = tmp_path / "features.tsv"
    path.write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        write_original_tsv(path, random_images(seed=2, count=1), force=False)
    assert path.read_text() == "keep me"

    bad = TSVImage(3, 10.0, 10.0, np.zeros((2, 4), np.float32), np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="image 3 has boxes"):
        write_original_tsv(tmp_path / "bad.tsv", [*random_images(seed=2, count=2), bad])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.tsv"]


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("second_row", "field", "message"),
    [
        ("7\t640\t480\t2\n", None, "4 tab-separated fields"),
        (original_row(num_boxes="3"), "boxes", "do not fit shape"),
        (original_row(num_boxes="two"), "num_boxes", "invalid literal"),
        (original_row(num_boxes="0"), "num_boxes", "at least one box"),
        (original_row(boxes="AAAA*AAA"), "boxes", "not valid base64"),
        (original_row(features=b64(np.full((2, 5), np.nan), "<f4")), "features", "NaN or infinite"),
        (original_row(image_id="seven"), "image_id", "PREFIX_DIGITS"),
        (original_row(height="-5"), "image_h", "not a positive number"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path, second_row, field, message):
    path = tmp_path / "bad.tsv"
    path.write_text(original_row() + second_row, newline="")
    images = iter_tsv(path)
    assert next(images).image_id == 7
    with pytest.raises(ValueError, match=message) as error:
        next(images)
    assert str(path) in str(error.value) and "line 2" in str(error.value)
    if field is not None:
        assert f"field {field!r}" in str(error.value)


def test_layout_mismatch_and_truncated_file(tmp_path):
    path = tmp_path / "features.tsv"
    write_original_tsv(path, random_images(seed=3, count=3))
    with pytest.raises(ValueError, match="expected 10 for the lxmert layout.*--layout original"):
        next(iter_tsv(path, layout="lxmert"))

    truncated = tmp_path / "truncated.tsv"
    text = path.read_bytes()
    truncated.write_bytes(text[: len(text) - 7])
    images = iter_tsv(truncated)
    assert [next(images).image_id, next(images).image_id] == [1, 2]
    with pytest.raises(ValueError, match="line 3: the last line has no line end, so the file was cut off"):
        next(images)
    # Cut inside the last field but keeping the line end: the row itself is malformed.
    truncated.write_bytes(text[: len(text) - 7] + b"\r\n")
    with pytest.raises(ValueError, match="line 3, field 'features'"):
        list(iter_tsv(truncated))


def test_detect_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        detect_layout(tmp_path / "missing.tsv")
    empty = tmp_path / "empty.tsv"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        detect_layout(empty)
    other = tmp_path / "other.tsv"
    other.write_text("a\tb\tc\n")
    with pytest.raises(ValueError, match="line 1: 3 tab-separated fields"):
        detect_layout(other)


# ---------------------------------------------------------------- compressed inputs


def _gzip(source, destination):
    import gzip

    destination.write_bytes(gzip.compress(source.read_bytes()))
    return destination


def _zip(destination, members: dict):
    import zipfile

    with zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return destination


def _same_images(left, right):
    left, right = list(left), list(right)
    assert [i.image_id for i in left] == [i.image_id for i in right]
    for a, b in zip(left, right, strict=True):
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert (a.image_w, a.image_h, a.line) == (b.image_w, b.image_h, b.line)


def test_gzip_and_zip_inputs_read_like_the_plain_files(tmp_path):
    first, second = tmp_path / "a.tsv", tmp_path / "b.tsv"
    write_original_tsv(first, random_images(seed=4, count=3))
    write_original_tsv(second, random_images(seed=5, count=2, first_id=10))
    plain = [*iter_tsv(first), *iter_tsv(second)]
    gz = _gzip(first, tmp_path / "a.tsv.gz")
    _same_images(iter_tsv(gz), iter_tsv(first))
    assert detect_layout(gz) == "original"
    # Members in name order, whatever their order in the archive; other members are skipped.
    archive = _zip(
        tmp_path / "features.zip",
        {"part/b.tsv": second.read_bytes(), "README.txt": b"two parts", "part/a.tsv": first.read_bytes()},
    )
    images = list(iter_tsv(archive))
    _same_images(images, plain)
    assert images[0].source == f"{archive}:part/a.tsv" and images[-1].source == f"{archive}:part/b.tsv"
    # Progress in the unit input_size() counts: bytes on disk, or uncompressed member bytes.
    from updown.data.tsv import input_size

    for path in (gz, archive):
        counted = []
        list(iter_tsv(path, on_bytes=counted.append))
        assert sum(counted) == input_size(path)


def test_damaged_archives_are_one_clear_error(tmp_path):
    source = tmp_path / "a.tsv"
    write_original_tsv(source, random_images(seed=6, count=3))
    data = bytearray(_gzip(source, tmp_path / "good.tsv.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped = tmp_path / "flipped.tsv.gz"
    flipped.write_bytes(bytes(data))
    cut = tmp_path / "cut.tsv.gz"
    cut.write_bytes(bytes(data[: len(data) // 2]))
    for path in (flipped, cut):
        with pytest.raises(ValueError, match=f"{path}: the archive is damaged .*Download or create it again"):
            list(iter_tsv(path))
    renamed = tmp_path / "plain.tsv.gz"
    renamed.write_bytes(source.read_bytes())
    with pytest.raises(ValueError, match="not a gzip archive"):
        detect_layout(renamed)
    archive = bytearray(_zip(tmp_path / "good.zip", {"a.tsv": source.read_bytes()}).read_bytes())
    archive[60] ^= 0xFF  # inside the compressed member
    (tmp_path / "bad.zip").write_bytes(bytes(archive))
    with pytest.raises(ValueError, match="bad.zip:a.tsv: the archive is damaged"):
        list(iter_tsv(tmp_path / "bad.zip"))
    with pytest.raises(ValueError, match="holds no .tsv file \\(found notes.txt\\)"):
        detect_layout(_zip(tmp_path / "empty.zip", {"notes.txt": b"nothing"}))


def test_a_stray_carriage_return_is_a_malformed_row_not_a_csv_error(tmp_path):
    path = tmp_path / "cr.tsv"
    path.write_text(original_row() + original_row(width="6\r40"), newline="")
    images = iter_tsv(path)
    next(images)
    with pytest.raises(ValueError, match="cr.tsv, line 2: new-line character seen .*The row is malformed"):
        next(images)
