"""The shipped synthetic defaults, end to end, against the targets the README quotes (slow: `pytest -m slow`).

Each trains the full default config on the full synthetic world in a fresh cache, exactly as a newcomer would
run it, and checks the scores in `metrics.json`: minutes each on 2 CPU cores, so they stay out of the fast
suite.
"""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from updown.fit import main

pytestmark = pytest.mark.slow


def _fit(tmp_path, monkeypatch, *args: str, run: str = "run") -> dict:
    monkeypatch.setenv("UPDOWN_DATA", str(tmp_path / "data"))
    root = tmp_path / run
    # As a user runs it: updown.fit pins the intra-op threads (--threads, default 1) whatever this process uses,
    # so these runs give the values of the README's Results table (tools/reproduce.py) bit for bit.
    code = main([*args, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"])
    assert code == 0
    return json.loads((root / "lightning_logs" / "version_0" / "metrics.json").read_text())


def test_captioning_default_beats_human_consensus_then_scst_adds_5_percent(tmp_path, monkeypatch):
    metrics = _fit(tmp_path, monkeypatch)  # no --config: python -m updown.fit's default
    assert metrics["val/cider"] > metrics["val/human_cider"], metrics
    assert metrics["val/grounding"] >= 0.8, metrics
    # Stage 2 as docs/training.md shows it: SCST from the XE run's best checkpoint.
    captioning = ROOT / "configs" / "captioning"
    scst = _fit(
        tmp_path,
        monkeypatch,
        "--config", str(captioning / "synthetic.yaml"),
        "--config", str(captioning / "synthetic_scst.yaml"),
        "--model.init_args.init_weights", metrics["best_checkpoint"],
        run="scst",
    )  # fmt: skip
    assert scst["start/val/cider"] == pytest.approx(metrics["best/val/cider"], rel=1e-6)
    assert scst["val/cider"] >= 1.05 * scst["start/val/cider"], scst


def test_vqa_default_reaches_80_and_beats_the_language_prior_by_25(tmp_path, monkeypatch):
    metrics = _fit(tmp_path, monkeypatch, "--config", str(ROOT / "configs" / "vqa" / "synthetic.yaml"))
    assert metrics["val/vqa_accuracy"] >= 80.0, metrics
    assert metrics["val/vqa_accuracy"] >= metrics["val/question_only_accuracy"] + 25.0, metrics
