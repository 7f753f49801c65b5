"""Write a world with COCO's shapes, in the real file formats, to time and size the pipeline at scale.

    python tools/make_coco_shaped.py --output /data/coco_shaped                  # 123,287 images x 36 x 2048
    python tools/make_coco_shaped.py --output /tmp/small --images 50 --min-boxes 10 --max-boxes 100
    python tools/make_coco_shaped.py --output /data/coco_shaped --workers 15    # images made in 15 processes

The synthetic world (tools/make_synthetic.py) is small and learnable; this world has the sizes of COCO and
VQA v2 so that preprocessing, loading and training can be timed and their memory measured before the real
files are at hand:

- 123,287 images (COCO train2014 82,783 + val2014 40,504), Karpathy's split (train 82,783, restval 30,504,
  val 5,000, test 5,000), with 36 regions each (``--min-boxes 10 --max-boxes 100``: the adaptive 10-100 boxes)
  of 2048-d float16 features in ``features.h5`` (our layout, written by ``RegionFeaturesWriter``; 36 boxes:
  about 18 GB);
- ``raw/dataset_coco.json``: five captions per image in Karpathy's format. A caption is one of the synthetic
  world's sentences about the image's salient object, lengthened to a COCO-like length (mean 10.6 words)
  by words drawn from a Zipf law over a made-up lexicon, so the vocabulary has COCO's size (about 9,200 words seen
  5 times or more in train + restval at the full size, where Karpathy's COCO has 9,487);
- ``raw/v2_OpenEnded_mscoco_{train,val}2014_questions.json`` and ``raw/v2_mscoco_{train,val}2014_annotations.json``:
  VQA v2's counts (443,757 training questions on train2014, 214,354 on val2014), each with 10 human answers;
  about half are the synthetic world's questions, the rest open questions whose answers follow a Zipf law,
  so about 3,500 answers are the majority answer of 9 or more questions (VQA v2: 3,128 by the same rule).

``--images N`` scales every count by N / 123,287 (at least one image per Karpathy split) for tests and CI.
``--workers N`` makes images in N processes (this one writes them, in order); each image draws from its own
generator, so the world is the same for any N. Everything streams: features are appended image by image and
the JSON files are written item by item, so memory stays constant (84 MB for the full world without workers)
at any size. The output folder appears only when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updown.cli import run_guarded  # noqa: E402
from updown.config import NonNegativeInt, PositiveInt, argparse_type  # noqa: E402
from updown.data.coco_shaped import COCO_IMAGES, split_sizes, write_world  # noqa: E402
from updown.io import atomic_outputs  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, help="output folder (must not exist unless --force)")
    positive = argparse_type(PositiveInt)
    parser.add_argument(
        "--images",
        type=positive,
        default=COCO_IMAGES,
        help=f"number of images (default: COCO's {COCO_IMAGES:,})",
    )
    parser.add_argument(
        "--min-boxes", type=positive, default=36, help="fewest regions per image (default: 36)"
    )
    parser.add_argument(
        "--max-boxes", type=positive, default=36, help="most regions per image (default: 36; 100 for 10-100)"
    )
    parser.add_argument("--feature-size", type=positive, default=2048, help="D (default: 2048)")
    parser.add_argument(
        "--seed", type=argparse_type(int), default=0, help="seed of everything drawn (default: 0)"
    )
    parser.add_argument(
        "--workers",
        type=argparse_type(NonNegativeInt),
        default=0,
        help="processes that generate images (default: 0, this one); the world is the same for any number",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        if args.min_boxes > args.max_boxes:
            raise ValueError(
                f"--min-boxes {args.min_boxes} is larger than --max-boxes {args.max_boxes}. Swap or fix them."
            )
        # The synthetic scenes give each image up to 20 object regions; fewer boxes would drop objects.
        if args.max_boxes < 20:
            raise ValueError(
                f"--max-boxes {args.max_boxes} is below 20, the most object regions a scene has."
            )
        output = Path(args.output)
        if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.force:
            raise FileExistsError(
                f"{output}: folder exists and is not empty. Pass --force or choose another --output."
            )
        split_sizes(args.images)  # refuse too few images before writing anything
        with atomic_outputs(output, force=True) as staging:
            counts = write_world(
                staging,
                args.images,
                args.seed,
                args.min_boxes,
                args.max_boxes,
                args.feature_size,
                not args.no_progress,
                args.workers,
            )
        print(
            f"COCO-shaped world -> {output}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()),
            file=sys.stderr,
        )
        return 0

    return run_guarded("make_coco_shaped.py", run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
