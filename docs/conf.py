"""Sphinx configuration of the documentation site: ``make docs`` builds it into docs/_build/html.

The pages are Markdown (MyST) and hold their own text; the index includes the README's introduction (between
``<!-- docs:intro:start -->`` and ``<!-- docs:intro:end -->``) and monitoring-stack.md includes deploy/README.md.
"""

import posixpath
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document this checkout's package, whichever one the environment installed

from dgdn_lightning_monitor import __version__  # noqa: E402

project = "dgdn-lightning-monitor"
release = __version__
version = __version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]

# Links to headings up to ### get anchors, as GitHub gives them (README and docs/*.md link to them that way).
myst_heading_anchors = 3
# Some pages (distributed, slurm, kubernetes, deploy/README.md's sections) start at ## under the page of their toctree.
suppress_warnings = ["myst.header"]

autodoc_default_options = {"members": True, "undoc-members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Attributes sections as fields: the attributes themselves are documented as members.
napoleon_use_ivar = True

nitpicky = True
# No intersphinx: other projects' inventories are not reachable offline, so their names stay unlinked (narrowly).
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|lightning|prometheus_client|opentelemetry|jsonargparse)(\..+)?"),
    (r"py:.*", r"(collections|datetime|os|pathlib|logging|ssl|types)(\..+)?"),  # the standard library
    # Bare names: annotations imported only for type checkers, and cli.py's LightningCLI.
    (r"py:class", r"CollectorRegistry|(trace\.)?TracerProvider|SpanExporter|LightningCLI|Path|ModuleType"),
    (r"py:class", r"dgdn_lightning_monitor\.dgdn\..+|TemporalGraph"),  # the example model, not in the reference
    (r"py:class", r"dgdn_lightning_monitor\.guards\.T|Emit"),  # a TypeVar and a type alias
]

html_theme = "furo"
html_title = f"{project} {release}"
html_show_copyright = False

# The Markdown files link to each other the way GitHub shows the repository. On the site, a link to a file that a
# page shows leads to that page (README.md to the index, README.md#x to the label x;
# deploy/README.md to monitoring-stack; docs/X.md to X), another file of the repository is a download, and a folder
# is its text.
_SHOWN_AS = {"deploy/README.md": "/monitoring-stack.md"}
_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^()\s]+)\)")


def _site_links(text: str, repo_dir: str) -> str:
    def site_link(match: re.Match) -> str:
        label, target = match.group(1), match.group(2)
        if target.startswith("#") or re.match(r"[a-z][a-z0-9+.-]*:", target):
            return match.group(0)
        path, _, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(repo_dir, path))
        fragment = f"#{anchor}" if anchor else ""
        if repo_path == "README.md":
            return f"[{label}]({fragment or '/index.md'})"
        if repo_path in _SHOWN_AS:
            return f"[{label}]({_SHOWN_AS[repo_path]}{fragment})"
        if repo_path.startswith("docs/"):
            return f"[{label}](/{repo_path.removeprefix('docs/')}{fragment})"
        if (ROOT / repo_path).is_dir():
            return label
        return f"[{label}](/../{repo_path})"

    return _LINK.sub(site_link, text)


def _page_links(app, docname: str, source: list[str]) -> None:
    source[0] = _site_links(source[0], posixpath.dirname(f"docs/{docname}"))


def _included_links(app, relative_path: Path, parent_docname: str, content: list[str]) -> None:
    content[0] = _site_links(content[0], posixpath.dirname(posixpath.normpath(f"docs/{relative_path.as_posix()}")))


def setup(app):
    app.connect("source-read", _page_links)
    app.connect("include-read", _included_links)
