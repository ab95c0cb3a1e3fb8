"""Every notebook runs top to bottom, headless, in the project's Python, with a free metrics port."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
#: Longest a cell may run (nbclient fails the test past it): a hung cell, not a slow machine, is what it catches.
TIME_LIMIT_S = 180


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A ``python3`` kernelspec that starts this interpreter (not whatever ``python`` is on PATH)."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("DGDN_MONITOR_PORT", raising=False)  # the notebooks must cope with a taken port alone
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    # A collector the machine may run must not change what is tested.
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)


def test_notebooks_are_found():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_dgdn_link_prediction.ipynb",
        "03_tracing.ipynb",
    ]


#: PNG plots each notebook promises, at least.
PLOTS = {"01_quickstart": 1, "02_dgdn_link_prediction": 1, "03_tracing": 1}
MAX_BYTES = 400_000  # small enough to review
NOISE = ("Tip:", "GPU available", "TPU available", "IProgress", "Warning", "Traceback")


def _outputs(notebook) -> list:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_with_its_outputs(path):
    """A preview (GitHub, an editor) shows what the notebook shows: every code cell ran, in order, plots included."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert None not in counts, f"{path.name}: a code cell was not executed (make notebooks-execute)"
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: cells not executed top to bottom: {counts}"
    outputs = _outputs(notebook)
    assert not [out for out in outputs if out.output_type == "error"], f"{path.name} stored an error"
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= PLOTS[path.stem], f"{path.name}: {len(images)} plots stored"
    text = "".join(out.get("text", "") for out in outputs)
    assert not [word for word in NOISE if word in text], text
    assert path.stat().st_size < MAX_BYTES


@pytest.fixture
def port_8000_taken():
    """Port 8000 in use, as by another run: the notebooks must still run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", 8000))
            sock.listen(1)
        except OSError:
            pass  # already taken by something else: the same situation
        yield


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_env, port_8000_taken):
    notebook = nbformat.read(path, as_version=4)
    probe = nbformat.v4.new_code_cell("import sys; print(sys.executable)")
    notebook.cells.insert(0, probe)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=TIME_LIMIT_S,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()

    printed = "".join(out.get("text", "") for out in notebook.cells[0].outputs)
    assert os.path.realpath(printed.strip()) == os.path.realpath(sys.executable)

    text = "\n".join(
        out.get("text", "") + json.dumps(out.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    images = sum(
        1
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if "image/png" in out.get("data", {})
    )
    assert images >= PLOTS[path.stem]
    assert "port 8000 is taken" in text
    if path.stem.startswith("01"):
        assert "dgdn_training_loss" in text and "dgdn_graph_nodes" in text
    elif path.stem.startswith("02"):
        assert "validation: AP=" in text and images >= 1
        ap = float(text.split("validation: AP=")[1].split()[0])
        assert ap > 0.85
    else:
        assert "forward" in text and "optimizer_step" in text and images >= 1
