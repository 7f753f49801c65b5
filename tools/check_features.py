"""Scan region-feature HDF5 files for corrupt or implausible data, every row, in constant memory.

    python tools/check_features.py data/coco_trainval_36.h5 [data/nocaps_val.h5 ...]

For files from elsewhere, which carry no checksums (ours do: docs/data.md, 'Integrity'), or to list every bad
image of a file the reader refused. Reads the layout of docs/design.md, section 2.1, and the nocaps /
updown-baseline layout, block by block (memory: one block of about 32 MB plus the per-image ids, box counts and
sizes), with a progress bar, and reports per kind of problem how many images have it and the first few ids:

- blocks that fail their checksum or cannot be read;
- features that are not floating point (integer dtypes);
- NaN / inf in features, boxes or image sizes; features beyond +-1e5;
- real boxes whose feature row is all zero, and real boxes equal to (0, 0, 0, 0);
- inverted boxes (x2 < x1 or y2 < y1) and boxes outside the image by more than max(2 px, 1% of the side);
- non-zero boxes or features beyond num_boxes (padding), num_boxes out of range, duplicate ids;
- image sizes that are not positive or larger than 20000 px.

It reports all that the reader refuses (updown.data.readers) and more: the reader refuses an image only when
all its real feature rows are zero, and does not read the features' padding. Exit status 0 when every file is
clean, 2 otherwise (one ``error:`` line on stderr, the per-kind report on stdout).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python tools/check_features.py` from a checkout where updown is not installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from updown.data.readers import (
    H5_DATA_ERRORS,
    MAX_FEATURE_MAGNITUDE,
    MAX_IMAGE_SIZE,
    PER_BOX_EXTRAS,
    REQUIRED_PADDED,
    REQUIRED_VARLEN,
    TOLERANCE_TEXT,
    box_problems,
    size_problems,
)

PROG = "check_features.py"
# Kinds of problem, in report order, with what each means.
KINDS: dict[str, str] = {
    "unreadable": "blocks that fail their checksum or cannot be read",
    "feature dtype": "features stored as a non-float type",
    "non-finite features": "NaN or inf in the features of real boxes",
    "huge features": f"features beyond +-{MAX_FEATURE_MAGNITUDE:g}",
    "all-zero feature rows": "real boxes whose feature row is all zero",
    "feature row size": "variable-length rows whose size is not num_boxes x D",
    "non-finite boxes": "NaN or inf in real boxes",
    "all-zero boxes": "real boxes equal to (0, 0, 0, 0)",
    "inverted boxes": "x2 < x1 or y2 < y1",
    "boxes outside the image": f"by more than {TOLERANCE_TEXT}",
    "non-zero padding": "boxes or features beyond num_boxes that are not zero",
    "per-box extras": "NaN in per-box datasets, or their padding overwritten",
    "non-finite image sizes": "NaN or inf",
    "non-positive image sizes": "width or height <= 0",
    "huge image sizes": f"larger than {MAX_IMAGE_SIZE:g} px",
    "num_boxes out of range": "not in 1..max_boxes",
    "duplicate image ids": "an id on more than one row",
}
FIX = (
    "Re-convert the files with tools/convert_features.py, download or copy them again, or re-extract the images "
    "listed."
)


@dataclass
class Report:
    """What one file's scan found: per kind, the images (ids) that have it; ``fatal`` when it could not be read."""

    path: Path
    num_images: int = 0
    images: dict[str, list[int]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    fatal: str | None = None

    def add(self, kind: str, image_ids: Sequence[int], examples: int) -> None:
        if len(image_ids) == 0:
            return
        self.counts[kind] = self.counts.get(kind, 0) + len(image_ids)
        kept = self.images.setdefault(kind, [])
        kept.extend(int(i) for i in list(image_ids)[: max(0, examples - len(kept))])

    @property
    def clean(self) -> bool:
        return self.fatal is None and not self.counts

    def lines(self) -> list[str]:
        if self.fatal is not None:
            return [f"{self.path}: {self.fatal}"]
        if self.clean:
            return [f"{self.path}: {self.num_images} images, clean"]
        lines = [f"{self.path}: {self.num_images} images, {len(self.counts)} kind(s) of problem:"]
        for kind in KINDS:
            if kind in self.counts:
                examples = ", ".join(map(str, self.images[kind]))
                lines.append(f"  {kind} ({KINDS[kind]}): {self.counts[kind]} image(s), e.g. {examples}")
        return lines


class _Scanner:
    """Scans one open file into a :class:`Report`."""

    def __init__(self, h5: h5py.File, report: Report, examples: int) -> None:
        self.h5, self.report, self.examples = h5, report, examples
        names = set(h5.keys())
        if set(REQUIRED_PADDED) <= names:
            self.layout, w_name, h_name = "padded", "image_w", "image_h"
        elif set(REQUIRED_VARLEN) <= names:
            self.layout, w_name, h_name = "varlen", "width", "height"
        else:
            raise _Fatal(
                f"missing dataset(s) {sorted(set(REQUIRED_PADDED) - names)}; found {sorted(names)}: not a "
                "region-feature file"
            )
        for name in REQUIRED_PADDED if self.layout == "padded" else REQUIRED_VARLEN:
            if not isinstance(h5[name], h5py.Dataset):
                raise _Fatal(f"'{name}' is not a dataset (a group or a link)")
        self.image_ids = _integers(h5, "image_id")
        self.num_boxes = _integers(h5, "num_boxes")
        self.image_w = np.asarray(h5[w_name][()], dtype=np.float64).reshape(-1)
        self.image_h = np.asarray(h5[h_name][()], dtype=np.float64).reshape(-1)
        n = report.num_images = len(self.image_ids)
        self.features, self.boxes = h5["features"], h5["boxes"]
        for name, values in (("num_boxes", self.num_boxes), (w_name, self.image_w), (h_name, self.image_h)):
            if values.shape != (n,):
                raise _Fatal(f"dataset '{name}' has shape {values.shape}, expected ({n},) like 'image_id'")
        if self.layout == "padded":
            if self.features.ndim != 3 or self.features.shape[0] != n:
                raise _Fatal(
                    f"dataset 'features' has shape {self.features.shape}, expected ({n}, max_boxes, D)"
                )
            self.max_boxes, self.feature_size = self.features.shape[1:]
            if self.boxes.shape != (n, self.max_boxes, 4):
                raise _Fatal(
                    f"dataset 'boxes' has shape {self.boxes.shape}, expected ({n}, {self.max_boxes}, 4)"
                )
            dtype = self.features.dtype
        else:
            if self.features.shape != (n,) or self.boxes.shape != (n,):
                raise _Fatal(
                    f"datasets 'features' / 'boxes' have shapes {self.features.shape} / {self.boxes.shape}"
                )
            self.max_boxes, self.feature_size = int(self.num_boxes.max(initial=1)), None
            dtype = h5py.check_vlen_dtype(self.features.dtype) or self.features.dtype
        if dtype.kind not in "fiu":
            raise _Fatal(f"dataset 'features' has dtype {dtype}, not numbers")
        self.extras = [
            name
            for name in h5
            if self.layout == "padded"
            and name not in REQUIRED_PADDED
            and isinstance(h5[name], h5py.Dataset)
            and h5[name].shape == (n, self.max_boxes)
        ]
        for name in PER_BOX_EXTRAS:
            if self.layout == "padded" and name in h5 and name not in self.extras:
                shape = getattr(h5[name], "shape", None)
                raise _Fatal(f"dataset '{name}' has shape {shape}, expected ({n}, {self.max_boxes})")
        if dtype.kind != "f":
            self.add("feature dtype", self.image_ids)

    def add(self, kind: str, image_ids: Sequence[int]) -> None:
        self.report.add(kind, image_ids, self.examples)

    def check_metadata(self) -> None:
        sizes = size_problems(self.image_w, self.image_h)
        self.add("non-finite image sizes", self.image_ids[sizes["non-finite"]])
        self.add("non-positive image sizes", self.image_ids[sizes["non-positive"]])
        self.add("huge image sizes", self.image_ids[sizes["too large"]])
        self.add(
            "num_boxes out of range", self.image_ids[(self.num_boxes < 1) | (self.num_boxes > self.max_boxes)]
        )
        unique, counts = np.unique(self.image_ids, return_counts=True)
        self.add("duplicate image ids", unique[counts > 1])

    def block_size(self) -> int:
        row_bytes = self.max_boxes * (self.feature_size or 2048) * 4
        return max(1, min(1024, (32 << 20) // max(row_bytes, 1)))

    def scan(self, progress: Progress) -> None:
        n = len(self.image_ids)
        task = progress.add_task(f"checking {self.report.path.name}", total=n)
        block = self.block_size()
        for start in range(0, n, block):
            stop = min(n, start + block)
            rows = self.read_rows(start, stop)
            if rows is not None:
                self.check_block(start, stop, *rows)
            else:  # a block failed: check its images one by one, to name the damaged ones
                for row in range(start, stop):
                    one = self.read_rows(row, row + 1)
                    if one is None:
                        self.add("unreadable", self.image_ids[row : row + 1])
                    else:
                        self.check_block(row, row + 1, *one)
            progress.advance(task, stop - start)

    def read_rows(self, start: int, stop: int) -> tuple | None:
        try:
            extras = {name: self.h5[name][start:stop] for name in self.extras}
            return self.features[start:stop], self.boxes[start:stop], extras
        except H5_DATA_ERRORS:
            return None

    def check_block(self, start: int, stop: int, features, boxes, extras: dict) -> None:
        ids = self.image_ids[start:stop]
        num_boxes = np.clip(self.num_boxes[start:stop], 0, self.max_boxes)
        w, h = self.image_w[start:stop], self.image_h[start:stop]
        if self.layout == "varlen":
            features, boxes, bad_size = self.pad_varlen(features, boxes, num_boxes)
            self.add("feature row size", ids[bad_size])
        # shape: (B, max_boxes)
        real = np.arange(features.shape[1])[None, :] < num_boxes[:, None]
        with np.errstate(invalid="ignore"):
            peak = np.maximum(features.max(axis=2, initial=0), -features.min(axis=2, initial=0)).astype(
                np.float64
            )
            self.add("non-finite features", ids[(~np.isfinite(peak) & real).any(axis=1)])
            self.add(
                "huge features", ids[((peak > MAX_FEATURE_MAGNITUDE) & np.isfinite(peak) & real).any(axis=1)]
            )
            self.add("all-zero feature rows", ids[((peak == 0) & real).any(axis=1)])
        problems = box_problems(boxes, w[:, None], h[:, None])
        # An image whose size is bad is reported for that; its boxes are not also "outside" it.
        problems["outside"] &= ~np.logical_or.reduce(list(size_problems(w, h).values()))[:, None]
        for kind, name in (
            ("non-finite", "non-finite boxes"),
            ("all-zero", "all-zero boxes"),
            ("inverted", "inverted boxes"),
            ("outside", "boxes outside the image"),
        ):
            self.add(name, ids[(problems[kind] & real).any(axis=1)])
        padding = ((boxes != 0).any(axis=2) | (features != 0).any(axis=2)) & ~real
        self.add("non-zero padding", ids[padding.any(axis=1)])
        bad_extras = np.zeros(len(ids), dtype=bool)
        for name, values in extras.items():
            if values.dtype.kind == "f":
                bad_extras |= ~np.isfinite(values).all(axis=1)
            if name in PER_BOX_EXTRAS and values.dtype.kind in "iuf":
                bad_extras |= ((values != PER_BOX_EXTRAS[name][1]) & ~real).any(axis=1)
        self.add("per-box extras", ids[bad_extras])

    def pad_varlen(self, features, boxes, num_boxes):
        """Flat variable-length rows as padded ``(B, max_boxes, D)`` and ``(B, max_boxes, 4)`` arrays."""
        if self.feature_size is None:
            self.feature_size = max(1, len(features[0]) // max(int(num_boxes[0]), 1))
        d = self.feature_size
        padded_features = np.zeros((len(features), self.max_boxes, d), dtype=np.float64)
        padded_boxes = np.zeros((len(features), self.max_boxes, 4), dtype=np.float64)
        bad = np.zeros(len(features), dtype=bool)
        for i, (f, b, n) in enumerate(zip(features, boxes, num_boxes)):
            n = int(n)
            if len(f) != n * d or len(b) != n * 4:
                bad[i] = True
                continue
            padded_features[i, :n] = np.asarray(f).reshape(n, d)
            padded_boxes[i, :n] = np.asarray(b).reshape(n, 4)
        return padded_features, padded_boxes, bad


class _Fatal(Exception):
    """The file cannot be scanned at all (not HDF5, another layout, damaged metadata)."""


def _integers(h5: h5py.File, name: str) -> np.ndarray:
    values = np.asarray(h5[name][()]).reshape(-1)
    if values.dtype.kind not in "iu":
        raise _Fatal(f"dataset '{name}' has dtype {values.dtype}, expected an integer type")
    return values.astype(np.int64)


def check_file(path: Path, progress: Progress, examples: int = 5) -> Report:
    """Scan one file; never raises for a bad file (the report says what is wrong)."""
    report = Report(path)
    if not path.is_file():
        report.fatal = "file not found"
        return report
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        report.fatal = f"not a readable HDF5 file ({error})"
        return report
    try:
        with h5:
            scanner = _Scanner(h5, report, examples)
            scanner.check_metadata()
            scanner.scan(progress)
    except _Fatal as error:
        report.fatal = str(error)
    except H5_DATA_ERRORS as error:
        # Metadata, or the per-image ids, box counts and sizes, that cannot be read.
        report.fatal = f"damaged: {type(error).__name__}: {error}"
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n" + "\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="region-feature HDF5 file(s)")
    parser.add_argument("--examples", type=int, default=5, help="image ids listed per kind of problem")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; 0 when every file is clean, 2 otherwise."""
    args = build_parser().parse_args(argv)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=args.quiet,
        transient=True,
    )
    with progress:
        reports = [check_file(path, progress, args.examples) for path in args.files]
    for report in reports:
        print("\n".join(report.lines()))
    bad = [report for report in reports if not report.clean]
    if not bad:
        return 0
    summary = "; ".join(
        f"{report.path}: " + (report.fatal or f"{len(report.counts)} kind(s) of problem") for report in bad
    )
    print(
        f"{PROG}: error: {len(bad)} of {len(reports)} file(s) are not clean ({summary}). {FIX}",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
