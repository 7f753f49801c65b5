"""Images/s through the DataLoader for 36 x 2048 region features, against a plain numpy copy as the ceiling.

    python tools/benchmark_data.py [--images 1000] [--batch-size 50] [--repeats 3]

Rows: float32 / float16 files, lazy (read per item from HDF5) vs in-memory, 0 and 2 workers. The ceiling
copies the same bytes (36 x 2048 float32 per image, into a batch array) with numpy from memory: no reader
can deliver batches faster than that. Files are read from the page cache (a warm-up epoch runs first), which is
how a training run sees them after its first epoch. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from updown.data.datasets import collate_regions  # noqa: E402
from updown.data.readers import RegionFeatures  # noqa: E402
from updown.data.writers import RegionFeaturesWriter  # noqa: E402

BOXES, DIM = 36, 2048


class RegionDataset(Dataset):
    def __init__(self, reader: RegionFeatures) -> None:
        self.reader = reader
        self.ids = reader.image_ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return self.reader[self.ids[index]]


def write_file(path: Path, images: int, dtype: str) -> None:
    rng = np.random.default_rng(0)
    block = rng.random((BOXES, DIM), dtype=np.float32)
    boxes = np.tile(np.array([[0, 0, 10, 10]], dtype=np.float32), (BOXES, 1))
    with RegionFeaturesWriter(path, BOXES, DIM, dtype=dtype, force=True) as writer:
        for i in range(images):
            writer.add(i + 1, block + i, boxes, 640, 480)


def loader_rate(path: Path, in_memory: bool, workers: int, batch_size: int, repeats: int) -> float:
    reader = RegionFeatures(path, in_memory=in_memory)
    loader = DataLoader(
        RegionDataset(reader),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_regions,
        persistent_workers=workers > 0,
    )
    for _ in loader:  # warm-up: page cache, worker start-up
        pass
    start = time.perf_counter()
    for _ in range(repeats):
        for batch in loader:
            batch["image_features"].sum()  # touch the data as a model would
    return repeats * len(reader) / (time.perf_counter() - start)


def ceiling_rate(images: int, batch_size: int, repeats: int) -> float:
    """The same work as the loader's collate, minus the reader: per-row copies of in-memory arrays into a
    fresh batch tensor, then the same touch. Best of two passes (the first warms the allocator)."""
    source = np.random.default_rng(0).random((images, BOXES, DIM), dtype=np.float32)
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(repeats):
            order = np.random.permutation(images)
            for first in range(0, images, batch_size):
                rows = order[first : first + batch_size]
                batch = torch.zeros((len(rows), BOXES, DIM), dtype=torch.float32)
                batch_np = batch.numpy()
                for j, row in enumerate(rows):
                    batch_np[j] = source[row]
                batch.sum()
        best = max(best, repeats * images / (time.perf_counter() - start))
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ceiling = ceiling_rate(args.images, args.batch_size, args.repeats)
    rows = [("numpy copy (ceiling)", "float32", "-", "-", ceiling)]
    with tempfile.TemporaryDirectory() as folder:
        for dtype in ("float32", "float16"):
            path = Path(folder) / f"{dtype}.h5"
            write_file(path, args.images, dtype)
            for in_memory in (False, True):
                for workers in (0, 2):
                    rate = loader_rate(path, in_memory, workers, args.batch_size, args.repeats)
                    rows.append(
                        ("DataLoader", dtype, "in-memory" if in_memory else "lazy", str(workers), rate)
                    )
    print(
        f"{args.images} images of {BOXES} x {DIM}, batch {args.batch_size}, shuffled, {args.repeats} epochs\n"
    )
    print("| reader | dtype | storage | workers | images/s | % of ceiling |")
    print("|---|---|---|---|---:|---:|")
    for reader, dtype, storage, workers, rate in rows:
        print(f"| {reader} | {dtype} | {storage} | {workers} | {rate:,.0f} | {100 * rate / ceiling:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
