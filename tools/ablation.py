"""Attention-design ablation on the synthetic VQA world: the base model vs each block vs cross-attention fusion.

    python tools/ablation.py [--epochs 10] [--num-train 1500] [--seeds 0 1] [--output ablation.md]
    python tools/ablation.py --jobs 16 --fit-args --trainer.accelerator gpu     # 16 runs at once on one GPU

Every row trains `configs/vqa/synthetic.yaml` (top-down attention with product fusion, the reproduction's
ReLU layers, projected-product attention, LayerNorm'd features) with the same world, budget (epochs) and
seeds, changing one thing: the paper's gated-tanh layers and concat attention; an attention block in front of
the model (SE, Non-local, GC; CoT needs grid features, so it runs on the grid variant of the world next to the
base model on that same grid world); or the fusion. Prints a markdown table of val/vqa_accuracy (mean and per
seed) and, with --output, writes it atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updown.fit import main as fit  # noqa: E402
from updown.io import atomic_output  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (name, world, extra arguments)
PAPER_LAYERS = [
    "--model.init_args.net.activation", "gated_tanh",
    "--model.init_args.net.attention", "concat",
    "--model.init_args.net.feature_norm", "none",
]  # fmt: skip
VARIANTS = [
    ("base (synthetic config)", "regions", []),
    ("paper's layers (gated tanh, concat attention, raw features)", "regions", PAPER_LAYERS),
    ("+ SE block", "regions", ["--model.init_args.net.feature_encoder", "se"]),
    ("+ Non-local block", "regions", ["--model.init_args.net.feature_encoder", "nonlocal"]),
    ("+ GC block", "regions", ["--model.init_args.net.feature_encoder", "gc"]),
    ("cross-attention fusion", "regions", ["--model.init_args.net.fusion", "cross_attention"]),
    ("base, grid features (6x6)", "grid", []),
    ("+ CoT block, grid features (6x6)", "grid", ["--model.init_args.net.feature_encoder", "cot"]),
]


def fit_arguments(world: str, extra: list[str], args, seed: int, root: Path) -> list[str]:
    """``updown.fit`` arguments of one row and seed: the synthetic config, the shared budget, the row's change."""
    world_args = (
        ["--data.init_args.synthetic.grid", "true", "--data.init_args.synthetic.grid_size", "6"]
        if world == "grid"
        else []
    )
    return [
        "--config", str(ROOT / "configs" / "vqa" / "synthetic.yaml"),
        "--seed_everything", str(seed),
        "--trainer.max_epochs", str(args.epochs),
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--model.init_args.question_only_baseline", "false",
        "--data.init_args.synthetic.num_train", str(args.num_train),
        "--data.init_args.synthetic.num_val", str(args.num_val),
        "--data.init_args.synthetic.num_test", "200",  # the default world: cached once for every run
        *world_args, *extra, *args.fit_args,
    ]  # fmt: skip


def run(name: str, world: str, extra: list[str], args, seed: int, folder: Path) -> float:
    """Train one row with one seed (in this process, or in a child process with ``--jobs`` > 1)."""
    root = folder / f"{abs(hash((name, seed)))}"
    arguments = fit_arguments(world, extra, args, seed, root)
    if args.jobs == 1:
        code = fit(arguments)
    else:
        # One thread per run: the runs themselves fill the cores.
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        log = root.with_suffix(".log")
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as output:
            code = subprocess.run(
                [sys.executable, "-m", "updown.fit", *arguments],
                cwd=ROOT,
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
            ).returncode
        if code != 0:
            sys.stderr.write(log.read_text()[-3000:])
    if code != 0:
        raise SystemExit(f"ablation: the run '{name}' (seed {seed}) failed with exit code {code}")
    metrics = json.loads(next(root.rglob("metrics.json")).read_text())
    return metrics["val/vqa_accuracy"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-train", type=int, default=1500)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--only", nargs="*", help="run only variants whose name contains one of these strings"
    )
    parser.add_argument("--output", help="also write the markdown table here")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once, each in its own process (1 thread)"
    )
    parser.add_argument(
        "--fit-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="everything after this goes to every updown.fit run (e.g. --trainer.accelerator gpu)",
    )
    args = parser.parse_args(argv)
    variants = [v for v in VARIANTS if not args.only or any(s in v[0] for s in args.only)]
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    tasks = [(variant, seed) for variant in variants for seed in args.seeds]
    scores: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="updown_ablation_") as folder:
        if args.jobs == 1:
            # In this process and its main thread (Lightning installs signal handlers).
            for variant, seed in tasks:
                scores[(variant[0], seed)] = run(*variant, args, seed, Path(folder))
                print(f"{variant[0]}, seed {seed}: {scores[(variant[0], seed)]:.2f}", file=sys.stderr)
        else:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                futures = {
                    (variant[0], seed): pool.submit(run, *variant, args, seed, Path(folder))
                    for variant, seed in tasks
                }
                for key, future in futures.items():
                    scores[key] = future.result()
                    print(f"{key[0]}, seed {key[1]}: {scores[key]:.2f}", file=sys.stderr)
    rows = [(name, [scores[(name, seed)] for seed in args.seeds]) for name, _, _ in variants]
    where = f"; every run with {' '.join(args.fit_args)}" if args.fit_args else ""
    lines = [
        f"Synthetic VQA world ({args.num_train} training / {args.num_val} validation images, 2048-d features), "
        f"{args.epochs} epochs, seeds {args.seeds}{where}; val/vqa_accuracy (official metric, %) after the last epoch.",
        "",
        "| model | mean | per seed |",
        "|---|---:|---|",
        *[f"| {name} | {sum(s) / len(s):.2f} | {', '.join(f'{x:.2f}' for x in s)} |" for name, s in rows],
    ]
    table = "\n".join(lines)
    print(table)
    if args.output:
        with atomic_output(args.output) as tmp:
            tmp.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
