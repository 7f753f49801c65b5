"""The attention-inspection notebook runs headless, top to bottom, on the CPU (in its tiny mode)."""

from __future__ import annotations

import nbformat
from conftest import ROOT
from nbclient import NotebookClient


def test_notebook_executes_headless(tmp_path, monkeypatch):
    monkeypatch.setenv("UPDOWN_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("UPDOWN_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(ROOT / "notebooks" / "attention_inspection.ipynb", as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "strip outputs"
    )
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # Every figure cell displayed an image.
    images = [
        o
        for o in outputs
        if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
    ]
    assert len(images) >= 4
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "grounding:" in text and "2 images, 36 boxes of 2048 features each" in text
