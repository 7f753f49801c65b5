"""Training throughput of UpDownVQA at the paper's sizes: questions per second, printed as a markdown table.

One step = forward, soft-score binary cross-entropy, backward, gradient clipping at 0.25 and an Adamax
step, exactly the loop of hengyuan-hu/bottom-up-attention-vqa (whose default hidden size, 1024, is this
tool's default; the paper's is 512). The batch is random and lives on the device before timing starts,
so the numbers are the model's compute alone, without data loading.

Usage, from the repository root::

    python -m tools.benchmark_vqa                                  # CPU, product fusion
    python -m tools.benchmark_vqa --device cpu cuda --fusion product cross_attention --iterations 20
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from updown.models.vqa import FUSIONS, UpDownVQA


def make_batch(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """Random inputs with the shapes and value ranges of real VQA v2 batches."""
    generator = torch.Generator().manual_seed(0)
    batch_size, boxes, length = args.batch_size, args.num_boxes, args.max_question_length
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(
    args: argparse.Namespace, device: torch.device, fusion: str, precision: str = "32"
) -> dict[str, float]:
    """Time ``args.iterations`` training steps after ``args.warmup`` untimed ones.

    ``precision`` "bf16" runs the forward pass and loss under bfloat16 autocast (Lightning's "bf16-mixed").
    """
    torch.manual_seed(0)
    model = UpDownVQA(
        args.vocabulary_size,
        args.num_answers,
        image_feature_size=args.image_feature_size,
        hidden_size=args.hidden_size,
        fusion=fusion,
    ).to(device)
    model.train()
    optimizer = torch.optim.Adamax(model.parameters())
    batch = make_batch(args, device)
    targets = batch.pop("answer_scores")

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(**batch)["logits"]
            # Soft-score BCE as the reproduction's instance_bce_with_logits: mean over all entries times A.
            loss = (
                F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="mean")
                * targets.shape[1]
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.iterations):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "parameters": sum(p.numel() for p in model.parameters()) / 1e6,
        "ms_per_step": 1000 * elapsed / args.iterations,
        "questions_per_second": args.batch_size * args.iterations / elapsed,
        "peak_gib": peak,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", nargs="+", default=["cpu"], help="devices to time, e.g. cpu cuda cuda:1")
    parser.add_argument("--fusion", nargs="+", default=["product"], choices=FUSIONS, help="fusions to time")
    parser.add_argument(
        "--precision", nargs="+", default=["32"], choices=("32", "bf16"), help="float32 and/or bf16 autocast"
    )
    parser.add_argument("--batch-size", type=int, default=512, help="questions per step (reproduction: 512)")
    parser.add_argument("--num-boxes", type=int, default=36, help="regions per image (fixed-36 features)")
    parser.add_argument("--image-feature-size", type=int, default=2048, help="region feature size D")
    parser.add_argument("--num-answers", type=int, default=3129, help="answer vocabulary (VQA v2: 3129)")
    parser.add_argument("--vocabulary-size", type=int, default=20000, help="question vocabulary (~20k)")
    parser.add_argument("--max-question-length", type=int, default=14, help="padded question length")
    parser.add_argument("--hidden-size", type=int, default=1024, help="reproduction: 1024; paper: 512")
    parser.add_argument("--iterations", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, cuDNN)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "num_boxes", "image_feature_size", "num_answers", "hidden_size", "iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.vocabulary_size < 2 or args.max_question_length < 4 or args.warmup < 0:
        parser.error("--vocabulary-size must be >= 2, --max-question-length >= 4 and --warmup >= 0.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    devices = [torch.device(name) for name in args.device]
    for device in devices:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(
                f"--device {device}: CUDA is not available here (torch {torch.__version__}); drop it."
            )
    print(
        f"UpDownVQA training step: batch {args.batch_size}, {args.num_boxes} boxes x {args.image_feature_size}, "
        f"{args.num_answers} answers, vocabulary {args.vocabulary_size}, hidden {args.hidden_size}, "
        f"{args.iterations} timed steps after {args.warmup} warm-up; torch {torch.__version__}\n"
    )
    print(
        "| device | fusion | precision | parameters (M) | ms / step | questions / s | peak GPU memory (GiB) |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for device in devices:
        for fusion in args.fusion:
            for precision in args.precision:
                result = benchmark(args, device, fusion, precision)
                peak = "-" if device.type != "cuda" else f"{result['peak_gib']:.2f}"
                print(
                    f"| {device_name(device)} | {fusion} | {precision} | {result['parameters']:.2f} "
                    f"| {result['ms_per_step']:.1f} | {result['questions_per_second']:.0f} | {peak} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
