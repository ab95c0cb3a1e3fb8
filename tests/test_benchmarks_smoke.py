"""Smoke test of the benchmarks: one cheap benchmark in quick form, and the report built from its result.

Checks the structure of the output, never the timings (those belong to ``python -m benchmarks.run``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package lives at the repo root

from benchmarks import memory  # noqa: E402
from benchmarks.common import machine_info, summarize  # noqa: E402
from benchmarks.report import markdown, summary_rows  # noqa: E402


def test_memory_benchmark_quick_structure() -> None:
    result = memory.run(quick=True, steps=300, trainer_steps=0, isolated=False, drain_s=0.1)

    assert result["name"] == "memory"
    for key in ("direct", "direct_baseline"):
        run = result[key]
        assert run["steps"] == 300
        assert run["warmup_steps"] == 150
        assert {"rss_start_mib", "rss_end_mib", "growth_mib_per_100k", "slope_mib_per_100k", "us_per_step",
                "samples"} <= set(run)
        assert run["samples"][0][0] == 0 and run["samples"][-1][0] == 300
        assert len(run["samples"]) >= 3
    assert result["direct"]["spans_received"] > 0  # the traced run really exported to the live receiver
    assert result["direct_baseline"]["spans_received"] == 0
    assert isinstance(result["met"], bool)

    report = {"quick": True, "benchmarks": ["memory"], "finished": "now", "duration_s": 1.0,
              "machine": machine_info(), "load_average_end": [0.0, 0.0, 0.0], "results": {"memory": result}}
    report["summary"] = summary_rows(report["results"])
    assert [row["benchmark"] for row in report["summary"]] == ["Memory (RSS)"]
    text = markdown(report)
    assert "| Benchmark | Figure | Value | Target | Met |" in text
    assert "## Memory" in text


def test_summarize_reports_median_and_spread() -> None:
    stats = summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert stats == {"n": 5, "median": 3.0, "q1": 2.0, "q3": 4.0, "min": 1.0, "max": 5.0}
