"""Score results files with the official caption or VQA evaluation.

Examples:
    python -m updown.evaluate captions --references captions_val2014.json --results results.json \\
        --output scores.json
    python -m updown.evaluate captions --references captions_val2014.json --human
    python -m updown.evaluate captions --references nocaps_val_4500_captions.json --results results.json
    python -m updown.evaluate vqa --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --results results.json

``captions`` reads COCO-format ground truth (``{"images": [{"id"}], "annotations": [{"image_id",
"caption"}]}``) and COCO results (``[{"image_id", "caption"}]``), tokenises the raw strings with the PTB
tokenizer and prints BLEU-1..4, METEOR, ROUGE-L, CIDEr and SPICE (when available) exactly as
pycocoevalcap computes them; ``--human`` instead scores each reference against the others.
nocaps ground truth (whose ``images`` carry a ``domain``: in-domain, near-domain, out-domain) is scored per
domain and overall, each domain as if it were the whole ground truth (pycocoevalcap on the domain's subset);
the output JSON then holds the overall scores at the top level and each domain's under ``by_domain``.
``vqa`` prints the official VQA accuracy, overall and per answer type.

Every input problem prints one message and exits with status 2, writing nothing (``--debug`` shows the
traceback). Importing this module stays cheap: the metrics are imported when a command runs.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from updown.cli import USER_ERRORS, error_message
from updown.io import check_output_paths, read_json, write_json
from updown.metrics.coco_caption import METRICS as CAPTION_METRICS

PROG = "python -m updown.evaluate"
USER_ERROR = 2


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output", metavar="JSON", help="write the scores to this JSON file (atomically).")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors.")
    return parser


def add_captions_parser(
    subparsers: Any, parents: Sequence[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """The ``captions`` subcommand."""
    parser = subparsers.add_parser(
        "captions",
        parents=list(parents),
        help="COCO caption metrics (pycocoevalcap) of a results file.",
        description="Score COCO-format caption results with BLEU, METEOR, ROUGE-L, CIDEr and SPICE.",
    )
    parser.add_argument(
        "--references", required=True, metavar="JSON", help="COCO-format ground truth captions."
    )
    parser.add_argument("--results", metavar="JSON", help='results: [{"image_id": int, "caption": str}].')
    parser.add_argument(
        "--spice",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: SPICE if its Stanford CoreNLP jars are installed, else skipped with a warning.",
    )
    parser.add_argument(
        "--human", action="store_true", help="score each reference against the others instead of results."
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        choices=CAPTION_METRICS,
        default=list(CAPTION_METRICS),
        help="metric families to compute (default: all; METEOR is the slow one).",
    )
    parser.add_argument(
        "--per-image-output", metavar="JSON", help="also write per-image scores to this file."
    )
    parser.set_defaults(handler=run_captions)
    return parser


def add_vqa_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """The ``vqa`` subcommand."""
    parser = subparsers.add_parser(
        "vqa",
        parents=list(parents),
        help="official VQA accuracy of a results file.",
        description="Score VQA results with the official GT-Vision-Lab evaluation.",
    )
    parser.add_argument("--questions", required=True, metavar="JSON", help="official questions JSON.")
    parser.add_argument("--annotations", required=True, metavar="JSON", help="official annotations JSON.")
    parser.add_argument("--results", metavar="JSON", help='results: [{"question_id": int, "answer": str}].')
    parser.add_argument(
        "--normalization",
        choices=("official", "legacy"),
        default="official",
        help="official: the current rule (normalise only non-unanimous questions); legacy: the pre-2021 rule.",
    )
    parser.set_defaults(handler=run_vqa)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m updown.evaluate`` parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{captions,vqa}")
    common = _common_options()
    add_captions_parser(subparsers, [common])
    add_vqa_parser(subparsers, [common])
    return parser


def read_coco_references(path: str) -> dict[int, list[str]]:
    """Image id -> raw reference captions from a COCO-format ground-truth file, in its image order."""
    return read_references_and_domains(path)[0]


def read_references_and_domains(path: str) -> tuple[dict[int, list[str]], dict[int, str] | None]:
    """Raw references of a COCO-format ground-truth file, and each image's nocaps domain if it has them.

    Returns:
        ``(references, domains)``: image id -> raw captions in the file's image order; image id -> its
        ``images[i]["domain"]`` (nocaps: in-domain / near-domain / out-domain), or None when no image has one
        (COCO).
    """
    data = read_json(path, "COCO caption ground-truth JSON")
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(data, dict) and not isinstance(data.get("annotations"), list):
        if isinstance(images, list) and any(
            isinstance(image, dict) and "domain" in image for image in images
        ):
            raise ValueError(
                f"{path}: nocaps images without captions (the test split's image info?). The nocaps test "
                "captions are hidden: submit the results file to the nocaps evaluation server instead."
            )
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f'{path}: expected a COCO captions object with an "annotations" list.')
    references: dict[int, list[str]] = {}
    domains: dict[int, str] | None = None
    if isinstance(images, list):
        if not all(isinstance(image, dict) and isinstance(image.get("id"), int) for image in images):
            raise ValueError(f'{path}: every entry of "images" needs an integer "id".')
        # COCOEvalCap scores the images in this order; keeping it keeps float sums identical.
        references = {image["id"]: [] for image in images}
        with_domain = [image for image in images if "domain" in image]
        if with_domain:
            wrong = [
                image["id"]
                for image in images
                if not isinstance(image.get("domain"), str) or not image["domain"]
            ]
            if wrong:
                raise ValueError(
                    f'{path}: {len(wrong)} images (e.g. {wrong[:5]}) lack a "domain" string while others have '
                    "one (nocaps: in-domain, near-domain, out-domain). Give every image its domain, or none."
                )
            domains = {image["id"]: image["domain"] for image in images}
    for index, annotation in enumerate(data["annotations"]):
        if (
            not isinstance(annotation, dict)
            or not isinstance(annotation.get("caption"), str)
            or not isinstance(annotation.get("image_id"), int)
        ):
            raise ValueError(
                f'{path}: annotations[{index}] needs an integer "image_id" and a string "caption".'
            )
        if domains is not None and annotation["image_id"] not in domains:
            raise ValueError(
                f'{path}: annotations[{index}] is for image {annotation["image_id"]}, which is not in "images" '
                "and so has no domain."
            )
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    if not references:
        raise ValueError(f"{path}: no annotations to score against.")
    empty = [image_id for image_id, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"{path}: {len(empty)} images (e.g. {empty[:5]}) have no caption annotations.")
    return references, domains


def read_caption_results(path: str) -> dict[int, str]:
    """Image id -> predicted caption from a COCO results file."""
    data = read_json(path, "caption results JSON")
    if not isinstance(data, list) or not data:
        raise ValueError(f'{path}: expected a non-empty list of {{"image_id": int, "caption": str}}.')
    predictions: dict[int, str] = {}
    for index, result in enumerate(data):
        if (
            not isinstance(result, dict)
            or not isinstance(result.get("caption"), str)
            or not isinstance(result.get("image_id"), int)
        ):
            raise ValueError(f'{path}: entry {index} needs an integer "image_id" and a string "caption".')
        image_id = result["image_id"]
        if image_id in predictions:
            raise ValueError(f"{path}: image {image_id} has more than one caption; keep one per image.")
        predictions[image_id] = result["caption"]
    return predictions


def _print_table(title: str, rows: list[tuple[str, float]], unit: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("metric")
    table.add_column(unit, justify="right")
    for name, value in rows:
        table.add_row(name, f"{value:.4f}" if unit == "score" else f"{value:.2f}")
    console = Console()
    console.print(title, markup=False, highlight=False)
    console.print(table)


def _print_domain_table(title: str, scores: dict[str, dict[str, float]]) -> None:
    """One row per metric, one column per domain (nocaps), the last one overall."""
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("metric")
    columns = list(scores)
    for column in columns:
        table.add_column(column, justify="right")
    for name in scores[columns[-1]]:
        table.add_row(name, *(f"{scores[column][name]:.4f}" for column in columns))
    console = Console()
    console.print(title, markup=False, highlight=False)
    console.print(table)


def _nest_domains(scores: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Overall scores at the top level (as for COCO), each domain's under ``"by_domain"``."""
    from updown.metrics.coco_caption import OVERALL

    return {
        **scores[OVERALL],
        "by_domain": {name: value for name, value in scores.items() if name != OVERALL},
    }


def run_captions(args: argparse.Namespace) -> dict[str, Any]:
    """Score caption results (or human consensus); returns the scores (with ``by_domain`` for nocaps)."""
    from updown.metrics.coco_caption import (
        OVERALL,
        domain_order,
        human_consensus,
        score_captions,
        score_captions_by_domain,
    )

    if args.human == (args.results is not None):
        raise ValueError("captions: give --results to score a results file, or --human (not both).")
    if args.human and args.per_image_output:
        raise ValueError(
            "captions: --per-image-output needs --results (human consensus has no per-image scores)."
        )
    references, domains = read_references_and_domains(args.references)
    per_image = None
    if args.human:
        if domains is None:
            scores = human_consensus(references, spice=args.spice, metrics=args.metrics)
        else:
            groups = [*domain_order(domains), OVERALL]
            by_domain = {
                group: human_consensus(
                    {k: refs for k, refs in references.items() if group in (OVERALL, domains[k])},
                    spice=args.spice,
                    metrics=args.metrics,
                )
                for group in groups
            }
        title = f"human consensus: {len(references)} images"
    else:
        predictions = read_caption_results(args.results)
        try:
            if domains is None:
                scores, per_image = score_captions(
                    references, predictions, spice=args.spice, metrics=args.metrics
                )
            else:
                by_domain, per_image = score_captions_by_domain(
                    references, predictions, domains, spice=args.spice, metrics=args.metrics
                )
        except ValueError as error:
            raise ValueError(f"{args.results} against {args.references}: {error}") from None
        title = f"{Path(args.results).name}: {len(references)} images"
    if domains is None:
        _print_table(title, list(scores.items()), "score")
    else:
        counts = Counter(domains[key] for key in references)
        title += " (" + ", ".join(f"{domain} {counts[domain]}" for domain in domain_order(domains)) + ")"
        _print_domain_table(title, by_domain)
        scores = _nest_domains(by_domain)
    if args.per_image_output:
        write_json(
            args.per_image_output, {str(key): value for key, value in per_image.items()}, args.force, indent=1
        )
    return scores


def run_vqa(args: argparse.Namespace) -> dict[str, Any]:
    """Score VQA results; returns the official accuracy dictionary."""
    from updown.metrics.vqa_accuracy import evaluate_vqa

    if args.results is None:
        raise ValueError("vqa: --results is required.")
    questions = read_json(args.questions, "VQA questions JSON")
    annotations = read_json(args.annotations, "VQA annotations JSON")
    results = read_json(args.results, "VQA results JSON")
    if not isinstance(results, list):
        raise ValueError(f'{args.results}: expected a list of {{"question_id": int, "answer": str}}.')
    try:
        accuracy = evaluate_vqa(questions, annotations, results, normalization=args.normalization)
    except ValueError as error:
        raise ValueError(
            f"{error} (questions: {args.questions}, annotations: {args.annotations}, results: {args.results})"
        ) from None
    rows = [("overall", accuracy["overall"])] + sorted(accuracy["perAnswerType"].items())
    _print_table(f"{Path(args.results).name}: VQA accuracy ({args.normalization})", rows, "accuracy %")
    return accuracy


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse bad output paths before scoring (minutes), not after."""
    outputs = {"--output": args.output, "--per-image-output": getattr(args, "per_image_output", None)}
    check_output_paths(outputs, args.force)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return int(exit_request.code or 0)
    from updown.metrics.coco_caption import MissingDependencyError

    try:
        check_outputs(args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            scores = args.handler(args)
        # Warnings (SPICE skipped) as one plain line each, not with a source-code excerpt; a warning repeated
        # (once per nocaps domain) is shown once.
        for message in dict.fromkeys(str(warning.message) for warning in caught):
            print(f"{PROG}: warning: {message}", file=sys.stderr)
        if args.output:
            write_json(args.output, scores, args.force, indent=2)
    except (*USER_ERRORS, MissingDependencyError) as error:
        if args.debug:
            raise
        print(f"{PROG}: error: {error_message(error)}", file=sys.stderr)
        return USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
