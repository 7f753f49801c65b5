"""Streaming writer for the region-feature HDF5 layout (docs/design.md, section 2.1).

Converters and the synthetic world both write through :class:`RegionFeaturesWriter`, so there is one
definition of the on-disk schema besides the reader's validation. Images are appended one at a time into
resizable, per-image-chunked datasets, which keeps memory constant however many images are written. The
file is written under a temporary name and renamed only when the ``with`` block succeeds.

Integrity at rest: every dataset stores a Fletcher-32 checksum per chunk (HDF5's ``fletcher32`` filter; the
features' chunk is one image), checked by HDF5 on every read, so a block overwritten after writing fails its
read instead of feeding a model other numbers. The file uses the HDF5 1.10 format (``libver=("v110",
"v110")``), whose metadata (object headers, chunk indexes) carries checksums too; HDF5 1.10 and later read
it. A chunk zeroed whole, checksum included, passes Fletcher-32 (the checksum of zeros is zero): the
reader refuses the all-zero features, boxes and sizes that leaves (docs/data.md, 'Integrity').
The writer refuses what the reader would refuse (:func:`updown.data.readers.image_problem`), so a file it
finished is one the reader accepts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from updown.data.readers import MAX_IMAGE_SIZE, PER_BOX_EXTRAS, image_problem, size_problems
from updown.io import atomic_output

__all__ = ["PER_BOX_EXTRAS", "RegionFeaturesWriter"]

# The HDF5 1.10 file format: checksummed metadata, readable by HDF5 1.10 to 2.x (the newest format is not).
LIBVER = ("v110", "v110")


class RegionFeaturesWriter:
    """Append images to a region-feature HDF5 file.

    Args:
        h5path: output file.
        max_boxes: the box dimension of ``features`` and ``boxes``; an image may have 1..max_boxes.
        feature_size: ``D``, the size of one region feature.
        dtype: ``"float32"`` or ``"float16"`` for ``features``.
        extras: names from :data:`PER_BOX_EXTRAS` that every image will provide.
        grid_shape: ``(H, W)`` when the features are a CNN grid (boxes tile the image row-major).
        force: replace an existing file; otherwise refuse.
        attrs: extra file attributes (e.g. provenance).
        checksums: store a Fletcher-32 checksum per chunk (the default; False only to measure their cost, or to
            make a file like those written elsewhere).

    Example:
        >>> with RegionFeaturesWriter("val.h5", max_boxes=36, feature_size=2048) as writer:
        ...     writer.add(42, features, boxes, image_w=640, image_h=480)
    """

    def __init__(
        self,
        h5path: str | os.PathLike,
        max_boxes: int,
        feature_size: int,
        dtype: str = "float32",
        extras: tuple[str, ...] = (),
        grid_shape: tuple[int, int] | None = None,
        force: bool = False,
        attrs: dict[str, Any] | None = None,
        checksums: bool = True,
    ) -> None:
        if dtype not in ("float32", "float16"):
            raise ValueError(f"{h5path}: feature dtype must be float32 or float16, not {dtype!r}.")
        unknown = set(extras) - set(PER_BOX_EXTRAS)
        if unknown:
            raise ValueError(
                f"{h5path}: unknown per-box datasets {sorted(unknown)}; known: {sorted(PER_BOX_EXTRAS)}."
            )
        self.h5path = Path(h5path)
        self.max_boxes = max_boxes
        self.feature_size = feature_size
        self.dtype = dtype
        self.extras = tuple(extras)
        self.grid_shape = grid_shape
        self.force = force
        self.attrs = attrs or {}
        self.checksums = checksums
        self.num_images = 0
        self._seen_ids: set[int] = set()
        self._atomic = None
        self._file: h5py.File | None = None

    def __enter__(self) -> RegionFeaturesWriter:
        self._atomic = atomic_output(self.h5path, force=self.force)
        tmp_path = self._atomic.__enter__()
        self._file = h5py.File(tmp_path, "w", libver=LIBVER)
        f, n, d = self._file, self.max_boxes, self.feature_size

        def create(name: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]) -> None:
            f.create_dataset(
                name,
                shape=(0, *shape),
                maxshape=(None, *shape),
                dtype=dtype,
                chunks=chunks,
                fletcher32=self.checksums,
            )

        create("image_id", (), "int64", (1024,))
        create("features", (n, d), self.dtype, (1, n, d))
        create("boxes", (n, 4), "float32", (1, n, 4))
        create("num_boxes", (), "int32", (1024,))
        create("image_w", (), "float32", (1024,))
        create("image_h", (), "float32", (1024,))
        for name in self.extras:
            create(name, (n,), PER_BOX_EXTRAS[name][0], (256, n))
        if self.grid_shape is not None:
            f.attrs["grid_shape"] = np.asarray(self.grid_shape, dtype="int64")
        for key, value in self.attrs.items():
            f.attrs[key] = value
        return self

    def add(
        self,
        image_id: int,
        features: np.ndarray,
        boxes: np.ndarray,
        image_w: float,
        image_h: float,
        **extras: np.ndarray,
    ) -> None:
        """Append one image.

        Args:
            image_id: unique integer id.
            features: ``(num_boxes, D)`` region features.
            boxes: ``(num_boxes, 4)`` x1, y1, x2, y2 in pixels.
            image_w, image_h: image size in pixels.
            **extras: ``(num_boxes,)`` arrays for each name given as ``extras`` to the constructor.
        """
        if self._file is None:
            raise RuntimeError("RegionFeaturesWriter.add() called outside its `with` block.")
        image_id = int(image_id)
        where = f"{self.h5path}: image {image_id}"
        if image_id in self._seen_ids:
            raise ValueError(f"{where} appears twice in the input. Remove the duplicate row.")
        features = np.asarray(features)
        boxes = np.asarray(boxes, dtype=np.float32)
        num_boxes = features.shape[0] if features.ndim == 2 else -1
        if features.ndim != 2 or features.shape[1] != self.feature_size:
            raise ValueError(
                f"{where}: features have shape {features.shape}, expected (num_boxes, {self.feature_size})."
            )
        if not 1 <= num_boxes <= self.max_boxes:
            raise ValueError(f"{where}: {num_boxes} boxes, expected 1..{self.max_boxes}. Raise --max-boxes.")
        if boxes.shape != (num_boxes, 4):
            raise ValueError(f"{where}: boxes have shape {boxes.shape}, expected ({num_boxes}, 4).")
        if set(extras) != set(self.extras):
            raise ValueError(
                f"{where}: got per-box datasets {sorted(extras)}, expected {sorted(self.extras)}."
            )
        if features.dtype.kind != "f":
            raise ValueError(f"{where}: features have dtype {features.dtype}; region features are floats.")
        sizes = size_problems(image_w, image_h)
        if any(bool(mask) for mask in sizes.values()):
            raise ValueError(
                f"{where}: implausible image size {image_w} x {image_h} (expected finite, positive, at most "
                f"{MAX_IMAGE_SIZE:g} px). Fix the input."
            )
        # Checked as stored (float16 turns values beyond 65504 into inf).
        with np.errstate(over="ignore"):
            stored = features.astype(self.dtype, copy=False)
        problem = image_problem(stored.astype(np.float32), boxes, image_w, image_h)
        if problem is not None:
            field, text = problem
            raise ValueError(f"{where}: {field} {text}. Fix or drop this image in the input.")

        f, i, n = self._file, self.num_images, self.max_boxes
        for name in ("image_id", "features", "boxes", "num_boxes", "image_w", "image_h", *self.extras):
            f[name].resize(i + 1, axis=0)
        padded = np.zeros((n, self.feature_size), dtype=self.dtype)
        padded[:num_boxes] = features
        f["features"][i] = padded
        padded_boxes = np.zeros((n, 4), dtype=np.float32)
        padded_boxes[:num_boxes] = boxes
        f["boxes"][i] = padded_boxes
        f["image_id"][i] = image_id
        f["num_boxes"][i] = num_boxes
        f["image_w"][i] = image_w
        f["image_h"][i] = image_h
        for name, values in extras.items():
            dtype, fill = PER_BOX_EXTRAS[name]
            values = np.asarray(values)
            if values.shape != (num_boxes,):
                raise ValueError(f"{where}: {name} has shape {values.shape}, expected ({num_boxes},).")
            padded_extra = np.full((n,), fill, dtype=dtype)
            padded_extra[:num_boxes] = values
            f[name][i] = padded_extra
        self._seen_ids.add(image_id)
        self.num_images += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None and self._atomic is not None
        self._file.close()
        self._file = None
        if exc_type is None and self.num_images == 0:
            exc = ValueError(
                f"{self.h5path}: no images were written; the input is empty. Check the input files."
            )
            self._atomic.__exit__(type(exc), exc, None)
            raise exc
        self._atomic.__exit__(exc_type, exc, tb)
