"""``python -m updown.fit``: train any task from composable YAML configs (LightningCLI, subclass mode).

    python -m updown.fit                                     # the synthetic captioning default
    python -m updown.fit --config configs/captioning/updown_xe.yaml --trainer.max_epochs 3
    python -m updown.fit --config A.yaml --config B.yaml     # later files override earlier ones
    python -m updown.fit --config A.yaml --ckpt_path last    # resume the run in A's root dir

With no ``--config`` / ``--model`` / ``--data`` it uses ``configs/captioning/synthetic.yaml``. The resolved
config is saved as ``config.yaml`` in the run directory (``<trainer.default_root_dir>/lightning_logs/version_N``),
with ``checkpoints/`` and the final ``metrics.json``. ``--debug`` shows tracebacks for user errors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import traceback
import warnings
from pathlib import Path

import pytorch_lightning as pl
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.cli import LightningCLI

from updown.callbacks import LastCheckpoint, MetricsReport
from updown.checkpointing import with_atomic_checkpoint_io
from updown.cli import USER_ERRORS, available_devices, parse_error_message, run_guarded
from updown.config import NonNegativeFloat, NonNegativeInt, PositiveInt, check_value, restricted_number_type
from updown.determinism import add_threads_argument, pin_threads

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIGS / "captioning" / "synthetic.yaml"


def raised_by_accelerator(error: BaseException) -> bool:
    """Whether Lightning's accelerator set-up raised ``error`` (a missing GPU, the ImportError of torch_xla)."""
    return any("accelerator" in frame.filename for frame in traceback.extract_tb(error.__traceback__))


# Ranges of the Trainer's numeric options that Lightning does not check itself (0 gradient-accumulation batches
# or validation every 0 epochs end in a ZeroDivisionError mid-run); declared once, checked before the Trainer is built.
AtLeastMinusOne = restricted_number_type("AtLeastMinusOne", int, (">=", -1))
TRAINER_RANGES = {
    "accumulate_grad_batches": PositiveInt,
    "check_val_every_n_epoch": PositiveInt | None,
    "log_every_n_steps": PositiveInt | None,
    "num_nodes": PositiveInt,
    "min_epochs": NonNegativeInt | None,
    "min_steps": AtLeastMinusOne | None,
    "num_sanity_val_steps": AtLeastMinusOne | None,
    "gradient_clip_val": NonNegativeFloat | None,
}


class UpDownCLI(LightningCLI):
    def _instantiate_trainer(self, config: dict, callbacks: list):
        # A rich progress bar unless the run turns progress bars off (Lightning refuses both at once).
        if config.get("enable_progress_bar", True) is not False:
            callbacks = [*callbacks, RichProgressBar()]
        # Checkpoints are written to a temporary file and renamed: a run killed mid-write keeps its last good one.
        config["plugins"] = with_atomic_checkpoint_io(config.get("plugins"))
        try:
            return super()._instantiate_trainer(config, callbacks)
        except (MisconfigurationException, ImportError) as error:
            if not raised_by_accelerator(error):
                if isinstance(error, ImportError):
                    raise
                # A trainer option Lightning refuses (max_epochs -5, limit_val_batches -1): its message names it.
                raise ValueError(f"trainer: {str(error).rstrip('.!')}. Fix the --trainer option.") from None
            # An accelerator or device this machine lacks ("No supported gpu backend found!", torch_xla missing).
            raise ValueError(
                f"--trainer.accelerator {config.get('accelerator')} --trainer.devices {config.get('devices')}: "
                f"{str(error).rstrip('.!')}. This machine has: {available_devices()}. Pick one of them "
                "(--trainer.accelerator cpu)."
            ) from None

    def before_instantiate_classes(self) -> None:
        pin_threads(self.config.get("threads"))  # before anything computes (updown.determinism)
        trainer = self.config.get("trainer") or {}
        for name, kind in TRAINER_RANGES.items():
            check_value(f"--trainer.{name}", trainer.get(name), kind)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None,
            help="Resume training from this checkpoint ('last': the newest last.ckpt of this run's root dir).",
        )  # fmt: skip
        # `--last_checkpoint.every_n_train_steps N`: also write last.ckpt every N steps, to resume mid-epoch.
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        add_threads_argument(parser)  # --threads: fixed intra-op threads, for bit-identical reruns


def with_default_config(args: list[str]) -> list[str]:
    """Prepend the synthetic default unless the arguments choose a config, a model or a datamodule."""
    chooses = any(a.split("=")[0] in ("--config", "--model", "--data", "-c") for a in args)
    return args if chooses or not DEFAULT_CONFIG.exists() else ["--config", str(DEFAULT_CONFIG), *args]


NULL_WORDS = ("null", "None", "~")


def nested_nulls_as_json(args: list[str]) -> list[str]:
    """``--model.init_args.net.word_vectors null`` as ``--model.init_args.net={"word_vectors": null}``.

    jsonargparse (4.53, subclass mode) turns a command-line null for a field of a config nested in ``init_args``
    into the string "None": a path option then names a file "None", a choice refuses it. The JSON form of the same
    override sets null and keeps the config's other fields (it merges), so the option is rewritten to it.
    """
    rewritten, i = [], 0
    while i < len(args):
        option, value, step = args[i], None, 1
        if option.startswith("--") and "=" in option:
            option, value = option.split("=", 1)
        elif option.startswith("--") and i + 1 < len(args):
            value, step = args[i + 1], 2
        head, _, rest = option.partition(".init_args.")
        if value in NULL_WORDS and rest.count(".") >= 1:
            parent, key = (head + ".init_args." + rest).rsplit(".", 1)
            rewritten.append(f"{parent}={{{json.dumps(key)}: null}}")
            i += step
        else:
            rewritten.append(args[i])
            i += 1
    return rewritten


def build_cli(args: list[str], cli_class: type[UpDownCLI] = UpDownCLI, **kwargs) -> UpDownCLI:
    """The CLI of every entry point; ``updown.validate`` passes its subclass and overrides (``kwargs``)."""
    options = dict(
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=nested_nulls_as_json(args),
        # Parse errors raise (and become one `error:` line) instead of printing the usage and a nested report.
        parser_kwargs={"exit_on_error": False},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [MetricsReport()]},
    )
    with warnings.catch_warnings():
        # We always pass the (default-completed) command line as args; Lightning warns whenever sys.argv is set too.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        try:
            return cli_class(pl.LightningModule, pl.LightningDataModule, **{**options, **kwargs})
        except argparse.ArgumentError as error:
            # A bad option or config value (a range, a type, an unknown key): jsonargparse's nested report as
            # one `error:` line naming the option.
            raise ValueError(parse_error_message(str(error), args)) from None


def resolve_ckpt_path(cli: UpDownCLI) -> str | None:
    """``last`` -> the newest ``last.ckpt`` under the trainer's root dir; otherwise the path as given."""
    ckpt_path = cli.config.get("ckpt_path")
    if ckpt_path != "last":
        if ckpt_path is not None and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: checkpoint not found. Check the path.")
        return ckpt_path
    root = Path(cli.trainer.default_root_dir)
    candidates = sorted(root.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"--ckpt_path last: no last.ckpt under {root}. Start without --ckpt_path.")
    return str(candidates[-1])


def new_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_unfinished_run(created: list[Path]) -> None:
    """Remove the run directory (``created[0]``) of a run that failed before its first step, unless it holds a
    checkpoint, and the then empty folders of ``created``.

    Bad input fails before the first step; the run directory it leaves (a config.yaml, empty logs) would look like
    a run and shift the next run's version number. Folders that existed before the run stay.
    """
    if not created or not created[0].is_dir() or any(created[0].rglob("*.ckpt")):
        return
    # Every DDP rank may get here at once: tolerate a folder another rank removed first.
    shutil.rmtree(created[0], ignore_errors=True)
    for folder in created[1:]:
        try:
            folder.rmdir()
        except OSError:  # not empty (another run's files), or already gone
            break


def main(args: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args
    args = with_default_config([a for a in args if a != "--debug"])

    def run() -> int:
        cli = build_cli(args)
        created = new_folders(Path(cli.trainer.log_dir)) if cli.trainer.log_dir else []
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resolve_ckpt_path(cli))
        except USER_ERRORS:
            if cli.trainer.global_step == 0:
                remove_unfinished_run(created)
            raise
        return 0

    return run_guarded("updown.fit", run, debug)


if __name__ == "__main__":
    sys.exit(main())
