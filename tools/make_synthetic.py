"""Write the synthetic world (docs/design.md, section 4) into a folder, in the real file formats.

    python tools/make_synthetic.py --output /tmp/world [--tsv] [--seed 0] [--num-train 1500] [--grid]

Writes features.h5 (with per-region object labels), raw/dataset_coco.json (Karpathy format),
raw/v2_*_{train,val,test}_*.json (VQA v2 format), raw/objects.json, and with --tsv raw/features.tsv (original
bottom-up TSV layout, to exercise tools/convert_features.py). Training commands generate their default world
automatically into $UPDOWN_DATA; this tool is for looking at it or converting it by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updown.cli import run_guarded  # noqa: E402
from updown.config import argparse_type, literal_choices  # noqa: E402
from updown.data.synthetic import SyntheticSpec, SyntheticWorld, write_raw_world  # noqa: E402
from updown.io import atomic_outputs  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, help="output folder (must not exist unless --force)")
    # One option per SyntheticSpec field, with the field's type and range (the annotation declares them once).
    hints = typing.get_type_hints(SyntheticSpec)
    for field in dataclasses.fields(SyntheticSpec):
        flag = "--" + field.name.replace("_", "-")
        annotation = hints[field.name]
        if annotation is bool:
            parser.add_argument(flag, action="store_true", help=f"(default: {field.default})")
        elif typing.get_origin(annotation) is tuple:  # held_out_categories: names separated by spaces
            parser.add_argument(flag, nargs="*", default=field.default, help="(default: none)")
        elif literal_choices(annotation) is not None:
            choices = literal_choices(annotation)
            parser.add_argument(
                flag, choices=choices, default=field.default, help=f"(default: {field.default})"
            )
        else:
            parser.add_argument(
                flag,
                type=argparse_type(annotation),
                default=field.default,
                help=f"(default: {field.default})",
            )
    parser.add_argument(
        "--tsv", action="store_true", help="also write raw/features.tsv (original bottom-up layout)"
    )
    parser.add_argument("--force", action="store_true", help="write into an existing folder")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        spec = SyntheticSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticSpec)})
        output = Path(args.output)
        if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.force:
            raise FileExistsError(
                f"{output}: folder exists and is not empty. Pass --force or choose another --output."
            )
        # All or nothing: the world is written into a staging folder and moved into place when complete.
        with atomic_outputs(output, force=True) as staging:
            write_raw_world(spec, SyntheticWorld(staging), tsv=args.tsv)
        print(f"synthetic world {spec.key()} -> {output}", file=sys.stderr)
        return 0

    return run_guarded("make_synthetic.py", run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
