"""README.md is the project's front page: short, with the commands CI and a new user run, an example that runs as
written, and links that lead to pages and headings that exist."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 150
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^()\s]+)\)")


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def anchors(markdown: Path) -> set[str]:
    """The anchors GitHub (and the docs site, myst_heading_anchors) gives the headings of a Markdown file."""
    text = re.sub(r"^```.*?^```", "", markdown.read_text(), flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move detail into docs/ and link to it"


def test_readme_names_the_commands_that_install_run_and_test():
    commands = "\n".join(blocks("bash"))
    for command in ("make demo", "make test"):
        assert re.search(rf"^{command}\b", commands, flags=re.MULTILINE), command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "make test" in ci, ".ci/run no longer runs the README's test command"


def test_readme_links_lead_to_files_and_headings_that_exist():
    links = LINK.findall(README.read_text())
    local = [target for target in links if not re.match(r"[a-z][a-z0-9+.-]*:", target)]
    assert sum(target.startswith("docs/") for target in local) >= 9
    for target in local:
        path, _, anchor = target.partition("#")
        file = (ROOT / path) if path else README
        assert file.exists(), f"README links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(file), f"README links to {target}: no such heading in {path or 'README.md'}"


def test_readme_example_trains_as_written(tmp_path):
    """The README's Python blocks, run in order in a fresh process, train the example model; only the endpoint moves
    to loopback and a free port, so that the run neither needs port 8000 nor listens beyond this machine."""
    (example,) = [block for block in blocks("python") if "trainer.fit(" in block]
    assert "graphs[:200]" in example and "max_epochs=3" in example and "batch_size=32" in example
    local = (
        "import dgdn_lightning_monitor\n"
        "class Local(dgdn_lightning_monitor.MonitoringCallback):\n"
        "    def __init__(self, **options):\n"
        "        super().__init__(**{'addr': '127.0.0.1', 'port': 0, 'tracing': False, **options})\n"
        "dgdn_lightning_monitor.MonitoringCallback = Local\n"
    )
    report = "\nimport json\nprint('SUMMARY', json.dumps(monitor.summary(), default=str))\n"
    script = tmp_path / "example.py"
    script.write_text(local + "\n".join(blocks("python")) + report)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("SUMMARY ")]
    summary = json.loads(line.removeprefix("SUMMARY "))
    epochs, graphs, batch_size = 3, 200, 32
    assert summary["steps"] == epochs * math.ceil(graphs / batch_size)
    assert summary["samples"] == epochs * graphs  # a sample of a graph loader is a graph
