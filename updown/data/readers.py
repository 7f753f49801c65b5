"""Readers: files in, plain numpy and Python objects out, almost as they are on disk.

:class:`RegionFeatures` reads bottom-up region features from one or several HDF5 files in the layout of
docs/design.md, section 2.1 (padded ``(N, max_boxes, D)`` arrays), and also, unconverted, the variable-length
layout of nocaps / kdexd/updown-baseline files (flattened ``features`` and ``boxes`` per image,
``width``/``height``).
The schema is validated when the reader is built; the feature arrays themselves are opened lazily, once
per process, because h5py handles do not survive ``fork`` into DataLoader workers.

Corrupt or implausible data never reaches a model (docs/data.md, 'What the reader refuses'): a block that fails
its checksum (the writer stores a Fletcher-32 checksum per chunk) or holds values no detector writes stops the
read with one ``ValueError`` naming the file, the image and the fix. :func:`image_problem`, :func:`box_problems`
and :func:`size_problems` are shared with the writer, the converter and ``tools/check_features.py``, so they all
agree on what is plausible.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from updown.data.batch_memory import BatchBuffers, batch_tensor
from updown.data.chunk_reader import ChunkReader, chunk_layout, copy_values
from updown.data.feature_store import DeviceFeatureStore, resolve_feature_store
from updown.types import FEATURES_INDEX_KEY, RegionBatch

REQUIRED_PADDED = ("image_id", "features", "boxes", "num_boxes", "image_w", "image_h")
REQUIRED_VARLEN = ("image_id", "features", "boxes", "num_boxes", "width", "height")
CONVERT_HINT = (
    "Convert the features with `python tools/convert_features.py` (docs/data.md, 'Region features (HDF5)')."
)


@dataclass
class RegionFeature:
    """The regions of one image.

    Attributes:
        image_id: COCO image id.
        features: ``(num_boxes, D)`` float32; None with the ``device`` feature store, whose batches gather the
            features on the device from ``store_row``.
        boxes: ``(num_boxes, 4)`` float32 x1, y1, x2, y2 in pixels.
        spatial: ``(num_boxes, 5)`` float32 (x1/w, y1/h, x2/w, y2/h, area/(w*h)).
        image_w, image_h: image size in pixels.
        store_row: the image's row in the device feature store (``device`` store only).
    """

    image_id: int
    features: np.ndarray | None
    boxes: np.ndarray
    spatial: np.ndarray
    image_w: float
    image_h: float
    store_row: int | None = None

    @property
    def num_boxes(self) -> int:
        return self.boxes.shape[0]


@dataclass(frozen=True)
class PendingRegions:
    """An image whose regions are read when its batch is collated (:meth:`RegionFeatures.collate`): datasets
    return these, so that a batch is read, checked and converted at once instead of image by image."""

    reader: RegionFeatures
    image_id: int


def as_float32(values: np.ndarray) -> np.ndarray:
    """``values`` as float32 (float16 converted by torch's vectorised copy, :func:`copy_values`)."""
    if values.dtype == np.float32:
        return values
    out = np.empty(values.shape, dtype=np.float32)
    copy_values(out, values)
    return out


def spatial_features(boxes: np.ndarray, image_w: float, image_h: float) -> np.ndarray:
    """Normalised box geometry used by models: (x1/w, y1/h, x2/w, y2/h, area/(w*h)).

    Args:
        boxes: ``(num_boxes, 4)`` x1, y1, x2, y2 in pixels.

    Returns:
        ``(num_boxes, 5)`` float32.
    """
    boxes = boxes.astype(np.float32, copy=False)
    scale = np.array([image_w, image_h, image_w, image_h], dtype=np.float32)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (image_w * image_h)
    # shape: (num_boxes, 5)
    return np.concatenate([boxes / scale, area[:, None]], axis=1).astype(np.float32)


def _batch_spatial(boxes: torch.Tensor, image_w: np.ndarray, image_h: np.ndarray) -> torch.Tensor:
    """:func:`spatial_features` of a batch, bit for bit: ``boxes (B, R, 4)`` (zero padding stays zero) and the
    images' sizes ``(B,)`` float32; ``(B, R, 5)`` float32 (in shared memory in a DataLoader worker)."""
    b = boxes.numpy()
    spatial = batch_tensor((*b.shape[:2], 5), torch.float32, zero=False)
    out = spatial.numpy()
    # shape: (B, 1, 4), float32 as in spatial_features
    scale = np.stack([image_w, image_h, image_w, image_h], axis=1)[:, None, :]
    np.divide(b, scale, out=out[..., :4])
    # As spatial_features: the image area in float64, then float32 (a Python float divides a float32 array).
    area = (image_w.astype(np.float64) * image_h.astype(np.float64)).astype(np.float32)[:, None]
    out[..., 4] = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) / area
    return spatial


# Optional per-box datasets a file may carry, with their dtype and the value of padded boxes (the writer's
# contract; the reader checks that the padding still holds it). LXMERT files keep Visual Genome object /
# attribute ids and confidences; the synthetic world keeps, for each region, the object it belongs to and that
# object's category (-1 for background regions).
PER_BOX_EXTRAS: dict[str, tuple[str, Any]] = {
    "objects_id": ("int64", -1),
    "objects_conf": ("float32", 0.0),
    "attrs_id": ("int64", -1),
    "attrs_conf": ("float32", 0.0),
    "region_object": ("int32", -1),
    "region_category": ("int32", -1),
}

# What is plausible (docs/data.md, 'What the reader refuses'). Real bottom-up features are pooled, rectified CNN
# activations below ~50 (the real rows in tests/data peak at 33); a value beyond this bound is overwritten data.
MAX_FEATURE_MAGNITUDE = 1e5
# Image sides in pixels: COCO's are at most 640, the largest photos of common data sets a few thousand.
MAX_IMAGE_SIZE = 20_000.0
# A box may cross the image border by max(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * side) on each side:
# detectors clip to [0, w - 1] or [0, w], and boxes predicted on the resized input come back with rounding error.
BOX_TOLERANCE_PX = 2.0
BOX_TOLERANCE_FRACTION = 0.01
TOLERANCE_TEXT = f"max({BOX_TOLERANCE_PX:g} px, {BOX_TOLERANCE_FRACTION:.0%} of the side)"

IMAGE_FIX = (
    "re-convert or re-download the file, or re-extract that image (`python tools/check_features.py FILE` lists "
    "every bad image of a file)"
)
VALUES_FIX = (
    "Re-convert the file (tools/convert_features.py) or download it again; `python tools/check_features.py FILE` "
    "lists every bad image."
)
DAMAGED_FIX = (
    "The file changed on disk after it was written (a failing disk, an interrupted copy or download): copy or "
    "download it again, or re-run the tool that wrote it (tools/convert_features.py)."
)
# What h5py raises for a block it cannot read: a failed checksum (OSError "filter returned failure during
# read"), or damaged metadata of a file without checksums (KeyError, RuntimeError, TypeError).
H5_READ_ERRORS = (OSError, RuntimeError, KeyError, TypeError)
# Reading a dataset's values can also fail with ValueError (a damaged dataspace of a file without checksums).
H5_DATA_ERRORS = (*H5_READ_ERRORS, ValueError)


def box_tolerance(side: Any) -> np.ndarray:
    """How far (pixels) a box may cross the border of an image side of ``side`` pixels."""
    return np.maximum(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * np.asarray(side, dtype=np.float64))


def size_problems(image_w: Any, image_h: Any) -> dict[str, np.ndarray]:
    """Masks of implausible image sizes, one bool per image.

    Returns:
        ``{"non-finite": ..., "non-positive": ..., "too large": ...}`` (larger than :data:`MAX_IMAGE_SIZE`).
    """
    w, h = np.asarray(image_w, dtype=np.float64), np.asarray(image_h, dtype=np.float64)
    finite = np.isfinite(w) & np.isfinite(h)
    with np.errstate(invalid="ignore"):
        return {
            "non-finite": ~finite,
            "non-positive": finite & ((w <= 0) | (h <= 0)),
            "too large": finite & ((w > MAX_IMAGE_SIZE) | (h > MAX_IMAGE_SIZE)),
        }


def box_problems(boxes: np.ndarray, image_w: Any, image_h: Any) -> dict[str, np.ndarray]:
    """Masks of implausible boxes, one bool per box.

    Args:
        boxes: ``(..., 4)`` x1, y1, x2, y2 in pixels (real boxes; padding is the caller's business).
        image_w, image_h: image size, broadcastable to ``boxes.shape[:-1]``.

    Returns:
        ``{"non-finite", "all-zero", "inverted", "outside"}`` masks of shape ``boxes.shape[:-1]``: NaN / inf; the
        box (0, 0, 0, 0), which is padding (a real box has an area); x2 < x1 or y2 < y1; and a box crossing the
        image border by more than :func:`box_tolerance` (inverted boxes are not also counted as outside).
    """
    b = np.asarray(boxes, dtype=np.float64)
    w, h = np.asarray(image_w, dtype=np.float64), np.asarray(image_h, dtype=np.float64)
    x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    tx, ty = box_tolerance(w), box_tolerance(h)
    finite = np.isfinite(b).all(axis=-1)
    with np.errstate(invalid="ignore"):
        inverted = finite & ((x2 < x1) | (y2 < y1))
        outside = finite & ~inverted & ((x1 < -tx) | (y1 < -ty) | (x2 > w + tx) | (y2 > h + ty))
    return {
        "non-finite": ~finite,
        "all-zero": (b == 0).all(axis=-1),
        "inverted": inverted,
        "outside": outside,
    }


def _box_text(box: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"


def image_problem(
    features: np.ndarray, boxes: np.ndarray, image_w: float, image_h: float
) -> tuple[str, str] | None:
    """Why one image's regions are implausible, or None: the reader, the writer and the converter all ask this.

    Args:
        features: ``(num_boxes, D)`` float features of the real boxes.
        boxes: ``(num_boxes, 4)`` their boxes, x1, y1, x2, y2 in pixels.
        image_w, image_h: the image size (already checked with :func:`size_problems`).

    Returns:
        ``(dataset, problem)``, e.g. ``("features", "contains NaN or inf")``, to be read as "dataset 'features'
        contains NaN or inf for image N"; None when the image is plausible.
    """
    # Two reductions and no temporary array: NaN propagates through max/min, so they also find NaN and inf.
    high, low = float(features.max()), float(features.min())
    peak = max(high, -low)
    if not np.isfinite(peak):
        return "features", "contains NaN or inf"
    if peak > MAX_FEATURE_MAGNITUDE:
        return "features", (
            f"has values up to {peak:.3g} in magnitude, beyond the plausible {MAX_FEATURE_MAGNITUDE:g} (real "
            "region features stay below ~100): the data was overwritten, or is not region features"
        )
    if high == 0 and low == 0:
        return "features", "is all zero in every real box (the block was overwritten with zeros)"
    if _boxes_plausible(boxes, float(image_w), float(image_h)):
        return None
    problems = box_problems(boxes, image_w, image_h)
    for kind, what in (
        ("non-finite", "contains NaN or inf in box {k} {box}"),
        ("all-zero", "has box {k} = {box}, a padding box counted as real ('num_boxes' is too large, or the "
         "boxes were overwritten with zeros)"),
        ("inverted", "has box {k} = {box} inverted (x2 < x1 or y2 < y1)"),
        ("outside", "has box {k} = {box} outside the {w:g} x {h:g} image by more than " + TOLERANCE_TEXT),
    ):  # fmt: skip
        bad = np.flatnonzero(problems[kind])
        if len(bad):
            k = int(bad[0])
            return "boxes", what.format(k=k, box=_box_text(boxes[k]), w=float(image_w), h=float(image_h))
    return None


def _boxes_plausible(boxes: np.ndarray, image_w: float, image_h: float) -> bool:
    """True exactly when :func:`box_problems` finds nothing, in a few reductions (the per-read fast path).

    NaN propagates through min / max and fails every comparison; inf ends up beyond the border or makes a box
    inverted; so finite, non-inverted, inside and not (0, 0, 0, 0) is all that is left to test.
    """
    low, high = boxes.min(axis=0), boxes.max(axis=0)
    tx = max(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * image_w)
    ty = max(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * image_h)
    if not (low[0] >= -tx and low[1] >= -ty and high[2] <= image_w + tx and high[3] <= image_h + ty):
        return False
    # What can still be non-finite (a +inf x1 or y1, a -inf x2 or y2) makes the difference -inf: not plausible.
    thinnest = (boxes[:, 2:] - boxes[:, :2]).min()
    # Only a box with a zero side can be (0, 0, 0, 0).
    return bool(thinnest > 0 or (thinnest == 0 and boxes.any(axis=1).all()))


def padding_problem(padding_boxes: np.ndarray, num_boxes: int) -> tuple[str, str] | None:
    """Why the boxes beyond ``num_boxes`` of a padded row are not padding (all zero), or None."""
    if padding_boxes.any():
        return "boxes", (
            f"has non-zero boxes beyond num_boxes = {num_boxes} ('num_boxes' is too small, or the padding was "
            "overwritten)"
        )
    return None


def _flag_padded_rows(
    features: np.ndarray, boxes: np.ndarray, num_boxes: np.ndarray, image_w: np.ndarray, image_h: np.ndarray
) -> np.ndarray:
    """Which images of a block of padded rows :func:`image_problem` or :func:`padding_problem` would refuse.

    A vectorised filter over ``(B, max_boxes, D)`` features and ``(B, max_boxes, 4)`` boxes; the refused rows
    are then checked one by one, so the message is always the per-image one. Returns a ``(B,)`` bool mask.
    """
    real = np.arange(features.shape[1])[None, :] < num_boxes[:, None]
    # numpy reduces float16 several times slower than float32.
    features = as_float32(features)
    # shape: (B, max_boxes)
    with np.errstate(invalid="ignore"):
        peak = np.maximum(features.max(axis=2), -features.min(axis=2)).astype(np.float64)
        bad_features = (~(peak <= MAX_FEATURE_MAGNITUDE) & real).any(axis=1)
        all_zero = ~((peak != 0) & real).any(axis=1)
    padding = ((boxes != 0).any(axis=2) & ~real).any(axis=1)
    return bad_features | all_zero | _flag_bad_boxes(boxes, num_boxes, image_w, image_h) | padding


def _flag_bad_boxes(
    boxes: np.ndarray, num_boxes: np.ndarray, image_w: np.ndarray, image_h: np.ndarray
) -> np.ndarray:
    """Which images of ``boxes (B, R, 4)`` have a real box (among their ``num_boxes (B,)``) that
    :func:`box_problems` refuses; ``(B,)`` bool."""
    real = np.arange(boxes.shape[1])[None, :] < num_boxes[:, None]
    problems = box_problems(boxes, image_w[:, None], image_h[:, None])
    return (np.logical_or.reduce(list(problems.values())) & real).any(axis=1)


class _FeatureFile:
    """One validated HDF5 file: metadata in memory, feature handle opened lazily per process.

    ``store`` is where its features live (:mod:`updown.data.feature_store`): ``disk`` reads them per item,
    ``host`` loads features and boxes here, ``device`` loads the boxes here and leaves the features to
    :meth:`load_into` (a :class:`~updown.data.feature_store.DeviceFeatureStore`).
    """

    def __init__(self, h5path: Path, store: str, check_finite: bool) -> None:
        self.h5path = h5path
        self.store = store
        if not h5path.is_file():
            raise FileNotFoundError(
                f"{h5path}: region-feature file not found. Check the path. {CONVERT_HINT}"
            )
        try:
            h5 = h5py.File(h5path, "r")
        except OSError as error:
            raise ValueError(
                f"{h5path}: not a readable HDF5 file ({error}). The file may be truncated or still being "
                f"written; regenerate it. {CONVERT_HINT}"
            ) from None
        try:
            with h5:
                self._open(h5, check_finite)
        except H5_READ_ERRORS as error:
            # Metadata the library cannot follow: a damaged file without checksums, or a failed metadata checksum.
            raise ValueError(
                f"{h5path}: the file's internal structure is damaged ({type(error).__name__}: {error}). "
                f"{DAMAGED_FIX}"
            ) from None
        self._handle: h5py.File | None = None
        self._handle_pid: int | None = None
        self._datasets: tuple[h5py.Dataset, h5py.Dataset] | None = None

    def _open(self, h5: h5py.File, check_finite: bool) -> None:
        names = set(h5.keys())
        if set(REQUIRED_PADDED) <= names:
            self.layout = "padded"
        elif set(REQUIRED_VARLEN) <= names:
            self.layout = "varlen"
        else:
            missing = sorted(set(REQUIRED_PADDED) - names)
            raise ValueError(
                f"{self.h5path}: missing dataset(s) {missing}; found {sorted(names)}. Expected the region-feature "
                f"layout {list(REQUIRED_PADDED)} or the nocaps/updown-baseline layout {list(REQUIRED_VARLEN)}. "
                f"{CONVERT_HINT}"
            )
        for name in REQUIRED_PADDED if self.layout == "padded" else REQUIRED_VARLEN:
            if not isinstance(h5[name], h5py.Dataset):
                raise self._fail(name, "is not a dataset (a group or a link)")
        self._check_dtypes(h5)
        self._read_metadata(h5)
        self.grid_shape = tuple(int(x) for x in h5.attrs["grid_shape"]) if "grid_shape" in h5.attrs else None
        self.attrs = dict(h5.attrs)
        self.extras = {name: self._read_all(h5, name) for name in _per_box_extras(h5, self.layout)}
        self._check_extras()
        # Only metadata (ids, box counts, image sizes, per-box extras: a few bytes per image) is read so far:
        # opening stays bounded (well under a second at COCO scale) however large the features are. The
        # features themselves are checked per read (disk), or once when loaded (host, device).
        self.features = self.boxes = None
        # Batches of a disk-store file in our own layout are read from its raw chunks (chunk_reader).
        layout = chunk_layout(h5) if self.store == "disk" and self.layout == "padded" else None
        self._chunks = None if layout is None else ChunkReader(self.h5path, len(self.image_ids), layout)
        if self.store == "host":
            self.features, self.boxes = self._load(h5, ("features", "boxes"))
            # Checked once here, in memory, so that reads need not check again.
            self._scan(self.features, self.boxes)
        elif self.store == "device":
            # The boxes stay on the host (items carry them: 4 floats a box); the features are checked while
            # they are copied to the device (load_into).
            (self.boxes,) = self._load(h5, ("boxes",))
        elif check_finite:
            self._scan(h5["features"], h5["boxes"])

    def _fail(self, field: str, problem: str, fix: str = CONVERT_HINT) -> ValueError:
        return ValueError(f"{self.h5path}: dataset '{field}' {problem}. {fix}")

    def _image_error(self, row: int, field: str, problem: str) -> ValueError:
        return ValueError(
            f"{self.h5path}: dataset '{field}' {problem} for image {self.image_ids[row]}; {IMAGE_FIX}."
        )

    def _damaged(self, field: str, error: Exception, row: int | None = None) -> ValueError:
        image = f" for image {self.image_ids[row]}" if row is not None else ""
        what = "fails its checksum" if "filter returned failure" in str(error) else "cannot be read"
        return ValueError(
            f"{self.h5path}: dataset '{field}' {what}{image} (HDF5: {error}): the data is damaged on disk. "
            f"{DAMAGED_FIX}"
        )

    def _read_all(self, h5: h5py.File, name: str) -> np.ndarray:
        try:
            return np.asarray(h5[name][()])
        except H5_DATA_ERRORS as error:
            raise self._damaged(name, error) from None

    def _read_block(self, dataset: Any, field: str, start: int, stop: int) -> Any:
        """Rows ``start:stop`` of an HDF5 dataset (or loaded array); a damaged block is traced to its image."""
        try:
            return dataset[start:stop]
        except H5_DATA_ERRORS as error:
            for row in range(start, stop):
                try:
                    dataset[row]
                except H5_DATA_ERRORS as row_error:
                    raise self._damaged(field, row_error, row) from None
            raise self._damaged(field, error) from None

    def _check_dtypes(self, h5: h5py.File) -> None:
        w_name, h_name = ("image_w", "image_h") if self.layout == "padded" else ("width", "height")
        expected = {
            "image_id": ("iu", "an integer type"),
            "num_boxes": ("iu", "an integer type"),
            "features": ("f", "float32 or float16"),
            "boxes": ("fiu", "a number type"),
            w_name: ("fiu", "a number type"),
            h_name: ("fiu", "a number type"),
        }
        for name, (kinds, text) in expected.items():
            dtype = h5[name].dtype
            base = h5py.check_vlen_dtype(dtype) if self.layout == "varlen" else None
            dtype = np.dtype(base if base is not None else dtype)
            if name == "features":
                self.feature_dtype = dtype
            if dtype.kind not in kinds:
                why = (
                    ": region features are floating point, integer features were quantised or written by "
                    "another tool"
                    if name == "features"
                    else ""
                )
                raise self._fail(name, f"has dtype {dtype}, expected {text}{why}")

    def _read_metadata(self, h5: h5py.File) -> None:
        w_name, h_name = ("image_w", "image_h") if self.layout == "padded" else ("width", "height")
        self.image_ids = self._read_all(h5, "image_id").astype(np.int64).reshape(-1)
        self.num_boxes = self._read_all(h5, "num_boxes").astype(np.int64).reshape(-1)
        self.image_w = self._read_all(h5, w_name).astype(np.float32).reshape(-1)
        self.image_h = self._read_all(h5, h_name).astype(np.float32).reshape(-1)
        n = len(self.image_ids)
        if n == 0:
            raise self._fail("image_id", "is empty: the file holds no images")
        for field, values in (("num_boxes", self.num_boxes), (w_name, self.image_w), (h_name, self.image_h)):
            if values.shape != (n,):
                raise self._fail(field, f"has shape {values.shape}, expected ({n},) like 'image_id'")
        features, boxes = h5["features"], h5["boxes"]
        if self.layout == "padded":
            if features.ndim != 3 or features.shape[0] != n:
                raise self._fail("features", f"has shape {features.shape}, expected ({n}, max_boxes, D)")
            self.max_boxes, self.feature_size = int(features.shape[1]), int(features.shape[2])
            if boxes.shape != (n, self.max_boxes, 4):
                raise self._fail("boxes", f"has shape {boxes.shape}, expected ({n}, {self.max_boxes}, 4)")
        else:
            if features.shape != (n,) or boxes.shape != (n,):
                raise self._fail(
                    "features", f"has shape {features.shape}, expected ({n},) variable-length rows"
                )
            self.max_boxes = int(self.num_boxes.max())
            first = self._read_block(features, "features", 0, 1)[0]
            self.feature_size = int(len(first) // max(int(self.num_boxes[0]), 1))
        if self.feature_size < 1:
            raise self._fail("features", f"has shape {features.shape}: regions without features")
        bad = np.flatnonzero((self.num_boxes < 1) | (self.num_boxes > self.max_boxes))
        if len(bad):
            raise self._fail(
                "num_boxes",
                f"is out of range 1..{self.max_boxes} for image {self.image_ids[bad[0]]} (value "
                f"{self.num_boxes[bad[0]]}; {len(bad)} image(s) in all)",
            )
        problems = size_problems(self.image_w, self.image_h)
        for kind, what in (
            ("non-finite", "a non-finite image size (NaN or inf)"),
            ("non-positive", "a non-positive image size"),
            ("too large", f"an implausible image size (larger than {MAX_IMAGE_SIZE:g} px)"),
        ):
            bad = np.flatnonzero(problems[kind])
            if len(bad):
                row = bad[0]
                size = f"{float(self.image_w[row]):g} x {float(self.image_h[row]):g}"
                field = w_name if bool(size_problems(self.image_w[row], 1.0)[kind]) else h_name
                raise self._fail(
                    field,
                    f"has {what} for image {self.image_ids[row]}: {size} ({len(bad)} image(s) in all)",
                    VALUES_FIX,
                )
        unique, counts = np.unique(self.image_ids, return_counts=True)
        if (counts > 1).any():
            duplicates = unique[counts > 1][:5].tolist()
            raise self._fail("image_id", f"has duplicate image ids {duplicates}; each image must appear once")

    def _check_extras(self) -> None:
        """Per-box datasets: finite, and padded boxes still hold the writer's fill value (a zeroed block doesn't)."""
        padding = np.arange(self.max_boxes)[None, :] >= self.num_boxes[:, None]
        for name, values in self.extras.items():
            if name in PER_BOX_EXTRAS and values.dtype.kind not in "iuf":
                raise self._fail(name, f"has dtype {values.dtype}, expected {PER_BOX_EXTRAS[name][0]}")
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                raise self._fail(name, "contains NaN or inf", VALUES_FIX)
            if name in PER_BOX_EXTRAS and np.any(values[padding] != PER_BOX_EXTRAS[name][1]):
                row = int(np.flatnonzero((values != PER_BOX_EXTRAS[name][1]) & padding)[0] // self.max_boxes)
                raise self._fail(
                    name,
                    f"has values beyond num_boxes for image {self.image_ids[row]}, where padding holds "
                    f"{PER_BOX_EXTRAS[name][1]} (the block was overwritten)",
                    VALUES_FIX,
                )

    def _block_size(self) -> int:
        """Images per block of a scan: about 32 MB of features."""
        row_bytes = self.max_boxes * self.feature_size * 4
        return max(1, min(1024, (32 << 20) // max(row_bytes, 1)))

    def _scan(self, features: Any, boxes: Any) -> None:
        """Check every image as a read would, block by block: ``features`` and ``boxes`` are the HDF5
        datasets, or the arrays / lists of rows loaded from them."""
        for _ in self._checked_blocks(features, boxes):
            pass

    def _checked_blocks(self, features: Any, boxes: Any):
        """Yield ``(start, feature_rows)`` for consecutive blocks of rows, each block checked as a read would
        check it (one ``ValueError`` for the first bad image); ``feature_rows`` are as read (padded arrays, or
        lists of flat rows)."""
        n = len(self.image_ids)
        block = self._block_size()
        for start in range(0, n, block):
            stop = min(n, start + block)
            feature_rows = self._read_block(features, "features", start, stop)
            box_rows = self._read_block(boxes, "boxes", start, stop)
            if self.layout == "padded":
                flagged = _flag_padded_rows(
                    np.asarray(feature_rows),
                    np.asarray(box_rows),
                    self.num_boxes[start:stop],
                    self.image_w[start:stop],
                    self.image_h[start:stop],
                )
                rows = np.flatnonzero(flagged)
            else:
                rows = range(stop - start)
            for i in rows:
                self._check(start + int(i), feature_rows[i], box_rows[i])
            yield start, feature_rows

    def load_into(self, store: DeviceFeatureStore, offset: int) -> None:
        """Copy every image's features, checked, into ``store`` rows ``offset : offset + N``, zero beyond each
        image's box count (as a batch from disk holds them), one block (~32 MB) at a time."""
        try:
            with h5py.File(self.h5path, "r", rdcc_nbytes=0) as h5:
                for start, feature_rows in self._checked_blocks(h5["features"], self.boxes):
                    counts = self.num_boxes[start : start + len(feature_rows)]
                    if self.layout == "padded":
                        rows = np.asarray(feature_rows)
                        rows[np.arange(rows.shape[1])[None, :] >= counts[:, None]] = 0
                    else:
                        rows = np.zeros((len(feature_rows), self.max_boxes, self.feature_size), np.float32)
                        for i, (flat, count) in enumerate(zip(feature_rows, counts)):
                            rows[i, :count] = np.asarray(flat).reshape(count, -1)
                    store.put(offset + start, rows)
        except H5_READ_ERRORS as error:
            raise ValueError(
                f"{self.h5path}: not a readable HDF5 file any more ({error}); it changed after it was opened. "
                f"{DAMAGED_FIX}"
            ) from None

    def _check(self, row: int, features: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Refuse an implausible image; returns its real features ``(num_boxes, D)`` and boxes ``(num_boxes, 4)``.

        ``features`` and ``boxes`` are the image's padded rows (``(max_boxes, D)`` or just the real boxes) or, in
        the variable-length layout, its flat rows.
        """
        n = int(self.num_boxes[row])
        if self.layout == "padded":
            problem = padding_problem(boxes[n:], n)
            features, boxes = features[:n], boxes[:n]
        else:
            features, boxes = np.asarray(features), np.asarray(boxes)
            problem = None
            if features.size != n * self.feature_size:
                problem = (
                    "features",
                    (f"has {features.size} values, expected num_boxes x D = {n} x {self.feature_size}"),
                )
            elif boxes.size != n * 4:
                problem = "boxes", f"has {boxes.size} values, expected num_boxes x 4 = {n} x 4"
            else:
                features, boxes = features.reshape(n, -1), boxes.reshape(n, 4)
        # float32 first: the result is float32 anyway, and numpy's float16 reductions are several times slower.
        features = as_float32(features)
        problem = problem or image_problem(features, boxes, self.image_w[row], self.image_h[row])
        if problem is not None:
            raise self._image_error(row, *problem)
        return features, boxes

    def _load(self, h5: h5py.File, names: tuple[str, ...]) -> list[Any]:
        """All values of the datasets ``names``: padded arrays, or lists of flat rows for the variable-length
        layout."""
        n, block = len(self.image_ids), self._block_size()
        loaded = []
        for name in names:
            dataset = h5[name]
            if self.layout == "padded":
                values = np.empty(dataset.shape, dtype=dataset.dtype)
                for start in range(0, n, block):
                    values[start : start + block] = self._read_block(dataset, name, start, start + block)
            else:
                values = []
                for start in range(0, n, block):
                    values.extend(self._read_block(dataset, name, start, start + block))
            loaded.append(values)
        return loaded

    def datasets(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        """This process's ``features`` and ``boxes`` datasets, opened on first use (and again after a fork)."""
        if self._handle is None or self._handle_pid != os.getpid():
            try:
                # rdcc_nbytes=0: a per-image chunk is read once per epoch, so h5py's chunk cache only adds copying.
                self._handle = h5py.File(self.h5path, "r", rdcc_nbytes=0)
                self._datasets = (self._handle["features"], self._handle["boxes"])
            except H5_READ_ERRORS as error:
                raise ValueError(
                    f"{self.h5path}: not a readable HDF5 file any more ({error}); it changed after it was opened. "
                    f"{DAMAGED_FIX}"
                ) from None
            self._handle_pid = os.getpid()
        return self._datasets

    def _read_row(self, dataset: h5py.Dataset, field: str, row: int, selection: Any) -> np.ndarray:
        try:
            return dataset[selection]
        except H5_DATA_ERRORS as error:
            raise self._damaged(field, error, row) from None

    def read(self, row: int) -> tuple[np.ndarray | None, np.ndarray]:
        """Features ``(num_boxes, D)`` float32 (None with the device store) and boxes ``(num_boxes, 4)`` of one
        row."""
        n = int(self.num_boxes[row])
        if self.store != "disk":
            # Checked when loaded.
            boxes = self.boxes[row]
            boxes = boxes[:n] if self.layout == "padded" else np.asarray(boxes).reshape(n, 4)
            if self.features is None:
                return None, boxes.astype(np.float32, copy=False)
            features = self.features[row]
            features = features[:n] if self.layout == "padded" else np.asarray(features).reshape(n, -1)
        else:
            features_ds, boxes_ds = self.datasets()
            if self.layout == "padded":
                # Slicing to the real boxes copies only those rows of the per-image chunk; the boxes are read
                # whole (a few hundred bytes), so that their padding shows a wrong num_boxes.
                features = self._read_row(features_ds, "features", row, (row, slice(0, n)))
            else:
                features = self._read_row(features_ds, "features", row, row)
            boxes = self._read_row(boxes_ds, "boxes", row, row)
            # Checked on every read from disk (cheap next to the read; in-memory data was checked on load), so
            # corrupt or implausible data never reaches a model even without the check_finite scan: training
            # would silently turn into NaN loss, prediction into nonsense output.
            features, boxes = self._check(row, features, boxes)
        return as_float32(features), boxes.astype(np.float32, copy=False)

    def read_batch_into(
        self, rows: np.ndarray, slots: np.ndarray, features: np.ndarray | None, boxes: np.ndarray
    ) -> None:
        """Images ``rows`` of this file into batch rows ``slots``, checked as :meth:`read` checks them.

        Args:
            rows, slots: ``(b,)`` rows of this file, and their rows in the batch.
            features: ``(B, R, D)`` float32, or float16 from a float16 file (None with the device store): real
                boxes' features, zeros after.
            boxes: ``(B, R, 4)`` float32: real boxes, zeros after.
        """
        if self._chunks is not None:
            counts = self.num_boxes[rows]
            bad, padding, peaks = self._chunks.read_into(rows, counts, slots, features, boxes)
            # What image_problem, padding_problem and the checksums refuse, for the whole batch at once; a flagged
            # image is read again through h5py, whose read raises the reader's message for it (or, if the fast
            # check was wrong, reads it).
            implausible = ~(peaks <= MAX_FEATURE_MAGNITUDE) | (peaks == 0)
            bad_boxes = _flag_bad_boxes(boxes[slots], counts, self.image_w[rows], self.image_h[rows])
            flagged = np.flatnonzero(bad | padding | implausible | bad_boxes)
        elif self.store == "host" and self.layout == "padded":
            # Checked when loaded: straight from memory into the batch.
            for row, slot in zip(rows.tolist(), slots.tolist()):
                n = int(self.num_boxes[row])
                copy_values(features[slot, :n], self.features[row, :n])
                features[slot, n:] = 0
                boxes[slot, :n] = self.boxes[row, :n]
                boxes[slot, n:] = 0
            return
        else:
            flagged = np.arange(len(rows))
        for i in flagged.tolist():
            row, slot = int(rows[i]), int(slots[i])
            n = int(self.num_boxes[row])
            row_features, row_boxes = self.read(row)
            if features is not None:
                features[slot, :n] = row_features
                features[slot, n:] = 0
            boxes[slot, :n] = row_boxes
            boxes[slot, n:] = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_handle=None, _handle_pid=None, _datasets=None)
        return state


def _per_box_extras(h5: h5py.File, layout: str) -> list[str]:
    """Optional per-box datasets (object labels, VG ids) kept beside the features, padded layout only.

    Any dataset of shape ``(N, max_boxes)`` is one; one of the known names (:data:`PER_BOX_EXTRAS`) with another
    shape is refused rather than skipped, so that labels never silently go missing.
    """
    if layout != "padded":
        return []
    n, max_boxes = h5["features"].shape[:2]
    known = set(REQUIRED_PADDED)
    for name in PER_BOX_EXTRAS:
        if name in h5 and getattr(h5[name], "shape", None) != (n, max_boxes):
            raise ValueError(
                f"{h5.filename}: dataset '{name}' has shape {getattr(h5[name], 'shape', None)}, expected ({n}, "
                f"{max_boxes}) like "
                f"the boxes. {CONVERT_HINT}"
            )
    # h5[name] (not h5.items(), which gives None for an object it cannot open) raises for damaged metadata.
    return [
        name
        for name in h5
        if name not in known and isinstance(h5[name], h5py.Dataset) and h5[name].shape == (n, max_boxes)
    ]


class RegionFeatures:
    """Bottom-up region features of one or several HDF5 files, looked up by COCO image id.

    Several files serve e.g. the Karpathy split, whose train/restval/val/test images live in the
    train2014 and val2014 feature files. The reader pickles without its HDF5 handles, so a dataset
    holding it works in a DataLoader with worker processes.

    What is checked, and when (docs/data.md, 'What the reader refuses'):

    - when built, cheaply, for every image: the schema and shapes, the dtypes (features must be floating
      point; ids and box counts integers), box counts in 1..max_boxes, unique ids, image sizes (finite,
      positive, at most :data:`MAX_IMAGE_SIZE`), and the per-box extras (finite, padding intact);
    - per image, on every read from disk (the ``disk`` store), or for all images once when built (the ``host``
      and ``device`` stores, or ``check_finite``): the checksum of its blocks, and :func:`image_problem`: features finite, within
      :data:`MAX_FEATURE_MAGNITUDE` and not all zero; boxes finite, not inverted, not (0, 0, 0, 0), within the
      image up to :func:`box_tolerance`; and, in the padded layout, zero boxes beyond ``num_boxes``.

    Boxes are checked per read rather than for all images when built because a scan costs a read of every
    image's box chunk: about 1 s for a COCO-sized file (123,287 x 100 x 4 float32, 197 MB) from the page
    cache, more from a cold disk, on every start of every process; a per-read check costs microseconds.

    Building the reader reads metadata only (ids, box counts, image sizes, per-box extras) with the ``disk``
    store, so it takes well under a second however large the file (docs/benchmarks.md, 'Data loading').

    Args:
        features_h5path: one path or a list of paths.
        feature_store: where the features live (:mod:`updown.data.feature_store`): ``disk`` (read per item, the
            default), ``host`` (all loaded into memory when built, in the file's dtype: N x max_boxes x D x 2
            bytes for float16) or ``device`` (all loaded onto ``device``; items then carry ``store_row`` instead
            of features, and :meth:`finish_batch` fills the batch on the device). Loaded images are checked once.
        in_memory: the older name of ``feature_store="host"``.
        check_finite: check every image once when built (NaN / inf and all the per-read checks), so that a bad
            image fails at once instead of when first read.
        device: where the ``device`` store lives (default ``"cpu"``, which stands in for an accelerator).

    Attributes:
        convert_on_device: False (the default): batches carry float32 features. True (what the datamodules set
            when the Trainer runs on an accelerator): batches of float16 files carry their features in float16,
            and :meth:`finish_batch` converts them to float32 once they are on the device. The model sees the
            same values (float16 converts to float32 exactly), and the host reads, checks, moves between
            processes and copies to the device half the bytes, with no conversion.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is not HDF5, is damaged (a failed checksum, unreadable metadata), lacks a dataset,
            has inconsistent shapes or dtypes, out-of-range box counts, implausible image sizes, duplicate image
            ids (within or across files), or an implausible image (when built, or when that image is read).
    """

    def __init__(
        self,
        features_h5path: str | os.PathLike | list,
        in_memory: bool = False,
        check_finite: bool = False,
        feature_store: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        paths = features_h5path if isinstance(features_h5path, (list, tuple)) else [features_h5path]
        if not paths:
            raise ValueError("RegionFeatures: no feature file given. Pass at least one features_h5path.")
        self.feature_store = resolve_feature_store(feature_store, in_memory)
        self.files = [_FeatureFile(Path(p), self.feature_store, check_finite) for p in paths]
        sizes = {f.feature_size for f in self.files}
        if len(sizes) > 1:
            raise ValueError(
                f"{[str(f.h5path) for f in self.files]}: feature sizes differ ({sorted(sizes)}). "
                "Use files extracted by the same detector."
            )
        self.feature_size = sizes.pop()
        self.max_boxes = max(f.max_boxes for f in self.files)
        grids = {f.grid_shape for f in self.files}
        self.grid_shape = grids.pop() if len(grids) == 1 else None
        self.region_category_names = _category_names(self.files)
        # The id -> row index is numpy arrays, not a dict: looking up a Python object writes its reference count,
        # which copies its page out of the memory a DataLoader worker shares with the main process; at COCO scale
        # (123,287 images) a dict would grow every worker by ~20 MB over an epoch, arrays never do.
        # Global row g = the files' rows one after the other; file k holds rows _offsets[k] : _offsets[k + 1].
        self._offsets = np.cumsum([0] + [len(f.image_ids) for f in self.files]).astype(np.int64)
        all_ids = np.concatenate([f.image_ids for f in self.files])
        self._order = np.argsort(all_ids, kind="stable")
        self._sorted_ids = all_ids[self._order]
        self._refuse_shared_images()
        # Per-image metadata of all files by global row, for collating batches with array lookups.
        self._metadata = {
            name: np.concatenate([getattr(f, name) for f in self.files])
            for name in ("num_boxes", "image_w", "image_h")
        }
        self._buffers = BatchBuffers()
        # Float16 files: batches keep float16 until they reach the accelerator (see convert_on_device).
        self.convert_on_device = False
        self.store: DeviceFeatureStore | None = None
        if self.feature_store == "device":
            self.store = DeviceFeatureStore(
                len(self), self.max_boxes, self.feature_size, self._feature_dtype(), device
            )
            for f, offset in zip(self.files, self._offsets[:-1].tolist()):
                f.load_into(self.store, offset)

    def _refuse_shared_images(self) -> None:
        """One error for an image in two files (each file's own ids are unique, checked when it was opened):
        the first such image in file order, naming the later file and the earlier one."""
        repeated = self._sorted_ids[1:] == self._sorted_ids[:-1]
        if not repeated.any():
            return
        # Each repeated id's later occurrence (stable sort: file order within equal ids); the earliest of those.
        later = int(self._order[1:][repeated].min())
        image_id = int(np.concatenate([f.image_ids for f in self.files])[later])
        first = int(self._order[np.searchsorted(self._sorted_ids, image_id)])
        raise ValueError(
            f"{self.files[self._file_of(later)].h5path}: image {image_id} is also in "
            f"{self.files[self._file_of(first)].h5path}. Each image must appear in one file only."
        )

    def _file_of(self, row: int) -> int:
        """The index of the file holding global row ``row``."""
        return int(np.searchsorted(self._offsets, row, side="right")) - 1

    def _feature_dtype(self) -> np.dtype:
        """The files' feature dtype (float32 when they differ, which holds float16 exactly)."""
        dtypes = {f.feature_dtype for f in self.files}
        return dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)

    @property
    def batch_dtype(self) -> torch.dtype:
        """The dtype of ``image_features`` in the batches :meth:`collate` makes: float32, or float16 when
        :attr:`convert_on_device` is set and every file stores float16 (:meth:`finish_batch` converts them)."""
        if self.convert_on_device and self._feature_dtype() == np.float16:
            return torch.float16
        return torch.float32

    @property
    def image_ids(self) -> list[int]:
        """All image ids, in file order (a new list each call)."""
        return [int(i) for f in self.files for i in f.image_ids.tolist()]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __contains__(self, image_id: int) -> bool:
        return self._global_row(image_id) is not None

    def _global_row(self, image_id: int) -> int | None:
        """The image's row among all files' rows, None if no file holds it."""
        image_id = int(image_id)
        k = int(np.searchsorted(self._sorted_ids, image_id))
        if k == len(self._sorted_ids) or int(self._sorted_ids[k]) != image_id:
            return None
        return int(self._order[k])

    def _locate(self, image_id: int) -> tuple[_FeatureFile, int]:
        file_index, row = self._position(image_id)
        return self.files[file_index], row

    def _position(self, image_id: int) -> tuple[int, int]:
        """``(file index, row in that file)`` of an image."""
        row = self._global_row(image_id)
        if row is None:
            names = ", ".join(str(f.h5path) for f in self.files)
            raise KeyError(
                f"image {image_id} is not in the region-feature file(s) {names}. Extract its features, or "
                "remove it from the captions / questions file."
            )
        file_index = self._file_of(row)
        return file_index, row - int(self._offsets[file_index])

    def check_ids(self, image_ids, source: str) -> None:
        """Raise one clear error if any of ``image_ids`` (read from ``source``) has no features."""
        wanted = np.asarray([int(i) for i in image_ids], dtype=np.int64)
        missing = wanted[~np.isin(wanted, self._sorted_ids)].tolist()
        if missing:
            names = ", ".join(str(f.h5path) for f in self.files)
            raise ValueError(
                f"{source}: {len(missing)} image id(s) have no region features in {names}, e.g. {missing[:5]}. "
                "Use the feature file(s) of the same images, or regenerate the annotations."
            )

    def num_boxes(self, image_id: int) -> int:
        f, row = self._locate(image_id)
        return int(f.num_boxes[row])

    def __getitem__(self, image_id: int) -> RegionFeature:
        file_index, row = self._position(image_id)
        f = self.files[file_index]
        features, boxes = f.read(row)
        w, h = float(f.image_w[row]), float(f.image_h[row])
        store_row = None if self.store is None else int(self._offsets[file_index]) + row
        return RegionFeature(int(image_id), features, boxes, spatial_features(boxes, w, h), w, h, store_row)

    def batch_features_nbytes(self, batch_size: int) -> int:
        """Bytes of the largest ``image_features`` of a batch of ``batch_size`` images (:attr:`batch_dtype`, every
        image at the most boxes); 0 with the ``device`` store, whose batches carry row indices instead. What a
        :class:`~updown.data.batch_memory.SlotDataLoader` sizes its workers' slots by."""
        if self.store is not None:
            return 0
        return batch_size * self.max_boxes * self.feature_size * self.batch_dtype.itemsize

    def pending(self, image_id: int) -> PendingRegions:
        """The image's regions, read when its batch is collated (what datasets return; see :meth:`collate`)."""
        return PendingRegions(self, int(image_id))

    def collate(self, image_ids: Sequence[int]) -> RegionBatch:
        """Read a batch of images, each checked as ``reader[image_id]`` checks it, padded to its largest box count.

        Files in our own layout are read from their raw chunks in one pass (:mod:`updown.data.chunk_reader`);
        the batch equals, bit for bit, the collated ``reader[image_id]`` items (after :meth:`finish_batch`).

        Returns:
            ``image_id (B,)``, ``image_features (B, R, D)`` :attr:`batch_dtype` (with the ``device`` store
            ``image_features_index (B,)`` instead, gathered on the device by :meth:`finish_batch`),
            ``image_features_mask (B, R)`` (True for a real box), ``image_boxes (B, R, 4)`` and
            ``image_spatial (B, R, 5)`` (:func:`spatial_features`); in a DataLoader worker, in shared memory.

        Raises:
            KeyError: an image no file holds.
            ValueError: an image that fails its checksum or is implausible (the same message as a single read).
        """
        ids = np.asarray([int(i) for i in image_ids], dtype=np.int64)
        # Every image's global row at once (as _global_row does it for one).
        found = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self._sorted_ids) - 1)
        missing = np.flatnonzero(self._sorted_ids[found] != ids)
        if len(missing):
            self._position(int(ids[missing[0]]))  # raises the reader's KeyError for that image
        global_rows = self._order[found]
        file_index = np.searchsorted(self._offsets, global_rows, side="right") - 1
        rows = global_rows - self._offsets[file_index]
        counts, image_w, image_h = (
            self._metadata[name][global_rows] for name in ("num_boxes", "image_w", "image_h")
        )
        batch_size, width = len(ids), int(counts.max())
        boxes = batch_tensor((batch_size, width, 4), torch.float32, zero=False)
        mask = batch_tensor((batch_size, width), torch.bool, zero=False)
        mask.numpy()[:] = np.arange(width)[None, :] < counts[:, None]
        batch: RegionBatch = {"image_id": torch.from_numpy(ids)}
        features = None
        if self.store is not None:
            batch[FEATURES_INDEX_KEY] = torch.from_numpy(global_rows.astype(np.int64))
        else:
            features = self._buffers.empty((batch_size, width, self.feature_size), self.batch_dtype)
            batch["image_features"] = features
        for k in np.unique(file_index).tolist():
            slots = np.flatnonzero(file_index == k)
            self.files[k].read_batch_into(
                rows[slots], slots, None if features is None else features.numpy(), boxes.numpy()
            )
        batch.update(
            image_features_mask=mask, image_boxes=boxes, image_spatial=_batch_spatial(boxes, image_w, image_h)
        )
        return batch

    def finish_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A collated batch as models take it, once it is on its device (the datamodule calls this in
        ``on_after_batch_transfer``): ``device``-store batches get their ``image_features`` gathered there, and
        float16 features (:attr:`convert_on_device`) become float32, exactly; a batch without image features
        is returned as it is."""
        if self.store is not None:
            batch = self.store.gather_batch(batch)
        features = batch.get("image_features")
        if features is not None and features.dtype == torch.float16:
            batch["image_features"] = features.float()
        return batch

    def extra(self, image_id: int, name: str) -> np.ndarray:
        """An optional per-box dataset (e.g. ``region_category``) of one image, ``(num_boxes,)``."""
        f, row = self._locate(image_id)
        if name not in f.extras:
            raise KeyError(f"{f.h5path}: no per-box dataset '{name}'; found {sorted(f.extras)}.")
        return f.extras[name][row, : int(f.num_boxes[row])]


def _category_names(files: list[_FeatureFile]) -> list[str] | None:
    """Names of ``region_category`` values, when every file labels its regions (the synthetic world does)."""
    names = {
        tuple(json.loads(f.attrs["region_category_names"]))
        for f in files
        if "region_category_names" in f.attrs
    }
    if len(names) != 1 or not all("region_category" in f.extras for f in files):
        return None
    return list(names.pop())
