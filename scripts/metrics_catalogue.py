"""Render the metrics table of docs/metrics.md from the catalogue in code (dgdn_lightning_monitor/catalogue.py).

    python scripts/metrics_catalogue.py            # print the table
    python scripts/metrics_catalogue.py --write    # rewrite it between the page's metrics-table markers
    python scripts/metrics_catalogue.py --check    # exit 1 when the page differs from the catalogue
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dgdn_lightning_monitor.catalogue import markdown_table  # noqa: E402

PAGE = ROOT / "docs" / "metrics.md"
TABLE = re.compile(r"(<!-- metrics-table:start -->\n)(.*?)(<!-- metrics-table:end -->)", re.DOTALL)


def rendered(page: str) -> str:
    """``page`` with the table between its markers rendered from the catalogue."""
    if len(TABLE.findall(page)) != 1:
        raise SystemExit(f"{PAGE}: expected one <!-- metrics-table:start --> ... end --> block")
    return TABLE.sub(lambda match: match.group(1) + markdown_table() + match.group(3), page)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the table in docs/metrics.md")
    mode.add_argument("--check", action="store_true", help="fail when docs/metrics.md differs from the catalogue")
    args = parser.parse_args()
    if not (args.write or args.check):
        print(markdown_table(), end="")
        return 0
    page = PAGE.read_text(encoding="utf-8")
    wanted = rendered(page)
    if args.check:
        if page != wanted:
            message = f"{PAGE} differs from the catalogue: run python scripts/metrics_catalogue.py --write"
            print(message, file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
