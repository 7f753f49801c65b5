"""Count CIDEr-D document frequencies over training references, once, for the SCST reward.

    python tools/build_cider_df.py --captions data/captions/captions.json --split train --split restval \\
        --output data/captions/cider_df_train.json

Reads the prepared captions (``tools/prepare_captions.py``: ``{"images": [{"image_id", "split",
"captions", "tokens"}]}``) and uses the ``tokens`` of the images in the given splits. For each 1..n-gram
it stores the number of images whose references contain it, and ``ref_len = log(number of images)``,
exactly as pycocoevalcap's CiderScorer counts them. The SCST config points at the output file
(:class:`updown.metrics.cider.CiderD` loads it); build it ``--eos-as-word`` when the reward counts
``<eos>`` as a word, since the file records that choice and the reward checks it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updown.cli import run_guarded  # noqa: E402
from updown.data.caption_preparation import read_prepared_captions  # noqa: E402
from updown.metrics.cider import CiderD  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--captions", required=True, metavar="JSON", help="prepared captions.json")
    parser.add_argument(
        "--split", action="append", required=True, help="split to count over (repeat: train, restval)"
    )
    parser.add_argument("--output", required=True, metavar="JSON", help="document-frequency file to write")
    parser.add_argument("--n", type=int, default=4, help="largest n-gram order (CIDEr-D: 4)")
    parser.add_argument("--eos-as-word", action="store_true", help="append <eos> to every reference first")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        if Path(args.output).exists() and not args.force:
            raise FileExistsError(f"{args.output}: output file exists. Pass --force to overwrite it.")
        if args.n < 1:
            raise ValueError(f"--n {args.n}: the n-gram order must be at least 1.")
        images = read_prepared_captions(args.captions, args.split)
        references = {image.image_id: image.tokens for image in images}
        if len(references) != len(images):
            raise ValueError(
                f"{args.captions}: an image id appears twice in splits {args.split}; remove the duplicate."
            )
        cider = CiderD.from_references(
            references, n=args.n, eos_as_word=args.eos_as_word, cache_references=False
        )
        cider.save(args.output, force=args.force)
        print(
            f"{len(references)} images of {args.split}, {len(cider.document_frequency)} n-grams "
            f"(n <= {args.n}, eos_as_word={args.eos_as_word}) -> {args.output}",
            file=sys.stderr,
        )
        return 0

    return run_guarded("build_cider_df.py", run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
