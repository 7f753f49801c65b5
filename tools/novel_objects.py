"""Novel object captioning on the synthetic world: train, decode with and without constraints, score per domain.

    python tools/novel_objects.py [--output-dir runs/novel_objects] [--split test] [--checkpoint CKPT]
        [--config configs/captioning/synthetic_novel.yaml] [--data-root DIR] [--threads 1] [-- FIT OPTIONS]

Without ``--checkpoint`` it first trains ``--config`` (``python -m updown.fit``; a few minutes on 2 CPU cores) into
``OUTPUT_DIR/run`` (options after ``--`` go to ``updown.fit``) and takes its best checkpoint. It then decodes ``--split`` three times with
``python -m updown.predict captions``: plain beam search (``--constraints off``), constrained beam search with the
config's settings (``--constraints on``), and with the nocaps baseline's (top-3 detections, at least 2 named);
scores each results file per nocaps domain with ``python -m updown.evaluate captions`` (the world's references
carry a ``domain``), and counts how often a caption names the held-out object of its out-domain image (any of its
word forms), and how often an in-domain caption names a held-out object that is not there. It prints one table
and writes every file it made, plus ``novel_objects.json`` (the table), into ``OUTPUT_DIR``.
docs/novel_objects.md explains the world and quotes the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updown.cli import run_guarded  # noqa: E402
from updown.config import PositiveInt, argparse_type  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (name, file name, updown.predict arguments) of each decoding compared.
SETTINGS = (
    ("beam search", "beam", ["--constraints", "off"]),
    ("CBS (config)", "cbs", ["--constraints", "on"]),
    ("CBS top-3 >=2", "cbs_nocaps", ["--constraints", "on", "--max-constraints", "3", "--min-constraints-to-satisfy", "2"]),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="runs/novel_objects", help="where every file goes")
    parser.add_argument("--config", default=str(ROOT / "configs" / "captioning" / "synthetic_novel.yaml"))
    parser.add_argument("--checkpoint", help="a checkpoint of --config's kind; skips training")
    parser.add_argument("--split", default="test", help="split decoded and scored (default: test)")
    parser.add_argument("--data-root", help="where the synthetic world is cached (default: $UPDOWN_DATA)")
    parser.add_argument(
        "--threads", type=argparse_type(PositiveInt), default=1, help="intra-op threads for training"
    )
    parser.add_argument("--force", action="store_true", help="overwrite files in --output-dir")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "fit_options", nargs=argparse.REMAINDER, help="after --: more updown.fit options for training"
    )
    return parser


def train(args: argparse.Namespace, output_dir: Path) -> Path:
    """Train ``--config`` into ``output_dir/run``; returns its best checkpoint."""
    from updown.fit import main as fit

    run_root = output_dir / "run"
    fit_args = [
        "--config",
        args.config,
        "--trainer.default_root_dir",
        str(run_root),
        "--threads",
        str(args.threads),
    ]
    if args.data_root:
        fit_args += ["--data.init_args.data_root", args.data_root]
    fit_args += [option for option in args.fit_options if option != "--"]
    if fit(fit_args) != 0:
        raise ValueError(f"training {args.config} failed (see above).")
    runs = sorted((run_root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    metrics = json.loads((runs[-1] / "metrics.json").read_text())
    return Path(metrics["best_checkpoint"])


def novel_object_world(checkpoint: Path):
    """The synthetic world the checkpoint was trained on (it must hold categories out)."""
    import torch

    from updown.data.synthetic import SyntheticSpec, ensure_synthetic_world

    hyper = (
        torch.load(checkpoint, map_location="cpu", weights_only=False).get("datamodule_hyper_parameters")
        or {}
    )
    spec = SyntheticSpec.coerce(hyper.get("synthetic") or {})
    if hyper.get("features_h5path") is not None or not spec.held_out_categories:
        raise ValueError(
            f"--checkpoint {checkpoint}: not trained on the synthetic novel-object world "
            "(data.init_args.synthetic.held_out_categories). Train configs/captioning/synthetic_novel.yaml."
        )
    return spec, ensure_synthetic_world(spec, hyper.get("data_root"), progress=False)


def mention_rates(results: list[dict], world, held_out: tuple[str, ...], domains: dict[int, str]) -> dict:
    """Out-domain captions naming their image's held-out object; in-domain captions naming any held-out one."""
    from updown.data.word_forms import WordForms
    from updown.io import read_json

    forms = WordForms.from_file(world.word_forms_tsvpath)
    objects = read_json(world.objects_jsonpath, "objects JSON")

    def names(caption: str, category: str) -> bool:
        words = caption.split()
        return any(
            any(tuple(words[i : i + len(form)]) == form for i in range(len(words)))
            for form in forms.constraint(category)
        )

    named = out_domain = hallucinated = in_domain = 0
    for result in results:
        present = [o["category"] for o in objects[str(result["image_id"])] if o["category"] in held_out]
        if domains[result["image_id"]] == "out-domain":
            out_domain += 1
            named += any(names(result["caption"], category) for category in present)
        else:
            in_domain += 1
            hallucinated += any(names(result["caption"], category) for category in held_out)
    return {
        "held_out_named": named / max(out_domain, 1),
        "held_out_hallucinated": hallucinated / max(in_domain, 1),
        "out_domain_images": out_domain,
        "in_domain_images": in_domain,
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from updown.evaluate import main as evaluate
        from updown.evaluate import read_references_and_domains
        from updown.predict import main as predict

        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = Path(args.checkpoint) if args.checkpoint else train(args, output_dir)
        spec, world = novel_object_world(checkpoint)
        references = world.captions_dir / f"references_{args.split}.json"
        _, domains = read_references_and_domains(str(references))
        force = ["--force"] if args.force else []
        table = {}
        for name, slug, options in SETTINGS:
            results_path, scores_path = (
                output_dir / f"captions_{slug}.json",
                output_dir / f"scores_{slug}.json",
            )
            status = predict(
                ["captions", "--checkpoint", str(checkpoint), "--split", args.split, "--output", str(results_path),
                 "--device", "cpu", *options, *force]
            )  # fmt: skip
            if status != 0:
                raise ValueError(f"decoding with {name} failed (see above).")
            with contextlib.redirect_stdout(io.StringIO()):  # the table below says it all
                status = evaluate(
                    ["captions", "--references", str(references), "--results", str(results_path),
                     "--output", str(scores_path), "--metrics", "CIDEr", "Bleu", *force]
                )  # fmt: skip
            if status != 0:
                raise ValueError(f"scoring {results_path} failed (see above).")
            scores = json.loads(scores_path.read_text())
            results = json.loads(results_path.read_text())
            table[name] = {
                "cider": scores["CIDEr"],
                **{f"cider_{domain}": value["CIDEr"] for domain, value in scores["by_domain"].items()},
                **mention_rates(results, world, spec.held_out_categories, domains),
                "command": f"python -m updown.predict captions --checkpoint {checkpoint} --split {args.split} "
                f"--output {results_path} {' '.join(options)}",
            }
        (output_dir / "novel_objects.json").write_text(json.dumps(table, indent=1))
        print_table(table, spec.held_out_categories, args.split, checkpoint)
        return 0

    return run_guarded("novel_objects.py", run, args.debug)


def print_table(table: dict, held_out: tuple[str, ...], split: str, checkpoint: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    first = next(iter(table.values()))
    out = Table(
        title=f"split {split}: {first['in_domain_images']} in-domain, {first['out_domain_images']} out-domain images "
        f"(held out: {', '.join(held_out)}); {checkpoint}"
    )
    for column in (
        "decoding",
        "CIDEr in",
        "CIDEr out",
        "CIDEr all",
        "held-out named (out)",
        "held-out said (in)",
    ):
        out.add_column(column, justify="left" if column == "decoding" else "right")
    for name, row in table.items():
        out.add_row(
            name,
            f"{row['cider_in-domain']:.4f}",
            f"{row['cider_out-domain']:.4f}",
            f"{row['cider']:.4f}",
            f"{100 * row['held_out_named']:.1f}%",
            f"{100 * row['held_out_hallucinated']:.1f}%",
        )
    Console().print(out)


if __name__ == "__main__":
    sys.exit(main())
