"""Images/s of the training DataLoader, against two ceilings measured in the same run.

    python tools/benchmark_data.py --features FILE.h5 [--images 2000] [--batch-size 50] [--rounds 3]
        [--workers 0 2 4] [--caches cold warm] [--stores disk host device] [--batch-dtypes float32 float16]
    python tools/benchmark_data.py          # on a temporary 36 x 2048 float16 file of --images images

What is measured, per pass over ``--images`` images of the file (a random sample of its rows, in a shuffled
order, batches of ``--batch-size``):

- ceiling "memcpy": each image's float32 features copied from memory into a preallocated pinned tensor
  (pageable when CUDA is absent): the host side of handing a batch to the accelerator, with no reader at all.
- ceiling "h5py chunks": ``read_direct_chunk`` of each image's features and boxes chunks, in the same order, in
  one process: the file's bytes through HDF5's chunk index, without checksum, conversion or checks.
- ceiling "worker transfer" (with workers): batches of the same shape from DataLoader workers that read nothing,
  each filled from memory: what handing a batch from a worker to the main process costs on this machine, whatever
  the reader. Twice: with the project's ``SlotDataLoader`` (the workers' shared slots, reused; what the loader
  rows use) and with a plain ``DataLoader`` (new shared memory per batch, as PyTorch's default collate makes).
- for reference, "h5py reads, checksum verified": ``dataset[row]`` of the same chunks, through HDF5's filter
  pipeline (the Fletcher-32 check every reader of these files pays), in one process.
- the loader: the project's path (dataset items ``RegionFeatures.pending(image_id)`` -> ``collate_regions``, which
  reads each batch with ``RegionFeatures.collate`` -> ``SlotDataLoader``) with 0, 2 or 4 workers, each batch handed
  on as training on an accelerator hands it on: its features copied into the same pinned tensor. The table gives
  the loader's rate without that copy (batches out of the DataLoader, what the "h5py chunks" ceiling is the
  ceiling of; the copy is what the "memcpy" ceiling measures) and, in the last two columns, with it. Worker start-up is excluded
  (persistent workers, started on other images first). ``disk`` reads each batch from the file (from the raw
  chunks, checksums verified by our own code, for files in the writer's layout); ``host`` and ``device``
  (``device`` = CPU here when CUDA is absent) load a copy of the sampled images once, so the page cache does not
  matter to them.
- the loader again with float16 batches (rows "..., float16 batches", for float16 files): what the datamodules'
  loaders give a Trainer on an accelerator (``RegionFeatures.convert_on_device``). The features stay in the file's
  float16 until they are on the device, which converts them to float32; the handoff copy is then a float16 copy
  into a pinned float16 tensor, half the bytes, and the conversion is not host work, so it is not timed here.

Cache states (``disk`` and "h5py chunks"): ``cold`` evicts the file's pages before the pass with
``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed; the report shows the file's cached bytes before and after
eviction, from ``fincore`` when installed), ``warm`` reads the sample once first. Use a file larger than the
machine's memory (COCO: 18 GB) for cold numbers that mean something.

Passes alternate their order every round (the machine may be shared); the table reports the median images/s
of ``--rounds`` rounds, each loader row as a percentage of both ceilings of the same cache state.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Sampler  # noqa: E402

from updown.data.batch_memory import PackedCollate, SlotDataLoader, slot_tensor  # noqa: E402
from updown.data.datasets import collate_regions  # noqa: E402
from updown.data.readers import RegionFeatures  # noqa: E402
from updown.data.writers import RegionFeaturesWriter  # noqa: E402
from updown.types import FEATURES_INDEX_KEY  # noqa: E402


class _ImageRows(Dataset):
    """Item ``i``: the regions of the reader's ``i``-th image (file order), read when the batch is collated, as
    the project's datasets do."""

    def __init__(self, reader: RegionFeatures) -> None:
        self.features = reader  # the name the project's datasets use (SlotDataLoader sizes its slots by it)
        self.ids = reader.image_ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return self.features.pending(self.ids[index])


class _SettableOrder(Sampler):
    """Yields whatever order was last set: persistent workers serve a start-up pass, then the measured one."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (clean pages; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(path: Path) -> str:
    """The file's bytes in the page cache, as ``fincore`` reports them (or "?" without fincore)."""
    if shutil.which("fincore") is None:
        return "?"
    result = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True
    )
    return result.stdout.strip() or "?"


def chunk_pass(path: Path, rows: list[int]) -> float:
    """Seconds to read each row's features and boxes chunks, raw (the h5py ceiling)."""
    with h5py.File(path, "r", rdcc_nbytes=0) as f:
        features, boxes = f["features"].id, f["boxes"].id
        start = time.perf_counter()
        for row in rows:
            features.read_direct_chunk((row, 0, 0))
            boxes.read_direct_chunk((row, 0, 0))
        return time.perf_counter() - start


def verified_pass(path: Path, rows: list[int]) -> float:
    """Seconds to read each row's features and boxes through h5py with HDF5's filters (the Fletcher-32 checksum
    verified): what any checked reader pays at least."""
    with h5py.File(path, "r", rdcc_nbytes=0) as f:
        features, boxes = f["features"], f["boxes"]
        start = time.perf_counter()
        for row in rows:
            features[row]
            boxes[row]
        return time.perf_counter() - start


def memcpy_pass(source: torch.Tensor, rows: list[int], staging: torch.Tensor, batch_size: int) -> float:
    """Seconds to copy each row's float32 features from memory into the preallocated (pinned) batch."""
    start = time.perf_counter()
    for first in range(0, len(rows), batch_size):
        for j, row in enumerate(rows[first : first + batch_size]):
            staging[j].copy_(source[row % source.shape[0]])
    return time.perf_counter() - start


class _FilledBatches:
    """A collate function that reads nothing: each batch's features tensor (what the reader's collate takes: a
    worker's shared slot, or new shared memory) filled from a block in memory, what the worker path costs with a
    free reader."""

    def __init__(self, block: torch.Tensor) -> None:
        self.block = block

    def __call__(self, items: list[int]) -> dict[str, torch.Tensor]:
        features = slot_tensor((len(items), *self.block.shape[1:]), torch.float32)
        features.copy_(self.block[: len(items)])
        return {"image_features": features}


class _Indices(Dataset):
    """Items ``0 .. n - 1``, with the ``features`` a SlotDataLoader sizes its slots by (a block's batch)."""

    def __init__(self, n: int, block: torch.Tensor) -> None:
        self.n, self.features = n, self
        self.row_bytes = block[0].nbytes

    def batch_features_nbytes(self, batch_size: int) -> int:
        return batch_size * self.row_bytes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


class TransferCase:
    """Batches of the loader's size from worker processes, with no reading: the ceiling of the worker path on this
    machine (crossing processes, through shared slots or new shared memory per batch), timed like a loader."""

    def __init__(self, block: torch.Tensor, workers: int, batch_size: int, images: int, slots: bool) -> None:
        self.loader = (SlotDataLoader if slots else DataLoader)(
            _Indices(images, block),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=PackedCollate(_FilledBatches(block)),
            persistent_workers=True,
        )
        for _ in self.loader:  # starts the workers
            pass

    def run(self, staging: torch.Tensor) -> tuple[float, float]:
        copying = 0.0
        start = time.perf_counter()
        for batch in self.loader:
            features = batch["image_features"]
            copy_start = time.perf_counter()
            staging[: features.shape[0]].copy_(features)
            copying += time.perf_counter() - copy_start
        return time.perf_counter() - start, copying


class LoaderCase:
    """A DataLoader over one reader with persistent workers, ready to time a pass in a given order."""

    def __init__(
        self, reader: RegionFeatures, workers: int, batch_size: int, startup_rows: list[int], rows: list[int]
    ) -> None:
        self.reader, self.rows = reader, rows
        self.sampler = _SettableOrder()
        self.loader = SlotDataLoader(
            _ImageRows(reader),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=PackedCollate(collate_regions),
            persistent_workers=workers > 0,
        )
        self.sampler.order = startup_rows
        for _ in self.loader:  # starts the workers (kept), on images outside the measured sample
            pass

    def run(self, stagings: dict[torch.dtype, torch.Tensor]) -> tuple[float, float]:
        """Seconds for one pass over the measured rows, each batch's features copied into the staging tensor of
        their dtype, and the seconds of those copies (the handoff to the accelerator) among them."""
        self.sampler.order = self.rows
        copying = 0.0
        start = time.perf_counter()
        for batch in self.loader:
            if FEATURES_INDEX_KEY in batch:  # the device store gathers (the CPU standing in for the device)
                batch = self.reader.finish_batch(batch)
            features = batch["image_features"]
            staging = stagings[features.dtype]
            copy_start = time.perf_counter()
            staging[: features.shape[0], : features.shape[1]].copy_(features)
            copying += time.perf_counter() - copy_start
        return time.perf_counter() - start, copying


def write_sample_copy(source: Path, rows: list[int], target: Path) -> None:
    """The sampled rows of ``source`` as a file of their own (for the in-memory stores), through the writer."""
    with h5py.File(source, "r") as f:
        features, boxes = f["features"], f["boxes"]
        with RegionFeaturesWriter(
            target, features.shape[1], features.shape[2], dtype=str(features.dtype), force=True
        ) as writer:
            for row in sorted(rows):
                n = int(f["num_boxes"][row])
                writer.add(
                    int(f["image_id"][row]),
                    features[row, :n],
                    boxes[row, :n],
                    float(f["image_w"][row]),
                    float(f["image_h"][row]),
                )


def write_test_file(path: Path, images: int) -> None:
    """A 36 x 2048 float16 file (when no --features is given)."""
    rng = np.random.default_rng(0)
    block = rng.random((36, 2048), dtype=np.float32)
    boxes = np.tile(np.array([[0, 0, 10, 10]], dtype=np.float32), (36, 1))
    with RegionFeaturesWriter(path, 36, 2048, dtype="float16", force=True) as writer:
        for i in range(images):
            writer.add(i + 1, block + (i % 13), boxes, 640, 480)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--features", type=Path, help="an HDF5 feature file (padded layout); default: temporary"
    )
    parser.add_argument("--images", type=int, default=2000, help="images per pass (a random sample of rows)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--caches", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    parser.add_argument(
        "--stores", nargs="+", choices=["disk", "host", "device"], default=["disk", "host", "device"]
    )
    parser.add_argument(
        "--batch-dtypes",
        nargs="+",
        choices=["float32", "float16"],
        default=["float32", "float16"],
        help="the loader's batches: float32 (a CPU Trainer) and float16 (an accelerator's, float16 files only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # One intra-op thread: the copies run where they are issued (a loader worker has one thread too).
    torch.set_num_threads(1)
    # More workers than cores is what this measures; torch's warning about it would only repeat that.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    folder = Path(tempfile.mkdtemp(prefix="benchmark_data_"))
    try:
        path = args.features
        if path is None:
            path = folder / "features.h5"
            write_test_file(path, args.images + 4 * args.batch_size * max(args.workers))
        return run(args, path, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args, path: Path, folder: Path) -> int:
    load_before = load_average()
    started = time.perf_counter()
    disk = RegionFeatures(path)
    open_seconds = time.perf_counter() - started
    n = len(disk)
    rng = np.random.default_rng(args.seed)
    startup_count = 2 * args.batch_size * max(max(args.workers), 1)
    if args.images + startup_count > n:
        raise SystemExit(
            f"{path}: holds {n} images, fewer than --images {args.images} + {startup_count} start-up."
        )
    sample = rng.choice(n, size=args.images + startup_count, replace=False)
    rows, startup_rows = [int(r) for r in sample[: args.images]], [int(r) for r in sample[args.images :]]
    max_boxes, dim = disk.max_boxes, disk.feature_size
    with h5py.File(path, "r") as f:
        dtype = f["features"].dtype

    pin = torch.cuda.is_available()
    # What a batch is copied into on its way to the accelerator, for float32 and for float16 batches.
    stagings = {
        batch_dtype: torch.empty((args.batch_size, max_boxes, dim), dtype=batch_dtype, pin_memory=pin)
        for batch_dtype in (torch.float32, torch.float16)
    }
    staging = stagings[torch.float32]
    source = torch.from_numpy(
        np.random.default_rng(1).random((min(500, args.images), max_boxes, dim), np.float32)
    )

    eviction = ""
    if "cold" in args.caches:
        chunk_pass(path, rows)
        before = cached_bytes(path)
        evict(path)
        eviction = f"page cache of the file: {before} bytes after a pass, {cached_bytes(path)} after eviction"

    # Loader variants: (store, path label); float16 batches for float16 files, except from the device store,
    # whose batches carry row numbers.
    variants = [(store, store) for store in args.stores if "float32" in args.batch_dtypes]
    if "float16" in args.batch_dtypes and dtype == np.float16:
        variants += [(store, f"{store}, float16 batches") for store in args.stores if store != "device"]
    cases: dict[tuple[str, int], LoaderCase] = {}
    file_ids = disk.image_ids
    for store, name in variants:
        if store == "disk":
            reader, order, startup = RegionFeatures(path), rows, startup_rows
        else:
            # The in-memory stores hold a copy of the sampled images (the whole file need not fit in memory).
            copy = folder / "sample.h5"
            if not copy.exists():
                write_sample_copy(path, rows + startup_rows, copy)
            reader = RegionFeatures(copy, feature_store=store)
            position = {image_id: i for i, image_id in enumerate(reader.image_ids)}
            order = [position[file_ids[r]] for r in rows]
            startup = [position[file_ids[r]] for r in startup_rows]
        # As the datamodules set it on an accelerator's Trainer.
        reader.convert_on_device = name.endswith("float16 batches")
        for workers in args.workers:
            cases[name, workers] = LoaderCase(reader, workers, args.batch_size, startup, order)

    passes = []  # (label, cache, function returning seconds)
    for cache in args.caches:
        prepare = (lambda: evict(path)) if cache == "cold" else (lambda: chunk_pass(path, rows))
        passes.append((("h5py chunks (ceiling)", cache, "-"), prepare, lambda: chunk_pass(path, rows)))
        passes.append(
            (("h5py reads, checksum verified", cache, "-"), prepare, lambda: verified_pass(path, rows))
        )
        for store, name in variants:
            if store == "disk":
                for workers in args.workers:
                    case = cases[name, workers]
                    passes.append(((name, cache, workers), prepare, lambda c=case: c.run(stagings)))
    block = torch.from_numpy(np.random.default_rng(2).random((args.batch_size, max_boxes, dim), np.float32))
    for workers in [w for w in args.workers if w > 0]:
        for slots, name in (
            (True, "worker transfer, slots (ceiling)"),
            (False, "worker transfer, plain DataLoader"),
        ):
            transfer = TransferCase(block, workers, args.batch_size, len(rows), slots)
            passes.append(((name, "-", workers), None, lambda c=transfer: c.run(staging)))
    passes.append(
        (("memcpy (ceiling)", "-", "-"), None, lambda: memcpy_pass(source, rows, staging, args.batch_size))
    )
    for store, name in variants:
        if store != "disk":
            for workers in args.workers:
                case = cases[name, workers]
                passes.append(((name, "in memory", workers), None, lambda c=case: c.run(stagings)))

    rates: dict[tuple, list[float]] = defaultdict(list)
    handed: dict[tuple, list[float]] = defaultdict(list)  # loader rows: images/s with the handoff copy
    for round_index in range(args.rounds):
        ordered = passes if round_index % 2 == 0 else passes[::-1]
        for label, prepare, measure in ordered:
            if prepare is not None:
                prepare()
            seconds = measure()
            if isinstance(seconds, tuple):  # a loader: (all, the handoff copies among them)
                handed[label].append(len(rows) / seconds[0])
                seconds = seconds[0] - seconds[1]
            rates[label].append(len(rows) / seconds)
        print(f"round {round_index + 1}/{args.rounds} done, load average {load_average()}", file=sys.stderr)

    median = {label: statistics.median(values) for label, values in rates.items()}
    memcpy = median["memcpy (ceiling)", "-", "-"]
    size = path.stat().st_size
    print(
        f"{path} ({size / 1e9:.1f} GB, {n:,} images of {max_boxes} x {dim} {dtype} features); "
        f"{args.images} sampled images per pass, shuffled, batch {args.batch_size}; median of "
        f"{args.rounds} rounds; reader opened in {open_seconds:.2f} s; CUDA pinned staging: {pin}; "
        f"load average {load_before} before, {load_average()} after (`uptime`, {os.cpu_count()} CPUs)."
    )
    if eviction:
        print(eviction + ".")
    print()
    print(
        "| path | page cache | workers | images/s | % of memcpy | % of h5py chunks | with handoff copy: images/s "
        "| % of h5py chunks |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for label, _, _ in passes:
        path_name, cache, workers = label
        rate = median[label]
        # In-memory stores and the worker transfer are compared with the warm ceiling.
        chunks = median.get(("h5py chunks (ceiling)", cache if cache in ("cold", "warm") else "warm", "-"))

        def share(value: float, chunks: float | None = chunks) -> str:
            return f"{100 * value / chunks:.0f}%" if chunks else "-"

        with_copy = statistics.median(handed[label]) if label in handed else None
        handoff = f"{with_copy:,.0f} | {share(with_copy)}" if with_copy is not None else "- | -"
        print(
            f"| {path_name} | {cache} | {workers} | {rate:,.0f} | {100 * rate / memcpy:.0f}% | {share(rate)} "
            f"| {handoff} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
