"""Time a reproduction recipe for a few steps on given data and project its epoch and whole-recipe time.

    python tools/time_recipe.py --config configs/captioning/updown_xe.yaml --world /data/coco_shaped
    python tools/time_recipe.py --config configs/captioning/updown_xe_adam.yaml \
        --config configs/captioning/updown_scst.yaml --world /data/coco_shaped --init-weights XE.ckpt
    python tools/time_recipe.py --config configs/vqa/updown.yaml --world /data/coco_shaped --steps 10 -- \
        --trainer.accelerator gpu

It runs ``updown.fit``'s own machinery (the same CLI, configs, datamodules, tasks and Trainer) for
``--warmup + --steps`` training steps and ``--val-batches`` validation batches, then projects from the recipe's
own batch size, ``max_steps`` / ``max_epochs`` and the data's sizes:

- training: seconds per step, measured from the end of one step to the end of the next (data loading, forward,
  backward, optimiser), after ``--warmup`` untimed steps;
- validation: seconds per batch (decoding), and the scoring after the batches: its measured time is a lower
  bound for the whole split (scoring has a large fixed part: Java start-up of the official toolkit) and, scaled
  linearly to the split, an upper bound; epochs and recipes are given as that range;
- epoch = steps per epoch x seconds per step + validation; recipe = total steps x seconds per step +
  validations (one per epoch, one more before training for SCST, which decodes the validation set first).

``--val-batches 0`` skips validation (where captions cannot be scored: no Java, or no pycocoevalcap); the epoch
and recipe times are then training only, and the table and JSON say so.

``--world`` is a folder with ``features.h5``, ``captions/`` (``tools/prepare_captions.py`` and
``tools/build_cider_df.py`` outputs) and ``vqa/`` (``tools/prepare_vqa.py`` output), as
``tools/make_coco_shaped.py`` writes raw files for; ``--features``, ``--captions-dir`` and ``--vqa-dir`` set
them one by one. Arguments after ``--`` go to ``updown.fit`` unchanged (devices, precision, workers). An SCST
recipe needs an XE checkpoint of the same vocabulary (``--init-weights``); ``--save-checkpoint`` keeps the one a
timed XE run writes. VQA recipes run without GloVe, which only sets the embedding's starting values
(``-- --model.init_args.glove_path FILE`` uses it). The model is untrained: decoding runs to ``max_length``, the
slowest case. Prints a markdown table row and writes the numbers as JSON with ``--output``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updown.cli import run_guarded  # noqa: E402
from updown.config import NonNegativeInt, PositiveInt, argparse_type  # noqa: E402


def recipe_settings(configs: list[str]) -> dict:
    """The data class, batch sizes and length of the composed configs (later files override earlier ones)."""
    merged: dict = {"trainer": {}, "data": {"init_args": {}}, "model": {"init_args": {}}}
    for path in configs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--config {path}: config file not found. Check the path.")
        data = yaml.safe_load(Path(path).read_text()) or {}
        for section in ("trainer",):
            merged[section].update(data.get(section) or {})
        for section in ("data", "model"):
            part = data.get(section) or {}
            if "class_path" in part:
                merged[section]["class_path"] = part["class_path"]
            merged[section]["init_args"].update(part.get("init_args") or {})
    return merged


def data_arguments(settings: dict, args: argparse.Namespace) -> list[str]:
    """``updown.fit`` options pointing the recipe's datamodule at the world's files."""
    data_class = settings["data"].get("class_path", "")
    features = args.features or str(Path(args.world) / "features.h5")
    options = ["--data.init_args.features_h5path", features]
    if "vqa" in data_class:
        vqa_dir = args.vqa_dir or str(Path(args.world) / "vqa")
        return [*options, "--data.init_args.prepared_dir", vqa_dir, "--model.init_args.glove_path", "null"]
    captions = Path(args.captions_dir or Path(args.world) / "captions")
    return [
        *options,
        "--data.init_args.captions_jsonpath",
        str(captions / "captions.json"),
        "--data.init_args.vocabulary_path",
        str(captions / "vocabulary.json"),
    ]


class StepTimer(pl.Callback):
    """Lightning callback: wall-clock times of training steps, validation batches and scoring."""

    def __init__(self, warmup: int) -> None:
        super().__init__()
        self.warmup = warmup
        self.step_ends: list[float] = []
        self.val_batch_seconds: list[float] = []
        self.scoring_seconds: list[float] = []
        self.val_batches_seen = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        _synchronize(module)
        self.step_ends.append(time.perf_counter())

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        _synchronize(module)
        self._val_start = time.perf_counter()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        _synchronize(module)
        self.val_batch_seconds.append(time.perf_counter() - self._val_start)
        self.val_batches_seen += 1

    def on_validation_epoch_end(self, trainer, module) -> None:
        # Callbacks' hook runs before the task's, which scores the decoded captions / answers.
        self._scoring_start = time.perf_counter()

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self.scoring_seconds.append(time.perf_counter() - self._scoring_start)

    def seconds_per_step(self) -> float:
        timed = self.step_ends[self.warmup :]
        if len(timed) < 2:
            raise ValueError("fewer than 2 timed steps; raise --steps (or the split has too few batches).")
        return (timed[-1] - timed[0]) / (len(timed) - 1)


def _synchronize(module) -> None:
    import torch

    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def project(settings: dict, timer: StepTimer, train_batches: int, val_batches: int, scst: bool) -> dict:
    """Seconds per epoch and per recipe from the measured rates and the recipe's length."""
    trainer = settings["trainer"]
    step = timer.seconds_per_step()
    # The SCST task's pass over the validation set in on_train_start calls validation_step directly, so the
    # timer sees only the end-of-epoch validation; that pass is counted as one more validation below.
    val_times = timer.val_batch_seconds
    # No validation timed (--val-batches 0): the projections are training time only, and say so.
    val_batch = sum(val_times) / len(val_times) if val_times else 0.0
    timed_val_batches = max(len(val_times), 1)
    # Scoring (the official toolkit's tokenizer and METEOR start Java processes) has a large fixed part: its time
    # for the timed batches is a lower bound for the whole split, and scaled linearly to it an upper bound.
    scoring_measured = timer.scoring_seconds[-1] if timer.scoring_seconds else 0.0
    scoring = {"low": scoring_measured, "high": scoring_measured * val_batches / timed_val_batches}
    validation = {bound: val_batches * val_batch + seconds for bound, seconds in scoring.items()}
    max_steps, max_epochs = trainer.get("max_steps", -1) or -1, trainer.get("max_epochs", -1)
    if max_steps and max_steps > 0:
        total_steps = max_steps
        epochs = max_steps / train_batches
    else:
        epochs = max_epochs if max_epochs and max_epochs > 0 else 1000  # Lightning's default without either
        total_steps = epochs * train_batches
    validations = math.ceil(epochs) + (1 if scst else 0)
    result = {
        "seconds_per_step": step,
        "steps_per_second": 1 / step,
        "train_batches_per_epoch": train_batches,
        "val_batches": val_batches,
        "seconds_per_val_batch": val_batch,
        "validation_timed": bool(val_times),
        "scoring_seconds_measured": scoring_measured,
        "epochs": epochs,
        "validations": validations,
        "total_steps": total_steps,
    }
    for bound in ("low", "high"):
        result[f"validation_seconds_{bound}"] = validation[bound]
        result[f"epoch_seconds_{bound}"] = train_batches * step + validation[bound]
        result[f"recipe_seconds_{bound}"] = total_steps * step + validations * validation[bound]
    return result


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def span(low: float, high: float) -> str:
    return hours(low) if hours(low) == hours(high) else f"{hours(low)} - {hours(high)}"


def markdown_row(configs: list[str], result: dict) -> str:
    """A markdown table (header and one row) of a result of :func:`project`."""
    validation = (
        f"{result['seconds_per_val_batch']:.2f} x {result['val_batches']}"
        if result["validation_timed"]
        else "not timed (training only)"
    )
    return (
        "| recipe | s/step | steps/epoch | val s/batch x batches | epoch | recipe |\n|---|---:|---:|---:|---:|---:|\n"
        f"| {' + '.join(Path(c).name for c in configs)} | {result['seconds_per_step']:.3f} | "
        f"{result['train_batches_per_epoch']:,} | {validation} | "
        f"{span(result['epoch_seconds_low'], result['epoch_seconds_high'])} | "
        f"{span(result['recipe_seconds_low'], result['recipe_seconds_high'])} ({result['epochs']:.1f} epochs) |"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", action="append", required=True, help="recipe config(s), composed in order"
    )
    parser.add_argument("--world", help="folder with features.h5, captions/ and vqa/")
    parser.add_argument("--features", help="features HDF5 (default: WORLD/features.h5)")
    parser.add_argument("--captions-dir", help="prepared captions folder (default: WORLD/captions)")
    parser.add_argument("--vqa-dir", help="prepared VQA folder (default: WORLD/vqa)")
    parser.add_argument("--steps", type=argparse_type(PositiveInt), default=10, help="timed training steps")
    parser.add_argument("--warmup", type=argparse_type(NonNegativeInt), default=2, help="untimed steps first")
    parser.add_argument(
        "--val-batches",
        type=argparse_type(NonNegativeInt),
        default=2,
        help="timed validation batches; 0: no validation (epoch and recipe times are then training only)",
    )
    parser.add_argument("--init-weights", help="XE checkpoint an SCST recipe starts from")
    parser.add_argument(
        "--save-checkpoint", help="copy the timed run's last checkpoint here (to time SCST next)"
    )
    parser.add_argument("--output", help="write the measurements and projections as JSON here")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("fit_args", nargs="*", help="after --: more updown.fit options")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from updown.fit import build_cli

        if not (args.world or args.features):
            raise ValueError(
                "give --world (or --features with --captions-dir / --vqa-dir): the data to time on."
            )
        settings = recipe_settings(args.config)
        scst = "scst" in settings["model"].get("class_path", "").lower()
        if scst and not args.init_weights:
            raise ValueError(
                "an SCST recipe starts from an XE checkpoint: pass --init-weights (time the XE recipe first with "
                "--save-checkpoint XE.ckpt)."
            )
        root = Path(tempfile.mkdtemp(prefix="time_recipe."))
        fit_args = [
            *(a for c in args.config for a in ("--config", c)),
            *data_arguments(settings, args),
            "--trainer.default_root_dir", str(root),
            "--trainer.max_epochs", "1",
            "--trainer.max_steps", "-1",
            "--trainer.limit_train_batches", str(args.warmup + args.steps),
            "--trainer.limit_val_batches", str(args.val_batches),
            "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false",
            *(["--model.init_args.init_weights", args.init_weights] if args.init_weights else []),
            *args.fit_args,
        ]  # fmt: skip
        try:
            cli = build_cli(fit_args)
            timer = StepTimer(args.warmup)
            cli.trainer.callbacks.insert(0, timer)
            started = time.perf_counter()
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            wall = time.perf_counter() - started
            train_batches = len(cli.datamodule.train_dataloader())
            val_batches = len(cli.datamodule.val_dataloader())
            if args.save_checkpoint:
                checkpoints = sorted(root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
                if not checkpoints:
                    raise FileNotFoundError(f"{root}: the timed run wrote no checkpoint to save.")
                shutil.copyfile(checkpoints[-1], args.save_checkpoint)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        result = {
            "configs": args.config,
            "fit_args": args.fit_args,
            "device": str(cli.trainer.strategy.root_device),
            "measured_steps": args.steps,
            "measured_val_batches": args.val_batches,
            "wall_seconds": wall,
            **project(settings, timer, train_batches, val_batches, scst),
        }
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2))
        print(markdown_row(args.config, result))
        return 0

    return run_guarded("time_recipe.py", run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
