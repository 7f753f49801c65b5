"""Prepare VQA v2 questions, answers, vocabularies and soft targets (docs/design.md, section 2.3).

    python tools/prepare_vqa.py \
        --split train=v2_OpenEnded_mscoco_train2014_questions.json,v2_mscoco_train2014_annotations.json \
        --split val=v2_OpenEnded_mscoco_val2014_questions.json,v2_mscoco_val2014_annotations.json \
        [--split test-dev=v2_OpenEnded_mscoco_test-dev2015_questions.json] --output data/vqa

The answer classes are the answers that are the (normalised) majority answer of at least 9 questions of train +
val, the annotated splits given (``--answer-splits`` overrides): the standard list, which hengyuan-hu's
reproduction and Teney et al. use for their val numbers too (tools/compute_softscore.py counts train + val). On
VQA v2 the standard list has 3,129 answers (tests/data/vqa/lxmert/trainval_label2ans.json, made by the same
rule); ours has 3,128, one fewer, because the empty string, which answers such as "the" or "." normalise to and
which is the standard list's class 0, is never a class here (updown/data/vqa_preparation.py).

Writes questions_<split>.json (tokens, raw answers, sparse soft targets), annotations_<split>.json (the
official annotations of annotated splits, for `python -m updown.evaluate vqa`), question_vocabulary.json
and answer_vocabulary.json into --output. Nothing is written if any input is bad.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updown.cli import run_guarded  # noqa: E402
from updown.config import PositiveInt, argparse_type  # noqa: E402
from updown.data.vqa_preparation import prepare_vqa  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--split",
        action="append",
        default=[],
        required=True,
        metavar="NAME=QUESTIONS.json[,ANNOTATIONS.json]",
        help="a split: its official questions file and, unless it is test-dev/test-std, its "
        "annotations file (repeat per split)",
    )
    parser.add_argument(
        "--answer-splits",
        nargs="+",
        default=None,
        help="annotated splits whose majority answers define the answer classes (default: train and val, "
        "those of them given)",
    )
    parser.add_argument(
        "--vocabulary-splits",
        nargs="+",
        default=None,
        help="splits whose question words form the question vocabulary (default: --answer-splits)",
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--min-answer-count",
        type=argparse_type(PositiveInt),
        default=9,
        help="questions an answer must be the most common answer of (reproduction: 9)",
    )
    parser.add_argument(
        "--min-word-count",
        type=argparse_type(PositiveInt),
        default=1,
        help="occurrences a question word needs",
    )
    parser.add_argument(
        "--max-question-length", type=argparse_type(PositiveInt), default=14,
        help="tokens kept per question (paper: 14)",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def parse_splits(items: list[str]) -> dict[str, tuple[str, str | None]]:
    """``NAME=QUESTIONS[,ANNOTATIONS]`` strings -> ``{name: (questions, annotations or None)}``."""
    splits: dict[str, tuple[str, str | None]] = {}
    for item in items:
        name, sep, paths = item.partition("=")
        files = paths.split(",")
        if not sep or not name or len(files) > 2 or not all(files):
            raise ValueError(
                f"--split {item!r}: expected NAME=QUESTIONS.json[,ANNOTATIONS.json], e.g. "
                "val=v2_OpenEnded_mscoco_val2014_questions.json,v2_mscoco_val2014_annotations.json."
            )
        if name in splits:
            raise ValueError(f"--split {item!r}: split '{name}' is given twice. Give each split once.")
        splits[name] = (files[0], files[1] if len(files) == 2 else None)
    return splits


def default_answer_splits(split_arguments: list[str]) -> list[str]:
    """train and val, those of them given (the standard answer list counts both)."""
    given = {item.split("=", 1)[0] for item in split_arguments}
    return [name for name in ("train", "val") if name in given] or ["train"]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        question_vocabulary, answer_vocabulary = prepare_vqa(
            parse_splits(args.split),
            args.output,
            answer_splits=args.answer_splits or default_answer_splits(args.split),
            min_answer_count=args.min_answer_count,
            max_question_length=args.max_question_length,
            vocabulary_splits=args.vocabulary_splits,
            min_word_count=args.min_word_count,
            force=args.force,
        )
        print(
            f"{len(args.split)} split(s): {len(question_vocabulary)} question tokens, "
            f"{len(answer_vocabulary)} answer classes -> {args.output}",
            file=sys.stderr,
        )
        return 0

    return run_guarded("prepare_vqa.py", run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
