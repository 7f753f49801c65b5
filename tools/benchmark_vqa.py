"""Training throughput of UpDownVQA, optionally against hengyuan-hu/bottom-up-attention-vqa on the same batch.

One step = forward, soft-score binary cross-entropy, backward, gradient clipping at 0.25 and an Adamax step,
exactly the loop of hengyuan-hu/bottom-up-attention-vqa's train.py. The batch is random, shaped like VQA v2
(36 x 2048 region features, 14-token questions of 4..14 real tokens, 3129 answers, soft scores), and lives on
the device before timing starts, so the numbers are the model's compute alone, without data loading.

Models (``--model``): ``reproduction`` is hengyuan-hu's architecture as configs/vqa/updown.yaml builds it
(ReLU layers, product attention, weight norm, dropout 0.2 / 0.5); ``paper`` is the paper's (gated tanh,
attention on the concatenation [v_i; q], configs/vqa/teney.yaml). Each runs at every ``--hidden-size``
(hengyuan-hu: 1024; paper: 512), ``--batch-size`` and ``--precision`` given.

With ``--reference DIR`` (a checkout of hengyuan-hu/bottom-up-attention-vqa; only attention.py, base_model.py,
classifier.py, fc.py and language_model.py are read) its ``build_baseline0_newatt`` model is timed on the same
batch (its own padding convention: left-padded, pad index = vocabulary size) at each hidden size, batch size and
precision of the ``reproduction`` rows, in alternating rounds, and the ratio of median step times is printed.
Its classifier's in-place dropout is switched to out-of-place: modern autograd refuses an in-place op on the
ReLU output it saved for the backward pass (PyTorch 0.3, which it was written for, allowed it).

Usage, from the repository root::

    python tools/benchmark_vqa.py                                   # ours, CPU, float32
    python tools/benchmark_vqa.py --threads 2 --precision 32 bf16 --reference ../bottom-up-attention-vqa
    python tools/benchmark_vqa.py --device cuda --batch-size 512 2048 --precision 32 bf16 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updown.models.vqa import UpDownVQA, VQAConfig  # noqa: E402

MODELS = {
    # configs/vqa/updown.yaml (hidden size set per row)
    "reproduction": VQAConfig(attention="product", activation="relu"),
    # configs/vqa/teney.yaml
    "paper": VQAConfig(attention="concat", activation="gated_tanh"),
}
REFERENCE_FILES = ("attention.py", "base_model.py", "classifier.py", "fc.py", "language_model.py")


def make_batch(args: argparse.Namespace, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random inputs with the shapes and value ranges of real VQA v2 batches (right-padded questions)."""
    generator = torch.Generator().manual_seed(0)
    boxes, length = args.num_boxes, args.max_question_length
    lengths = torch.randint(4, length + 1, (batch_size,), generator=generator)
    tokens = torch.randint(1, args.vocabulary_size, (batch_size, length), generator=generator)
    tokens[torch.arange(length) >= lengths[:, None]] = 0
    # Soft scores as the VQA targets hold them: a few answers per question, scores in {0.3, 0.6, 0.9, 1}.
    answer_scores = torch.zeros(batch_size, args.num_answers)
    answers = torch.randint(0, args.num_answers, (batch_size, 3), generator=generator)
    scores = torch.tensor([0.3, 0.6, 0.9, 1.0])[torch.randint(0, 4, (batch_size, 3), generator=generator)]
    answer_scores.scatter_(1, answers, scores)
    batch = {
        # Pooled Faster R-CNN features are non-negative (post-ReLU).
        "image_features": torch.rand(batch_size, boxes, args.image_feature_size, generator=generator),
        "image_features_mask": torch.ones(batch_size, boxes, dtype=torch.bool),
        "question_tokens": tokens,
        "question_lengths": lengths,
        "answer_scores": answer_scores,
    }
    return {key: value.to(device) for key, value in batch.items()}


def left_padded(tokens: torch.Tensor, lengths: torch.Tensor, pad_index: int) -> torch.Tensor:
    """The reference's question layout: real tokens at the end, ``pad_index`` before them (its dataset.py)."""
    batch_size, length = tokens.shape
    # Position j of the left-padded row holds token j - (length - lengths) of the right-padded one.
    source = torch.arange(length, device=tokens.device)[None, :] - (length - lengths)[:, None]
    shifted = tokens.gather(1, source.clamp(min=0))
    return shifted.masked_fill(source < 0, pad_index)


def load_reference(directory: Path) -> Callable[..., nn.Module]:
    """``build_baseline0_newatt`` from a checkout of hengyuan-hu/bottom-up-attention-vqa."""
    missing = [name for name in REFERENCE_FILES if not (directory / name).is_file()]
    if missing:
        raise SystemExit(
            f"--reference {directory}: {', '.join(missing)} not found; pass the root of a checkout of "
            "hengyuan-hu/bottom-up-attention-vqa (the folder holding base_model.py)."
        )
    sys.path.insert(0, str(directory))
    try:
        with warnings.catch_warnings():
            # torch.nn.utils.weight_norm and torch.autograd.Variable are deprecated but still work.
            warnings.simplefilter("ignore")
            return importlib.import_module("base_model").build_baseline0_newatt
    except SyntaxError as error:
        raise SystemExit(
            f"--reference {directory}: {error.filename} line {error.lineno} is not Python 3 ({error.msg}); its "
            "Python 2 `print x` statements must become `print(x)` calls."
        ) from error


def build_reference(build: Callable[..., nn.Module], args: argparse.Namespace, hidden_size: int) -> nn.Module:
    dataset = argparse.Namespace(
        dictionary=argparse.Namespace(ntoken=args.vocabulary_size),
        v_dim=args.image_feature_size,
        num_ans_candidates=args.num_answers,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(dataset, hidden_size)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.inplace = False
    return model


class Runner:
    """One model, its Adamax optimiser and its training step on a fixed batch."""

    def __init__(
        self, name: str, model: nn.Module, forward: Callable[[], torch.Tensor], targets: torch.Tensor
    ):
        self.name = name
        self.model = model
        self.forward = forward
        self.targets = targets
        self.optimizer = torch.optim.Adamax(model.parameters())
        self.times: list[float] = []  # wall-clock seconds per step
        self.cpu_times: list[float] = []  # this process's CPU seconds per step

    def step(self, precision: str, device: torch.device) -> None:
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            logits = self.forward()
            # The reproduction's instance_bce_with_logits: mean over all entries times the number of answers.
            loss = F.binary_cross_entropy_with_logits(logits.float(), self.targets) * self.targets.shape[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.25)
        self.optimizer.step()
        self.optimizer.zero_grad()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runners(
    runners: list[Runner], args: argparse.Namespace, precision: str, device: torch.device
) -> None:
    """Warm every runner up, then alternate rounds of ``args.steps`` steps; one time per step in ``times``.

    On a CPU shared with other jobs the wall time of a step varies with their load; the process's CPU time
    (``cpu_times``) much less so, and with one thread it equals the wall time of an idle machine.
    """
    for runner in runners:
        for _ in range(args.warmup):
            runner.step(precision, device)
    for _ in range(args.rounds):
        for runner in runners:
            for _ in range(args.steps):
                synchronize(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                runner.step(precision, device)
                synchronize(device)
                runner.times.append(time.perf_counter() - start)
                runner.cpu_times.append(time.process_time() - cpu_start)


def benchmark_row(
    args: argparse.Namespace,
    device: torch.device,
    model_name: str,
    hidden_size: int,
    batch_size: int,
    precision: str,
    reference: Callable[..., nn.Module] | None,
) -> list[str]:
    """Markdown table rows: ours and, when given, the reference, on the same batch."""
    batch = make_batch(args, batch_size, device)
    targets = batch.pop("answer_scores")
    torch.manual_seed(0)
    config = MODELS[model_name].replace(hidden_size=hidden_size)
    ours = (
        UpDownVQA(args.vocabulary_size, args.num_answers, args.image_feature_size, config).to(device).train()
    )
    forward = torch.compile(ours) if args.compile else ours
    runners = [Runner("updown", ours, lambda: forward(**batch)["logits"], targets)]
    if reference is not None and model_name == "reproduction":
        theirs = build_reference(reference, args, hidden_size).to(device).train()
        questions = left_padded(batch["question_tokens"], batch["question_lengths"], args.vocabulary_size)
        features = batch["image_features"]
        runners.append(
            Runner("hengyuan-hu", theirs, lambda: theirs(features, None, questions, None), targets)
        )
    time_runners(runners, args, precision, device)
    medians = [statistics.median(runner.times) for runner in runners]
    cpu_medians = [statistics.median(runner.cpu_times) for runner in runners]
    rows = []
    for runner, median, cpu_median in zip(runners, medians, cpu_medians):
        ratio = f"{medians[-1] / median:.2f}" if len(runners) > 1 else "-"
        cpu_ratio = (
            f"{cpu_medians[-1] / cpu_median:.2f}" if len(runners) > 1 and device.type == "cpu" else "-"
        )
        cpu = f"{1000 * cpu_median:.0f}" if device.type == "cpu" else "-"
        spread = f"{1000 * min(runner.times):.0f}–{1000 * max(runner.times):.0f}"
        parameters = sum(p.numel() for p in runner.model.parameters()) / 1e6
        compiled = " (compiled)" if args.compile and runner.name == "updown" else ""
        rows.append(
            f"| {runner.name}{compiled} | {model_name} | {hidden_size} | {batch_size} | {precision} | {parameters:.2f} "
            f"| {1000 * median:.0f} | {spread} | {cpu} | {batch_size / median:.0f} | {ratio} | {cpu_ratio} |"
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="device to time: cpu, cuda, cuda:1")
    parser.add_argument("--threads", type=int, help="intra-op CPU threads for both models (default: torch's)")
    parser.add_argument(
        "--model", nargs="+", default=["reproduction"], choices=tuple(MODELS), help="our models"
    )
    parser.add_argument(
        "--hidden-size", nargs="+", type=int, default=[1024, 512], help="hengyuan-hu 1024, paper 512"
    )
    parser.add_argument("--batch-size", nargs="+", type=int, default=[512], help="questions per step (512)")
    parser.add_argument(
        "--precision", nargs="+", default=["32"], choices=("32", "bf16"), help="bf16: autocast"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (not the reference)")
    parser.add_argument("--reference", type=Path, help="checkout of hengyuan-hu/bottom-up-attention-vqa")
    parser.add_argument("--num-boxes", type=int, default=36, help="regions per image (fixed-36 features)")
    parser.add_argument("--image-feature-size", type=int, default=2048, help="region feature size D")
    parser.add_argument("--num-answers", type=int, default=3129, help="answer vocabulary (VQA v2: 3129)")
    parser.add_argument("--vocabulary-size", type=int, default=20000, help="question vocabulary (~20k)")
    parser.add_argument("--max-question-length", type=int, default=14, help="padded question length")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians over all steps)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per model and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    args = parser.parse_args(argv)
    for name in ("num_boxes", "image_feature_size", "num_answers", "rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    for name in ("hidden_size", "batch_size"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name.replace('_', '-')} values must be >= 1, got {getattr(args, name)}.")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}.")
    if args.vocabulary_size < 2 or args.max_question_length < 4 or args.warmup < 0:
        parser.error("--vocabulary-size must be >= 2, --max-question-length >= 4 and --warmup >= 0.")
    if args.reference is not None and "reproduction" not in args.model:
        parser.error("--reference compares with the reproduction model: add `reproduction` to --model.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {device}: CUDA is not available here (torch {torch.__version__}); use cpu."
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reference = load_reference(args.reference) if args.reference is not None else None
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    load = " / ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"VQA training step on {where}: {args.num_boxes} boxes x {args.image_feature_size}, {args.num_answers} "
        f"answers, vocabulary {args.vocabulary_size}, questions of 4..{args.max_question_length} tokens; "
        f"{args.rounds} rounds x {args.steps} step(s) after {args.warmup} warm-up; torch {torch.__version__}; "
        f"load average {load}\n"
    )
    print(
        "| model | architecture | hidden | batch | precision | parameters (M) | median ms / step | range (ms) "
        "| median CPU ms / step | questions / s | speed-up over hengyuan-hu | speed-up in CPU time |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for model_name in args.model:
        for hidden_size in args.hidden_size:
            for batch_size in args.batch_size:
                for precision in args.precision:
                    for row in benchmark_row(
                        args, device, model_name, hidden_size, batch_size, precision, reference
                    ):
                        print(row, flush=True)
    print(f"\nload average after: {' / '.join(f'{value:.2f}' for value in os.getloadavg())}")


if __name__ == "__main__":
    main()
