"""The analysis notebook executes headless, top to bottom, on the outputs of a test-environment run."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "pilot_analysis.ipynb"


def test_the_analysis_notebook_runs_without_errors(finished_run, monkeypatch):
    monkeypatch.setenv("KEDRO_ENV", "test")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(finished_run)}}).execute()  # raises on any cell error
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # accuracy, latency, training curves, guidance map
    assert any("guidance vectors of dimension" in o.get("text", "") for o in outputs)
    assert not [o for o in outputs if o.get("output_type") == "error"]
