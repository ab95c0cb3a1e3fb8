"""Smoke test of the benchmarks: one cheap benchmark in quick form, and the report built from its result.

Checks the structure of the output, never the timings (those belong to ``python -m benchmarks.run``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package lives at the repo root

from benchmarks import detection, memory  # noqa: E402
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


def test_detection_benchmark_quick_structure() -> None:
    """One rank's hang with a 2 s threshold: a dump is found, no sooner than the threshold allows, and the default and
    ``"auto"`` settings are measured or said why not; the report carries the rows and the section."""
    result = detection.run(quick=True, settings=(2.0, detection.default_after_s(), "auto"), cases=("hang",))

    assert result["name"] == "detection" and result["config"]["reps"] == 1
    hang = result["cases"]["hang:2.0"]
    assert hang["seconds"]["missed"] == 0
    # The dump waits for 2 s without progress, counted from the end of the step before the hang began.
    assert 1.9 <= hang["seconds"]["median"] <= hang["bound_s"]
    assert hang["target_s"] >= 10.0 and isinstance(hang["met"], bool)
    for setting in (detection.default_after_s(), "auto"):
        assert f"hang:{setting}" in result["cases"] or f"hang:{setting}" in result["skipped"]

    report = {"quick": True, "benchmarks": ["detection"], "finished": "now", "duration_s": 1.0,
              "machine": machine_info(), "load_average_end": [0.0, 0.0, 0.0], "results": {"detection": result}}
    report["summary"] = summary_rows(report["results"])
    figures = [row["figure"] for row in report["summary"]]
    assert any(figure.endswith("stall_dump_after_s=2") for figure in figures)
    assert all(row["benchmark"] == "Detection" for row in report["summary"])
    assert "## Detection latency" in markdown(report)
