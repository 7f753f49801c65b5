"""Fuzzing the region-feature inputs (issue 16): a corrupt input never yields a result.

Hypothesis mutates valid inputs and drives each mutant through the entry point that reads it:

- HDF5 feature files (written by RegionFeaturesWriter): dtype changes, shape changes, implausible values (NaN,
  inf, huge, inverted or outside boxes, bad sizes and box counts), truncation, bytes flipped or overwritten in
  data chunks or anywhere in the file, and chunks zeroed whole (checksum included, which Fletcher-32 passes).
  Through :class:`RegionFeatures` (lazy, in memory, scanned) and ``tools/check_features.py``, and, for a bounded
  number of examples, through ``python -m updown.predict captions`` on a tiny trained checkpoint.
- Bottom-up TSV files, plain, ``.tsv.gz`` or ``.zip``: fields replaced by garbage, base64 damaged (bad characters,
  cut, deleted or doubled), wrong counts (num_boxes, fields, split or duplicated rows), truncation, and bytes
  flipped in the compressed archive. Through ``tools/convert_features.py``.

The property: the result equals that of the clean input (a harmless mutation), or the entry point refuses it
with exit 2 (a ValueError for the reader), exactly one ``error:`` line, no traceback, and no new or changed
files. Never a traceback, never a different result with exit 0.

Left out, because no reader can tell them from valid data: rewriting a value with another plausible one (a
feature 0.3 -> 0.4, a box moved within the image, a larger image size, another id), dropping or reordering
whole rows or images, and lossy re-saves (narrowing an integer type that clips). A TSV has no checksum, so a
bit flipped inside valid base64 is such a plausible rewrite too: TSV damage here breaks the text's structure.

Examples per property: ``FUZZ_EXAMPLES`` (default 100; the predict property runs ``FUZZ_PREDICT_EXAMPLES``,
default 20), derandomised so every run tries the same ones; setting either variable draws fresh random examples.
``pytest -m slow tests/test_fuzz_features.py`` runs 2000 per property (200 through predict). Each property
reports the number of examples it ran (``-s`` shows them).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import updown.predict
from updown.data.readers import RegionFeatures
from updown.data.writers import RegionFeaturesWriter


def _load_tool(name: str):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"_fuzz_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check_features = _load_tool("check_features")
convert_features = _load_tool("convert_features")

FAST_EXAMPLES = 100
FAST_PREDICT_EXAMPLES = 20
SLOW_EXAMPLES = 2000
SLOW_PREDICT_EXAMPLES = 200
RANDOM = "FUZZ_EXAMPLES" in os.environ or "FUZZ_PREDICT_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", FAST_EXAMPLES))
PREDICT_EXAMPLES = int(os.environ.get("FUZZ_PREDICT_EXAMPLES", FAST_PREDICT_EXAMPLES))
# Examples run per property, and how they ended: printed at the end of each property.
COUNTS: dict[str, Counter] = {}


def fuzz_settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written into the repository
        derandomize=not RANDOM,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def record(name: str, outcome: str) -> None:
    COUNTS.setdefault(name, Counter())[outcome] += 1


def report(name: str) -> None:
    counts = COUNTS.pop(name, Counter())
    print(
        f"\n{name}: {sum(counts.values())} examples ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})"
    )


def listing(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def one_error_line(text: str, prog: str) -> None:
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), text


# ==========================================================================================================
# HDF5 mutations. A mutation is drawn against a description of the clean file and applied to a copy of it.


@dataclass(frozen=True)
class FileSpec:
    """What mutations need to know of a clean feature file."""

    num_images: int
    max_boxes: int
    feature_size: int
    num_boxes: tuple[int, ...]
    image_w: tuple[float, ...]
    image_h: tuple[float, ...]
    datasets: tuple[str, ...]
    extras: tuple[str, ...]
    rows: tuple[int, ...]  # rows a mutation aims at (e.g. the images predict reads)
    reach: tuple[tuple[float, float], ...]  # per image, the largest x2 and y2 of its boxes
    retypes: dict[str, tuple[str, ...]]  # per dataset, the dtypes it can be re-saved as without loss

    @classmethod
    def of(cls, path: Path, rows=None) -> FileSpec:
        with h5py.File(path, "r") as f:
            values = {name: f[name][()] for name in f}
        n, m, d = values["features"].shape
        num_boxes = values["num_boxes"]
        reach = tuple(
            (float(values["boxes"][i, :k, 2].max()), float(values["boxes"][i, :k, 3].max()))
            for i, k in enumerate(num_boxes)
        )
        candidates = (
            "float16",
            "float32",
            "float64",
            "int8",
            "int16",
            "int32",
            "int64",
            "uint8",
            "uint16",
            "uint32",
        )
        with np.errstate(all="ignore"):  # the lossy casts overflow
            retypes = {
                name: tuple(
                    t for t in candidates if np.array_equal(array.astype(t).astype(array.dtype), array)
                )
                for name, array in values.items()
            }
        extras = tuple(name for name in values if name not in REQUIRED)
        rows = tuple(range(n)) if rows is None else tuple(rows)
        return cls(n, m, d, tuple(map(int, num_boxes)), tuple(map(float, values["image_w"])),
                   tuple(map(float, values["image_h"])), tuple(values), extras, rows, reach, retypes)  # fmt: skip


REQUIRED = ("image_id", "features", "boxes", "num_boxes", "image_w", "image_h")


@dataclass
class Mutation:
    """A named change of a feature file (``apply(path)`` edits it in place)."""

    name: str
    apply: Callable[[Path], None]

    def __repr__(self) -> str:
        return self.name


def _rewrite(path: Path, name: str, edit: Callable[[np.ndarray], np.ndarray]) -> None:
    """Replace dataset ``name`` by ``edit(values)``: a valid HDF5 file (new checksums) holding other values."""
    with h5py.File(path, "r+") as f:
        values = f[name][()]
        del f[name]
        f.create_dataset(name, data=edit(values))


def _set(path: Path, name: str, index, value) -> None:
    with h5py.File(path, "r+") as f, np.errstate(all="ignore"):  # huge values overflow float16 to inf
        values = f[name][()]
        values[index] = value
        f[name][...] = values


def _chunk(path: Path, name: str, row: int | None = None, index: int = 0) -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        ds = f[name]
        if row is not None and ds.chunks is not None and ds.chunks[0] == 1:
            info = ds.id.get_chunk_info_by_coord((row,) + (0,) * (ds.ndim - 1))
        else:
            info = ds.id.get_chunk_info(index % ds.id.get_num_chunks())
        return info.byte_offset, info.size


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def _xor(path: Path, offset: int, mask: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ mask]))


BAD_FLOATS = st.sampled_from([np.nan, np.inf, -np.inf]) | st.floats(1e6, 3e38).flatmap(
    lambda v: st.sampled_from([v, -v])
)


@st.composite
def hdf5_mutations(draw, spec: FileSpec) -> Mutation:
    kind = draw(
        st.sampled_from(
            ["flip in chunk", "overwrite in chunk", "zero chunk", "flip anywhere", "truncate", "append",
             "bad feature", "padding feature", "bad box", "padding box", "bad size", "box count", "duplicate id",
             "extras padding", "dtype", "shape"]
        )
    )  # fmt: skip
    row = draw(st.sampled_from(spec.rows))
    n = spec.num_boxes[row]
    if kind in ("flip in chunk", "overwrite in chunk", "zero chunk"):
        name = draw(st.sampled_from(spec.datasets))
        per_image = name in ("features", "boxes")
        index = draw(st.integers(0, 10**6))

        def apply(path: Path) -> None:
            offset, size = _chunk(path, name, row if per_image else None, index)
            if kind == "zero chunk":
                _patch(path, offset, bytes(size))
            elif kind == "flip in chunk":
                for position in positions:
                    _xor(path, offset + position % size, mask)
            else:
                start = positions[0] % size
                _patch(path, offset + start, noise[: size - start])

        positions = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=4))
        mask = draw(st.integers(1, 255))
        noise = draw(st.binary(min_size=1, max_size=64))
        return Mutation(f"{kind} {name} row {row} {positions} {mask}", apply)
    if kind == "flip anywhere":
        fraction, mask = draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(1, 255))
        return Mutation(f"flip byte at {fraction:.4f} ^ {mask}",
                        lambda p: _xor(p, int(fraction * p.stat().st_size), mask))  # fmt: skip
    if kind == "truncate":
        fraction = draw(st.floats(0, 1, exclude_max=True))
        return Mutation(f"truncate at {fraction:.4f}",
                        lambda p: p.write_bytes(p.read_bytes()[: int(fraction * p.stat().st_size)]))  # fmt: skip
    if kind == "append":
        tail = draw(st.binary(min_size=1, max_size=100))
        return Mutation(f"append {len(tail)} bytes", lambda p: p.write_bytes(p.read_bytes() + tail))
    if kind == "bad feature":
        box, column, value = (
            draw(st.integers(0, n - 1)),
            draw(st.integers(0, spec.feature_size - 1)),
            draw(BAD_FLOATS),
        )
        return Mutation(f"feature[{row}, {box}, {column}] = {value}",
                        lambda p: _set(p, "features", (row, box, column), value))  # fmt: skip
    if kind == "padding feature":
        if n == spec.max_boxes:
            return Mutation("nothing", lambda p: None)
        box, value = draw(st.integers(n, spec.max_boxes - 1)), draw(BAD_FLOATS | st.floats(0.1, 5))
        # The reader never reads padded features: harmless (check_features reports it).
        return Mutation(f"padding feature[{row}, {box}] = {value}",
                        lambda p: _set(p, "features", (row, box, 0), value))  # fmt: skip
    if kind == "bad box":
        box = draw(st.integers(0, n - 1))
        how = draw(st.sampled_from(["value", "invert", "outside", "zero"]))
        w, h = spec.image_w[row], spec.image_h[row]
        if how == "value":
            coordinate, value = draw(st.integers(0, 3)), draw(BAD_FLOATS)
            return Mutation(f"box[{row}, {box}, {coordinate}] = {value}",
                            lambda p: _set(p, "boxes", (row, box, coordinate), value))  # fmt: skip
        if how == "invert":
            axis = draw(st.sampled_from([0, 1]))
            return Mutation(f"invert box[{row}, {box}] axis {axis}",
                            lambda p: _set(p, "boxes", (row, box, [axis, axis + 2]),
                                           _read(p, "boxes")[row, box, [axis + 2, axis]]))  # fmt: skip
        if how == "outside":
            coordinate, beyond = draw(st.integers(0, 3)), draw(st.floats(0.5, 1e6))
            side = w if coordinate % 2 == 0 else h
            tolerance = max(2.0, 0.01 * side)
            value = -(tolerance + beyond) if coordinate < 2 else side + tolerance + beyond

            def outside(p: Path) -> None:
                boxes = _read(p, "boxes")
                boxes[row, box, coordinate] = value
                if coordinate < 2:  # keep the box not inverted, so that "outside" is the only problem
                    boxes[row, box, coordinate + 2] = max(boxes[row, box, coordinate + 2], value)
                else:
                    boxes[row, box, coordinate - 2] = min(boxes[row, box, coordinate - 2], value)
                _set(p, "boxes", slice(None), boxes)

            return Mutation(f"box[{row}, {box}, {coordinate}] = {value} (outside)", outside)
        return Mutation(f"zero box[{row}, {box}]", lambda p: _set(p, "boxes", (row, box), 0))
    if kind == "padding box":
        if n == spec.max_boxes:
            return Mutation("nothing", lambda p: None)
        box, value = draw(st.integers(n, spec.max_boxes - 1)), draw(st.floats(0.5, 30))
        return Mutation(
            f"padding box[{row}, {box}] = {value}", lambda p: _set(p, "boxes", (row, box, 2), value)
        )
    if kind == "bad size":
        name = draw(st.sampled_from(["image_w", "image_h"]))
        side = spec.image_w[row] if name == "image_w" else spec.image_h[row]
        # Too small for the boxes: they reach past it by more than the tolerance.
        reach = spec.reach[row][0 if name == "image_w" else 1]
        too_small = min(reach - 2.5, reach / 1.0102) - 0.01
        value = draw(BAD_FLOATS | st.sampled_from([0.0, -1.0, -side, 20001.0, 1e9, too_small]))
        return Mutation(f"{name}[{row}] = {value}", lambda p: _set(p, name, row, value))
    if kind == "box count":
        value = draw(
            st.integers(-3, spec.max_boxes + 3).filter(lambda v: v != n) | st.sampled_from([2**31 - 1])
        )
        return Mutation(f"num_boxes[{row}] = {value}", lambda p: _set(p, "num_boxes", row, value))
    if kind == "duplicate id":
        other = draw(st.sampled_from([r for r in range(spec.num_images) if r != row]))
        return Mutation(f"image_id[{row}] = image_id[{other}]",
                        lambda p: _set(p, "image_id", row, _read(p, "image_id")[other]))  # fmt: skip
    if kind == "extras padding":
        if not spec.extras or n == spec.max_boxes:
            return Mutation("nothing", lambda p: None)
        name, box = draw(st.sampled_from(spec.extras)), draw(st.integers(n, spec.max_boxes - 1))
        value = draw(st.integers(0, 10))
        return Mutation(f"{name}[{row}, {box}] = {value}", lambda p: _set(p, name, (row, box), value))
    if kind == "dtype":
        name = draw(st.sampled_from(spec.datasets))
        # Lossless re-saves (harmless), plus the types the reader must refuse whatever the values: integer
        # features, and floating-point ids and box counts.
        refused = {
            "features": ("int8", "int16", "int32", "int64", "uint8", "uint16"),
            "image_id": ("float32", "float64"),
            "num_boxes": ("float32", "float64"),
        }.get(name, ())
        dtype = draw(st.sampled_from(sorted(set(spec.retypes[name]) | set(refused))))
        return Mutation(f"{name} as {dtype}", lambda p: _rewrite(p, name, lambda v: v.astype(dtype)))
    # shape
    how = draw(st.sampled_from(["pad boxes", "shrink boxes", "pad boxes partly", "drop a row", "coordinates",
                                "flatten features", "drop a feature dataset", "extras shape"]))  # fmt: skip
    per_box = ["features", "boxes", *spec.extras]
    if how in ("pad boxes", "pad boxes partly"):
        extra = draw(st.integers(1, 3))
        names = (
            per_box
            if how == "pad boxes"
            else draw(st.lists(st.sampled_from(per_box), min_size=1, unique=True))
        )

        def pad(p: Path) -> None:
            for name in names:
                fill = -1 if name in ("region_object", "region_category") else 0
                _rewrite(p, name, lambda v, fill=fill: np.concatenate(
                    [v, np.full((v.shape[0], extra, *v.shape[2:]), fill, v.dtype)], axis=1))  # fmt: skip

        # Padding every per-box dataset keeps the file valid and equal; padding only some is a shape error.
        return Mutation(f"pad {names} by {extra} boxes", pad)
    if how == "shrink boxes":
        keep = draw(st.integers(1, spec.max_boxes - 1))

        def shrink(p: Path) -> None:
            for name in per_box:
                _rewrite(p, name, lambda v: v[:, :keep])

        return Mutation(f"keep {keep} boxes per image", shrink)
    if how == "drop a row":
        name = draw(st.sampled_from(spec.datasets))
        return Mutation(
            f"drop row {row} of {name}", lambda p: _rewrite(p, name, lambda v: np.delete(v, row, axis=0))
        )
    if how == "coordinates":
        keep = draw(st.sampled_from([3, 5]))
        return Mutation(f"boxes with {keep} coordinates", lambda p: _rewrite(
            p, "boxes", lambda v: v[..., :keep] if keep < 4 else np.concatenate([v, v[..., :1]], axis=-1)))  # fmt: skip
    if how == "flatten features":
        return Mutation(
            "features as (N, max_boxes * D)",
            lambda p: _rewrite(p, "features", lambda v: v.reshape(len(v), -1)),
        )
    if how == "extras shape":
        if not spec.extras:
            return Mutation("nothing", lambda p: None)
        name = draw(st.sampled_from(spec.extras))
        return Mutation(f"{name} reshaped", lambda p: _rewrite(p, name, lambda v: v[:, :-1]))
    name = draw(st.sampled_from(["image_id", "features", "boxes", "num_boxes", "image_w", "image_h"]))

    def drop(p: Path) -> None:
        with h5py.File(p, "r+") as f:
            del f[name]

    return Mutation(f"delete {name}", drop)


def _read(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name][()]


# ----------------------------------------------------------------------------------- the reader, in-process


def _small_feature_file(path: Path) -> None:
    """A clean file whose every value survives any lossless re-save: features are multiples of 1/64 (exact in
    float16), boxes and sizes are integers below 2048, some images fill every box and some do not."""
    rng = np.random.default_rng(16)
    with RegionFeaturesWriter(
        path, max_boxes=5, feature_size=6, extras=("region_object", "region_category")
    ) as w:
        for k, num_boxes in enumerate([2, 5, 1, 3]):
            image_w, image_h = 64 + 16 * k, 48 + 8 * k
            features = rng.integers(1, 256, size=(num_boxes, 6)) / 64
            x1 = rng.integers(0, image_w // 4, size=num_boxes)
            y1 = rng.integers(0, image_h // 4, size=num_boxes)
            x2 = rng.integers(image_w * 3 // 4, image_w + 1, size=num_boxes)
            y2 = rng.integers(image_h * 3 // 4, image_h + 1, size=num_boxes)
            boxes = np.stack([x1, y1, x2, y2], axis=1)
            owners = rng.integers(-1, 3, size=num_boxes)
            w.add(100 + 7 * k, features.astype(np.float32), boxes, image_w, image_h,
                  region_object=owners, region_category=owners + 1)  # fmt: skip


def _reader_result(path: Path, mode: dict) -> Any:
    """Everything a RegionFeatures gives, as plain values (or raises ValueError). Mode ``{"batch": True}``
    reads every image in one batch (``reader.collate``, what the datasets' loaders do), with ``"on_device"`` as
    an accelerator's loaders do (a float16 file's features stay float16 until ``finish_batch``); the others one
    by one."""
    mode = dict(mode)
    batched = mode.pop("batch", False)
    on_device = mode.pop("on_device", False)
    reader = RegionFeatures(path, **mode)
    reader.convert_on_device = on_device
    ids = reader.image_ids
    if batched:
        batch = reader.finish_batch(reader.collate(ids))
        assert batch["image_features"].dtype == torch.float32
    images = []
    for i, image_id in enumerate(ids):
        if batched:
            n = int(batch["image_features_mask"][i].sum())
            features, boxes, spatial = (
                batch[key][i, :n].numpy() for key in ("image_features", "image_boxes", "image_spatial")
            )
            image_w, image_h = float(reader.files[0].image_w[i]), float(reader.files[0].image_h[i])
        else:
            item = reader[image_id]
            assert item.features.dtype == np.float32 and item.boxes.dtype == np.float32
            features, boxes, spatial, image_w, image_h = (
                item.features,
                item.boxes,
                item.spatial,
                item.image_w,
                item.image_h,
            )
        extras = {name: reader.extra(image_id, name).tolist() for name in sorted(reader.files[0].extras)}
        images.append(
            (image_id, features.tolist(), boxes.tolist(), spatial.tolist(), image_w, image_h, extras)
        )
    return reader.feature_size, reader.grid_shape, reader.region_category_names, images


READER_MODES = (
    {},
    {"in_memory": True},
    {"check_finite": True},
    {"batch": True},
    {"batch": True, "on_device": True},
)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> tuple[Path, FileSpec, list]:
    path = tmp_path_factory.mktemp("clean") / "features.h5"
    _small_feature_file(path)
    return path, FileSpec.of(path), [_reader_result(path, mode) for mode in READER_MODES]


def check_reader(small_file, mutation: Mutation, name: str) -> None:
    clean_path, _, clean = small_file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "features.h5"
        shutil.copy(clean_path, path)
        mutation.apply(path)
        outcomes = []
        for mode, expected in zip(READER_MODES, clean):
            try:
                result = _reader_result(path, mode)
            except ValueError as error:
                message = str(error)
                assert "\n" not in message and message.startswith(str(path)), message
                outcomes.append("refused")
            else:
                assert result == expected, f"{mutation}: a different result in mode {mode}"
                outcomes.append("same")
        # Every mode agrees: the lazy reader refuses (when the image is read) what a scan refuses.
        assert len(set(outcomes)) == 1, f"{mutation}: {dict(zip(map(str, READER_MODES), outcomes))}"
        if outcomes[0] == "refused":
            # The checker reports at least what the reader refuses.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                assert check_features.main([str(path), "--quiet"]) == 2, mutation
            one_error_line(err.getvalue(), "check_features.py")
        record(name, outcomes[0])


def _reader_property(examples: int, name: str):
    @fuzz_settings(examples)
    @given(data=st.data())
    def run(small_file, data):
        check_reader(small_file, data.draw(hdf5_mutations(small_file[1]), label="mutation"), name)

    return run


def test_mutated_feature_files_are_refused_or_harmless(small_file):
    _reader_property(EXAMPLES, "reader")(small_file)
    report("reader")


@pytest.mark.slow
def test_mutated_feature_files_are_refused_or_harmless_many(small_file):
    _reader_property(SLOW_EXAMPLES, "reader (slow)")(small_file)
    report("reader (slow)")


# ----------------------------------------------------------------------------------- python -m updown.predict


@pytest.fixture(scope="module")
def predict_setup(tiny_captioning_run, tiny_world, tmp_path_factory):
    """The tiny checkpoint, its world, the clean captions, and the rows of the test images predict reads."""
    folder = tmp_path_factory.mktemp("predict_clean")
    checkpoint = tiny_captioning_run / "checkpoints" / "last.ckpt"
    arguments = _predict_arguments(checkpoint, tiny_world, tiny_world.features_h5path, folder / "out.json")
    assert updown.predict.main(arguments) == 0
    clean = json.loads((folder / "out.json").read_text())
    test_ids = {result["image_id"] for result in clean}
    ids = _read(tiny_world.features_h5path, "image_id").tolist()
    rows = [row for row, image_id in enumerate(ids) if image_id in test_ids]
    spec = FileSpec.of(tiny_world.features_h5path, rows)
    return checkpoint, tiny_world, clean, spec


def _predict_arguments(checkpoint, world, features, output) -> list[str]:
    return [
        "captions", "--checkpoint", str(checkpoint), "--features", str(features),
        "--captions", str(world.captions_dir / "captions.json"), "--vocabulary", str(world.captions_dir / "vocabulary.json"),
        "--output", str(output),
    ]  # fmt: skip


def check_predict(predict_setup, mutation: Mutation, workers: int, name: str) -> None:
    checkpoint, world, clean, _ = predict_setup
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        features = folder / "features.h5"
        shutil.copy(world.features_h5path, features)
        mutation.apply(features)
        before = listing(folder)
        arguments = _predict_arguments(checkpoint, world, features, folder / "out.json")
        with contextlib.redirect_stderr(io.StringIO()) as err:
            code = updown.predict.main([*arguments, "--num-workers", str(workers)])
        if code == 0:
            assert json.loads((folder / "out.json").read_text()) == clean, f"{mutation}: different captions"
            record(name, "same")
        else:
            assert code == 2, f"{mutation}: exit {code}\n{err.getvalue()}"
            one_error_line(err.getvalue(), updown.predict.PROG)
            assert listing(folder) == before, f"{mutation}: files changed"
            record(name, "refused")


def _predict_property(examples: int, name: str):
    @fuzz_settings(examples)
    @given(data=st.data(), workers=st.sampled_from([0, 0, 0, 1]))
    def run(predict_setup, data, workers):
        spec = predict_setup[3]
        mutation = data.draw(hdf5_mutations(spec) | _consumer_mutations(spec), label="mutation")
        check_predict(predict_setup, mutation, workers, name)

    return run


@st.composite
def _consumer_mutations(draw, spec: FileSpec) -> Mutation:
    """Valid files that are wrong for the checkpoint: another feature size, or a test image missing."""
    if draw(st.booleans()):
        keep = draw(st.integers(1, spec.feature_size - 1))
        return Mutation(
            f"features cut to {keep}-d", lambda p: _rewrite(p, "features", lambda v: v[..., :keep])
        )
    row = draw(st.sampled_from(spec.rows))

    def drop(p: Path) -> None:
        for name in spec.datasets:
            _rewrite(p, name, lambda v: np.delete(v, row, axis=0))

    return Mutation(f"drop test image at row {row}", drop)


def test_mutated_feature_files_through_predict(predict_setup):
    _predict_property(PREDICT_EXAMPLES, "predict")(predict_setup)
    report("predict")


@pytest.mark.slow
def test_mutated_feature_files_through_predict_many(predict_setup):
    _predict_property(SLOW_PREDICT_EXAMPLES, "predict (slow)")(predict_setup)
    report("predict (slow)")


# ==========================================================================================================
# TSV mutations, through tools/convert_features.py.

LXMERT_EXTRAS = (("objects_id", "<i8"), ("objects_conf", "<f4"), ("attrs_id", "<i8"), ("attrs_conf", "<f4"))


def _b64(values: np.ndarray, dtype: str, strip: bool) -> str:
    text = base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")
    return text.rstrip("=") if strip else text


@st.composite
def clean_tsvs(draw) -> dict:
    """A clean TSV: 3 rows of 2-4 boxes, original or LXMERT layout, and how it is packed."""
    layout = draw(st.sampled_from(["original", "lxmert"]))
    feature_size = draw(st.sampled_from([4, 6]))
    strip = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(3):
        n = int(rng.integers(2, 5))
        w, h = int(rng.integers(40, 700)), int(rng.integers(40, 700))
        x1, y1 = rng.integers(0, w // 4, n), rng.integers(0, h // 4, n)
        x2, y2 = rng.integers(w * 3 // 4, w + 1, n), rng.integers(h * 3 // 4, h + 1, n)
        boxes = _b64(np.stack([x1, y1, x2, y2], axis=1), "<f4", strip)
        features = _b64(rng.integers(1, 256, (n, feature_size)) / 64, "<f4", strip)
        image_id = 1000 + 17 * k
        if layout == "original":
            fields = [str(image_id), str(w), str(h), str(n), boxes, features]
        else:
            extras = [_b64(rng.integers(0, 1600, n) if "id" in name else rng.random(n), dtype, strip)
                      for name, dtype in LXMERT_EXTRAS]  # fmt: skip
            fields = [f"COCO_val2014_{image_id:012d}", str(h), str(w), *extras, str(n), boxes, features]
        rows.append(fields)
    container = draw(st.sampled_from(["plain", "gzip", "zip", "zip of two"]))
    return {"layout": layout, "rows": rows, "container": container}


ARRAY_FIELDS = {"original": (4, 5), "lxmert": (3, 4, 5, 6, 8, 9)}
SCALAR_FIELDS = {"original": (0, 1, 2, 3), "lxmert": (0, 1, 2, 7)}
GARBAGE = ["", " ", "nan", "NaN", "inf", "-inf", "1e309", "1e30", "-1", "-0", "abc", "None", "0x10", "1,5", '"',
           "\u00e9", "\x00", "12 3"]  # fmt: skip


@st.composite
def tsv_mutations(
    draw, layout: str, container: str
) -> tuple[str, Callable[[list[list[str]]], list[list[str]]] | None, dict]:
    """``(name, text edit, archive edit)``: the edit of the rows' fields, and / or of the packed bytes."""
    kinds = [
        "garbage",
        "whitespace",
        "b-repr",
        "bad character",
        "cut field",
        "delete chars",
        "double field",
        "box count",
        "extra field",
        "missing field",
        "split row",
        "join rows",
        "duplicate row",
        "truncate",
    ]
    if container != "plain":
        kinds += ["archive flip", "archive flip", "archive flip", "archive cut", "archive append"]
    kind = draw(st.sampled_from(kinds))  # fmt: skip
    row = draw(st.integers(0, 2))
    array_field = draw(st.sampled_from(ARRAY_FIELDS[layout]))
    scalar_field = draw(st.sampled_from(SCALAR_FIELDS[layout]))
    count_field = 3 if layout == "original" else 7
    archive: dict = {}
    edit = None
    if kind == "garbage":
        field = draw(st.sampled_from(SCALAR_FIELDS[layout] + ARRAY_FIELDS[layout]))
        value = draw(st.sampled_from(GARBAGE + (["0"] if field not in (0,) else [])))

        def edit(rows):
            rows[row][field] = value
            return rows

        kind = f"field {field} of row {row} = {value!r}"
    elif kind == "whitespace":

        def edit(rows):
            rows[row][scalar_field] = f" {rows[row][scalar_field]} "
            return rows

        kind = f"spaces around field {scalar_field} of row {row}"
    elif kind == "b-repr":

        def edit(rows):
            rows[row][array_field] = f"b'{rows[row][array_field]}'"
            return rows

        kind = f"b'...' around field {array_field} of row {row}"
    elif kind in ("bad character", "cut field", "delete chars", "double field"):
        position = draw(st.floats(0, 1, exclude_max=True))
        count = draw(st.integers(1, 12))
        character = draw(st.sampled_from(list("!@#$%^&*(),.?:;~` -_\u00e9\x00\x7f") + ["=", "=="]))

        def edit(rows):
            text = rows[row][array_field]
            at = int(position * len(text))
            if kind == "bad character":
                text = text[:at] + character + text[at:]
            elif kind == "cut field":
                text = text[:at]
            elif kind == "delete chars":
                text = text[:at] + text[at + count :]
            else:
                text = text + text
            rows[row][array_field] = text
            return rows

        kind = f"{kind} in field {array_field} of row {row} at {position:.3f} ({count}, {character!r})"
    elif kind == "box count":
        change = draw(st.sampled_from([-2, -1, 1, 2, 100]))

        def edit(rows):
            rows[row][count_field] = str(max(1, int(rows[row][count_field]) + change))
            return rows

        kind = f"num_boxes of row {row} {change:+d}"
    elif kind in ("extra field", "missing field"):
        field = draw(st.integers(0, 5))

        def edit(rows):
            if kind == "extra field":
                rows[row].insert(field, rows[row][field])
            else:
                del rows[row][field]
            return rows

        kind = f"{kind} {field} in row {row}"
    elif kind == "split row":
        field = draw(st.integers(1, 5))

        def edit(rows):
            rows[row : row + 1] = [rows[row][:field], rows[row][field:]]
            return rows

        kind = f"row {row} split before field {field}"
    elif kind == "join rows":
        first = min(row, 1)

        def edit(rows):
            rows[first : first + 2] = [rows[first] + rows[first + 1]]
            return rows

        kind = f"rows {first} and {first + 1} joined"
    elif kind == "duplicate row":
        other = draw(st.integers(0, 3))

        def edit(rows):
            rows.insert(other, list(rows[row]))
            return rows

        kind = f"row {row} repeated at {other}"
    elif kind == "truncate":
        archive["truncate"] = draw(st.floats(0, 1, exclude_max=True))
    elif kind == "archive flip":
        archive["flip"] = (draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(1, 255)))
    elif kind == "archive cut":
        archive["cut"] = draw(st.floats(0, 1, exclude_max=True))
    else:
        archive["append"] = draw(st.binary(min_size=1, max_size=40))
    return f"{kind} {archive}" if archive else kind, edit, archive


def _tsv_text(rows: list[list[str]]) -> bytes:
    return "".join("\t".join(fields) + "\r\n" for fields in rows).encode("utf-8")


def _truncate_inside_a_row(text: bytes, fraction: float) -> bytes:
    """Cut ``text`` at a position inside a row (a cut right after a line end is a valid, shorter file)."""
    at = int(fraction * len(text))
    while at > 0 and text[at - 1 : at] == b"\n":
        at -= 1
    return text[: max(at, 1)]


def _pack(folder: Path, rows: list[list[str]], container: str, archive: dict) -> list[Path]:
    text = _tsv_text(rows)
    if "truncate" in archive:
        text = _truncate_inside_a_row(text, archive["truncate"])
    if container == "plain":
        files = {folder / "features.tsv": text}
    elif container == "gzip":
        files = {folder / "features.tsv.gz": gzip.compress(text, mtime=0)}
    else:
        lines = text.splitlines(keepends=True)
        split = 1 if container == "zip of two" else len(lines)
        members = {"part/a.tsv": b"".join(lines[:split]), "part/b.tsv": b"".join(lines[split:])}
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as packed:
            for name, data in sorted(
                members.items(), reverse=True
            ):  # stored out of order: read in name order
                if data or name == "part/a.tsv":
                    packed.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
        files = {folder / "features.zip": buffer.getvalue()}
    ((path, data),) = files.items()
    if container != "plain":
        if "flip" in archive:
            fraction, mask = archive["flip"]
            data = bytearray(data)
            data[int(fraction * len(data))] ^= mask
            data = bytes(data)
        if "cut" in archive:
            data = data[: int(archive["cut"] * len(data))]
        if "append" in archive:
            data = data + archive["append"]
    path.write_bytes(data)
    return [path]


def _converted(folder: Path, inputs: list[Path], options: list[str]) -> tuple[int, str, dict | None]:
    output = folder / "out" / "features.h5"
    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = convert_features.main(
            ["--input", *map(str, inputs), "--output", str(output), "--quiet", *options]
        )
    if code != 0:
        return code, err.getvalue(), None
    with h5py.File(output, "r") as f:
        contents = {name: f[name][()].tolist() for name in f} | {"layout": f.attrs["source_layout"]}
    return code, err.getvalue(), contents


def check_convert(clean: dict, mutation, options: list[str], previous: bool, name: str) -> None:
    label, edit, archive = mutation
    container = clean["container"]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "clean").mkdir()
        code, err, expected = _converted(
            folder / "clean", _pack(folder / "clean", clean["rows"], container, {}), options
        )
        assert code == 0, err
        (folder / "mutant").mkdir()
        rows = [list(fields) for fields in clean["rows"]]
        rows = edit(rows) if edit is not None else rows
        inputs = _pack(folder / "mutant", rows, container, archive)
        if previous:  # an earlier output that a failed --force run must leave as it was
            (folder / "mutant" / "out").mkdir()
            (folder / "mutant" / "out" / "features.h5").write_bytes(b"previous results")
            options = [*options, "--force"]
        before = listing(folder / "mutant")
        code, err, contents = _converted(folder / "mutant", inputs, options)
        if code == 0:
            assert contents == expected, f"{label}: a different result"
            record(name, "same")
        else:
            assert code == 2, f"{label}: exit {code}: {err}"
            one_error_line(err, "convert_features.py")
            assert listing(folder / "mutant") == before, f"{label}: files changed"
            assert sorted(p.name for p in (folder / "mutant").iterdir()) == sorted(
                ["out"] * previous + [p.name for p in inputs]
            ), f"{label}: new files or folders"
            record(name, "refused")


def _convert_property(examples: int, name: str):
    @fuzz_settings(examples)
    @given(data=st.data(), clean=clean_tsvs(), scan=st.booleans(), previous=st.booleans())
    def run(data, clean, scan, previous):
        mutation = data.draw(tsv_mutations(clean["layout"], clean["container"]), label="mutation")
        options = [] if scan else ["--max-boxes", "4"]
        check_convert(clean, mutation, options, previous, name)

    return run


def test_mutated_tsv_inputs_are_refused_or_harmless():
    _convert_property(EXAMPLES, "convert")()
    report("convert")


@pytest.mark.slow
def test_mutated_tsv_inputs_are_refused_or_harmless_many():
    _convert_property(SLOW_EXAMPLES, "convert (slow)")()
    report("convert (slow)")
