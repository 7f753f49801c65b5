"""Count CIDEr-D document frequencies over training references, once, for the SCST reward.

    python tools/build_cider_df.py --captions data/captions/captions.json                 # -> cider_df.json
    python tools/build_cider_df.py --captions data/captions/captions.json --eos-as-word   # -> cider_df_eos.json

By default it counts the Karpathy training images, train + restval (113,287 on COCO): what self-critical.pytorch's
``prepro_ngrams.py --split train`` counts (its "train" includes restval). The output goes beside the captions as
``cider_df.json`` (``cider_df_eos.json`` with ``--eos-as-word``), the file the SCST task reads when
``model.init_args.cider_df_path`` is not set (``CaptioningDataModule.cider_df_path``), so the SCST configs need
no path.

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
from updown.config import PositiveInt, argparse_type  # noqa: E402
from updown.data.caption_preparation import read_prepared_captions  # noqa: E402
from updown.metrics.cider import CiderD  # noqa: E402

# The Karpathy training images (self-critical.pytorch's "train" includes restval).
TRAIN_SPLITS = ("train", "restval")


def default_output(captions: str, eos_as_word: bool) -> Path:
    """Where the SCST task looks for the document frequencies of these captions (see the module docstring)."""
    return Path(captions).parent / ("cider_df_eos.json" if eos_as_word else "cider_df.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--captions", required=True, metavar="JSON", help="prepared captions.json")
    parser.add_argument(
        "--split",
        action="append",
        help=f"split to count over, repeatable (default: {' and '.join(TRAIN_SPLITS)}, the training images)",
    )
    parser.add_argument(
        "--output",
        metavar="JSON",
        help="document-frequency file to write (default: cider_df.json, or cider_df_eos.json with "
        "--eos-as-word, beside --captions: where the SCST task looks)",
    )
    parser.add_argument(
        "--n", type=argparse_type(PositiveInt), default=4, help="largest n-gram order (CIDEr-D: 4)"
    )
    parser.add_argument("--eos-as-word", action="store_true", help="append <eos> to every reference first")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        args.split = args.split or list(TRAIN_SPLITS)
        if args.output is None:
            args.output = str(default_output(args.captions, args.eos_as_word))
        if Path(args.output).exists() and not args.force:
            raise FileExistsError(f"{args.output}: output file exists. Pass --force to overwrite it.")
        # Unknown split names and images listed twice are refused by the reader.
        images = read_prepared_captions(args.captions, args.split)
        references = {image.image_id: image.tokens for image in images}
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
