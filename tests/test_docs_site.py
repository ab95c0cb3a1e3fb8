"""The documentation site's pages include README.md's sections by markers: every marker a page names is in the
file once, in order, and every README section lies between markers, so none is missing from the site.
(``make docs`` builds the site itself, with warnings as errors; these checks need no Sphinx.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
INCLUDE = re.compile(r"^```\{include\} (?P<path>\S+)\n(?P<options>(?::[a-z-]+:.*\n)*)```", re.MULTILINE)
MARKER = re.compile(r"^<!-- docs:(?P<name>[a-z-]+):(?P<edge>start|end) -->$")


def includes() -> list[tuple[Path, Path, dict[str, str]]]:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for match in INCLUDE.finditer(page.read_text()):
            options = dict(re.findall(r"^:([a-z-]+): (.*)$", match.group("options"), re.MULTILINE))
            found.append((page, (page.parent / match.group("path")).resolve(), options))
    return found


def test_every_marker_a_page_includes_by_is_in_the_file_once_and_in_order():
    readme_includes = 0
    for page, path, options in includes():
        text = path.read_text()
        start, end = options.get("start-after"), options.get("end-before")
        for marker in filter(None, (start, end)):
            assert text.count(marker) == 1, f"{page.name}: {marker!r} occurs {text.count(marker)} times in {path.name}"
        if start and end:
            assert text.index(start) < text.index(end), f"{page.name}: {start!r} comes after {end!r}"
        readme_includes += path == ROOT / "README.md"
    assert readme_includes >= 10


def test_every_readme_section_is_between_markers_that_a_page_includes():
    included = {options["start-after"] for _, path, options in includes() if path == ROOT / "README.md"}
    inside = None
    for number, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        marker = MARKER.match(line)
        if marker:
            inside = line if marker.group("edge") == "start" else None
            continue
        if line.startswith("## "):
            assert inside is not None, f"README.md:{number}: {line!r} is outside every docs marker pair"
            assert inside in included, f"README.md:{number}: no docs page includes {inside!r} ({line!r})"
