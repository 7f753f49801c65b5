"""Speed of the SCST reward: :class:`updown.metrics.cider.CiderD` against pycocoevalcap's CiderScorer.

A reward batch is ``--images`` images x ``--samples`` sampled captions, each image with ``--refs``
references (default 50 x 5 x 5, the paper's SCST batch). pycocoevalcap is timed the way a reward built on
it runs: a CiderScorer filled with the batch's (hypothesis, references) pairs, then ``compute_score``.
CiderD is given the very document frequencies and ``ref_len`` that CiderScorer derived from that batch, so
both compute the same numbers (the maximum difference is printed), and is timed warm (reference vectors
cached, as during training) and cold (``add_references`` for the batch's images included).

    python tools/benchmark_cider.py                       # synthetic captions
    python tools/benchmark_cider.py --references tests/data/coco-caption/captions_val2014_fakecap_gt.json
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updown.io import read_json  # noqa: E402
from updown.metrics.cider import CiderD  # noqa: E402


def synthetic_references(num_images: int, num_refs: int, rng: random.Random) -> list[list[list[str]]]:
    """Captions from a Zipf-like vocabulary, so n-grams repeat within and across images as in COCO."""
    vocabulary = [f"w{i}" for i in range(2000)]
    weights = [1.0 / (rank + 1) for rank in range(len(vocabulary))]
    return [
        [rng.choices(vocabulary, weights, k=rng.randint(8, 14)) for _ in range(num_refs)]
        for _ in range(num_images)
    ]


def coco_references(path: str, num_images: int, num_refs: int, rng: random.Random) -> list[list[list[str]]]:
    """Lower-cased, punctuation-free word lists of real COCO references (no Java tokenizer needed)."""
    data = read_json(path, "COCO caption ground-truth JSON")
    by_image: dict[int, list[list[str]]] = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(
            re.findall(r"[a-z0-9]+", annotation["caption"].lower())
        )
    usable = [refs[:num_refs] for refs in by_image.values() if len(refs) >= num_refs]
    if len(usable) < num_images:
        raise ValueError(f"{path}: only {len(usable)} images have {num_refs} references; lower --images.")
    return rng.sample(usable, num_images)


def sample_hypotheses(
    references: list[list[list[str]]], num_samples: int, rng: random.Random
) -> list[list[str]]:
    """Sampled-caption stand-ins: words drawn from the image's references, of reference-like length."""
    hypotheses = []
    for refs in references:
        words = [word for ref in refs for word in ref]
        hypotheses.extend(rng.choices(words, k=rng.randint(6, 16)) for _ in range(num_samples))
    return hypotheses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--samples", type=int, default=5, help="sampled captions per image")
    parser.add_argument("--refs", type=int, default=5, help="references per image")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions (the median is reported)")
    parser.add_argument(
        "--references", metavar="JSON", help="COCO-format ground truth to take references from"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    rng = random.Random(args.seed)
    if args.references:
        references = coco_references(args.references, args.images, args.refs, rng)
    else:
        references = synthetic_references(args.images, args.refs, rng)
    hypotheses = sample_hypotheses(references, args.samples, rng)
    keys = [image for image in range(args.images) for _ in range(args.samples)]
    reference_strings = [[" ".join(ref) for ref in refs] for refs in references]

    def run_pycocoevalcap() -> tuple[CiderScorer, list[float]]:
        scorer = CiderScorer(n=4, sigma=6.0)
        for hypothesis, key in zip(hypotheses, keys):
            scorer += (" ".join(hypothesis), reference_strings[key])
        _, scores = scorer.compute_score()
        return scorer, list(scores)

    scorer, expected = run_pycocoevalcap()
    frequencies = {gram: count for gram, count in scorer.document_frequency.items() if count > 0}

    def new_cider() -> CiderD:
        return CiderD(frequencies, ref_len=float(scorer.ref_len))

    def run_cold() -> CiderD:
        cider = new_cider()
        for image, refs in enumerate(references):
            cider.add_references(image, refs)
        cider.score(hypotheses, keys)
        return cider

    warm = run_cold()
    difference = max(abs(a - b) for a, b in zip(warm.score(hypotheses, keys), expected))

    def median_seconds(function) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    reference_time = median_seconds(run_pycocoevalcap)
    warm_time = median_seconds(lambda: warm.score(hypotheses, keys))
    cold_time = median_seconds(run_cold)
    source = args.references or "synthetic captions"
    print(f"batch: {args.images} images x {args.samples} samples, {args.refs} references each ({source})")
    print(f"max |CiderD - pycocoevalcap| = {difference:.3g}")
    print(f"pycocoevalcap CiderScorer : {1000 * reference_time:8.2f} ms")
    print(
        f"CiderD, cached references : {1000 * warm_time:8.2f} ms   {reference_time / warm_time:6.1f}x faster"
    )
    print(
        f"CiderD, references added  : {1000 * cold_time:8.2f} ms   {reference_time / cold_time:6.1f}x faster"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
