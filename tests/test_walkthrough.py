"""`examples/walkthrough.ipynb` runs, cell by cell, on a tiny model and a few pairs, so it cannot rot.

The notebook's parameter cell (tagged `parameters`) is replaced, as papermill would, and every cell
is executed in a fresh kernel; the plots must come out as images and the inspector page be written.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.ipynb"


def test_the_walkthrough_runs_on_tiny_settings(tmp_path, tiny_model_dir, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    names = {line.split("=")[0].strip() for line in parameters.source.splitlines() if "=" in line and not line.startswith("#")}
    tiny = {"MODEL": tiny_model_dir, "DATASET": "arithmetic", "TRAIN_PAIRS": 4, "EVAL_PAIRS": 4, "MAX_STEPS": 2,
            "BATCH_SIZE": 2, "SDPO_THRESHOLD": 0.6, "LEARNING_RATE": 1e-3, "OUTPUT_DIR": str(tmp_path / "out")}  # fmt: skip
    assert names == tiny.keys(), names ^ tiny.keys()  # every parameter the notebook has is set here, and no other
    parameters.source = "\n".join(f"{name} = {value!r}" for name, value in tiny.items())
    monkeypatch.setenv("SELECTIVE_PO_CACHE", str(tmp_path / "cache"))  # the kernel inherits it: stored values go there
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert len(images) == 2  # the training curves and the score histogram
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "likelihood accuracy before training" in text and "reward accuracy" in text and "⟦" in text
    assert (tmp_path / "out" / "inspect.html").is_file()
