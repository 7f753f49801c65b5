"""``python -m updown.predict``: decode a split with a checkpoint into the community's results formats.

    python -m updown.predict captions --checkpoint runs/.../best.ckpt --split test --output captions_test.json \\
        [--attention attention_test.h5] [--score scores.json]

writes the COCO results JSON ``[{"image_id": int, "caption": str}]`` that the evaluation server and
``python -m updown.evaluate captions`` read. The data default to those the checkpoint was trained on (its saved
datamodule arguments); ``--features``, ``--captions`` and ``--vocabulary`` point elsewhere (e.g. the test images'
features). ``--attention`` saves per-word attention as HDF5 (read by ``updown.visualize``):

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
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from updown.cli import run_guarded
from updown.io import atomic_output, check_output_paths, write_json

PROG = "python -m updown.predict"


def load_checkpoint(path: str) -> dict:
    """The raw checkpoint dict, with a clear error for a missing or unreadable file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found. Check the path.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint ({error}). Use a .ckpt written by updown.fit."
        ) from None


def caption_datamodule(checkpoint: dict, args: argparse.Namespace):
    """The checkpoint's caption datamodule, with paths overridden from the command line."""
    from updown.data.datamodules import CaptioningDataModule, datamodule_from_checkpoint

    return datamodule_from_checkpoint(
        CaptioningDataModule, checkpoint, features_h5path=args.features, captions_jsonpath=args.captions,
        vocabulary_path=args.vocabulary, eval_batch_size=args.batch_size, num_workers=args.num_workers,
    )  # fmt: skip


def predict_captions(args: argparse.Namespace) -> int:
    from rich.progress import track
    from torch.utils.data import DataLoader

    from updown.tasks.captioning import CaptioningTask
    from updown.tasks.vocabulary_model import check_vocabulary

    checkpoint = load_checkpoint(args.checkpoint)
    if "vocabulary" not in checkpoint:
        raise ValueError(
            f"{args.checkpoint}: not a captioning checkpoint (no vocabulary stored). "
            "Pass the checkpoint of a captioning run (configs/captioning/...), or use `updown.predict vqa`."
        )
    task = CaptioningTask.load_from_checkpoint(args.checkpoint, map_location="cpu")
    task.eval().to(args.device)
    datamodule = caption_datamodule(checkpoint, args)
    check_vocabulary(task.vocabulary, datamodule.vocabulary, args.checkpoint, str(datamodule.vocabulary_path))
    datamodule.setup("predict")
    dataset = datamodule.evaluation_dataset(args.split)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=dataset.collate
    )
    results, rows = [], []
    with torch.no_grad():
        for batch in track(loader, description=f"Decoding {args.split}", transient=True):
            features = batch["image_features"].to(args.device)
            mask = batch["image_features_mask"].to(args.device)
            output = task.decode(
                {"image_features": features, "image_features_mask": mask}, beam_size=args.beam_size
            )
            captions = task.captions_of(output.tokens)
            for row, image_id in enumerate(batch["image_id"].tolist()):
                results.append({"image_id": image_id, "caption": captions[row]})
            if args.attention:
                rows.append((batch, output, captions))
    write_json(args.output, results, force=args.force)
    print(f"{len(results)} captions of split '{args.split}' -> {args.output}", file=sys.stderr)
    if args.attention:
        write_caption_attention(args.attention, rows, task.vocabulary.tokens, force=args.force)
        print(f"per-word attention -> {args.attention}", file=sys.stderr)
    if args.score:
        from updown.metrics.coco_caption import score_captions

        references = {image_id: refs for image_id, refs in zip(dataset.image_ids, dataset.references)}
        scores, _ = score_captions(
            references, {r["image_id"]: r["caption"] for r in results}, spice=args.spice
        )
        write_json(args.score, scores, force=args.force, indent=2)
        print(json.dumps(scores, indent=2))
    return 0


def write_caption_attention(path: str, rows: list, vocabulary_tokens: list[str], force: bool = True) -> None:
    """Per-word attention of decoded captions as HDF5 (layout in the module docstring), atomically."""
    import h5py

    max_boxes = max(batch["image_features_mask"].size(1) for batch, _, _ in rows)
    max_length = max(output.tokens.size(1) for _, output, _ in rows)
    total = sum(output.tokens.size(0) for _, output, _ in rows)
    with atomic_output(path, force=force) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["vocabulary"] = json.dumps(vocabulary_tokens)
        image_id = f.create_dataset("image_id", (total,), "int64")
        tokens = f.create_dataset("tokens", (total, max_length), "int64")
        lengths = f.create_dataset("lengths", (total,), "int64")
        attention = f.create_dataset("attention", (total, max_length, max_boxes), "float32")
        num_boxes = f.create_dataset("num_boxes", (total,), "int32")
        boxes = f.create_dataset("boxes", (total, max_boxes, 4), "float32")
        captions = f.create_dataset("captions", (total,), h5py.string_dtype())
        start = 0
        for batch, output, batch_captions in rows:
            n, t, r = output.tokens.size(0), output.tokens.size(1), batch["image_features_mask"].size(1)
            end = start + n
            image_id[start:end] = batch["image_id"].numpy()
            tokens[start:end, :t] = output.tokens.cpu().numpy()
            lengths[start:end] = output.lengths.cpu().numpy()
            if output.attention is not None:
                attention[start:end, :t, :r] = output.attention.float().cpu().numpy()
            num_boxes[start:end] = batch["image_features_mask"].sum(dim=1).numpy()
            boxes[start:end, :r] = batch["image_boxes"].numpy()
            captions[start:end] = np.array(batch_captions, dtype=object)
            start = end


def predict_vqa(args: argparse.Namespace) -> int:
    from rich.progress import track
    from torch.utils.data import DataLoader

    from updown.data.datamodules import datamodule_from_checkpoint
    from updown.data.vqa_data import VQADataModule
    from updown.tasks.vqa import VQATask

    checkpoint = load_checkpoint(args.checkpoint)
    if "answer_vocabulary" not in checkpoint and "question_vocabulary" not in checkpoint:
        raise ValueError(
            f"{args.checkpoint}: not a VQA checkpoint (no vocabularies stored). "
            "Pass the checkpoint of a VQA run (configs/vqa/...), or use `updown.predict captions`."
        )
    task = VQATask.load_from_checkpoint(args.checkpoint, map_location="cpu")
    task.eval().to(args.device)
    datamodule = datamodule_from_checkpoint(
        VQADataModule, checkpoint, features_h5path=args.features, prepared_dir=args.prepared,
        eval_batch_size=args.batch_size, num_workers=args.num_workers,
    )  # fmt: skip
    data = f"the data ({datamodule.prepared_dir})"
    try:
        task.check_vocabularies(datamodule.question_vocabulary, datamodule.answer_vocabulary, data)
    except ValueError as error:
        # The task calls itself "the model"; the user needs to know which file that is.
        raise ValueError(f"{args.checkpoint}: {error}") from None
    dataset = datamodule.dataset(args.split)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=dataset.collate
    )
    results, rows = [], []
    with torch.no_grad():
        for batch in track(loader, description=f"Answering {args.split}", transient=True):
            inputs = {
                key: batch[key].to(args.device)
                for key in ("image_features", "image_features_mask", "question_tokens", "question_lengths")
            }
            output = task.model(**inputs)
            answers = task.answers_of(output["logits"])
            results.extend(
                {"question_id": q, "answer": a} for q, a in zip(batch["question_id"].tolist(), answers)
            )
            if args.attention:
                rows.append((batch, output["attention"].float().cpu(), answers))
    write_json(args.output, results, force=args.force)
    print(f"{len(results)} answers of split '{args.split}' -> {args.output}", file=sys.stderr)
    if args.attention:
        questions = [q.question for q in dataset.questions]
        write_question_attention(args.attention, rows, questions, force=args.force)
        print(f"question attention -> {args.attention}", file=sys.stderr)
    if args.score:
        from updown.io import read_json
        from updown.metrics.vqa_accuracy import evaluate_vqa

        annotations = datamodule.annotations_jsonpath(args.split)
        if annotations is None:
            raise ValueError(
                f"--score: split '{args.split}' has no annotations; submit {args.output} to the server."
            )
        questions = read_json(datamodule.questions_jsonpath(args.split), "VQA questions JSON")
        scores = evaluate_vqa(
            questions, read_json(annotations, "VQA annotations JSON"), results, task.hparams.normalization
        )
        write_json(args.score, scores, force=args.force, indent=2)
        print(json.dumps({"overall": scores["overall"], "perAnswerType": scores["perAnswerType"]}, indent=2))
    return 0


def write_question_attention(path: str, rows: list, questions: list[str], force: bool = True) -> None:
    """Per-question attention as HDF5 (layout in the module docstring), atomically."""
    import h5py

    max_boxes = max(batch["image_features_mask"].size(1) for batch, _, _ in rows)
    total = sum(len(answers) for _, _, answers in rows)
    with atomic_output(path, force=force) as tmp, h5py.File(tmp, "w") as f:
        datasets = {
            "question_id": f.create_dataset("question_id", (total,), "int64"),
            "image_id": f.create_dataset("image_id", (total,), "int64"),
            "attention": f.create_dataset("attention", (total, max_boxes), "float32"),
            "num_boxes": f.create_dataset("num_boxes", (total,), "int32"),
            "boxes": f.create_dataset("boxes", (total, max_boxes, 4), "float32"),
        }
        answers_ds = f.create_dataset("answers", (total,), h5py.string_dtype())
        questions_ds = f.create_dataset("questions", (total,), h5py.string_dtype())
        start = 0
        for batch, attention, answers in rows:
            end, r = start + len(answers), attention.size(1)
            datasets["question_id"][start:end] = batch["question_id"].numpy()
            datasets["image_id"][start:end] = batch["image_id"].numpy()
            datasets["attention"][start:end, :r] = attention.numpy()
            datasets["num_boxes"][start:end] = batch["image_features_mask"].sum(dim=1).numpy()
            datasets["boxes"][start:end, :r] = batch["image_boxes"].numpy()
            answers_ds[start:end] = np.array(answers, dtype=object)
            questions_ds[start:end] = np.array(questions[start:end], dtype=object)
            start = end


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
    captions.add_argument("--beam-size", type=int, default=None, help="override the checkpoint's beam size")
    captions.add_argument(
        "--features", nargs="+", help="region-feature HDF5 file(s) instead of the checkpoint's"
    )
    captions.add_argument("--captions", help="prepared captions.json instead of the checkpoint's")
    captions.add_argument("--vocabulary", help="vocabulary.json instead of the checkpoint's (must match it)")
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
        sub.add_argument("--batch-size", type=int, default=50, help="images per batch")
        sub.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
