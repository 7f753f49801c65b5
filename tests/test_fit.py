"""`python -m updown.fit` end to end on a tiny synthetic world, and every shipped config parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_SPEC
from updown.fit import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def tiny_args(root: Path, data_root: Path, *extra: str) -> list[str]:
    spec = TINY_SPEC
    return [
        "--config", "configs/captioning/synthetic.yaml",
        "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.embedding_size", "16",
        "--model.init_args.hidden_size", "32",
        "--model.init_args.attention_size", "16",
        "--data.init_args.data_root", str(data_root),
        "--data.init_args.synthetic.num_train", str(spec.num_train),
        "--data.init_args.synthetic.num_val", str(spec.num_val),
        "--data.init_args.synthetic.num_test", str(spec.num_test),
        "--data.init_args.synthetic.feature_size", str(spec.feature_size),
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(c.parents[1])) for c in CONFIGS])
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("updown.tasks.")
    assert printed["data"]["class_path"].startswith("updown.data.")


def test_fit_writes_run_directory_and_resumes(tmp_path, tiny_world, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    data_root = tiny_world.root.parent
    assert main(tiny_args(tmp_path / "run", data_root)) == 0
    run = tmp_path / "run" / "lightning_logs" / "version_0"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val/cider", "val/bleu4", "val/meteor", "val/rouge_l", "val/human_cider", "best/val/cider"):
        assert key in metrics and isinstance(metrics[key], float)
    assert metrics["global_step"] == 2 * 3  # 60 images / 20 per batch, 2 epochs
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_epochs"] == 2
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["vocabulary"][:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    # Resume from last.ckpt for one more epoch: training continues at the saved step.
    assert main(tiny_args(tmp_path / "run", data_root, "--trainer.max_epochs", "3", "--ckpt_path", "last")) == 0
    resumed = json.loads((tmp_path / "run" / "lightning_logs" / "version_1" / "metrics.json").read_text())
    assert resumed["global_step"] == 3 * 3


def test_user_errors_exit_2_without_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    code = main(["--config", "configs/captioning/synthetic.yaml", "--data.init_args.features_h5path",
                 str(tmp_path / "absent.h5"), "--data.init_args.captions_jsonpath", "c.json",
                 "--data.init_args.vocabulary_path", "v.json", "--trainer.default_root_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "absent.h5: region-feature file not found" in err and "Traceback" not in err
    code = main(["--config", "configs/captioning/synthetic.yaml", "--ckpt_path", str(tmp_path / "nope.ckpt"),
                 "--trainer.default_root_dir", str(tmp_path)])
    assert code == 2 and "checkpoint not found" in capsys.readouterr().err
