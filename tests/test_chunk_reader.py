"""Batch reads from raw chunks (updown/data/chunk_reader.py, RegionFeatures.collate) and our Fletcher-32.

The independent references: HDF5's Fletcher-32 as its C source computes it (``reference_fletcher32``) and as HDF5
stored it in files h5py wrote; and the reader's one-image-at-a-time path through h5py (``reader[image_id]``,
HDF5's own checksum check), collated by ``collate_regions``.
"""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch

import updown.data.chunk_reader as chunk_reader
from updown.data.batch_memory import PackedCollate, SlotDataLoader
from updown.data.datasets import collate_regions
from updown.data.fletcher32 import Fletcher32, checksum_matches, reference_fletcher32, stored_checksums
from updown.data.readers import RegionFeatures
from updown.data.writers import RegionFeaturesWriter

# ------------------------------------------------------------------------------------------------ Fletcher-32


# 131,078 and 300,001 bytes: more than one of the 2**16-word blocks the sums are taken in.
@pytest.mark.parametrize("nbytes", [1, 2, 3, 9, 718, 720, 722, 1441, 4096, 66_001, 131_078, 300_001])
def test_fletcher32_equals_hdf5s_definition(nbytes):
    rng = np.random.default_rng(nbytes)
    data = rng.integers(0, 256, size=(6, nbytes), dtype=np.uint8)
    data[1] = 255  # the largest sums HDF5's 360-word blocks are sized for
    data[2] = 0  # all zero: checksum 0
    data[3] = 0
    data[3, -1] = 7  # one non-zero byte, at the odd end when nbytes is odd
    data[4, : nbytes // 2] = 0  # a long zero prefix
    computed = Fletcher32(nbytes)(data)
    assert computed.tolist() == [reference_fletcher32(bytes(row)) for row in data]


def test_fletcher32_reads_only_its_bytes_of_wider_or_strided_rows():
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, size=(5, 1000), dtype=np.uint8)
    for nbytes, rows in ((998, wide), (997, wide), (998, wide[:, 1:]), (996, wide[::2, 3:])):
        assert Fletcher32(nbytes)(rows).tolist() == [
            reference_fletcher32(bytes(row[:nbytes])) for row in rows
        ]


def test_fletcher32_compiles_without_a_writable_cache(monkeypatch):
    import numba

    from updown.data import fletcher32

    njit = numba.njit

    def njit_without_cache_directory(**options):
        if options.get("cache"):  # what numba raises when no cache directory is writable
            raise RuntimeError("cannot cache function '_word_sums': no locator available for file")
        return njit(**options)

    monkeypatch.setattr(numba, "njit", njit_without_cache_directory)
    fletcher32._compiled_word_sums.cache_clear()
    try:
        data = np.arange(40, dtype=np.uint8).reshape(2, 20)
        assert Fletcher32(20)(data).tolist() == [reference_fletcher32(bytes(row)) for row in data]
    finally:
        fletcher32._compiled_word_sums.cache_clear()


def test_fletcher32_equals_the_checksums_hdf5_stored(tmp_path):
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        values = (rng.random((12, 36, 64)) * 40).astype(np.float16)
        values[3] = 0
        values[5, 2] = -values[5, 2]
        f.create_dataset("x", data=values, chunks=(1, 36, 64), fletcher32=True)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        chunks = np.stack(
            [np.frombuffer(f["x"].id.read_direct_chunk((i, 0, 0))[1], np.uint8) for i in range(12)]
        )
    stored = stored_checksums(chunks)
    assert Fletcher32(chunks.shape[1] - 4)(chunks).tolist() == stored.tolist()
    assert [reference_fletcher32(bytes(c[:-4])) for c in chunks] == stored.tolist()


def test_checksum_matches_accepts_what_hdf5_accepts_and_nothing_else():
    computed = np.array([0x12345678, 0x12345678, 0x12345678, 0], dtype=np.uint32)
    # Equal; each 16-bit half byte-swapped (HDF5 < 1.6.3); the halves exchanged instead (not accepted).
    stored = np.array([0x12345678, 0x34127856, 0x56781234, 1], dtype=np.uint32)
    assert checksum_matches(computed, stored).tolist() == [True, True, False, False]


# ------------------------------------------------------------------------------------- batches equal reads


def _eager_batch(reader: RegionFeatures, ids: list[int]) -> dict:
    """The one-by-one path: reader[image_id] (h5py, HDF5's checksum), stacked by collate_regions."""
    return reader.finish_batch(collate_regions([reader[i] for i in ids]))


# Batches as a CPU Trainer gets them (float32), and as an accelerator's gets them: float16 files' features in
# float16, read straight from their chunks into the batch where they can be, converted by finish_batch.
BATCH_DTYPES = pytest.mark.parametrize(
    "on_device", [False, True], ids=["float32 batches", "file-dtype batches"]
)


def _reader(path, on_device: bool = False, **options) -> RegionFeatures:
    reader = RegionFeatures(path, **options)
    reader.convert_on_device = on_device
    return reader


def _collated(reader: RegionFeatures, ids: list[int]) -> dict:
    """``reader.collate(ids)`` as a model gets it (``finish_batch``), after checking the dtype it crossed in."""
    batch = reader.collate(ids)
    if "image_features" in batch:
        float16 = reader.convert_on_device and all(f.feature_dtype == np.float16 for f in reader.files)
        assert batch["image_features"].dtype == (torch.float16 if float16 else torch.float32)
    return reader.finish_batch(batch)


def _assert_batches_equal(batch: dict, expected: dict) -> None:
    assert batch.keys() == expected.keys()
    for key, value in expected.items():
        assert batch[key].dtype == value.dtype, key
        assert torch.equal(batch[key], value), key  # bit for bit


def _mixed_file(
    path, dtype="float16", max_boxes=12, feature_size=40, seed=0, first_id=1, full=False, signed=False
):
    """Images with 1..max_boxes boxes (``full``: all max_boxes, as COCO's 36), sizes and values that vary
    (``signed``: some negative), in the writer's layout."""
    rng = np.random.default_rng(seed)
    counts = [max_boxes] * 13 if full else [1, max_boxes, 3, 7, max_boxes - 1, 2, 5, 9, 4, 6, 8, 1, 10]
    with RegionFeaturesWriter(path, max_boxes, feature_size, dtype=dtype, force=True) as writer:
        for k, n in enumerate(counts):
            w, h = float(rng.integers(50, 700)), float(rng.integers(50, 700))
            x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
            boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], axis=1)
            values = rng.random((n, feature_size)) * 30 - (10 if signed and k % 3 == 1 else 0)
            writer.add(first_id + k, values, boxes.astype(np.float32), w, h)
    return [first_id + k for k in range(len(counts))]


@BATCH_DTYPES
@pytest.mark.parametrize("full", [False, True], ids=["box counts vary", "every box real"])
@pytest.mark.parametrize("signed", [False, True], ids=["rectified", "some negative"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("store", ["disk", "host", "device"])
def test_a_batch_equals_the_collated_single_reads(tmp_path, dtype, store, full, signed, on_device):
    ids = _mixed_file(tmp_path / "f.h5", dtype=dtype, full=full, signed=signed)
    reader = _reader(tmp_path / "f.h5", on_device, feature_store=store)
    order = [ids[k] for k in (4, 0, 12, 7, 1, 9, 3, 11, 2, 10, 5, 8, 6)]  # more than one checksum group
    for chosen in (order, order[:1], order[3:6]):
        _assert_batches_equal(_collated(reader, chosen), _eager_batch(reader, chosen))


@BATCH_DTYPES
@pytest.mark.parametrize("full", [False, True], ids=["box counts vary", "every box real"])
def test_the_disk_store_reads_our_files_from_their_chunks_not_through_h5py(
    tmp_path, monkeypatch, full, on_device
):
    ids = _mixed_file(tmp_path / "f.h5", full=full)
    reader = _reader(tmp_path / "f.h5", on_device)
    expected = _eager_batch(reader, ids)
    assert reader.files[0]._chunks is not None

    def no_h5py_read(self, row):
        raise AssertionError(f"row {row} was read through h5py")

    monkeypatch.setattr(type(reader.files[0]), "read", no_h5py_read)
    staging_copies = []
    convert_group = chunk_reader.ChunkReader._convert_group

    def recording(self, staged, features, boxes, copy):
        staging_copies.append(copy)
        return convert_group(self, staged, features, boxes, copy)

    monkeypatch.setattr(chunk_reader.ChunkReader, "_convert_group", recording)
    _assert_batches_equal(_collated(reader, ids), expected)
    # Float16 batches of whole images take the chunks straight into their rows, with no staging copy.
    assert staging_copies == ([not on_device] * 2 if full else [])


@BATCH_DTYPES
def test_a_batch_across_two_files_keeps_the_requested_order(tmp_path, on_device):
    first = _mixed_file(tmp_path / "a.h5", seed=1, first_id=1)
    second = _mixed_file(tmp_path / "b.h5", seed=2, first_id=100)
    reader = _reader([tmp_path / "a.h5", tmp_path / "b.h5"], on_device)
    chosen = [second[3], first[0], first[5], second[0], second[12], first[1]]
    _assert_batches_equal(_collated(reader, chosen), _eager_batch(reader, chosen))


def test_files_of_two_dtypes_give_float32_batches_on_the_device_too(tmp_path):
    first = _mixed_file(tmp_path / "a.h5", dtype="float16", first_id=1, full=True)
    second = _mixed_file(tmp_path / "b.h5", dtype="float32", first_id=100, full=True)
    reader = _reader([tmp_path / "a.h5", tmp_path / "b.h5"], on_device=True)
    chosen = first[:5] + second[:5]
    assert reader.batch_dtype == torch.float32
    _assert_batches_equal(_collated(reader, chosen), _eager_batch(reader, chosen))


def test_float16_batches_halve_the_workers_slots(tmp_path):
    _mixed_file(tmp_path / "f.h5", full=True)
    reader = RegionFeatures(tmp_path / "f.h5")
    float32_bytes = reader.batch_features_nbytes(50)
    reader.convert_on_device = True
    assert reader.batch_features_nbytes(50) * 2 == float32_bytes == 50 * 12 * 40 * 4


@pytest.mark.parametrize(
    "how",
    ["no checksum", "other chunks", "compressed", "contiguous"],
)
@BATCH_DTYPES
@pytest.mark.parametrize("full", [False, True], ids=["box counts vary", "every box real"])
def test_files_in_other_layouts_read_the_same(tmp_path, how, full, on_device):
    """Without checksums the chunks are read raw too; other layouts fall back to h5py, with the same batch."""
    ids = _mixed_file(tmp_path / "ours.h5", full=full)
    with h5py.File(tmp_path / "ours.h5", "r") as source, h5py.File(tmp_path / "f.h5", "w") as target:
        for name, dataset in source.items():
            options = {}
            if name in ("features", "boxes"):
                options = {
                    "no checksum": {"chunks": (1, *dataset.shape[1:])},
                    "other chunks": {"chunks": (2, *dataset.shape[1:]), "fletcher32": True},
                    "compressed": {"chunks": (1, *dataset.shape[1:]), "compression": "gzip"},
                    "contiguous": {},
                }[how]
            target.create_dataset(name, data=dataset[()], **options)
        target.attrs.update(source.attrs)
    reader = _reader(tmp_path / "f.h5", on_device)
    assert (reader.files[0]._chunks is not None) == (how == "no checksum")
    _assert_batches_equal(
        _collated(reader, ids[::-1]), _eager_batch(RegionFeatures(tmp_path / "ours.h5"), ids[::-1])
    )


def test_the_variable_length_layout_reads_through_the_batch_path(tmp_path):
    rng = np.random.default_rng(0)
    counts = {11: 3, 12: 5, 13: 1}
    with h5py.File(tmp_path / "nocaps.h5", "w") as f:
        f["image_id"] = np.array(list(counts))
        f["num_boxes"] = np.array(list(counts.values()))
        f["width"], f["height"] = np.array([64, 32, 50]), np.array([48, 16, 40])
        features = f.create_dataset("features", (3,), dtype=h5py.vlen_dtype(np.float32))
        boxes = f.create_dataset("boxes", (3,), dtype=h5py.vlen_dtype(np.float32))
        for k, n in enumerate(counts.values()):
            features[k] = rng.random(n * 8, dtype=np.float32)
            boxes[k] = np.tile(np.array([1, 2, 10, 12], np.float32), n)
    reader = RegionFeatures(tmp_path / "nocaps.h5")
    _assert_batches_equal(reader.collate([13, 11, 12]), _eager_batch(reader, [13, 11, 12]))


# ----------------------------------------------------------------------------------------- damaged chunks


def _chunk_offset(path, name: str, row: int) -> int:
    with h5py.File(path, "r") as f:
        return f[name].id.get_chunk_info_by_coord((row, 0, 0)).byte_offset


def _xor_byte(path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0x10]))


@BATCH_DTYPES
@pytest.mark.parametrize("full", [False, True], ids=["box counts vary", "every box real"])
@pytest.mark.parametrize("name, position", [("features", 37), ("features", -1), ("boxes", 5), ("boxes", -3)])
def test_a_damaged_chunk_fails_the_batch_with_the_readers_message(tmp_path, name, position, full, on_device):
    ids = _mixed_file(tmp_path / "f.h5", dtype="float16", full=full)
    path = tmp_path / "f.h5"
    with h5py.File(path, "r") as f:
        size = f[name].id.get_chunk_info_by_coord((3, 0, 0)).size
    # A data byte, or a byte of the stored checksum (position < 0 counts from the chunk's end).
    _xor_byte(path, _chunk_offset(path, name, 3) + position % size)
    reader = _reader(path, on_device)
    with pytest.raises(ValueError) as single:
        reader[ids[3]]
    with pytest.raises(ValueError) as batched:
        reader.collate([ids[0], ids[3], ids[5]])
    assert str(batched.value) == str(single.value)
    assert str(batched.value).startswith(f"{path}: dataset '{name}' fails its checksum for image {ids[3]}")
    # The other images still read, as they did.
    _assert_batches_equal(_collated(reader, [ids[0], ids[5]]), _eager_batch(reader, [ids[0], ids[5]]))


@pytest.mark.parametrize(
    "name, index, value, problem",
    [
        ("features", (2, 1, 3), np.nan, "contains NaN or inf"),
        ("features", (2, 2, 5), -np.inf, "contains NaN or inf"),
        ("features", (2, 0, 0), 1e6, "beyond the plausible"),
        ("features", (2, slice(None)), 0.0, "all zero"),
        ("boxes", (2, 0), [5, 5, 1, 1], "inverted"),
        ("boxes", (2, 8), [1, 1, 2, 2], "non-zero boxes beyond num_boxes"),
        ("boxes", (2, 1), [0, 0, 0, 0], "a padding box counted as real"),
    ],
)
@BATCH_DTYPES
@pytest.mark.parametrize("full", [False, True], ids=["box counts vary", "every box real"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_implausible_values_with_valid_checksums_fail_the_batch_like_a_read(
    tmp_path, name, index, value, problem, dtype, full, on_device
):
    if full and "beyond num_boxes" in problem:
        return  # every box is real: there is no padding box to overwrite
    path = tmp_path / "f.h5"
    ids = _mixed_file(path, dtype=dtype, full=full)
    with h5py.File(path, "r+") as f, np.errstate(over="ignore"):  # rewritten through HDF5: valid checksums
        values = f[name][2]
        values[index[1:]] = value
        f[name][2] = values
    reader = _reader(path, on_device)
    with pytest.raises(ValueError) as single:
        reader[ids[2]]
    with pytest.raises(ValueError) as batched:
        reader.collate(ids)
    if dtype == "float16" and value == 1e6:
        problem = "contains NaN or inf"  # 1e6 is inf in float16
    assert str(batched.value) == str(single.value) and problem in str(batched.value)


@BATCH_DTYPES
@pytest.mark.parametrize("full", [False, True], ids=["box counts vary", "every box real"])
def test_a_wrong_fast_checksum_falls_back_to_hdf5s_check(tmp_path, monkeypatch, full, on_device):
    """The fast check is never the last word: a mismatch re-reads the image through h5py, which reads it."""
    ids = _mixed_file(tmp_path / "f.h5", full=full)
    reader = _reader(tmp_path / "f.h5", on_device)
    expected = _eager_batch(reader, ids)
    monkeypatch.setattr(
        chunk_reader, "checksum_matches", lambda computed, stored: np.zeros(len(stored), bool)
    )
    _assert_batches_equal(_collated(reader, ids), expected)


def test_a_file_truncated_after_it_was_opened_is_refused(tmp_path):
    path = tmp_path / "f.h5"
    ids = _mixed_file(path)
    reader = RegionFeatures(path)
    reader.collate(ids[:2])  # the chunk index is read
    with open(path, "r+b") as file:
        file.truncate(_chunk_offset(path, "features", 6) + 10)
    with pytest.raises(ValueError, match=rf"^{path}: .*(damaged|changed after it was opened)"):
        reader.collate(ids)


def test_a_file_replaced_before_the_first_batch_is_refused_with_the_readers_message(tmp_path):
    path = tmp_path / "f.h5"
    ids = _mixed_file(path)
    reader = RegionFeatures(path)  # metadata read; the chunk index is read with the first batch
    path.write_bytes(b"not HDF5 any more")
    with pytest.raises(ValueError, match=rf"^{path}: not a readable HDF5 file any more"):
        reader.collate(ids[:3])


# ------------------------------------------------------------------------------------------------- processes


def test_the_reader_pickles_with_its_chunk_index_and_without_its_descriptor(tmp_path):
    ids = _mixed_file(tmp_path / "f.h5")
    reader = RegionFeatures(tmp_path / "f.h5")
    expected = reader.collate(ids)
    chunks = reader.files[0]._chunks
    assert chunks._fd is not None and chunks._offsets is not None
    state = chunks.__getstate__()
    assert state["_fd"] is None and state["_scratch"] is None and state["_offsets"] is not None
    copy = pickle.loads(pickle.dumps(reader))
    _assert_batches_equal(copy.collate(ids), expected)


class _Pending(torch.utils.data.Dataset):
    """The reader's images as the project's datasets give them (``features``: what a SlotDataLoader sizes by)."""

    def __init__(self, reader: RegionFeatures, ids: list[int]) -> None:
        self.features, self.ids = reader, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return self.features.pending(self.ids[index])


@BATCH_DTYPES
@pytest.mark.parametrize("loader_class", [torch.utils.data.DataLoader, SlotDataLoader])
def test_loader_workers_read_the_same_batches(tmp_path, loader_class, on_device):
    ids = _mixed_file(tmp_path / "f.h5", full=on_device)
    reader = _reader(tmp_path / "f.h5", on_device)
    loader = loader_class(
        _Pending(reader, ids),
        batch_size=4,
        num_workers=2,
        collate_fn=PackedCollate(collate_regions),
        persistent_workers=True,
    )
    for _ in range(2):
        for k, batch in enumerate(loader):
            assert batch["image_features"].dtype == (torch.float16 if on_device else torch.float32)
            _assert_batches_equal(reader.finish_batch(batch), _eager_batch(reader, ids[4 * k : 4 * k + 4]))
    if loader_class is SlotDataLoader:  # every batch's features were read into the workers' slots
        counts = loader._iterator.shared_batch_slots.counts
        assert counts[:, 0].sum() == 2 * len(loader) and counts[:, 1].sum() == 0
