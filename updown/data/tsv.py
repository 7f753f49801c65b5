"""Read and write the two TSV layouts in which bottom-up region features are published.

Both layouts hold one image per tab-separated row, with arrays stored as base64 of raw little-endian
buffers (docs/data.md, 'Converting bottom-up TSV files'):

- ``original`` (peteanderson80/bottom-up-attention ``tools/generate_tsv.py``): :data:`ORIGINAL_FIELDS`.
  Some published files lost the base64 ``=`` padding; :func:`decode_base64_array` restores it.
- ``lxmert`` (airsplay/lxmert, py-bottom-up-attention): :data:`LXMERT_FIELDS`. Height comes before width,
  image ids are strings such as ``COCO_train2014_000000132417``, and each box also carries a Visual Genome
  object id / attribute id with their confidences, kept here as ``extras``.

:func:`iter_tsv` streams rows one at a time, so memory stays constant however large the file is. It reads
plain ``.tsv`` files, gzip-compressed ones (``.tsv.gz``) and ``.zip`` archives of TSV files (every ``.tsv``
member, in name order) as they are, decompressing while it reads; the kind is told by the first bytes. A
damaged archive (a failed CRC, a cut-off stream) is one ``ValueError`` naming the file.
:func:`write_original_tsv` writes the original layout, which lets the synthetic world exercise the same
conversion path as real data.
"""

from __future__ import annotations

import base64
import binascii
import csv
import gzip
import os
import re
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from updown.io import atomic_output

ORIGINAL_FIELDS: tuple[str, ...] = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_FIELDS: tuple[str, ...] = (
    "img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes", "boxes",
    "features",
)  # fmt: skip
LAYOUTS: dict[str, tuple[str, ...]] = {"original": ORIGINAL_FIELDS, "lxmert": LXMERT_FIELDS}

# LXMERT's per-box arrays and their on-disk dtypes (little-endian), in the names of writers.PER_BOX_EXTRAS.
LXMERT_EXTRAS: dict[str, str] = {
    "objects_id": "<i8",
    "objects_conf": "<f4",
    "attrs_id": "<i8",
    "attrs_conf": "<f4",
}

_PREFIXED_ID = re.compile(r"^[A-Za-z]\w*_(\d+)$")

# Rows hold megabytes of base64; the csv module's default limit (128 KiB) would reject them.
csv.field_size_limit(sys.maxsize)

GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# What reading a damaged gzip or zip archive raises: a failed CRC or length (gzip.BadGzipFile, an OSError, and
# zipfile.BadZipFile), a cut-off or garbled stream (EOFError, zlib.error), damaged headers (struct.error,
# ValueError), or flags the damage turned on (RuntimeError: "encrypted"; NotImplementedError: compression).
ARCHIVE_ERRORS = (
    OSError, EOFError, zlib.error, zipfile.BadZipFile, struct.error, ValueError, RuntimeError, NotImplementedError,
)  # fmt: skip


@dataclass
class TSVImage:
    """One image's row, decoded.

    Attributes:
        image_id: integer image id (COCO id for COCO images).
        image_w: image width in pixels.
        image_h: image height in pixels.
        boxes: ``(num_boxes, 4)`` float32 x1, y1, x2, y2 in pixels.
        features: ``(num_boxes, D)`` float32 region features.
        extras: per-box ``(num_boxes,)`` arrays (LXMERT: objects_id, objects_conf, attrs_id, attrs_conf).
        line: 1-based line of the row in its file (0 when the image was not read from a file).
        source: the file it was read from: the path, or ``ARCHIVE.zip:MEMBER.tsv`` for a zip member.
    """

    image_id: int
    image_w: float
    image_h: float
    boxes: np.ndarray
    features: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    line: int = 0
    source: str = ""

    @property
    def num_boxes(self) -> int:
        return int(self.features.shape[0])


def parse_image_id(text: str) -> int:
    """Turn an image id as written in a TSV into an integer.

    ``"132417"`` -> 132417 and ``"COCO_train2014_000000132417"`` -> 132417 (the digits after the last
    underscore, as in COCO file names).

    Raises:
        ValueError: the id is neither a non-negative integer nor ``<prefix>_<digits>``.
    """
    text = text.strip()
    if text.isdigit():
        return int(text)
    match = _PREFIXED_ID.match(text)
    if match is None:
        raise ValueError(
            f"image id {text!r} is neither an integer nor of the form PREFIX_DIGITS "
            "(e.g. COCO_train2014_000000132417). Fix the id column."
        )
    return int(match.group(1))


def decode_base64_array(text: str, dtype: str | np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Decode base64 of a raw little-endian buffer into an array, restoring missing ``=`` padding.

    Args:
        text: base64 text; a Python-3 ``b'...'`` repr (written by careless ports of generate_tsv.py) is
            accepted too.
        dtype: element type, e.g. ``"float32"``; read as little-endian.
        shape: result shape; at most one entry may be -1 (inferred, e.g. the feature size).

    Returns:
        A writable array of ``shape`` in native byte order.

    Raises:
        ValueError: the text is not base64, or its size does not fit ``shape``.
    """
    text = text.strip()
    if len(text) >= 3 and text[:2] in ("b'", 'b"') and text[-1] == text[1]:
        text = text[2:-1]
    text = text.rstrip("=")
    if len(text) % 4 == 1:
        raise ValueError(
            f"base64 text of length {len(text)} is truncated (one character too many or too few)"
        )
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error as error:
        raise ValueError(f"not valid base64 ({error})") from None
    if list(shape).count(-1) > 1:
        raise ValueError(f"shape {tuple(shape)} has more than one -1")
    little_endian = np.dtype(dtype).newbyteorder("<")
    if len(raw) % little_endian.itemsize:
        raise ValueError(f"{len(raw)} bytes is not a whole number of {little_endian.name} values")
    values = np.frombuffer(raw, dtype=little_endian)
    known = int(np.prod([size for size in shape if size != -1]))
    if -1 in shape:
        fits = values.size > 0 and known > 0 and values.size % known == 0
    else:
        fits = values.size == known
    if not fits:
        raise ValueError(f"{values.size} {little_endian.name} values do not fit shape {tuple(shape)}")
    return values.reshape(shape).astype(np.dtype(dtype).newbyteorder("="), copy=True)


def _archive_kind(path: Path) -> str:
    """``"gzip"``, ``"zip"`` or ``"plain"``, from the file's first bytes; a ``.gz`` / ``.zip`` name must match."""
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic[:2] == GZIP_MAGIC:
        return "gzip"
    if magic in ZIP_MAGICS:
        return "zip"
    expected = {".gz": "gzip", ".zip": "zip"}.get(path.suffix.lower())
    if expected is not None:
        raise ValueError(
            f"{path}: not a {expected} archive (it starts with {magic!r}): the file is damaged, cut off or "
            "misnamed. Download or create it again."
        )
    return "plain"


def _damaged_archive(where: str, error: BaseException) -> ValueError:
    return ValueError(
        f"{where}: the archive is damaged ({type(error).__name__}: {error}). Download or create it again."
    )


def _guarded(where: str, lines: Iterable[bytes]) -> Iterator[bytes]:
    """``lines`` of an archive member, with the archive's own errors turned into one clear ValueError."""
    iterator = iter(lines)
    while True:
        try:
            line = next(iterator)
        except StopIteration:
            return
        except ARCHIVE_ERRORS as error:
            raise _damaged_archive(where, error) from None
        yield line


def _terminated(where: str, lines: Iterable[bytes]) -> Iterator[bytes]:
    """``lines``, refusing a last line without a line end: every tool writes one, so the file was cut off."""
    number = 0
    for number, line in enumerate(lines, start=1):  # noqa: B007 (the count is read after the loop)
        if not line.endswith(b"\n") and line.strip():
            raise ValueError(
                f"{where}, line {number}: the last line has no line end, so the file was cut off (truncated) "
                "mid-row. Download, copy or create it again."
            )
        yield line


def _sources(path: Path, on_bytes: Callable[[int], None] | None) -> Iterator[tuple[str, Iterator[bytes]]]:
    """``(where, raw lines)`` of each TSV in ``path``: the file itself, its gzip stream, or each ``.tsv`` member
    of a zip archive in name order. ``on_bytes`` counts the units of :func:`input_size`."""
    report = on_bytes or (lambda size: None)
    kind = _archive_kind(path)
    if kind == "plain":
        with open(path, "rb") as file:
            yield str(path), _terminated(str(path), (report(len(line)) or line for line in file))
    elif kind == "gzip":
        with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as stream:

            def lines() -> Iterator[bytes]:
                position = 0
                for line in stream:
                    # Progress in compressed bytes, the unit of the file's size on disk.
                    report(raw.tell() - position)
                    position = raw.tell()
                    yield line

            yield str(path), _terminated(str(path), _guarded(str(path), lines()))
    else:
        try:
            archive = zipfile.ZipFile(path)
        except ARCHIVE_ERRORS as error:
            raise _damaged_archive(str(path), error) from None
        with archive:
            for info in _zip_tsv_members(path, archive):
                where = f"{path}:{info.filename}"
                try:
                    member = archive.open(info)
                except ARCHIVE_ERRORS as error:
                    raise _damaged_archive(where, error) from None
                with member:
                    lines = (report(len(line)) or line for line in member)
                    yield where, _terminated(where, _guarded(where, lines))


def _zip_members(path: Path, archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The ``.tsv`` members of a zip archive, in name order (other members are skipped)."""
    # A damaged length in the central directory can swallow the entries after it, which zipfile then does not
    # list: compare with the count the end record states.
    with open(path, "rb") as file:
        end_record = zipfile._EndRecData(file)
    if end_record is not None and end_record[zipfile._ECD_ENTRIES_TOTAL] != len(archive.infolist()):
        raise zipfile.BadZipFile(
            f"its directory states {end_record[zipfile._ECD_ENTRIES_TOTAL]} entries, but "
            f"{len(archive.infolist())} could be read"
        )
    infos = [info for info in archive.infolist() if not info.is_dir()]
    members = sorted((i for i in infos if i.filename.lower().endswith(".tsv")), key=lambda i: i.filename)
    others = [info for info in infos if not info.filename.lower().endswith(".tsv")]
    for info in others:
        # Opening a member checks its local header against the directory, so a damaged name that turned a
        # .tsv member into a skipped one is an error, not a silently missing file.
        archive.open(info).close()
    return members


def _zip_tsv_members(path: Path, archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """:func:`_zip_members`, with a damaged archive and one without a ``.tsv`` member as clear errors."""
    try:
        members = _zip_members(path, archive)
        names = [info.filename for info in archive.infolist()[:5]]
    except ARCHIVE_ERRORS as error:
        raise _damaged_archive(str(path), error) from None
    if not members:
        raise ValueError(
            f"{path}: the zip archive holds no .tsv file (found {', '.join(names) or 'nothing'}). Point to an "
            "archive of TSV feature files."
        )
    return members


def input_size(path: str | os.PathLike) -> int:
    """The size progress is counted in for ``path``: bytes on disk, or for a zip archive the uncompressed
    bytes of its ``.tsv`` members (a zip member's compressed position is not exposed)."""
    path = _check_path(path)
    if _archive_kind(path) != "zip":
        return path.stat().st_size
    try:
        archive = zipfile.ZipFile(path)
    except ARCHIVE_ERRORS as error:
        raise _damaged_archive(str(path), error) from None
    with archive:
        return sum(info.file_size for info in _zip_tsv_members(path, archive))


def iter_lines(
    path: str | os.PathLike, on_bytes: Callable[[int], None] | None = None
) -> Iterator[tuple[str, int, bytes]]:
    """``(where, line number, raw line)`` for every line of a ``.tsv``, ``.tsv.gz`` or ``.zip`` of TSV files.

    ``where`` names the file (``ARCHIVE.zip:MEMBER.tsv`` for a zip member); line numbers start at 1 in each.
    """
    path = _check_path(path)
    for where, lines in _sources(path, on_bytes):
        for number, line in enumerate(lines, start=1):
            yield where, number, line


def _read_rows(path: Path, on_bytes: Callable[[int], None] | None) -> Iterator[tuple[str, int, list[str]]]:
    """Yield ``(where, line_number, fields)`` for each non-empty row, reporting bytes read to ``on_bytes``."""
    for where, lines in _sources(path, on_bytes):
        reader = csv.reader((raw.decode("ascii", errors="replace") for raw in lines), delimiter="\t")
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                raise ValueError(
                    f"{where}, line {reader.line_num}: {error}. The row is malformed; regenerate or re-download "
                    "the file, or remove the row."
                ) from None
            if fields:
                yield where, reader.line_num, fields


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: TSV feature file not found. Check the path.")
    return path


def _layout_of_row(path: str | Path, line: int, fields: list[str]) -> str:
    for layout, names in LAYOUTS.items():
        if len(fields) == len(names):
            return layout
    raise ValueError(
        f"{path}, line {line}: {len(fields)} tab-separated fields, but the original layout has "
        f"{len(ORIGINAL_FIELDS)} ({', '.join(ORIGINAL_FIELDS)}) and the LXMERT layout {len(LXMERT_FIELDS)} "
        f"({', '.join(LXMERT_FIELDS)}). Check that this is a bottom-up feature TSV and that it is not truncated."
    )


def detect_layout(path: str | os.PathLike) -> str:
    """Return ``"original"`` or ``"lxmert"`` from the first row's field count (6 or 10).

    Only the first row is read, so this is cheap on files of any size.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is empty, or its first row fits neither layout.
    """
    path = _check_path(path)
    for where, line, fields in _read_rows(path, None):
        return _layout_of_row(where, line, fields)
    raise ValueError(f"{path}: the file has no rows. Point to a non-empty TSV feature file.")


# How each field is decoded given the row's num_boxes: (dtype, per-box shape) for arrays.
_ARRAY_FIELDS: dict[str, tuple[str, tuple[int, ...]]] = {
    "boxes": ("<f4", (4,)),
    "features": ("<f4", (-1,)),
    **{name: (dtype, ()) for name, dtype in LXMERT_EXTRAS.items()},
}


def _decode_field(name: str, text: str, num_boxes: int) -> int | float | np.ndarray:
    """Decode one field; ``num_boxes`` is already known for array fields (it comes first in decoding order)."""
    if name in ("image_id", "img_id"):
        return parse_image_id(text)
    if name == "num_boxes":
        value = int(text)
        if value < 1:
            raise ValueError(f"num_boxes is {value}, but every image needs at least one box")
        return value
    if name in _ARRAY_FIELDS:
        dtype, per_box = _ARRAY_FIELDS[name]
        values = decode_base64_array(text, dtype, (num_boxes, *per_box))
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ValueError(f"{int((~np.isfinite(values)).sum())} values are NaN or infinite")
        return values
    value = float(text)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"image size {text!r} is not a positive number")
    return value


def _decode_row(path: str, line: int, fields: list[str], layout: str) -> TSVImage:
    names = LAYOUTS[layout]
    if len(fields) != len(names):
        found = _layout_of_row(path, line, fields)
        raise ValueError(
            f"{path}, line {line}: {len(fields)} fields, expected {len(names)} for the {layout} layout; the row "
            f"looks like the {found} layout. Pass --layout {found} (or auto)."
        )
    row = dict(zip(names, fields))
    decoded: dict[str, int | float | np.ndarray] = {}
    num_boxes = 0
    # Scalars first: the arrays' shapes depend on num_boxes, which LXMERT stores after its per-box arrays.
    for name in sorted(names, key=lambda name: name in _ARRAY_FIELDS):
        try:
            decoded[name] = _decode_field(name, row[name], num_boxes)
        except ValueError as error:
            raise ValueError(
                f"{path}, line {line}, field {name!r} (image {row[names[0]][:40]!r}): {str(error).rstrip('.')}. The row is "
                "malformed or truncated; regenerate or re-download the file, or remove the row."
            ) from None
        if name == "num_boxes":
            num_boxes = int(decoded[name])
    if layout == "original":
        image_id, image_w, image_h = decoded["image_id"], decoded["image_w"], decoded["image_h"]
    else:
        image_id, image_w, image_h = decoded["img_id"], decoded["img_w"], decoded["img_h"]
    extras = {name: decoded[name] for name in LXMERT_EXTRAS if name in decoded}
    return TSVImage(
        int(image_id),
        float(image_w),
        float(image_h),
        decoded["boxes"],
        decoded["features"],
        extras,
        line,
        path,
    )


def iter_tsv(
    path: str | os.PathLike, layout: str = "auto", on_bytes: Callable[[int], None] | None = None
) -> Iterator[TSVImage]:
    """Stream the images of a bottom-up feature TSV, one decoded row at a time.

    Args:
        path: the TSV file: plain, gzip-compressed, or a zip archive of TSV files (read in member name order).
        layout: ``"original"``, ``"lxmert"`` or ``"auto"`` (:func:`detect_layout`).
        on_bytes: called with the number of bytes read after each line, for progress bars (the units of
            :func:`input_size`).

    Yields:
        :class:`TSVImage` with boxes ``(num_boxes, 4)`` and features ``(num_boxes, D)``, float32.

    Raises:
        ValueError: a malformed row (wrong field count, bad base64, sizes not matching num_boxes, NaN), or a
            damaged archive; the message names the file, line and field.
    """
    path = _check_path(path)
    if layout == "auto":
        layout = detect_layout(path)
    if layout not in LAYOUTS:
        raise ValueError(f"{path}: unknown TSV layout {layout!r}; choose auto, original or lxmert.")
    for where, line, fields in _read_rows(path, on_bytes):
        yield _decode_row(where, line, fields, layout)


def _format_number(value: float) -> str:
    # generate_tsv.py wrote integer sizes, and some readers call int() on them.
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _encode(values: np.ndarray, dtype: str, strip_padding: bool) -> str:
    text = base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")
    return text.rstrip("=") if strip_padding else text


def write_original_tsv(
    path: str | os.PathLike, images: Iterable[TSVImage], force: bool = True, strip_padding: bool = False
) -> int:
    """Write images in the original bottom-up layout (:data:`ORIGINAL_FIELDS`), atomically.

    Args:
        path: output TSV.
        images: images to write, consumed one at a time; extras are not part of this layout and are dropped.
        force: replace an existing file; otherwise refuse.
        strip_padding: drop base64 ``=`` padding, as in some published files, so readers' repair path runs.

    Returns:
        The number of rows written.

    Raises:
        ValueError: an image whose boxes are not ``(num_boxes, 4)`` or features not ``(num_boxes, D)``.
        FileExistsError: ``path`` exists and ``force`` is False.
    """
    count = 0
    with (
        atomic_output(path, force=force) as tmp_path,
        open(tmp_path, "w", newline="", encoding="ascii") as file,
    ):
        # The default "\r\n" line terminator matches generate_tsv.py's csv.DictWriter.
        writer = csv.writer(file, delimiter="\t")
        for image in images:
            features = np.asarray(image.features)
            boxes = np.asarray(image.boxes)
            if features.ndim != 2 or features.shape[0] < 1 or boxes.shape != (features.shape[0], 4):
                raise ValueError(
                    f"{path}: image {image.image_id} has boxes {boxes.shape} and features {features.shape}; "
                    "expected (num_boxes, 4) and (num_boxes, D) with num_boxes >= 1."
                )
            writer.writerow(
                [
                    str(int(image.image_id)),
                    _format_number(image.image_w),
                    _format_number(image.image_h),
                    str(features.shape[0]),
                    _encode(boxes, "<f4", strip_padding),
                    _encode(features, "<f4", strip_padding),
                ]
            )
            count += 1
    return count
