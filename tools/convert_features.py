"""Convert bottom-up region features from TSV (original or LXMERT layout) to the project's HDF5 layout.

    python tools/convert_features.py --input trainval_36/*.tsv --output trainval_36.h5 --max-boxes 36
    python tools/convert_features.py --input trainval_36.zip --output trainval_36.h5   # or train.tsv.gz

Reads one or more TSV files (see updown/data/tsv.py for the two layouts) into one HDF5 file as described in
docs/design.md, section 2.1: ``image_id``, ``features`` (N, max_boxes, D), ``boxes``, ``num_boxes``,
``image_w``, ``image_h``, plus ``objects_id``, ``objects_conf``, ``attrs_id``, ``attrs_conf`` for LXMERT files.
Inputs may be plain ``.tsv``, gzip-compressed ``.tsv.gz`` or ``.zip`` archives of ``.tsv`` files (all members,
in name order), read as they are, without unpacking. Rows are streamed one at a time, so memory stays constant
for files of any size. Every row must be plausible as the reader defines it (finite features and boxes, boxes
inside the image up to a few pixels, x1 <= x2, sane image sizes): one bad row stops the conversion. The output
is written under a temporary name and renamed only on success, so a failure leaves the previous output as it
was and no new file (nor a new folder); an existing output is never replaced without ``--force``.

Without ``--max-boxes``, a first pass reads only the ``num_boxes`` column of every file to find the largest
box count (the 10-100 adaptive files vary per image). That pass still reads every byte, so for fixed-box
files (e.g. 36 boxes) pass ``--max-boxes 36`` to halve the reading time.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python tools/convert_features.py` from a checkout where updown is not installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from updown.data.readers import MAX_IMAGE_SIZE, image_problem, size_problems
from updown.data.tsv import LAYOUTS, TSVImage, detect_layout, input_size, iter_lines, iter_tsv
from updown.data.writers import RegionFeaturesWriter

# Index of num_boxes in each layout, for the cheap first pass that never decodes base64.
_NUM_BOXES_COLUMN = {layout: fields.index("num_boxes") for layout, fields in LAYOUTS.items()}
_LAYOUT_EXTRAS = {"original": (), "lxmert": ("objects_id", "objects_conf", "attrs_id", "attrs_conf")}


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=quiet,
    )


def scan_max_boxes(paths: Sequence[Path], layouts: Sequence[str], quiet: bool = False) -> int:
    """Return the largest ``num_boxes`` over all rows, reading only that column (no base64 decoding)."""
    largest = 0
    with _progress(quiet) as progress:
        task = progress.add_task("scanning num_boxes", total=sum(input_size(path) for path in paths))
        for path, layout in zip(paths, layouts):
            column = _NUM_BOXES_COLUMN[layout]
            for source, line_number, line in iter_lines(path, lambda size: progress.advance(task, size)):
                if not line.strip():
                    continue
                where = f"{source}, line {line_number}"
                # Counting tabs checks the row without copying its megabytes of base64.
                num_fields = line.count(b"\t") + 1
                if num_fields != len(LAYOUTS[layout]):
                    raise ValueError(
                        f"{where}: {num_fields} fields, expected {len(LAYOUTS[layout])} for the "
                        f"{layout} layout. The file is malformed or truncated; regenerate or re-download it."
                    )
                text = line.split(b"\t", column + 1)[column]
                if not text.strip().isdigit():
                    raise ValueError(
                        f"{where}, field 'num_boxes': {text[:20]!r} is not a box count. The file is malformed; "
                        "regenerate or re-download it."
                    )
                largest = max(largest, int(text))
    return largest


def _images(
    paths: Sequence[Path], layouts: Sequence[str], progress: Progress, task
) -> Iterator[tuple[Path, TSVImage]]:
    for path, layout in zip(paths, layouts):
        for image in iter_tsv(path, layout, on_bytes=lambda size: progress.advance(task, size)):
            yield path, image


def convert(
    input_paths: Sequence[str | Path],
    output_path: str | Path,
    layout: str = "auto",
    dtype: str = "float32",
    max_boxes: int | None = None,
    force: bool = False,
    quiet: bool = False,
) -> int:
    """Convert TSV feature files into one region-feature HDF5 file.

    Args:
        input_paths: TSV files (plain, ``.tsv.gz`` or ``.zip`` archives of them), all of the same layout; their
            images are concatenated in order.
        output_path: HDF5 file to write.
        layout: ``"auto"`` (per file, from its first row), ``"original"`` or ``"lxmert"``.
        dtype: ``"float32"`` or ``"float16"`` for the stored features (boxes stay float32).
        max_boxes: box dimension of the output; None scans the inputs for the largest ``num_boxes``.
        force: replace an existing output.
        quiet: no progress bar.

    Returns:
        The number of images written.

    Raises:
        FileNotFoundError: an input is missing.
        FileExistsError: the output exists and ``force`` is False.
        ValueError: malformed input (message names file, line and field), a damaged archive, mixed layouts,
            duplicate ids, feature sizes that differ between rows, a row with more than ``max_boxes`` boxes, or
            an implausible row (:func:`updown.data.readers.image_problem`).
    """
    paths = [Path(path) for path in input_paths]
    output_path = Path(output_path)
    if not paths:
        raise ValueError("--input: no input files given. Name at least one TSV file.")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype: {dtype!r} is not supported; choose float32 or float16.")
    if layout not in ("auto", *LAYOUTS):
        raise ValueError(f"--layout: {layout!r} is unknown; choose auto, original or lxmert.")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: input TSV not found. Check the --input path.")
        if output_path.exists() and path.resolve() == output_path.resolve():
            raise ValueError(f"{output_path}: --output is also an --input. Choose another output path.")
    # Checked here too (the writer checks again) so a long scan is not wasted on a refusal.
    if output_path.exists() and not force:
        raise FileExistsError(
            f"{output_path}: output file exists. Pass --force to overwrite it, or choose another path."
        )
    if max_boxes is not None and max_boxes < 1:
        raise ValueError(
            f"--max-boxes: {max_boxes} is not a positive box count. Pass e.g. 36 or 100, or omit it."
        )

    layouts = [detect_layout(path) for path in paths]
    for path, detected in zip(paths, layouts):
        if layout != "auto" and detected != layout:
            raise ValueError(
                f"{path}, line 1: --layout {layout} expects {len(LAYOUTS[layout])} fields, but the row has "
                f"{len(LAYOUTS[detected])} as in the {detected} layout. Pass --layout {detected} (or auto)."
            )
    if len(set(layouts)) > 1:
        found = ", ".join(f"{path} ({name})" for path, name in zip(paths, layouts))
        raise ValueError(
            f"--input: files mix the original and LXMERT layouts ({found}); the LXMERT object/attribute "
            "datasets would be missing for some images. Convert each layout into its own output file."
        )
    if max_boxes is None:
        max_boxes = scan_max_boxes(paths, layouts, quiet)

    # The writer creates the output's folder; a failure must not leave it behind either.
    missing = [folder for folder in [output_path.parent, *output_path.parent.parents] if not folder.exists()]
    try:
        return _write(paths, layouts, output_path, dtype, max_boxes, force, quiet)
    except BaseException:
        for folder in missing:  # innermost first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _write(
    paths: Sequence[Path],
    layouts: Sequence[str],
    output_path: Path,
    dtype: str,
    max_boxes: int,
    force: bool,
    quiet: bool,
) -> int:
    first_seen: dict[int, str] = {}
    attrs = {"source_files": "\n".join(path.name for path in paths), "source_layout": layouts[0]}
    total_bytes = sum(input_size(path) for path in paths)
    with _progress(quiet) as progress:
        task = progress.add_task(f"converting to {output_path.name}", total=total_bytes)
        images = _images(paths, layouts, progress, task)
        # The feature size D is only known from the first row, and the writer needs it up front.
        first = next(images, None)
        if first is None:
            raise ValueError(
                f"--input: {', '.join(map(str, paths))} contain no rows. Point to non-empty TSV files."
            )
        feature_size = first[1].features.shape[1]
        extras = _LAYOUT_EXTRAS[layouts[0]]
        with RegionFeaturesWriter(
            output_path, max_boxes, feature_size, dtype, extras, force=force, attrs=attrs
        ) as writer:
            for _, image in itertools.chain([first], images):
                where = f"{image.source}, line {image.line} (image {image.image_id})"
                if image.features.shape[1] != feature_size:
                    raise ValueError(
                        f"{where}: features are {image.features.shape[1]}-d, but earlier rows are {feature_size}-d. "
                        "The row may be truncated; or convert files from different extractors separately."
                    )
                if image.num_boxes > max_boxes:
                    raise ValueError(
                        f"{where}: {image.num_boxes} boxes, more than --max-boxes {max_boxes}. Raise it."
                    )
                if image.image_id in first_seen:
                    raise ValueError(
                        f"{where}: image id already appeared at {first_seen[image.image_id]}. Remove the duplicate."
                    )
                _check_plausible(where, image)
                first_seen[image.image_id] = f"{Path(image.source).name}, line {image.line}"
                writer.add(
                    image.image_id, image.features, image.boxes, image.image_w, image.image_h, **image.extras
                )
    return writer.num_images


def _check_plausible(where: str, image: TSVImage) -> None:
    """Refuse a row the reader would refuse, naming its file and line (the writer would only name the output)."""
    if any(bool(mask) for mask in size_problems(image.image_w, image.image_h).values()):
        raise ValueError(
            f"{where}: implausible image size {image.image_w:g} x {image.image_h:g} (expected finite, positive, at "
            f"most {MAX_IMAGE_SIZE:g} px). The row is corrupt; regenerate or re-download the file, or remove the row."
        )
    problem = image_problem(image.features, image.boxes, image.image_w, image.image_h)
    if problem is not None:
        field, text = problem
        raise ValueError(
            f"{where}, field {field!r}: {text}. The row is corrupt or the detector's output is broken; "
            "regenerate or re-download the file, or remove the row."
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_features.py",
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n" + "\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        type=Path,
        help="TSV feature file(s), one layout: .tsv, .tsv.gz, or .zip archives of .tsv files.",
    )
    parser.add_argument("--output", required=True, type=Path, help="HDF5 file to write.")
    parser.add_argument(
        "--layout",
        choices=("auto", *LAYOUTS),
        default="auto",
        help="TSV layout; auto detects it from the first row.",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="stored feature dtype (boxes stay float32).",
    )
    parser.add_argument(
        "--max-boxes",
        type=int,
        default=None,
        help="box dimension of the output; default: largest num_boxes seen.",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file.")
    parser.add_argument("--quiet", action="store_true", help="no progress bar.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0 on success and 2 on a user error (message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        count = convert(
            args.input, args.output, args.layout, args.dtype, args.max_boxes, args.force, args.quiet
        )
    except (ValueError, OSError) as error:
        if args.debug:
            raise
        print(f"convert_features.py: error: {error}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {count} images to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
