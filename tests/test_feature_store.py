"""The feature stores (disk, host, device) give the same batches; the device store gathers on the device.

``device="cpu"`` stands in for an accelerator, so CI covers the whole device path: items carry store rows,
the collate function batches the rows, and ``on_after_batch_transfer`` gathers the features.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_SPEC, write_features
from torch.utils.data import DataLoader, Dataset

from updown.data.datamodules import CaptioningDataModule
from updown.data.datasets import collate_regions
from updown.data.feature_store import resolve_feature_store
from updown.data.readers import RegionFeatures
from updown.types import FEATURES_INDEX_KEY


class _Images(Dataset):
    """One item per image id of a reader, in the order given."""

    def __init__(self, reader: RegionFeatures, image_ids: list[int]) -> None:
        self.reader, self.image_ids = reader, image_ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        return self.reader[self.image_ids[index]]


def _batches(reader: RegionFeatures, image_ids: list[int], batch_size: int, workers: int = 0) -> list[dict]:
    loader = DataLoader(
        _Images(reader, image_ids), batch_size=batch_size, collate_fn=collate_regions, num_workers=workers
    )
    return [reader.finish_batch(batch) for batch in loader]


def _assert_same_batches(expected: list[dict], actual: list[dict]) -> None:
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        assert set(a) == set(b)
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            # Exact: float16 values convert to float32 exactly, and padding is zero in both.
            assert torch.equal(a[key], b[key]), key


def _nocaps_file(path, rows: dict[int, np.ndarray], boxes: dict[int, np.ndarray]) -> None:
    vlen = h5py.vlen_dtype(np.float32)
    with h5py.File(path, "w") as f:
        f["image_id"] = np.array(list(rows))
        f["num_boxes"] = np.array([len(r) for r in rows.values()])
        f["width"] = np.full(len(rows), 64.0)
        f["height"] = np.full(len(rows), 48.0)
        features = f.create_dataset("features", (len(rows),), dtype=vlen)
        box_rows = f.create_dataset("boxes", (len(rows),), dtype=vlen)
        for i, image_id in enumerate(rows):
            features[i], box_rows[i] = rows[image_id].reshape(-1), boxes[image_id].reshape(-1)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_store_gives_the_disk_readers_batches_exactly(tmp_path, dtype):
    # Two files with different max_boxes: the device store pads the narrower file's rows with zeros.
    write_features(tmp_path / "a.h5", [2, 6, 1, 4, 3], max_boxes=6, dtype=dtype, seed=1)
    written_b = write_features(tmp_path / "b.h5", [3, 1, 2], max_boxes=3, dtype=dtype, seed=2)
    # write_features numbers images from 100 in both files: renumber the second file's.
    with h5py.File(tmp_path / "b.h5", "r+") as f:
        f["image_id"][...] = np.array(list(written_b)) + 1000
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    disk = RegionFeatures(paths)
    # A shuffled order mixing the files, batches of 3 with different box counts.
    image_ids = [int(i) for i in np.random.default_rng(0).permutation(disk.image_ids)]
    expected = _batches(disk, image_ids, 3)
    assert expected[0]["image_features"].dtype == torch.float32
    for store in ("host", "device"):
        reader = RegionFeatures(paths, feature_store=store)
        assert reader.feature_store == store
        _assert_same_batches(expected, _batches(reader, image_ids, 3))
    device = RegionFeatures(paths, feature_store="device")
    assert device.store.tensor.dtype == getattr(torch, dtype)  # the file's dtype, not float32
    assert device.store.tensor.shape == (8, 6, 8)


def test_device_store_batches_carry_rows_not_features(tmp_path):
    write_features(tmp_path / "f.h5", [2, 5, 3], dtype="float16")
    reader = RegionFeatures(tmp_path / "f.h5", feature_store="device")
    item = reader[107]
    assert item.features is None and item.store_row == 1 and item.num_boxes == 5
    batch = collate_regions([reader[114], reader[100]])
    assert "image_features" not in batch
    assert batch[FEATURES_INDEX_KEY].tolist() == [2, 0]
    gathered = reader.finish_batch(batch)
    assert FEATURES_INDEX_KEY not in gathered
    assert gathered["image_features"].shape == (2, 3, 8)
    # Image 100 has 2 boxes: its third row is padding, zero.
    assert torch.all(gathered["image_features"][1, 2] == 0)


def test_the_nocaps_layout_in_every_store(tmp_path):
    rng = np.random.default_rng(0)
    rows = {11: rng.random((3, 8), dtype=np.float32), 12: rng.random((5, 8), dtype=np.float32)}
    boxes = {
        image_id: np.tile(np.array([[1, 2, 30, 40]], dtype=np.float32), (len(r), 1))
        for image_id, r in rows.items()
    }
    _nocaps_file(tmp_path / "nocaps.h5", rows, boxes)
    expected = _batches(RegionFeatures(tmp_path / "nocaps.h5"), [12, 11], 2)
    np.testing.assert_array_equal(expected[0]["image_features"][0].numpy(), rows[12])
    for store in ("host", "device"):
        _assert_same_batches(
            expected, _batches(RegionFeatures(tmp_path / "nocaps.h5", feature_store=store), [12, 11], 2)
        )


def test_device_store_with_worker_processes(tmp_path):
    write_features(tmp_path / "f.h5", [2, 5, 3, 6, 1, 4], dtype="float16")
    disk = RegionFeatures(tmp_path / "f.h5")
    device = RegionFeatures(tmp_path / "f.h5", feature_store="device")
    # Workers get the reader pickled (or forked) without the feature tensor, and send back rows only.
    assert pickle.loads(pickle.dumps(device)).store.tensor is None
    expected = _batches(disk, disk.image_ids, 2)
    _assert_same_batches(expected, _batches(device, disk.image_ids, 2, workers=2))


def test_a_worker_copy_cannot_gather(tmp_path):
    write_features(tmp_path / "f.h5", [2, 3])
    copy = pickle.loads(pickle.dumps(RegionFeatures(tmp_path / "f.h5", feature_store="device")))
    assert copy[107].store_row == 1  # items still work
    with pytest.raises(RuntimeError, match="gather batches in the main process"):
        copy.finish_batch(collate_regions([copy[100]]))


def test_in_memory_is_the_host_store_and_conflicts_are_refused():
    assert resolve_feature_store(None, False) == "disk"
    assert resolve_feature_store(None, True) == "host"
    assert resolve_feature_store("host", True) == "host"
    assert resolve_feature_store("device", False) == "device"
    with pytest.raises(
        ValueError, match="in_memory=True asks for the host store but feature_store is 'device'"
    ):
        resolve_feature_store("device", True, "data.init_args")
    with pytest.raises(
        ValueError, match=r"feature_store must be one of \['disk', 'host', 'device'\], not 'gpu'"
    ):
        resolve_feature_store("gpu", False)


def test_the_datamodule_takes_the_store_from_its_arguments(tiny_world):
    root = str(tiny_world.root.parent)
    assert CaptioningDataModule(data_root=root, synthetic=TINY_SPEC).feature_store == "disk"
    legacy = CaptioningDataModule(data_root=root, synthetic=TINY_SPEC, in_memory=True)
    assert legacy.feature_store == "host" and legacy.in_memory
    with pytest.raises(ValueError, match="data.init_args: in_memory=True asks for the host store"):
        CaptioningDataModule(data_root=root, synthetic=TINY_SPEC, in_memory=True, feature_store="device")
    with pytest.raises(ValueError, match="feature_store"):
        CaptioningDataModule(data_root=root, synthetic=TINY_SPEC, feature_store="gpu")


class _Recorder(pl.LightningModule):
    """Keeps every validation batch as the step sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[dict] = []

    def validation_step(self, batch, batch_index):
        self.batches.append({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})


def _validation_batches(datamodule) -> list[dict]:
    recorder = _Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.validate(recorder, datamodule=datamodule, verbose=False)
    return recorder.batches


def test_the_trainer_gathers_device_batches_through_the_datamodule_hook(tiny_world):
    def datamodule(store: str) -> CaptioningDataModule:
        return CaptioningDataModule(
            data_root=str(tiny_world.root.parent), synthetic=TINY_SPEC, eval_batch_size=5, feature_store=store
        )

    device = datamodule("device")
    expected = _validation_batches(datamodule("disk"))
    actual = _validation_batches(device)
    assert device.features.store is not None and device.features.store.device == torch.device("cpu")
    assert "image_features" in actual[0] and FEATURES_INDEX_KEY not in actual[0]
    _assert_same_batches(expected, actual)
    # What the loader yields, before the hook: rows, no features.
    raw = next(iter(device.val_dataloader()))
    assert FEATURES_INDEX_KEY in raw and "image_features" not in raw


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_loaders_pin_their_batches_when_the_trainer_runs_on_cuda(tiny_world, device):
    """On a CUDA device a batch goes over by DMA, asynchronously, from page-locked memory; on the CPU pinning would
    only copy it. On any accelerator, float16 features cross in float16. (The loaders are built, not iterated:
    this machine may have no CUDA.)"""
    datamodule = CaptioningDataModule(data_root=str(tiny_world.root.parent), synthetic=TINY_SPEC)
    assert datamodule.pin_memory is False and datamodule.on_accelerator is False  # no Trainer yet
    datamodule.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device(device)),
        world_size=1,
        global_rank=0,
        current_epoch=0,
    )
    datamodule.setup("fit")
    loaders = [datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()]
    assert [loader.pin_memory for loader in loaders] == [device == "cuda"] * 3
    assert datamodule.features.convert_on_device is (device != "cpu")
    assert datamodule.features.batch_dtype == (torch.float32 if device == "cpu" else torch.float16)


def test_on_an_accelerator_float16_batches_reach_the_model_as_float32(tiny_world, monkeypatch):
    """What an accelerator's Trainer gets, the CPU standing in (``on_accelerator`` forced): the loaders' batches
    hold the float16 world's features in float16, and the Trainer's transfer (``on_after_batch_transfer``) hands
    the model float32 batches equal, bit for bit, to a CPU Trainer's."""

    def datamodule() -> CaptioningDataModule:
        return CaptioningDataModule(
            data_root=str(tiny_world.root.parent), synthetic=TINY_SPEC, eval_batch_size=5
        )

    expected = _validation_batches(datamodule())
    monkeypatch.setattr(CaptioningDataModule, "on_accelerator", property(lambda self: True))
    accelerated = datamodule()
    actual = _validation_batches(accelerated)
    assert accelerated.features.convert_on_device
    assert actual[0]["image_features"].dtype == torch.float32
    _assert_same_batches(expected, actual)
    raw = next(iter(accelerated.val_dataloader()))
    assert raw["image_features"].dtype == torch.float16
