"""tools/benchmark_captioning.py runs end to end at tiny sizes (without a reference checkout) and reports every
measurement, constrained beam search included; a bad --reference is refused."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
TINY = ["--threads", "1", "--images", "2", "--boxes", "4", "--feature-size", "16", "--vocabulary-size", "50",
        "--hidden-size", "16", "--attention-size", "8", "--rounds", "1", "--warmup", "0", "--large-images", "0"]  # fmt: skip


@pytest.fixture
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_captioning", TOOLS / "benchmark_captioning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_captioning"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("benchmark_captioning", None)


@pytest.mark.parametrize("constraint_words", ["1", "3"])
def test_every_measurement_is_reported(benchmark, constraint_words):
    rows = benchmark.main([*TINY, "--constraint-words", constraint_words])
    measurements = [row["measurement"] for row in rows]
    assert measurements == [
        "XE train step (fwd + bwd + Adam)",
        "beam search, beam 5",
        "constrained beam search, beam 5",
        "SCST reward (CIDEr-D), references cached",
        "SCST reward (CIDEr-D), references added",
    ]
    assert f"2 {constraint_words}-word forms" in rows[2]["batch"]
    # Without --reference the reference columns stay empty.
    assert all(row["reference"] == "" and row["ours / reference"] == "" for row in rows)


def test_skip(benchmark):
    rows = benchmark.main([*TINY, "--skip", "xe", "reward", "beam"])
    assert [row["measurement"] for row in rows] == ["constrained beam search, beam 5"]


def test_reference_without_attmodel_is_refused(benchmark, tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark.main([*TINY, "--reference", str(tmp_path)])
    assert "no captioning/models/AttModel.py" in capsys.readouterr().err
