"""The documentation site's pages: the guide in a reader's order, each page holding its own text (only the
introduction comes from README.md, by markers), and every included marker in its file once and in order.
(``make docs`` builds the site itself, with warnings as errors, so links between pages are checked there; these
checks need no Sphinx.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
INCLUDE = re.compile(r"^```\{include\} (?P<path>\S+)\n(?P<options>(?::[a-z-]+:.*\n)*)```", re.MULTILINE)
TOCTREE = re.compile(r"^```\{toctree\}\n(?P<body>.*?)^```", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"^<!-- docs:(?P<name>[a-z-]+):(?P<edge>start|end) -->$", re.MULTILINE)
#: The guide as a reader meets it: set up, configure, what is exported, traces, many ranks, the stack, trouble, where
#: the time goes, cost.
GUIDE = [
    "getting-started",
    "options",
    "metrics",
    "tracing",
    "scaling",
    "stack",
    "troubleshooting",
    "where-the-time-goes",
    "benchmarks",
]


def includes() -> list[tuple[Path, Path, dict[str, str]]]:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for match in INCLUDE.finditer(page.read_text()):
            options = dict(re.findall(r"^:([a-z-]+): (.*)$", match.group("options"), re.MULTILINE))
            found.append((page, (page.parent / match.group("path")).resolve(), options))
    return found


def toctree_entries(page: Path) -> list[str]:
    entries = []
    for match in TOCTREE.finditer(page.read_text()):
        entries += [line.strip() for line in match.group("body").splitlines() if line.strip() and line[0] != ":"]
    return entries


def test_every_marker_a_page_includes_by_is_in_the_file_once_and_in_order():
    for page, path, options in includes():
        text = path.read_text()
        start, end = options.get("start-after"), options.get("end-before")
        for marker in filter(None, (start, end)):
            assert text.count(marker) == 1, f"{page.name}: {marker!r} occurs {text.count(marker)} times in {path.name}"
        if start and end:
            assert text.index(start) < text.index(end), f"{page.name}: {start!r} comes after {end!r}"


def test_pages_hold_their_own_text_and_take_only_the_introduction_from_the_readme():
    from_readme = [(page.name, options.get("start-after")) for page, path, options in includes() if path == README]
    assert from_readme == [("index.md", "<!-- docs:intro:start -->")]
    assert [match.group("name") for match in MARKER.finditer(README.read_text())] == ["intro", "intro"]


def test_the_index_lists_the_guide_in_a_readers_order_and_every_page_is_in_a_toctree():
    index = toctree_entries(DOCS / "index.md")
    assert index[: len(GUIDE)] == GUIDE
    listed = {entry for page in DOCS.glob("*.md") for entry in toctree_entries(page)}
    assert listed == {page.stem for page in DOCS.glob("*.md")} - {"index"}
