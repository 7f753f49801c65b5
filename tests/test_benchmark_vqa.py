"""tools/benchmark_vqa.py: the reference's left padding, tiny end-to-end runs, and its errors for a bad --reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
TINY = ["--threads", "1", "--batch-size", "4", "--hidden-size", "8", "--num-boxes", "3", "--image-feature-size", "6",
        "--num-answers", "5", "--vocabulary-size", "30", "--rounds", "2", "--warmup", "0"]  # fmt: skip

# A stand-in for hengyuan-hu's base_model.py (our own few lines): the tool only needs build_baseline0_newatt(dataset,
# num_hid) -> a module called as model(v, b, q, labels) that returns (B, num_answers) logits.
FAKE_BASE_MODEL = """
import torch
from torch import nn


class Fake(nn.Module):
    def __init__(self, ntoken, v_dim, num_hid, num_answers):
        super().__init__()
        self.embedding = nn.Embedding(ntoken + 1, num_hid, padding_idx=ntoken)
        self.image = nn.Linear(v_dim, num_hid)
        self.classifier = nn.Sequential(nn.ReLU(), nn.Dropout(0.5, inplace=True), nn.Linear(num_hid, num_answers))

    def forward(self, v, b, q, labels):
        assert b is None and labels is None and int(q.max()) <= self.embedding.padding_idx
        return self.classifier(self.embedding(q).mean(1) * self.image(v).mean(1))


def build_baseline0_newatt(dataset, num_hid):
    return Fake(dataset.dictionary.ntoken, dataset.v_dim, num_hid, dataset.num_ans_candidates)
"""


@pytest.fixture
def tool(monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmark_vqa", TOOLS / "benchmark_vqa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The tool imports the reference as `base_model`; never keep one between tests.
    monkeypatch.delitem(sys.modules, "base_model", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    threads = torch.get_num_threads()  # --threads sets the process's thread count: restore it
    yield module
    sys.modules.pop("base_model", None)
    torch.set_num_threads(threads)


def test_left_padding_matches_a_loop(tool):
    tokens = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 9], [8, 0, 0, 0, 0]])
    lengths = torch.tensor([3, 5, 1])
    expected = torch.full_like(tokens, 99)
    for b in range(3):
        expected[b, 5 - lengths[b] :] = tokens[b, : lengths[b]]
    assert torch.equal(tool.left_padded(tokens, lengths, 99), expected)


def test_prints_a_row_per_model_size_and_precision(tool, capsys):
    tool.main([*TINY, "--model", "reproduction", "paper", "--precision", "32", "bf16"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| updown")]
    assert len(rows) == 4
    assert all(row.count("|") == 13 and row.endswith("| - | - |") for row in rows)


def test_reference_runs_on_the_same_batch_and_gets_a_ratio(tool, tmp_path, capsys):
    for name in tool.REFERENCE_FILES:
        (tmp_path / name).write_text("")
    (tmp_path / "base_model.py").write_text(FAKE_BASE_MODEL)
    tool.main([*TINY, "--reference", str(tmp_path)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["updown", "hengyuan-hu"]
    # Our speed-up is a positive number; the reference's own ratio is 1.
    assert float(rows[0].split("|")[-3]) > 0 and rows[1].split("|")[-3].strip() == "1.00"


def test_bad_reference_directories_are_refused_with_the_fix(tool, tmp_path):
    with pytest.raises(SystemExit, match="base_model.py.*not found.*hengyuan-hu/bottom-up-attention-vqa"):
        tool.main([*TINY, "--reference", str(tmp_path)])
    for name in tool.REFERENCE_FILES:
        (tmp_path / name).write_text("")
    (tmp_path / "base_model.py").write_text("print 'python 2'\n")
    with pytest.raises(SystemExit, match=r"is not Python 3.*print\(x\)"):
        tool.main([*TINY, "--reference", str(tmp_path)])


def test_reference_needs_the_reproduction_model(tool, tmp_path):
    with pytest.raises(SystemExit):
        tool.main([*TINY, "--model", "paper", "--reference", str(tmp_path)])
