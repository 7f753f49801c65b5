"""``python -m updown.validate``: score a checkpoint on the validation split, on any devices.

    python -m updown.validate --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt
    python -m updown.validate --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt \\
        --trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu   # or 8 GPUs, several nodes...
    python -m updown.validate --config A.yaml --ckpt_path last --output scores.json

It reads the same configs as ``python -m updown.fit`` (the run directory's ``config.yaml`` rebuilds the
model the checkpoint was trained as) and runs ``trainer.validate`` once. Every validation metric is exact
under DDP: the tasks gather per-sample results from all ranks and keep one copy of each sample (the
distributed sampler repeats samples when the world size does not divide the split), so the numbers equal
a single-process run's on the same checkpoint and data. Global rank 0 prints them as a table and writes them,
with ``checkpoint``, ``world_size`` and ``num_samples`` (distinct samples scored), to ``--output``
(default: ``<checkpoint>.val_metrics.json`` next to the checkpoint), atomically. No logger and no config
copy are written unless asked for (``--trainer.logger true``). ``--debug`` shows tracebacks for user errors.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from updown.callbacks import print_metrics
from updown.cli import run_guarded
from updown.fit import UpDownCLI, build_cli, resolve_ckpt_path, with_default_config
from updown.io import write_json

PROG = "python -m updown.validate"


class ValidateCLI(UpDownCLI):
    def _instantiate_trainer(self, config: dict, callbacks: list):
        # A run's config.yaml says `logger: null` (Lightning's default logger); a validation writes its JSON
        # report instead of a new lightning_logs/version_N unless a logger is asked for.
        if config.get("logger") is None:
            config = {**config, "logger": False}
        return super()._instantiate_trainer(config, callbacks)

    def add_arguments_to_parser(self, parser) -> None:
        # Every option of updown.fit, so a run's config.yaml is accepted as it is.
        super().add_arguments_to_parser(parser)
        ckpt_path = next(action for action in parser._actions if "--ckpt_path" in action.option_strings)
        ckpt_path.help = (
            "The checkpoint to score (required; 'last': the newest last.ckpt under trainer.default_root_dir)."
        )
        parser.add_argument(
            "--output", type=str | None, default=None,
            help="Write the metrics to this JSON file (default: <checkpoint>.val_metrics.json beside it).",
        )  # fmt: skip


def default_output(ckpt_path: str) -> Path:
    """``checkpoints/last.ckpt`` -> ``checkpoints/last.val_metrics.json``."""
    path = Path(ckpt_path)
    return path.with_name(f"{path.stem}.val_metrics.json")


def validate(cli: ValidateCLI) -> dict[str, Any]:
    """Run one validation of ``--ckpt_path``; returns the report (the same on every rank but ``num_samples``)."""
    if cli.config.get("ckpt_path") is None:
        raise ValueError(
            "--ckpt_path is required: the checkpoint to score, e.g. "
            "--ckpt_path runs/captioning_synthetic/lightning_logs/version_0/checkpoints/last.ckpt."
        )
    ckpt_path = resolve_ckpt_path(cli)
    try:
        results = cli.trainer.validate(
            cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, verbose=False
        )
    except RuntimeError as error:
        if "state_dict" not in str(error):
            raise
        # The first concrete problem ("size mismatch for ...", "Missing key(s) ..."), not the header line.
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        first_line = lines[1] if len(lines) > 1 else lines[0]
        raise ValueError(
            f"{ckpt_path}: the checkpoint's weights do not fit the model the config builds ({first_line}). "
            "Pass the config the checkpoint was trained with (its run directory's config.yaml)."
        ) from None
    if not results or not results[0]:
        raise ValueError(
            f"{ckpt_path}: validation logged no metrics: no validation batch ran (a config with "
            "trainer.limit_val_batches: 0, or an empty val split?). Pass --trainer.limit_val_batches 1.0."
        )
    report: dict[str, Any] = {key: float(value) for key, value in sorted(results[0].items())}
    report["checkpoint"] = str(ckpt_path)
    report["world_size"] = cli.trainer.world_size
    # Set by the tasks on rank 0 (at least), after removing the sampler's repeats.
    num_samples = getattr(cli.model, "validation_num_samples", None)
    if num_samples is not None:
        report["num_samples"] = int(num_samples)
    return report


def main(args: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args
    args = with_default_config([a for a in args if a != "--debug"])

    def run() -> int:
        # No logger and no config copy by default: a validation's output is its JSON report.
        cli = build_cli(args, ValidateCLI, save_config_callback=None, trainer_defaults={})
        report = validate(cli)
        if cli.trainer.is_global_zero:
            output = Path(cli.config.get("output") or default_output(report["checkpoint"]))
            write_json(output, report, indent=2)
            print_metrics("Validation metrics", report, output)
        return 0

    return run_guarded(PROG, run, debug)


if __name__ == "__main__":
    sys.exit(main())
