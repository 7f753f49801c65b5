"""Captioning speed at the paper's sizes: XE training, beam search and the SCST reward, optionally side by side
with self-critical.pytorch's UpDown code (ruotianluo) and its CIDEr-D reward.

Both sides get the same batch: random weights, random 36 x 2048 features, and captions whose word counts follow
COCO's (Karpathy train split: 8-13 words mostly, mean about 10.5, cut at 16 as self-critical.pytorch does), each
followed by <eos>; a batch is padded to its longest caption, as self-critical.pytorch's loader trims it. Training
is forward + backward + Adam (lr 5e-4) with dropout 0.5 on both sides, each side's loss being the masked token
NLL (our sequence cross-entropy; their LanguageModelCriterion). Beam search is beam 5 over 16 tokens; the <eos>
logit's bias is set to -100 on both sides, so no caption ends early (the worst case). The SCST reward is CIDEr-D of 250 sampled and
250 greedy captions (50 images x 5) against 5 references each, from token ids to rewards, as
self-critical.pytorch's get_self_critical_reward computes it (the greedy decode itself is not timed); ours is
timed with the reference vectors cached (as during training) and with them added in the timed call.

Rounds alternate (ours, reference, reference, ours, ...) and medians are reported, all in one process with the
same intra-op threads (--threads). Examples::

    python tools/benchmark_captioning.py --threads 2
    python tools/benchmark_captioning.py --threads 2 --reference ~/src/self-critical.pytorch --cider-reference ~/src/cider
    python tools/benchmark_captioning.py --device cuda --rounds 10 --precision bf16 --large-images 500

--reference is a self-critical.pytorch checkout with the ``captioning`` package (models/AttModel.py,
models/CaptionModel.py, modules/losses.py); the reward comparison also needs its ``misc/rewards.py`` and a CIDEr-D
checkout (``pyciderevalcap``), --cider-reference. Without --reference only our throughput is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import random
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updown.constraints import Constraint  # noqa: E402
from updown.decoding import beam_search, constrained_beam_search  # noqa: E402
from updown.losses import sequence_cross_entropy  # noqa: E402
from updown.metrics.cider import CiderD, document_frequency  # noqa: E402
from updown.models.captioner import CaptionerConfig, UpDownCaptioner  # noqa: E402
from updown.tasks.scst import caption_words  # noqa: E402

#: Words per COCO caption (Karpathy train split, rounded), 17+ words folded into 16 as self-critical.pytorch cuts.
COCO_LENGTHS = {
    6: 0.002,
    7: 0.01,
    8: 0.095,
    9: 0.23,
    10: 0.25,
    11: 0.16,
    12: 0.09,
    13: 0.06,
    14: 0.04,
    15: 0.028,
}
COCO_LENGTHS[16] = 1.0 - sum(COCO_LENGTHS.values())
#: Bias of the <eos> logit on both sides: random weights would otherwise end a beam at once (our beam search
#: stops when no unfinished hypothesis can beat a finished one), so both decode every step, the worst case.
EOS_BIAS = -100.0
SPECIALS = 4  # our <pad>, <unk>, <bos>, <eos>; word id k is the reference's id k - 3 (its 0 is bos/eos/pad)


def parse_args(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (both sides); default: torch's"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed rounds per measurement (medians reported)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each function first")
    parser.add_argument("--images", type=int, default=50, help="images per batch (the paper's 50)")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument(
        "--large-images", type=int, default=200, help="images of the large-batch rows; 0: skip"
    )
    parser.add_argument(
        "--max-words", type=int, default=16, help="longest caption and decode, <eos> excluded"
    )
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--boxes", type=int, default=36, help="regions per image")
    parser.add_argument("--feature-size", type=int, default=2048)
    parser.add_argument("--vocabulary-size", type=int, default=10010, help="including our 4 special tokens")
    parser.add_argument("--hidden-size", type=int, default=1000, help="LSTM size and word embedding size")
    parser.add_argument("--attention-size", type=int, default=512)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision", choices=("32", "bf16"), default="32", help="bf16: bfloat16 autocast (both sides)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile our steps (UpDownCaptioner.compile_steps) first"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=("xe", "beam", "cbs", "reward"), help="measurements to skip"
    )
    parser.add_argument(
        "--constraint-words", type=int, default=1, choices=(1, 2, 3),
        help="words per form of the constrained beam search's 3 constraints per image (2 forms each)",
    )  # fmt: skip
    parser.add_argument("--reference", metavar="DIR", help="a self-critical.pytorch checkout")
    parser.add_argument(
        "--cider-reference", metavar="DIR", help="a cider checkout (pyciderevalcap) for the reward"
    )
    parsed = parser.parse_args(args)
    for name in ("rounds", "images", "captions_per_image", "max_words", "beam_size", "boxes"):
        if getattr(parsed, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(parsed, name)}")
    if parsed.warmup < 0 or parsed.large_images < 0:
        parser.error("--warmup and --large-images must be non-negative")
    if parsed.threads is not None and parsed.threads < 1:
        parser.error(f"--threads must be at least 1, got {parsed.threads}")
    for name in ("reference", "cider_reference"):
        path = getattr(parsed, name)
        if path is not None and not Path(path).is_dir():
            parser.error(f"--{name.replace('_', '-')} {path}: not a directory")
    if parsed.reference and not (Path(parsed.reference) / "captioning" / "models" / "AttModel.py").is_file():
        parser.error(
            f"--reference {parsed.reference}: no captioning/models/AttModel.py; pass a self-critical.pytorch checkout"
        )
    return parsed


def caption_lengths(count: int, rng: random.Random, max_words: int) -> list[int]:
    """Word counts drawn from :data:`COCO_LENGTHS`, cut at ``max_words``."""
    lengths = rng.choices(list(COCO_LENGTHS), weights=list(COCO_LENGTHS.values()), k=count)
    return [min(length, max_words) for length in lengths]


def padded(rows: list[list[int]], width: int) -> np.ndarray:
    array = np.zeros((len(rows), width), dtype=np.int64)
    for index, row in enumerate(rows):
        array[index, : len(row)] = row
    return array


class Batch:
    """One batch in both formats: ours (<bos> words <eos> <pad>, image_index) and self-critical.pytorch's."""

    def __init__(self, options: argparse.Namespace, num_images: int, device: torch.device, seed: int) -> None:
        rng = random.Random(seed)
        generator = torch.Generator().manual_seed(seed)
        per_image = options.captions_per_image
        self.num_images, self.num_captions = num_images, num_images * per_image
        # shape: (images, boxes, feature_size)
        self.features = torch.rand(num_images, options.boxes, options.feature_size, generator=generator).to(
            device
        )
        self.mask = torch.ones(num_images, options.boxes, dtype=torch.bool, device=device)
        self.image_index = torch.arange(num_images, device=device).repeat_interleave(per_image)
        lengths = caption_lengths(self.num_captions, rng, options.max_words)
        words = [[rng.randrange(SPECIALS, options.vocabulary_size) for _ in range(n)] for n in lengths]
        self.mean_words = sum(lengths) / len(lengths)
        longest = max(lengths)
        # shape: (captions, longest + 2)
        self.tokens = torch.from_numpy(padded([[2, *w, 3] for w in words], longest + 2)).to(device)
        # self-critical.pytorch: labels (images, per_image, longest + 2) = 0 w_1 .. w_n 0 .., masks over w and <eos>
        labels = padded([[0, *(k - 3 for k in w)] for w in words], longest + 2)
        masks = padded([[1] * (n + 2) for n in lengths], longest + 2)
        self.labels = torch.from_numpy(labels).view(num_images, per_image, -1).to(device)
        self.masks = torch.from_numpy(masks).float().view(num_images, per_image, -1).to(device)
        self.fc_features = self.features.mean(dim=1)


def build_ours(options: argparse.Namespace, device: torch.device) -> UpDownCaptioner:
    config = CaptionerConfig(
        embedding_size=options.hidden_size,
        hidden_size=options.hidden_size,
        attention_size=options.attention_size,
        dropout=options.dropout,
    )
    model = UpDownCaptioner(
        options.vocabulary_size, options.feature_size, config, max_caption_length=options.max_words + 1
    )
    with torch.no_grad():  # every caption runs all steps (see suppress_eos)
        model.output.bias[3] = EOS_BIAS
    return model.to(device)


def build_reference(options: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    sys.path.insert(0, str(Path(options.reference).resolve()))
    from captioning.models.AttModel import UpDownModel

    vocabulary = {str(i): f"w{i}" for i in range(1, options.vocabulary_size - 3)}
    opt = types.SimpleNamespace(
        vocab_size=options.vocabulary_size - 1,  # + 1 for its index 0: the same number of output logits
        input_encoding_size=options.hidden_size,
        rnn_size=options.hidden_size,
        num_layers=2,
        drop_prob_lm=options.dropout,
        max_length=options.max_words,
        seq_length=options.max_words,
        fc_feat_size=options.feature_size,
        att_feat_size=options.feature_size,
        att_hid_size=options.attention_size,
        vocab=vocabulary,
    )
    model = UpDownModel(opt)
    with torch.no_grad():
        model.logit.bias[0] = EOS_BIAS  # its <eos> is id 0
    return model.to(device)


def xe_steps(options, ours, reference, batch: Batch) -> tuple[Callable[[], None], Callable[[], None] | None]:
    autocast = precision_context(options, batch.features.device)
    optimizer = torch.optim.Adam(ours.parameters(), lr=5e-4)

    def ours_step() -> None:
        ours.train()
        with autocast():
            output = ours.forward_packed(
                batch.features, batch.mask, batch.tokens, image_index=batch.image_index
            )
            # As CaptioningTask.training_step: the loss in float32 whatever the autocast.
            loss = sequence_cross_entropy(
                output["logits"].float().unsqueeze(0), output["targets"].unsqueeze(0)
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if reference is None:
        return ours_step, None
    from captioning.modules.losses import LanguageModelCriterion

    criterion = LanguageModelCriterion()
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=5e-4)

    def reference_step() -> None:
        reference.train()
        with autocast():
            # All 36 boxes are real, so its loader passes att_masks=None.
            output = reference(batch.fc_features, batch.features, batch.labels[..., :-1], None)
            loss = criterion(output, batch.labels[..., 1:], batch.masks[..., 1:])
        reference_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        reference_optimizer.step()

    return ours_step, reference_step


def beam_steps(
    options, ours, reference, batch: Batch
) -> tuple[Callable[[], None], Callable[[], None] | None]:
    autocast = precision_context(options, batch.features.device)
    lengths: list[float] = []

    def ours_decode() -> None:
        ours.eval()
        with torch.no_grad(), autocast():
            state = ours.init_state(batch.features, batch.mask)
            output = beam_search(ours.step, state, beam_size=options.beam_size, max_length=options.max_words)
        lengths.append(float(output.lengths.float().mean()))

    ours_decode.lengths = lengths  # type: ignore[attr-defined]
    if reference is None:
        return ours_decode, None

    def reference_decode() -> None:
        reference.eval()
        with torch.no_grad(), autocast():
            # What its _sample does for beam_size > 1.
            reference._sample_beam(
                batch.fc_features, batch.features, None, opt={"beam_size": options.beam_size, "sample_n": 1}
            )

    return ours_decode, reference_decode


def cbs_steps(options, ours, batch: Batch) -> tuple[Callable[[], None], Callable[[], None]]:
    """Plain and constrained beam search on the same images: 3 constraints per image (the nocaps baseline's
    most), each with 2 word forms of ``--constraint-words`` random words (like "dog" / "dogs")."""
    autocast = precision_context(options, batch.features.device)
    rng = random.Random(options.seed)

    def random_constraint() -> Constraint:
        words = [rng.randrange(SPECIALS, options.vocabulary_size) for _ in range(options.constraint_words)]
        plural = [*words[:-1], rng.randrange(SPECIALS, options.vocabulary_size)]
        return Constraint((tuple(words), tuple(plural)))

    constraints = [[random_constraint() for _ in range(3)] for _ in range(batch.num_images)]

    def decode(constrained: bool) -> None:
        ours.eval()
        with torch.no_grad(), autocast():
            state = ours.init_state(batch.features, batch.mask)
            if constrained:
                constrained_beam_search(
                    ours.step, state, constraints, beam_size=options.beam_size, max_length=options.max_words
                )
            else:
                beam_search(ours.step, state, beam_size=options.beam_size, max_length=options.max_words)

    return lambda: decode(False), lambda: decode(True)


def reward_steps(options, batch_size: int, seed: int):
    """Ours (warm, cold) and the reference's reward over the same 2 x ``batch_size`` captions, and their max |diff|."""
    rng = random.Random(seed)
    num_images, per_image = options.images, options.captions_per_image
    # References of at most max_words - 1 words: self-critical.pytorch appends its <eos> ("0") only to shorter rows.
    references = [
        [
            [rng.randrange(SPECIALS, min(SPECIALS + 2000, options.vocabulary_size)) for _ in range(n)]
            for n in caption_lengths(5, rng, options.max_words - 1)
        ]
        for _ in range(num_images)
    ]

    def sampled(image: int) -> list[int]:
        pool = [word for ref in references[image] for word in ref]
        return [rng.choice(pool) for _ in range(rng.randint(6, options.max_words))]

    rows = [sampled(image) for image in range(num_images) for _ in range(per_image)]
    rows += [sampled(image) for image in range(num_images) for _ in range(per_image)]  # the greedy decodes
    width = options.max_words
    # Ours: (N, width) tokens ending with <eos> unless cut at the maximum length, lengths with <eos>.
    ended = [len(row) < width for row in rows]
    tokens = torch.from_numpy(padded([row + [3] * end for row, end in zip(rows, ended)], width))
    lengths = torch.tensor([len(row) + end for row, end in zip(rows, ended)])
    names = ["<pad>", "<unk>", "<bos>", "<eos>"] + [
        str(k - 3) for k in range(SPECIALS, options.vocabulary_size)
    ]
    keys = [index // per_image % num_images for index in range(len(rows))]
    reference_words = {
        image: [[names[k] for k in ref] for ref in refs] for image, refs in enumerate(references)
    }
    # The document frequencies self-critical.pytorch's df="corpus" counts: each image's references once per
    # caption scored, so the same idf for every n-gram, also those no reference has.
    frequencies, _ = document_frequency(reference_words, 4, eos_as_word=True)
    repeats = len(rows) // num_images
    frequencies = {gram: count * repeats for gram, count in frequencies.items()}
    ref_len = math.log(len(rows))

    def ours_cold() -> np.ndarray:
        cider = CiderD(frequencies, ref_len=ref_len, eos_as_word=True)
        for image, refs in reference_words.items():
            cider.add_references(image, refs)
        return ours_score(cider)

    def ours_score(cider: CiderD) -> np.ndarray:
        words, has_eos = caption_words(tokens, lengths, 3, names)
        scores = cider.score(words, keys, ended=has_eos)
        return scores[: len(rows) // 2] - scores[len(rows) // 2 :]

    warm = CiderD(frequencies, ref_len=ref_len, eos_as_word=True)
    for image, refs in reference_words.items():
        warm.add_references(image, refs)
    result = {"ours_warm": lambda: ours_score(warm), "ours_cold": ours_cold}
    if not (options.reference and options.cider_reference):
        return result, None
    if not (Path(options.reference) / "misc" / "rewards.py").is_file():
        print(
            f"reward: no misc/rewards.py in {options.reference}; the reference reward is skipped",
            file=sys.stderr,
        )
        return result, None
    sys.path.insert(0, str(Path(options.cider_reference).resolve()))
    from misc import rewards

    rewards.init_scorer("corpus")
    gts = [padded([[k - 3 for k in ref] for ref in refs], options.max_words) for refs in references]
    gen = torch.from_numpy(padded([[k - 3 for k in row] for row in rows], width))
    half = len(rows) // 2

    class Greedy(torch.nn.Module):
        """Stands in for the model: returns the prepared greedy captions (decoding is not timed)."""

        def forward(self, *args, **kwargs):
            return gen[half:], None

    opt = types.SimpleNamespace(cider_reward_weight=1.0, bleu_reward_weight=0.0)

    def reference_reward() -> np.ndarray:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the mean score
            return rewards.get_self_critical_reward(
                Greedy(), None, None, None, {"gts": gts}, gen[:half], opt
            )[:, 0]

    result["reference"] = reference_reward
    difference = float(np.abs(result["ours_warm"]() - reference_reward()).max())
    return result, difference


def precision_context(options: argparse.Namespace, device: torch.device) -> Callable[[], torch.autocast]:
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.precision == "bf16")


def alternate(
    functions: list[Callable[[], object] | None], options, device: torch.device
) -> list[float | None]:
    """Median seconds per call of each function, over rounds that alternate their order."""
    present = [index for index, function in enumerate(functions) if function is not None]
    for index in present:
        for _ in range(options.warmup):
            functions[index]()
    times: dict[int, list[float]] = {index: [] for index in present}
    for round_index in range(options.rounds):
        for index in present if round_index % 2 == 0 else present[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            functions[index]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[index].append(time.perf_counter() - start)
    return [statistics.median(times[index]) if index in times else None for index in range(len(functions))]


def main(args: list[str] | None = None) -> list[dict[str, str]]:
    options = parse_args(args)
    device = torch.device(options.device)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    ours = build_ours(options, device)
    if options.compile:
        ours.compile_steps()
    reference = build_reference(options, device) if options.reference else None
    rows: list[dict[str, str]] = []

    def add(measurement: str, batch: str, unit: str, amount: int, seconds: list[float | None]) -> None:
        ours_seconds, reference_seconds = seconds
        row = {
            "measurement": measurement,
            "batch": batch,
            "ours": f"{amount / ours_seconds:,.1f} {unit}/s ({1000 * ours_seconds:,.0f} ms)",
            "reference": "" if reference_seconds is None else f"{amount / reference_seconds:,.1f} {unit}/s",
            "ours / reference": ""
            if reference_seconds is None
            else f"{reference_seconds / ours_seconds:.2f}x",
        }
        rows.append(row)
        print("| " + " | ".join(row.values()) + " |", flush=True)

    columns = ["measurement", "batch", "ours", "reference", "ours / reference"]
    print(
        f"UpDown captioner, D={options.feature_size}, R={options.boxes}, V={options.vocabulary_size}, "
        f"H=E={options.hidden_size}, A={options.attention_size}, dropout {options.dropout}; ours "
        f"{sum(p.numel() for p in ours.parameters()):,} parameters"
        + (f", reference {sum(p.numel() for p in reference.parameters()):,}" if reference is not None else "")
        + f"; {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
        f"{torch.get_num_threads()} threads, precision {options.precision}"
        + (", ours compiled" if options.compile else "")
        + f", torch {torch.__version__}\n"
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|", flush=True)
    sizes = [options.images] + ([options.large_images] if options.large_images else [])
    for num_images in sizes:
        batch = Batch(options, num_images, device, options.seed + num_images)
        per_image = options.captions_per_image
        if "xe" not in options.skip:
            seconds = alternate(list(xe_steps(options, ours, reference, batch)), options, device)
            add(
                "XE train step (fwd + bwd + Adam)",
                f"{num_images} images x {per_image} captions, mean {batch.mean_words:.1f} words + <eos>",
                "captions",
                batch.num_captions,
                seconds,
            )
        if "beam" not in options.skip:
            ours_decode, reference_decode = beam_steps(options, ours, reference, batch)
            seconds = alternate([ours_decode, reference_decode], options, device)
            mean_length = statistics.mean(ours_decode.lengths)  # type: ignore[attr-defined]
            add(
                f"beam search, beam {options.beam_size}",
                f"{num_images} images, <= {options.max_words} tokens (ours: mean {mean_length:.1f})",
                "images",
                num_images,
                seconds,
            )
    if "cbs" not in options.skip:
        batch = Batch(options, options.images, device, options.seed + options.images)
        plain_seconds, constrained_seconds = alternate(list(cbs_steps(options, ours, batch)), options, device)
        forms = f"{options.constraint_words}-word forms"
        add(
            f"constrained beam search, beam {options.beam_size}",
            f"{options.images} images, 3 constraints of 2 {forms} each, <= {options.max_words} tokens",
            "images",
            options.images,
            [constrained_seconds, None],
        )
        print(
            f"(plain beam search on the same images in the same rounds: {options.images / plain_seconds:,.1f} images/s; "
            f"constrained / plain time {constrained_seconds / plain_seconds:.2f}x)",
            flush=True,
        )
    if "reward" not in options.skip:
        functions, difference = reward_steps(
            options, options.images * options.captions_per_image, options.seed
        )
        count = 2 * options.images * options.captions_per_image
        batch_text = f"{count} captions ({options.images} images x {options.captions_per_image} x 2), 5 refs"
        warm, cold, reference_seconds = alternate(
            [functions["ours_warm"], functions["ours_cold"], functions.get("reference")], options, device
        )
        add(
            "SCST reward (CIDEr-D), references cached",
            batch_text,
            "captions",
            count,
            [warm, reference_seconds],
        )
        add(
            "SCST reward (CIDEr-D), references added",
            batch_text,
            "captions",
            count,
            [cold, reference_seconds],
        )
        if difference is not None:
            print(f"\nmax |our reward - self-critical.pytorch's| = {difference:.3g}")
    return rows


if __name__ == "__main__":
    main()
