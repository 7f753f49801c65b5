"""Readers: files in, plain numpy and Python objects out, almost as they are on disk.

:class:`RegionFeatures` reads bottom-up region features from one or several HDF5 files in the layout of
docs/design.md, section 2.1 (padded ``(N, max_boxes, D)`` arrays), and also, unconverted, the variable-length
layout of nocaps / kdexd/updown-baseline files (flattened ``features`` and ``boxes`` per image,
``width``/``height``).
The schema is validated when the reader is built; the feature arrays themselves are opened lazily, once
per process, because h5py handles do not survive ``fork`` into DataLoader workers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

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
        features: ``(num_boxes, D)`` float32.
        boxes: ``(num_boxes, 4)`` float32 x1, y1, x2, y2 in pixels.
        spatial: ``(num_boxes, 5)`` float32 (x1/w, y1/h, x2/w, y2/h, area/(w*h)).
        image_w, image_h: image size in pixels.
    """

    image_id: int
    features: np.ndarray
    boxes: np.ndarray
    spatial: np.ndarray
    image_w: float
    image_h: float

    @property
    def num_boxes(self) -> int:
        return self.features.shape[0]


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


class _FeatureFile:
    """One validated HDF5 file: metadata in memory, feature handle opened lazily per process."""

    def __init__(self, h5path: Path, in_memory: bool, check_finite: bool) -> None:
        self.h5path = h5path
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
        with h5:
            names = set(h5.keys())
            if set(REQUIRED_PADDED) <= names:
                self.layout = "padded"
            elif set(REQUIRED_VARLEN) <= names:
                self.layout = "varlen"
            else:
                missing = sorted(set(REQUIRED_PADDED) - names)
                raise ValueError(
                    f"{h5path}: missing dataset(s) {missing}; found {sorted(names)}. Expected the region-feature "
                    f"layout {list(REQUIRED_PADDED)} or the nocaps/updown-baseline layout {list(REQUIRED_VARLEN)}. "
                    f"{CONVERT_HINT}"
                )
            self._read_metadata(h5)
            self.grid_shape = (
                tuple(int(x) for x in h5.attrs["grid_shape"]) if "grid_shape" in h5.attrs else None
            )
            self.attrs = dict(h5.attrs)
            self.extras = {name: h5[name][()] for name in _per_box_extras(h5, self.layout)}
            self.features, self.boxes = self._load(h5) if in_memory else (None, None)
            if in_memory:
                # Scanned once here, in memory, so that reads need not check again (a tenth of a read's cost).
                self._check_finite(self.features)
            elif check_finite:
                self._check_finite(h5["features"])
        self._handle: h5py.File | None = None
        self._handle_pid: int | None = None
        self._datasets: tuple[h5py.Dataset, h5py.Dataset] | None = None

    def _fail(self, field: str, problem: str) -> ValueError:
        return ValueError(f"{self.h5path}: dataset '{field}' {problem}. {CONVERT_HINT}")

    def _read_metadata(self, h5: h5py.File) -> None:
        w_name, h_name = ("image_w", "image_h") if self.layout == "padded" else ("width", "height")
        self.image_ids = np.asarray(h5["image_id"][()]).astype(np.int64).reshape(-1)
        self.num_boxes = np.asarray(h5["num_boxes"][()]).astype(np.int64).reshape(-1)
        self.image_w = np.asarray(h5[w_name][()], dtype=np.float32).reshape(-1)
        self.image_h = np.asarray(h5[h_name][()], dtype=np.float32).reshape(-1)
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
            first = features[0]
            self.feature_size = int(len(first) // max(int(self.num_boxes[0]), 1))
        bad = np.flatnonzero((self.num_boxes < 1) | (self.num_boxes > self.max_boxes))
        if len(bad):
            raise self._fail(
                "num_boxes",
                f"is out of range 1..{self.max_boxes} for image {self.image_ids[bad[0]]} (value "
                f"{self.num_boxes[bad[0]]}; {len(bad)} image(s) in all)",
            )
        bad = np.flatnonzero((self.image_w <= 0) | (self.image_h <= 0))
        if len(bad):
            raise self._fail(w_name, f"has a non-positive image size for image {self.image_ids[bad[0]]}")
        unique, counts = np.unique(self.image_ids, return_counts=True)
        if (counts > 1).any():
            duplicates = unique[counts > 1][:5].tolist()
            raise self._fail("image_id", f"has duplicate image ids {duplicates}; each image must appear once")

    def _check_finite(self, features: Any) -> None:
        """Reject NaN / inf in ``features``: the HDF5 dataset, or the arrays loaded from it (read in blocks)."""
        block = 256
        for start in range(0, len(self.image_ids), block):
            if self.layout == "padded":
                values = features[start : start + block]
                rows = np.flatnonzero(~np.isfinite(values).all(axis=(1, 2)))
            else:
                rows = [
                    i for i, row in enumerate(features[start : start + block]) if not np.isfinite(row).all()
                ]
            if len(rows):
                image_id = self.image_ids[start + rows[0]]
                raise self._fail(
                    "features", f"contains NaN or inf for image {image_id}; re-extract that image"
                )

    def _load(self, h5: h5py.File) -> tuple[Any, Any]:
        """All features and boxes: padded arrays, or lists of flat rows for the variable-length layout."""
        if self.layout == "padded":
            return h5["features"][()], h5["boxes"][()]
        return list(h5["features"][()]), list(h5["boxes"][()])

    def datasets(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        """This process's ``features`` and ``boxes`` datasets, opened on first use (and again after a fork)."""
        if self._handle is None or self._handle_pid != os.getpid():
            # rdcc_nbytes=0: a per-image chunk is read once per epoch, so h5py's chunk cache only adds copying.
            self._handle = h5py.File(self.h5path, "r", rdcc_nbytes=0)
            self._handle_pid = os.getpid()
            self._datasets = (self._handle["features"], self._handle["boxes"])
        return self._datasets

    def read(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Features ``(num_boxes, D)`` float32 and boxes ``(num_boxes, 4)`` of one row."""
        n = int(self.num_boxes[row])
        if self.features is not None:
            features, boxes = self.features[row], self.boxes[row]
        elif self.layout == "padded":
            features_ds, boxes_ds = self.datasets()
            # Slicing to the real boxes reads only those rows of the per-image chunk.
            features, boxes = features_ds[row, :n], boxes_ds[row, :n]
        else:
            features_ds, boxes_ds = self.datasets()
            features, boxes = features_ds[row], boxes_ds[row]
        if self.layout == "padded":
            features, boxes = features[:n], boxes[:n]
        else:
            features, boxes = np.asarray(features).reshape(n, -1), np.asarray(boxes).reshape(n, 4)
        features = features.astype(np.float32, copy=False)
        # Checked on every read from disk (cheap next to the read; in-memory features were scanned on load), so
        # NaN never reaches a model even without the check_finite scan: training would silently turn into NaN
        # loss, prediction into nonsense output.
        if self.features is None and not np.isfinite(features).all():
            raise self._fail(
                "features",
                f"contains NaN or inf for image {self.image_ids[row]}; re-extract that image "
                "(RegionFeatures(..., check_finite=True) lists the first bad image of a file)",
            )
        return features, boxes.astype(np.float32, copy=False)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_handle=None, _handle_pid=None, _datasets=None)
        return state


def _per_box_extras(h5: h5py.File, layout: str) -> list[str]:
    """Optional per-box datasets (object labels, VG ids) kept beside the features, padded layout only."""
    if layout != "padded":
        return []
    n, max_boxes = h5["features"].shape[:2]
    known = set(REQUIRED_PADDED)
    return [name for name, ds in h5.items() if name not in known and ds.shape == (n, max_boxes)]


class RegionFeatures:
    """Bottom-up region features of one or several HDF5 files, looked up by COCO image id.

    Several files serve e.g. the Karpathy split, whose train/restval/val/test images live in the
    train2014 and val2014 feature files. The reader pickles without its HDF5 handles, so a dataset
    holding it works in a DataLoader with worker processes.

    Args:
        features_h5path: one path or a list of paths.
        in_memory: load all features into memory when built (fast epochs; needs N x max_boxes x D x 4 bytes);
            loaded features are always scanned for NaN / inf once.
        check_finite: scan every feature once when built and reject NaN / inf.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is not HDF5, lacks a dataset, has inconsistent shapes, out-of-range box counts,
            non-positive image sizes, duplicate image ids (within or across files), or NaN/inf features.
    """

    def __init__(
        self, features_h5path: str | os.PathLike | list, in_memory: bool = False, check_finite: bool = False
    ) -> None:
        paths = features_h5path if isinstance(features_h5path, (list, tuple)) else [features_h5path]
        if not paths:
            raise ValueError("RegionFeatures: no feature file given. Pass at least one features_h5path.")
        self.files = [_FeatureFile(Path(p), in_memory, check_finite) for p in paths]
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
        self._index: dict[int, tuple[int, int]] = {}
        for file_index, f in enumerate(self.files):
            for row, image_id in enumerate(f.image_ids.tolist()):
                if image_id in self._index:
                    other = self.files[self._index[image_id][0]].h5path
                    raise ValueError(
                        f"{f.h5path}: image {image_id} is also in {other}. Each image must appear in one file only."
                    )
                self._index[image_id] = (file_index, row)

    @property
    def image_ids(self) -> list[int]:
        """All image ids, in file order."""
        return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._index

    def _locate(self, image_id: int) -> tuple[_FeatureFile, int]:
        try:
            file_index, row = self._index[int(image_id)]
        except KeyError:
            names = ", ".join(str(f.h5path) for f in self.files)
            raise KeyError(
                f"image {image_id} is not in the region-feature file(s) {names}. Extract its features, or "
                "remove it from the captions / questions file."
            ) from None
        return self.files[file_index], row

    def check_ids(self, image_ids, source: str) -> None:
        """Raise one clear error if any of ``image_ids`` (read from ``source``) has no features."""
        missing = [i for i in image_ids if int(i) not in self._index]
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
        f, row = self._locate(image_id)
        features, boxes = f.read(row)
        w, h = float(f.image_w[row]), float(f.image_h[row])
        return RegionFeature(int(image_id), features, boxes, spatial_features(boxes, w, h), w, h)

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
