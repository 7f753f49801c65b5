"""`python -m updown.fit` end to end on a tiny synthetic world, and every shipped config parses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, tiny_captioning_args

from updown.fit import main

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def configured_value(task, group: str, key: str | None = None):
    """Where a task keeps the value of ``model.init_args.<group>[.<key>]`` once it is built."""
    holders = {
        "net": task.net_config,
        "optimizer": task.optimizer_config,
        "decoding": getattr(task, "decoding", None),
        "scheduled_sampling": getattr(task, "scheduled_sampling", None),
        "constraints": getattr(task, "constraints", None),
    }
    value = getattr(holders[group], key) if key is not None else task.hparams[group]
    return list(value) if isinstance(value, tuple) else value  # YAML has lists where configs keep tuples


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(c.parents[1])) for c in CONFIGS])
def test_every_shipped_config_builds_the_objects_it_describes(config):
    """Each value a shipped config sets reaches the task and datamodule the CLI builds from it (nothing is
    dropped or overridden on the way from YAML through the parser, the config dataclasses and the defaults)."""
    from updown.fit import build_cli

    written = yaml.safe_load(config.read_text())
    cli = build_cli(["--config", str(config)])
    assert type(cli.model).__module__ + "." + type(cli.model).__name__ == written["model"]["class_path"]
    assert (
        type(cli.datamodule).__module__ + "." + type(cli.datamodule).__name__ == written["data"]["class_path"]
    )
    for name, value in (written["model"].get("init_args") or {}).items():
        if isinstance(value, dict):
            for key, inner in value.items():
                assert configured_value(cli.model, name, key) == inner, f"model.init_args.{name}.{key}"
        else:
            assert configured_value(cli.model, name) == value, f"model.init_args.{name}"
    for name, value in (written["data"].get("init_args") or {}).items():
        stored = cli.datamodule.hparams[name]
        if isinstance(value, dict):  # a nested spec (synthetic): the fields the YAML sets
            stored = {
                key: list(stored[key]) if isinstance(stored[key], tuple) else stored[key] for key in value
            }
        assert stored == value, f"data.init_args.{name}"
        if hasattr(cli.datamodule, name) and not isinstance(value, dict):
            assert getattr(cli.datamodule, name) == value, f"data.init_args.{name}"


def test_fit_writes_the_run_directory(tiny_captioning_run):
    metrics = json.loads((tiny_captioning_run / "metrics.json").read_text())
    for key in ("val/cider", "val/bleu4", "val/meteor", "val/rouge_l", "val/human_cider", "best/val/cider"):
        assert key in metrics and isinstance(metrics[key], float)
    assert metrics["global_step"] == 2 * 3  # 60 images / 20 per batch, 2 epochs
    assert yaml.safe_load((tiny_captioning_run / "config.yaml").read_text())["trainer"]["max_epochs"] == 2
    checkpoint = torch.load(
        tiny_captioning_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert checkpoint["data_spec"]["vocabularies"]["caption"][:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert Path(metrics["best_checkpoint"]).is_file()


def test_resume_from_last_continues_at_the_saved_step(tmp_path, tiny_captioning_run, tiny_world):
    root = tmp_path / "run"
    shutil.copytree(tiny_captioning_run, root / "lightning_logs" / "version_0")
    args = tiny_captioning_args(
        root, tiny_world.root.parent, "--trainer.max_epochs", "3", "--ckpt_path", "last"
    )
    assert main(args) == 0
    resumed = json.loads((root / "lightning_logs" / "version_1" / "metrics.json").read_text())
    assert resumed["global_step"] == 3 * 3


def test_user_errors_exit_2_without_traceback(tmp_path, capsys):
    base = [
        "--config",
        str(ROOT / "configs" / "captioning" / "synthetic.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    code = main(
        [
            *base,
            "--data.init_args.features_h5path",
            str(tmp_path / "absent.h5"),
            "--data.init_args.captions_jsonpath",
            "c.json",
            "--data.init_args.vocabulary_path",
            "v.json",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "absent.h5: region-feature file not found" in err and "Traceback" not in err
    assert main([*base, "--ckpt_path", str(tmp_path / "nope.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_same_seed_and_config_give_the_same_metrics(tmp_path, tiny_captioning_run, tiny_world):
    assert main(tiny_captioning_args(tmp_path / "again", tiny_world.root.parent)) == 0
    first = json.loads((tiny_captioning_run / "metrics.json").read_text())
    second = json.loads((tmp_path / "again" / "lightning_logs" / "version_0" / "metrics.json").read_text())
    assert {k: v for k, v in first.items() if k.startswith("val/")} == {
        k: v for k, v in second.items() if k.startswith("val/")
    }


def test_null_on_the_command_line_switches_an_optional_net_option_off():
    """`--model.init_args.net.word_vectors null` reaches a config nested in a task's init_args as the string "None"
    (jsonargparse, subclass mode); the config reads it as the null that was meant."""
    from updown.fit import build_cli

    config = ROOT / "configs" / "captioning" / "synthetic_novel.yaml"
    assert yaml.safe_load(config.read_text())["model"]["init_args"]["net"]["word_vectors"] is not None
    cli = build_cli(["--config", str(config), "--model.init_args.net.word_vectors", "null",
                     "--model.init_args.net.feature_encoder", "null"])  # fmt: skip
    assert cli.model.net_config.word_vectors is None and cli.model.net_config.feature_encoder is None


def test_only_nested_init_args_nulls_are_rewritten():
    from updown.fit import nested_nulls_as_json

    args = ["--model.init_args.net.word_vectors", "null", "--data.init_args.synthetic.held_out=~",
            "--data.init_args.features_h5path", "null", "--trainer.logger", "null", "--model.init_args.net.dropout",
            "0.1", "--model.init_args.net.word_vectors"]  # fmt: skip
    assert nested_nulls_as_json(args) == [
        '--model.init_args.net={"word_vectors": null}', '--data.init_args.synthetic={"held_out": null}',
        "--data.init_args.features_h5path", "null", "--trainer.logger", "null", "--model.init_args.net.dropout",
        "0.1", "--model.init_args.net.word_vectors",
    ]  # fmt: skip
