"""Check that the models compute the same thing on an accelerator as on the CPU.

For the captioner and the VQA model (small sizes, fixed seed, float32 with TF32 off) it compares, CPU against
``--device``: teacher-forced logits, VQA logits and attention, the exact zero on padded boxes, and beam-search
tokens. Prints one line per check and exits 1 if any fails. Example::

    python tools/check_device.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from updown.decoding import beam_search
from updown.models.captioner import UpDownCaptioner
from updown.models.vqa import UpDownVQA


def _inputs(seed: int, images: int, boxes: int, feature_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random non-negative features ``(images, boxes, D)`` and a mask with a different box count per image."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(images, boxes, feature_size, generator=generator)
    counts = torch.randint(1, boxes + 1, (images,), generator=generator)
    counts[0] = boxes
    mask = torch.arange(boxes)[None, :] < counts[:, None]
    # Garbage in padded rows: it must not reach any output on any device.
    features[~mask] = 1e4
    return features, mask


def check_captioner(device: torch.device, tolerance: float) -> list[tuple[str, bool, str]]:
    torch.manual_seed(0)
    model = UpDownCaptioner(
        500, image_feature_size=256, embedding_size=128, hidden_size=128, attention_size=64
    )
    with torch.no_grad():
        # Peaked word distributions, as in a trained model: random weights give near-ties between words
        # that a 1e-7 difference in arithmetic may break either way.
        model.output.weight.mul_(30.0)
    model.eval()
    features, mask = _inputs(1, 6, 20, 256)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(4, 500, (6, 12), generator=generator)
    tokens[:, 0] = model.bos_index
    results = []
    with torch.no_grad():
        cpu = model(features, mask, tokens)
        other_model = model.to(device)
        other = other_model(features.to(device), mask.to(device), tokens.to(device))
        difference = float((cpu["logits"] - other["logits"].cpu()).abs().max())
        results.append(("captioner logits", difference <= tolerance, f"max |diff| {difference:.2e}"))
        padded = other["attention"].cpu()[~mask[:, None, :].expand_as(other["attention"])]
        results.append(
            (
                "captioner attention on padded boxes",
                bool((padded == 0).all()),
                f"max {float(padded.abs().max()):.1e}",
            )
        )
        decoded = []
        # Two separate copies: .to() moves a module in place.
        for current, feats, m in (
            (copy.deepcopy(model).cpu(), features, mask),
            (copy.deepcopy(model).to(device), features.to(device), mask.to(device)),
        ):
            output = beam_search(current.step, current.init_state(feats, m), beam_size=3, max_length=12)
            decoded.append(output)
        cpu_out, other_out = decoded[0], decoded[1]
        rows = (cpu_out.tokens != other_out.tokens.cpu()).any(dim=1)
        score_difference = float((cpu_out.scores - other_out.scores.cpu()).abs().max())
        results.append(
            (
                "captioner beam-search tokens",
                not bool(rows.any()),
                f"{int(rows.sum())} of {rows.numel()} rows differ; max |score diff| {score_difference:.2e}",
            )
        )
    return results


def check_vqa(device: torch.device, tolerance: float) -> list[tuple[str, bool, str]]:
    results = []
    for fusion in ("product", "cross_attention"):
        torch.manual_seed(0)
        model = UpDownVQA(300, 50, image_feature_size=256, embedding_size=64, hidden_size=128, fusion=fusion)
        model.eval()
        features, mask = _inputs(3, 8, 20, 256)
        generator = torch.Generator().manual_seed(4)
        tokens = torch.randint(1, 300, (8, 10), generator=generator)
        lengths = torch.randint(1, 11, (8,), generator=generator)
        with torch.no_grad():
            cpu = model(features, mask, tokens, lengths)
            other = model.to(device)(
                features.to(device), mask.to(device), tokens.to(device), lengths.to(device)
            )
        difference = float((cpu["logits"] - other["logits"].cpu()).abs().max())
        results.append((f"vqa[{fusion}] logits", difference <= tolerance, f"max |diff| {difference:.2e}"))
        attention = other["attention"].cpu()
        padded = attention[~mask.expand_as(attention)] if attention.dim() == 2 else attention[..., ~mask]
        results.append(
            (
                f"vqa[{fusion}] attention on padded boxes",
                bool((padded == 0).all()),
                f"max {float(padded.abs().max()):.1e}",
            )
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="device to compare with the CPU (default cuda)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |logit difference|")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {device}: CUDA is not available (torch {torch.__version__}).", file=sys.stderr)
        return 2
    # TF32 would trade exactness for speed; the comparison is about the code, not the number format.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = check_captioner(device, args.tolerance) + check_vqa(device, args.tolerance)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"CPU against {name}, torch {torch.__version__}")
    for check, passed, detail in results:
        print(f"{'PASS' if passed else 'FAIL'}  {check}: {detail}")
    return 0 if all(passed for _, passed, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
