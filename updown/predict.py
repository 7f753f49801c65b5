"""``python -m updown.predict``: decode a split with a checkpoint into the community's results formats.

    python -m updown.predict captions --checkpoint runs/.../best.ckpt --split test --output captions_test.json \\
        [--attention attention_test.h5] [--score scores.json]

writes the COCO results JSON ``[{"image_id": int, "caption": str}]`` that the evaluation server and
``python -m updown.evaluate captions`` read. The data default to those the checkpoint was trained on (its saved
datamodule arguments); ``--features``, ``--captions`` and ``--vocabulary`` point elsewhere (e.g. the test images'
features). ``--constraints on|off`` switches constrained beam search from object detections (the nocaps baseline;
``--detections``, ``--class-hierarchy``, ``--word-forms``, ``--max-constraints``, ``--min-constraints-to-satisfy``
override the checkpoint's settings; docs/novel_objects.md). ``--attention`` saves per-word attention as HDF5 (read
by ``updown.visualize``):

| dataset | shape | meaning |
|---|---|---|
| ``image_id`` | (N,) int64 | image of each row |
| ``tokens`` | (N, T) int64 | generated token ids (``<eos>`` then ``<pad>``) |
| ``lengths`` | (N,) int64 | generated tokens, ``<eos>`` included |
| ``attention`` | (N, T, R) float32 | attention over regions behind each token (0 past ``lengths`` / ``num_boxes``) |
| ``num_boxes`` | (N,) int32 | real regions of each image |
| ``boxes`` | (N, R, 4) float32 | region boxes in pixels |
| ``captions`` | (N,) str | the decoded caption |
File attribute ``vocabulary``: the JSON list of tokens.

    python -m updown.predict vqa --checkpoint runs/.../best.ckpt --split test-dev --output vqa_test-dev.json \
        [--attention attention_test-dev.h5] [--score scores.json]

writes the official VQA results JSON ``[{"question_id": int, "answer": str}]``; ``--attention`` saves
``question_id (N,)``, ``image_id (N,)``, ``attention (N, R)``, ``num_boxes (N,)``, ``boxes (N, R, 4)``, ``questions``
and ``answers`` (N strings each); ``--score`` scores an annotated split with the official metric.

Decoding is ``Trainer.predict`` of the task's ``predict_step`` (the beam search of validation, ``--beam-size``
overriding the checkpoint's), so it runs on the devices and precision training can use: ``--device cpu``,
``cuda`` or ``cuda:N``, ``--devices 4`` (DDP, one process per device), ``--precision bf16-mixed``. The writers of
:mod:`updown.prediction` gather every process's predictions, keep one per sample, in the split's order, and write
one file each, all together (results, ``--attention``, ``--score``): an existing file is refused before decoding
without ``--force``, and on any error, scoring included, none is replaced and no partial file is left.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import re
import sys
import warnings
from collections.abc import Iterator, Sequence

import torch

from updown.cli import run_guarded
from updown.config import NonNegativeInt, PositiveInt, argparse_type
from updown.io import check_output_paths

PROG = "python -m updown.predict"


def check_checkpoint_data(task, datamodule, checkpoint_path: str) -> None:
    """Refuse data whose vocabularies differ from the checkpoint's, naming the checkpoint file."""
    spec = dataclasses.replace(task.data_spec, source=checkpoint_path)
    spec.check_matches(datamodule.data_spec())


def device_settings(device: str, devices: str | None) -> tuple[str, int | str | list[int]]:
    """Lightning's ``(accelerator, devices)`` of ``--device`` and ``--devices``: ``cpu`` / ``cuda`` / ``gpu``
    (``--devices`` of them, default 1), ``cuda:N`` (GPU N alone), or any accelerator name Lightning knows."""
    match = re.fullmatch(r"(cuda|gpu):(\d+)", device)
    if match:
        if devices is not None:
            raise ValueError(
                f"--device {device} names one GPU; drop --devices {devices}, or pass --device cuda."
            )
        return "gpu", [int(match.group(2))]
    accelerator = "gpu" if device == "cuda" else device
    return accelerator, 1 if devices is None else devices


def build_trainer(args: argparse.Namespace, writer):
    """A Trainer on ``--device`` / ``--devices`` / ``--precision`` with the prediction ``writer``, no logger or
    checkpoints; a rich progress bar on a terminal. More than one device runs DDP, one process per device."""
    import pytorch_lightning as pl
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.callbacks import RichProgressBar

    accelerator, devices = device_settings(args.device, args.devices)
    progress = sys.stderr.isatty()
    single = devices == 1 or (isinstance(devices, list) and len(devices) == 1)
    try:
        return pl.Trainer(
            accelerator=accelerator,
            devices=devices,
            # DDP through re-launched processes, whose rank 0 is this process (it scores after predicting).
            strategy="auto" if single else "ddp",
            precision=args.precision,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            callbacks=[writer, RichProgressBar()] if progress else [writer],
        )
    except (MisconfigurationException, ImportError) as error:
        from updown.cli import available_devices

        flags = f"--device {args.device}" + (f" --devices {args.devices}" if args.devices is not None else "")
        raise ValueError(
            f"{flags}: {str(error).rstrip('.!')}. This machine has: {available_devices()}. Pick one of them "
            "(--device cpu)."
        ) from None


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (devices available, tips) and advice that does not apply here, silenced: the
    command reports what it wrote itself."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        # The number of DataLoader workers is --num-workers, the user's choice.
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def load_task(args: argparse.Namespace, task_class: type, fix: str):
    """The checkpoint dict and the ``task_class`` loaded from it (a damaged checkpoint, or one of another task,
    is refused naming the file)."""
    from updown.checkpointing import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint, "--checkpoint", task_class=task_class, fix=fix)
    try:
        task = task_class.load_from_checkpoint(args.checkpoint, map_location="cpu")
    except (RuntimeError, KeyError, TypeError, AttributeError, ValueError) as error:
        # Hyper-parameters or weights that do not build the task: a damaged or edited checkpoint.
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [
            type(error).__name__
        ]
        detail = lines[1] if isinstance(error, RuntimeError) and len(lines) > 1 else lines[0]
        if isinstance(error, ValueError) and str(args.checkpoint) in detail:
            raise
        raise ValueError(
            f"--checkpoint {args.checkpoint}: its hyper-parameters and weights do not build a "
            f"{task_class.checkpoint_kind} model ({detail}). The checkpoint is damaged or edited; use one written "
            "by python -m updown.fit."
        ) from None
    return checkpoint, task


def run_prediction(task, datamodule, args: argparse.Namespace, writer, what: tuple[str, str]) -> list | None:
    """``Trainer.predict`` of the task's ``predict_step`` over ``--split``, written by ``writer``. Returns the
    results on global rank 0, which reports the files written (``what``: results, attention), None elsewhere."""
    with quiet_lightning():
        trainer = build_trainer(args, writer)
        trainer.predict(task, datamodule=datamodule, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    results = writer.results
    print(f"{len(results)} {what[0]} of split '{args.split}' -> {args.output}", file=sys.stderr)
    if args.attention:
        print(f"{what[1]} -> {args.attention}", file=sys.stderr)
    return results


def predict_captions(args: argparse.Namespace) -> int:
    from updown.data.datamodules import CaptioningDataModule, datamodule_from_checkpoint
    from updown.prediction import CaptionWriter
    from updown.tasks.captioning import CaptioningTask

    checkpoint, task = load_task(
        args, CaptioningTask,
        "Pass the checkpoint of a captioning run (configs/captioning/...), or use `updown.predict vqa`.",
    )  # fmt: skip
    if args.beam_size is not None:
        task.decoding = task.decoding.replace(beam_size=args.beam_size)
    task.set_constraints(constraint_settings(task.constraints, args))
    datamodule = datamodule_from_checkpoint(
        CaptioningDataModule, checkpoint, features_h5path=args.features, captions_jsonpath=args.captions,
        vocabulary_path=args.vocabulary, test_split=args.split, eval_batch_size=args.batch_size,
        num_workers=args.num_workers,
    )  # fmt: skip
    check_checkpoint_data(task, datamodule, args.checkpoint)
    dataset = datamodule.dataset(args.split)

    def score(results: list[dict]) -> dict:
        from updown.metrics.coco_caption import MissingDependencyError, score_captions

        references = {image_id: refs for image_id, refs in zip(dataset.image_ids, dataset.references)}
        predictions = {r["image_id"]: r["caption"] for r in results}
        try:
            return score_captions(references, predictions, spice=args.spice)[0]
        except MissingDependencyError as error:  # Java or the SPICE jars: nothing is written either
            raise ValueError(f"--score: {error}") from None

    # The results, attention and scores files are moved into place together, once all are written.
    writer = CaptionWriter(
        args.output, task.vocabulary.tokens, attention=args.attention, force=args.force,
        score_path=args.score, score=score if args.score else None,
    )  # fmt: skip
    results = run_prediction(task, datamodule, args, writer, ("captions", "per-word attention"))
    if results is not None and args.score:
        print(json.dumps(writer.scores, indent=2))
    return 0


def constraint_settings(config, args: argparse.Namespace):
    """The checkpoint's constrained-beam-search settings with ``--constraints``, ``--detections``, ... applied."""
    changes = {
        "enabled": None if args.constraints is None else args.constraints == "on",
        "detections_jsonpath": args.detections,
        "class_hierarchy_jsonpath": args.class_hierarchy,
        "word_forms_tsvpath": args.word_forms,
        "max_constraints": args.max_constraints,
        "min_constraints_to_satisfy": args.min_constraints_to_satisfy,
    }
    return config.replace(**{key: value for key, value in changes.items() if value is not None})


def predict_vqa(args: argparse.Namespace) -> int:
    from updown.data.base import datamodule_from_checkpoint
    from updown.data.vqa_data import VQADataModule
    from updown.prediction import AnswerWriter
    from updown.tasks.vqa import VQATask

    checkpoint, task = load_task(
        args, VQATask, "Pass the checkpoint of a VQA run (configs/vqa/...), or use `updown.predict captions`."
    )
    datamodule = datamodule_from_checkpoint(
        VQADataModule, checkpoint, features_h5path=args.features, prepared_dir=args.prepared,
        test_split=args.split, eval_batch_size=args.batch_size, num_workers=args.num_workers,
    )  # fmt: skip
    check_checkpoint_data(task, datamodule, args.checkpoint)
    dataset = datamodule.dataset(args.split)
    annotations = datamodule.annotations_jsonpath(args.split) if args.score else None
    if args.score and annotations is None:
        raise ValueError(
            f"--score: split '{args.split}' has no annotations to score against; drop --score and submit "
            f"{args.output} to the evaluation server."
        )
    questions = {q.question_id: q.question for q in dataset.questions}

    def score(results: list[dict]) -> dict:
        from updown.io import read_json
        from updown.metrics.vqa_accuracy import evaluate_vqa

        official = read_json(datamodule.questions_jsonpath(args.split), "VQA questions JSON")
        return evaluate_vqa(
            official, read_json(annotations, "VQA annotations JSON"), results, task.hparams.normalization
        )

    # The results, attention and scores files are moved into place together, once all are written.
    writer = AnswerWriter(
        args.output, questions, attention=args.attention, force=args.force,
        score_path=args.score, score=score if args.score else None,
    )  # fmt: skip
    results = run_prediction(task, datamodule, args, writer, ("answers", "question attention"))
    if results is not None and args.score:
        scores = writer.scores
        print(json.dumps({"overall": scores["overall"], "perAnswerType": scores["perAnswerType"]}, indent=2))
    return 0


def devices_argument(text: str) -> str:
    """``--devices``: a count (``2``; ``-1``: all), ``auto``, or a list of device indices (``0,1``), as Lightning takes."""
    value = text.strip()
    if value in ("auto", "-1") or re.fullmatch(r"[1-9]\d*", value) or re.fullmatch(r"\d+(,\d+)*,?", value):
        return value
    raise argparse.ArgumentTypeError(f"expected a count of devices, 'auto' or a list like 0,1 (got {text!r})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    captions = subparsers.add_parser("captions", help="decode captions into the COCO results format")
    captions.add_argument("--checkpoint", required=True, help="a .ckpt written by updown.fit (XE or SCST)")
    captions.add_argument(
        "--split", default="test", help="split of the prepared captions to decode (default: test)"
    )
    captions.add_argument("--output", required=True, help='results JSON: [{"image_id": int, "caption": str}]')
    captions.add_argument("--attention", help="also save per-word attention to this HDF5 file")
    captions.add_argument(
        "--score", metavar="JSON", help="also score against the split's references, write scores here"
    )
    captions.add_argument("--spice", default="off", choices=("auto", "on", "off"), help="SPICE with --score")
    captions.add_argument(
        "--beam-size", type=argparse_type(PositiveInt), default=None,
        help="override the checkpoint's beam size (1 decodes greedily)",
    )  # fmt: skip
    captions.add_argument(
        "--features", nargs="+", help="region-feature HDF5 file(s) instead of the checkpoint's"
    )
    captions.add_argument("--captions", help="prepared captions.json instead of the checkpoint's")
    captions.add_argument("--vocabulary", help="vocabulary.json instead of the checkpoint's (must match it)")
    cbs = captions.add_argument_group(
        "constrained beam search (nocaps)",
        "objects detected in each image must be named (docs/novel_objects.md)",
    )
    cbs.add_argument(
        "--constraints", choices=("on", "off"),
        help="decode with constrained beam search from detections, or plain beam search (default: as the checkpoint)",
    )  # fmt: skip
    cbs.add_argument(
        "--detections",
        metavar="JSON",
        help="detections of the decoded images (nocaps *_oi_detector_boxes.json)",
    )
    cbs.add_argument(
        "--class-hierarchy",
        metavar="JSON",
        help="the detector's class hierarchy (nocaps class_hierarchy.json)",
    )
    cbs.add_argument(
        "--word-forms", metavar="TSV", help="forms of each constraint word (nocaps constraint_wordforms.tsv)"
    )
    cbs.add_argument(
        "--max-constraints",
        type=argparse_type(NonNegativeInt),
        help="top-k detected classes used (nocaps: 3)",
    )
    cbs.add_argument(
        "--min-constraints-to-satisfy",
        type=argparse_type(NonNegativeInt),
        help="constraints a caption must satisfy (nocaps: 2)",
    )
    captions.set_defaults(handler=predict_captions)
    vqa = subparsers.add_parser("vqa", help="answer questions into the official VQA results format")
    vqa.add_argument("--checkpoint", required=True, help="a .ckpt written by updown.fit with a VQA config")
    vqa.add_argument("--split", default="test", help="prepared split to answer (default: test)")
    vqa.add_argument("--output", required=True, help='results JSON: [{"question_id": int, "answer": str}]')
    vqa.add_argument("--attention", help="also save each question's attention over regions to this HDF5 file")
    vqa.add_argument(
        "--score", metavar="JSON", help="also score an annotated split, write the official scores here"
    )
    vqa.add_argument("--features", nargs="+", help="region-feature HDF5 file(s) instead of the checkpoint's")
    vqa.add_argument("--prepared", help="folder of tools/prepare_vqa.py instead of the checkpoint's")
    vqa.set_defaults(handler=predict_vqa)
    for sub in (captions, vqa):
        sub.add_argument("--batch-size", type=argparse_type(PositiveInt), default=50, help="images per batch")
        sub.add_argument(
            "--num-workers", type=argparse_type(NonNegativeInt), default=0, help="DataLoader workers"
        )
        sub.add_argument(
            "--device", default="cuda" if torch.cuda.is_available() else "cpu",
            help="cpu, cuda (or gpu), cuda:N for GPU N alone, or another Lightning accelerator (default: cuda if any)",
        )  # fmt: skip
        sub.add_argument(
            "--devices", type=devices_argument, help="devices of --device to use (default 1; N, 'auto', or a list like 0,1): more than one "
            "runs DDP, one process per device, and still writes one file",
        )  # fmt: skip
        sub.add_argument(
            "--precision", default="32-true", help="e.g. 32-true (default), bf16-mixed, 16-mixed"
        )
        sub.add_argument("--force", action="store_true", help="overwrite existing output files")
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse bad output paths before decoding (which can take an hour), not after."""
    check_output_paths(
        {"--output": args.output, "--attention": args.attention, "--score": args.score}, args.force
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        check_outputs(args)
        return args.handler(args)

    return run_guarded(PROG, run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
