"""Prepare captions for training and evaluation (docs/design.md, section 2.2).

From Karpathy's split:
    python tools/prepare_captions.py --karpathy data/dataset_coco.json --output data/captions

From COCO annotation files and split lists (one image id or COCO file name per line):
    python tools/prepare_captions.py --coco captions_train2014.json captions_val2014.json \
        --split train=train_ids.txt --split val=karpathy_val_images.txt --output data/captions

Writes captions.json, vocabulary.json (count >= --min-count over train+restval) and references_<split>.json
(COCO-format raw references for the official scorer) into --output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updown.cli import run_guarded  # noqa: E402
from updown.config import PositiveInt, argparse_type  # noqa: E402
from updown.data.caption_preparation import load_coco_captions, load_karpathy, prepare_captions  # noqa: E402
from updown.data.word_forms import WordForms  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--karpathy", help="Karpathy's dataset_coco.json")
    source.add_argument("--coco", nargs="+", help="COCO captions_*.json files")
    parser.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="NAME=LIST",
        help="with --coco: a split name and its image list file (repeat per split)",
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--min-count", type=argparse_type(PositiveInt), default=5,
        help="minimum word count for the vocabulary (paper: 5)",
    )  # fmt: skip
    parser.add_argument("--vocabulary-splits", nargs="+", default=["train", "restval"])
    parser.add_argument(
        "--constraint-words", metavar="TSV",
        help="also add every word of this word-forms TSV to the vocabulary, whatever its count "
        "(nocaps constrained beam search: constraint_wordforms.tsv)",
    )  # fmt: skip
    parser.add_argument("--evaluation-splits", nargs="+", default=["val", "test"])
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        if args.karpathy:
            images = load_karpathy(args.karpathy)
        else:
            if not args.split:
                raise ValueError(
                    "--coco needs at least one --split NAME=LIST (e.g. --split train=train_ids.txt)."
                )
            lists = {}
            for item in args.split:
                name, sep, path = item.partition("=")
                if not sep or not name or not path:
                    raise ValueError(f"--split {item!r}: expected NAME=LIST, e.g. train=train_ids.txt.")
                lists[name] = path
            images = load_coco_captions(args.coco, lists)
        output = Path(args.output)
        extra_words = (
            WordForms.from_file(args.constraint_words).vocabulary_words() if args.constraint_words else ()
        )
        # All or nothing: an existing file is refused (without --force) before any is replaced.
        vocabulary = prepare_captions(
            images, output, args.min_count, args.vocabulary_splits, args.evaluation_splits, force=args.force,
            extra_words=extra_words,
        )  # fmt: skip
        print(f"{len(images)} images, vocabulary of {len(vocabulary)} tokens -> {output}", file=sys.stderr)
        return 0

    return run_guarded("prepare_captions.py", run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
