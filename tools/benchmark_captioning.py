"""Throughput of the UpDown captioner at the paper's sizes: XE training captions/s and beam-search images/s.

Random weights and features (36 boxes of 2048-d, vocabulary 10,010, hidden 1000) stand in for a real
run; an untrained model rarely emits <eos>, so decoding runs the full ``--max-length`` steps, the worst
case. Example::

    python tools/benchmark_captioning.py --device cpu --iterations 2
    python tools/benchmark_captioning.py --device cuda --iterations 20
    python tools/benchmark_captioning.py --device cuda --iterations 20 --precision bf16

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from updown.decoding import beam_search
from updown.losses import sequence_cross_entropy
from updown.models.captioner import UpDownCaptioner


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--images", type=int, default=50, help="images per training or decoding batch")
    parser.add_argument(
        "--captions-per-image", type=int, default=5, help="captions per image (image_index path)"
    )
    parser.add_argument("--max-length", type=int, default=20, help="decoder steps (training and decoding)")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--boxes", type=int, default=36, help="regions per image")
    parser.add_argument("--feature-size", type=int, default=2048)
    parser.add_argument("--vocabulary-size", type=int, default=10010)
    parser.add_argument("--hidden-size", type=int, default=1000, help="LSTM size and word embedding size")
    parser.add_argument("--attention-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision",
        choices=("32", "bf16"),
        default="32",
        help="32: float32; bf16: bfloat16 autocast, as Lightning's precision='bf16-mixed'",
    )
    parsed = parser.parse_args(args)
    for name in ("iterations", "images", "captions_per_image", "max_length", "beam_size", "boxes"):
        if getattr(parsed, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(parsed, name)}")
    if parsed.warmup < 0:
        parser.error(f"--warmup must be non-negative, got {parsed.warmup}")
    return parsed


def seconds_per_iteration(
    function: Callable[[], object], device: torch.device, iterations: int, warmup: int
) -> float:
    """Mean wall-clock seconds of ``function`` after ``warmup`` untimed calls (CUDA synchronised)."""
    for _ in range(warmup):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iterations


def main(args: list[str] | None = None) -> list[dict[str, str]]:
    options = parse_args(args)
    device = torch.device(options.device)
    torch.manual_seed(options.seed)
    model = UpDownCaptioner(
        options.vocabulary_size,
        image_feature_size=options.feature_size,
        embedding_size=options.hidden_size,
        hidden_size=options.hidden_size,
        attention_size=options.attention_size,
        max_caption_length=options.max_length,
    ).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    # shape: (images, boxes, feature_size)
    features = torch.rand(options.images, options.boxes, options.feature_size, device=device)
    mask = torch.ones(options.images, options.boxes, dtype=torch.bool, device=device)
    num_captions = options.images * options.captions_per_image
    image_index = torch.arange(options.images, device=device).repeat_interleave(options.captions_per_image)
    # <bos>, max_length words without <pad>: every caption runs every step.
    # shape: (num_captions, max_length + 1)
    tokens = torch.randint(4, options.vocabulary_size, (num_captions, options.max_length + 1), device=device)
    tokens[:, 0] = model.bos_index

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.precision == "bf16")

    def train_step() -> None:
        model.train()
        with autocast():
            logits = model(features, mask, tokens, image_index=image_index)["logits"]
            loss = sequence_cross_entropy(logits, tokens[:, 1:], pad_index=model.pad_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    lengths: list[float] = []

    def decode() -> None:
        model.eval()
        with torch.no_grad(), autocast():
            state = model.init_state(features, mask)
            output = beam_search(
                model.step, state, beam_size=options.beam_size, max_length=options.max_length
            )
        lengths.append(float(output.lengths.float().mean()))

    train_seconds = seconds_per_iteration(train_step, device, options.iterations, options.warmup)
    decode_seconds = seconds_per_iteration(decode, device, options.iterations, options.warmup)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    rows = [
        {
            "measurement": "XE train step (fwd+bwd+SGD)",
            "batch": f"{options.images} images x {options.captions_per_image} captions, {options.max_length} steps",
            "seconds/iteration": f"{train_seconds:.3f}",
            "throughput": f"{num_captions / train_seconds:.1f} captions/s",
        },
        {
            "measurement": f"beam search (beam {options.beam_size})",
            "batch": f"{options.images} images, mean length {sum(lengths) / len(lengths):.1f}",
            "seconds/iteration": f"{decode_seconds:.3f}",
            "throughput": f"{options.images / decode_seconds:.1f} images/s",
        },
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"UpDownCaptioner D={options.feature_size}, R={options.boxes}, V={options.vocabulary_size}, "
        f"H=E={options.hidden_size}, A={options.attention_size}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters on {name}{threads}, precision {options.precision}, torch {torch.__version__}\n"
    )
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(row[column] for column in columns) + " |")
    return rows


if __name__ == "__main__":
    main()
