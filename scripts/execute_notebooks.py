"""Run the notebooks top to bottom and store their outputs (text and PNG plots) in the files.

``make notebooks-execute`` runs this. Each notebook runs in a fresh kernel of this Python, with no OTLP
collector variables (so the stored outputs do not depend on the machine's environment), and is written back
only when it ran without an error.

Example::

    python scripts/execute_notebooks.py                      # every notebook in notebooks/
    python scripts/execute_notebooks.py notebooks/01_quickstart.ipynb
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"
TIME_LIMIT_S = 600
#: What the stored notebook says about its kernel, whatever kernel ran it.
STORED_METADATA = {
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": KERNEL},
    "language_info": {"name": "python"},
}


def kernel_env(workdir: Path) -> dict[str, str]:
    """Environment whose ``python3`` kernel is this interpreter (not whatever ``python`` is on PATH)."""
    spec_dir = workdir / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3", "language": "python"}  # fmt: skip
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env.pop("DGDN_MONITOR_PORT", None)
    env["JUPYTER_PATH"] = str(workdir / "jupyter")
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    return env


def execute(path: Path, timeout_s: int = TIME_LIMIT_S) -> float:
    """Execute ``path`` in place; returns the seconds it took. Raises (and leaves the file alone) on an error."""
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    started = time.monotonic()
    nbclient.NotebookClient(notebook, kernel_name=KERNEL, timeout=timeout_s,
                            resources={"metadata": {"path": str(path.parent)}}).execute()  # fmt: skip
    elapsed = time.monotonic() - started
    notebook.metadata = nbformat.from_dict({**notebook.metadata, **STORED_METADATA})
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)  # timestamps: noise in every diff
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute notebooks in place, keeping their outputs.")
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: every notebooks/*.ipynb)")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOKS.glob("*.ipynb"))
    with tempfile.TemporaryDirectory() as workdir:
        os.environ.update(kernel_env(Path(workdir)))
        for key in [k for k in os.environ if k.startswith("OTEL_")] + ["DGDN_MONITOR_PORT"]:
            os.environ.pop(key, None)
        for path in paths:
            print(f"{path.name} ...", end=" ", flush=True)
            try:
                seconds = execute(path)
            except Exception as error:  # noqa: BLE001 - report which notebook failed, keep its stored version
                print(f"failed: {type(error).__name__}: {str(error).strip().splitlines()[-1:] or ''}")
                return 1
            print(f"{seconds:.0f} s, {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
