"""Resume: a `python -m updown.fit` process SIGKILLed mid-epoch and resumed with `--ckpt_path last` ends exactly
like an uninterrupted run (XE and SCST); a checkpoint being written when the process dies never replaces the
previous one; the training order and the per-step seeds that make resuming exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY_SPEC, tiny_captioning_args

from updown.checkpointing import AtomicCheckpointIO, atomic_torch_save
from updown.data.samplers import ResumableShuffleSampler, ResumableTrainingOrder
from updown.fit import resolve_ckpt_path

# 60 training images in batches of 10: 6 steps an epoch, last.ckpt every 2 steps, so most saves are mid-epoch.
STEPS_PER_EPOCH = 6
FAST = [
    "--data.init_args.batch_size", "10",
    "--last_checkpoint.every_n_train_steps", "2",
    "--model.init_args.val_metrics", "[CIDEr]",
    "--trainer.log_every_n_steps", "1",
]  # fmt: skip

# A callback for the child process: at the given step it announces itself and waits to be killed, so the
# SIGKILL lands at a known point (a real SIGKILL of a real process, sent by the test).
HELPER = """
import time
from pathlib import Path

import pytorch_lightning as pl


class WaitForKill(pl.Callback):
    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(batch_idx))
            while True:
                time.sleep(1)
"""

SLOW_PICKLE = '''
import time
from pathlib import Path


class SlowToPickle:
    """Pickling it announces itself and hangs: a checkpoint holding it is being written until the process dies."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        Path(self.marker).write_text("writing")
        while True:
            time.sleep(1)
'''


def child_environment(helpers: Path) -> dict[str, str]:
    # One thread: the same arithmetic in every process (and fast on shared cores).
    return {**os.environ, "PYTHONPATH": str(helpers), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def fit(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "updown.fit", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def fit_and_kill_at(args: list[str], step: int, marker: Path, env: dict[str, str]) -> None:
    """Run ``updown.fit`` until it is about to train step ``step + 1``, then SIGKILL it."""
    callback = {
        "class_path": "resume_helpers.WaitForKill",
        "init_args": {"step": step, "marker": str(marker)},
    }
    command = [sys.executable, "-m", "updown.fit", *args, f"--trainer.callbacks+={json.dumps(callback)}"]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None, (
                f"the run ended before step {step}:\n{process.stderr.read()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"the run did not reach step {step}"
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def run_directory(root: Path, version: int) -> Path:
    return root / "lightning_logs" / f"version_{version}"


def assert_same_end(reference: Path, resumed: Path) -> None:
    """Same final metrics, steps and weights."""
    expected = json.loads((reference / "metrics.json").read_text())
    actual = json.loads((resumed / "metrics.json").read_text())
    # The final validation's keys: metrics.json also keeps keys that only an earlier validation logged (e.g.
    # val/grounding when some epoch generated no category word), which a resumed process never ran.
    last_validation = final_validation(reference)
    assert last_validation == final_validation(resumed) and "val/cider" in last_validation
    compared = [
        *last_validation,
        "global_step",
        "epochs",
        *(k for k in expected if k.startswith(("start/", "gain/"))),
    ]
    assert {k: actual.get(k) for k in compared} == {k: expected[k] for k in compared}
    # The best checkpoint so far is remembered across the restart (its file stays in the first run's folder).
    assert actual["best/val/cider"] == expected["best/val/cider"]
    assert Path(actual["best_checkpoint"]).name == Path(expected["best_checkpoint"]).name
    assert Path(actual["best_checkpoint"]).is_file()
    expected_weights = load(reference / "checkpoints" / "last.ckpt")["state_dict"]
    actual_weights = load(resumed / "checkpoints" / "last.ckpt")["state_dict"]
    assert expected_weights.keys() == actual_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(tensor, actual_weights[name]), name


@pytest.fixture(scope="module")
def helpers(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("helpers")
    (folder / "resume_helpers.py").write_text(textwrap.dedent(HELPER) + textwrap.dedent(SLOW_PICKLE))
    return folder


@pytest.fixture(scope="module")
def xe_runs(tmp_path_factory, tiny_world, helpers):
    """An uninterrupted XE run and one SIGKILLed after step 8 (mid-epoch 2) then resumed; their run directories."""
    env = child_environment(helpers)
    base = tmp_path_factory.mktemp("xe")
    # Dropout and scheduled sampling: random draws every step, which the resumed run must repeat exactly.
    extra = [*FAST, "--model.init_args.net.dropout", "0.3", "--model.init_args.scheduled_sampling.probability", "0.25"]
    data_root = tiny_world.root.parent
    fit(tiny_captioning_args(base / "reference", data_root, *extra), env)
    interrupted = base / "interrupted"
    fit_and_kill_at(tiny_captioning_args(interrupted, data_root, *extra), 8, base / "at_step_8", env)
    killed_at = load(run_directory(interrupted, 0) / "checkpoints" / "last.ckpt")
    fit(tiny_captioning_args(interrupted, data_root, *extra, "--ckpt_path", "last"), env)
    return run_directory(base / "reference", 0), run_directory(interrupted, 1), killed_at


def test_xe_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(xe_runs):
    reference, resumed, killed_at = xe_runs
    # The newest checkpoint before the kill is mid-epoch: epoch 1, 2 of its 6 batches trained.
    assert killed_at["global_step"] == 8 and killed_at["epoch"] == 1
    assert tuple(killed_at["CaptioningDataModule"]["next_batch"]) == (1, 8 - STEPS_PER_EPOCH)
    assert_same_end(reference, resumed)
    # Every step after the restart logged the loss of the uninterrupted run's step.
    expected = train_losses(reference)
    actual = train_losses(resumed)
    assert sorted(actual) == list(range(8, 2 * STEPS_PER_EPOCH))
    assert actual == {step: expected[step] for step in actual}


def logged_rows(run: Path) -> list[dict[str, str]]:
    """The rows of the run's ``metrics.csv``, without their empty cells."""
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [{k: v for k, v in zip(header, line.split(",")) if v} for line in lines[1:]]


def train_losses(run: Path) -> dict[int, str]:
    return {int(row["step"]): row["train/loss"] for row in logged_rows(run) if "train/loss" in row}


def final_validation(run: Path) -> dict[str, str]:
    """The ``val/*`` values the run's last validation logged."""
    row = [row for row in logged_rows(run) if "val/cider" in row][-1]
    return {k: v for k, v in row.items() if k.startswith("val/")}


def test_scst_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(
    tmp_path, tiny_world, helpers, xe_runs
):
    env = child_environment(helpers)
    xe_checkpoint = xe_runs[0] / "checkpoints" / "last.ckpt"

    def scst_args(root: Path, *extra: str) -> list[str]:
        # Multinomial samples with the mean-of-others baseline: the SCST random draws the resume must repeat.
        xe_config, *rest = tiny_captioning_args(root, tiny_world.root.parent)[1:]
        return [
            "--config", xe_config, "--config", str(ROOT / "configs" / "captioning" / "synthetic_scst.yaml"), *rest, *FAST,
            "--trainer.max_epochs", "1", "--model.init_args.baseline", "mean_of_others",
            "--model.init_args.net.embedding_size", "16", "--model.init_args.net.hidden_size", "32",
            "--model.init_args.net.attention_size", "16", "--model.init_args.net.dropout", "0.3",
            "--model.init_args.init_weights", str(xe_checkpoint), *extra,
        ]  # fmt: skip

    fit(scst_args(tmp_path / "reference"), env)
    interrupted = tmp_path / "interrupted"
    fit_and_kill_at(scst_args(interrupted), 4, tmp_path / "at_step_4", env)
    killed_at = load(run_directory(interrupted, 0) / "checkpoints" / "last.ckpt")
    assert killed_at["global_step"] == 4 and tuple(killed_at["CaptioningDataModule"]["next_batch"]) == (0, 4)
    fit(scst_args(interrupted, "--ckpt_path", "last"), env)
    reference, resumed = run_directory(tmp_path / "reference", 0), run_directory(interrupted, 1)
    assert_same_end(reference, resumed)
    # The resumed run kept the starting score of its checkpoint instead of decoding again.
    assert (
        json.loads((resumed / "metrics.json").read_text())["start/val/cider"]
        == killed_at["scst_start_metrics"]["start/val/cider"]
    )


def test_a_checkpoint_killed_mid_write_never_replaces_the_previous_one(tmp_path, helpers):
    folder = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints"
    target = folder / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 4, "weights": torch.arange(5.0)}, target)
    marker = tmp_path / "writing"
    writer = textwrap.dedent(f"""
        import torch
        from resume_helpers import SlowToPickle
        from updown.checkpointing import AtomicCheckpointIO
        AtomicCheckpointIO().save_checkpoint(
            {{"global_step": 6, "weights": torch.zeros(100_000), "hangs": SlowToPickle({str(marker)!r})}}, {str(target)!r}
        )
    """)
    process = subprocess.Popen([sys.executable, "-c", writer], cwd=ROOT, env=child_environment(helpers))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    # The killed write left its partial file beside the intact previous checkpoint ...
    partial = [p for p in folder.iterdir() if p.name != "last.ckpt"]
    assert (
        len(partial) == 1
        and partial[0].name.startswith(".last.ckpt.")
        and partial[0].name.endswith(".partial")
    )
    checkpoint = load(target)
    assert checkpoint["global_step"] == 4 and torch.equal(checkpoint["weights"], torch.arange(5.0))
    # ... and `--ckpt_path last` resolves to the good checkpoint, never the partial one.
    os.utime(partial[0])
    cli = SimpleNamespace(
        config={"ckpt_path": "last"}, trainer=SimpleNamespace(default_root_dir=tmp_path / "run")
    )
    assert resolve_ckpt_path(cli) == str(target)


def test_a_failed_write_keeps_the_previous_checkpoint_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, target)

    def broken_save(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"step": 2}, target)
    monkeypatch.undo()
    assert load(target) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_the_training_order_depends_on_seed_and_epoch_and_resumes_mid_epoch():
    def epoch_order(epoch: int, seed: int = 3, **kwargs) -> list[int]:
        sampler = ResumableShuffleSampler(23, seed=seed, **kwargs)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_order(0) == epoch_order(0) and sorted(epoch_order(0)) == list(range(23))
    assert epoch_order(1) != epoch_order(0) and epoch_order(0, seed=4) != epoch_order(0)
    # Ranks split the epoch's permutation (DistributedSampler's sharding, padded to equal shares).
    shards = [epoch_order(2, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 12 and set(shards[0]) | set(shards[1]) == set(range(23))

    resumed = ResumableShuffleSampler(23, seed=3)
    resumed.start_at(1, 10)
    assert len(resumed) == 23  # Lightning counts the resumed epoch's batches from where it stopped
    assert list(resumed) == epoch_order(1)[10:]
    resumed.set_epoch(2)
    assert list(resumed) == epoch_order(2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_restored_datamodule_loads_the_remaining_batches_of_its_epoch(num_workers):
    class Order(ResumableTrainingOrder):
        trainer = None

    dataset = list(range(25))
    full = Order()
    full.load_state_dict({"shuffle_seed": 7})
    arguments = {"num_workers": num_workers, "persistent_workers": num_workers > 0}
    loader = full.resumable_train_loader(dataset, 4, **arguments)
    loader.sampler.set_epoch(3)
    epoch = [batch.tolist() for batch in loader]

    restored = Order()
    restored.load_state_dict({"shuffle_seed": 7, "next_batch": (3, 2)})
    loader = restored.resumable_train_loader(dataset, 4, **arguments)
    assert len(loader) == 7
    assert [batch.tolist() for batch in loader] == epoch[2:]


def test_every_n_train_steps_must_be_positive(tmp_path, capsys):
    from updown.fit import main

    args = ["--trainer.default_root_dir", str(tmp_path), "--last_checkpoint.every_n_train_steps", "0"]
    assert main(args) == 2
    assert "--last_checkpoint.every_n_train_steps: must be an integer > 0, got 0" in capsys.readouterr().err


def test_the_synthetic_default_writes_last_ckpt_only_after_validation(capsys):
    from updown.fit import main

    with pytest.raises(SystemExit):
        main(["--print_config"])
    printed = capsys.readouterr().out
    assert "last_checkpoint:\n  every_n_train_steps: null" in printed


def test_the_resume_tests_arithmetic_matches_the_training_loader(tiny_world):
    """The kill points above assume STEPS_PER_EPOCH batches per epoch: count them in the real loader."""
    from updown.data.datamodules import CaptioningDataModule

    datamodule = CaptioningDataModule(batch_size=10, data_root=str(tiny_world.root.parent), synthetic=TINY_SPEC)
    datamodule.setup("fit")
    assert len(datamodule.train_dataloader()) == STEPS_PER_EPOCH
