"""The dashboard with three runs training at once on one node: a real Prometheus (the training job as ``make
stack-native`` derives it, with the shipped rules) scrapes two real training processes discovered with default
ports and one on the static quick-start target, whose series carry no run id. Every query of every panel on the
callback's metrics, run against it, keeps the runs apart (each result series names one run) and shows all three;
with one run selected, the quick-start target's or a discovered one, it shows that run and only that run."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import free_port, require_tool
from prom_helpers import (
    CALLBACK_CUDA_ONLY,
    CALLBACK_SAMPLED_METRICS,
    RULES_FILE,
    Prometheus,
    dashboard_queries,
    load_dashboard,
    substitute,
    wait_until,
)
from test_deploy_lifecycle_live import Child

pytestmark = pytest.mark.slow

VARIABLES = {
    "job": ".*",
    "instance": ".*",
    "rank": ".*",
    "gpu_host": ".*",
    "gpu": ".*",
    "__rate_interval": "20s",
    "__interval": "5s",
    "__range": "5m",
    "datasource": "prometheus",
}
#: Series a run on the CPU does not export.
NEEDS_GPU = "dgdn_gpu_"
#: Series a run on the CPU with unsampled graph batches leaves empty: GPU figures, the CUDA capacity estimate and
#: the per-hop counts of neighbour sampling.
ABSENT = (NEEDS_GPU, *CALLBACK_CUDA_ONLY, *CALLBACK_SAMPLED_METRICS)


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory) -> Any:
    import deploy_training as dt

    binary = require_tool("prometheus")
    workdir = tmp_path_factory.mktemp("dashboard-runs")
    targets = workdir / "targets"
    targets.mkdir()
    static_port = free_port()
    static = f"127.0.0.1:{static_port}"
    config = dt.shipped_training_config(workdir / "prometheus.yml", static, targets, rule_files=[RULES_FILE])
    prometheus = Prometheus(binary, config, workdir, free_port())
    # trace every step: the phase panels need sampled steps; short sleeps keep the runs training meanwhile
    discovered = [Child("--targets-dir", str(targets), "--port", "default", "--step-sleep", "0.03") for _ in range(2)]
    quick_start = Child(
        "--port", "default", "--addr", "default", "--default-port", str(static_port), "--step-sleep", "0.03"
    )
    children = [*discovered, quick_start]
    try:
        prometheus.wait_ready()
        for child in children:
            child.serving()
        assert quick_start.target.endswith(f":{static_port}")
        run_ids = {child.run_id for child in children}
        assert len(run_ids) == 3
        for child in discovered:
            wait_until(
                lambda child=child: prometheus.query(
                    f'count_over_time(dgdn_step_phase_seconds_count{{run_id="{child.run_id}", phase="forward"}}[1m])'
                    " >= 15"
                ),
                120,
                what=f"discovered run {child.run_id} scraped for 15 s with sampled steps",
            )
        wait_until(
            lambda: prometheus.query(
                f'count_over_time(dgdn_step_phase_seconds_count{{instance="{static}", phase="forward"}}[1m]) >= 15'
            ),
            120,
            what=f"the quick-start run {quick_start.run_id} scraped at {static} for 15 s with sampled steps",
        )
        # The static target's series carry no run id: only its dgdn_training_info names the run.
        assert not prometheus.query(f'dgdn_samples_processed_total{{instance="{static}", run_id!=""}}')
        assert prometheus.query(f'dgdn_training_info{{instance="{static}", run_id="{quick_start.run_id}"}}')
        wait_until(
            lambda: (
                {
                    series["metric"]["run_id"]
                    for series in prometheus.query("max by (run_id) (dgdn_rank:run_outcome:timestamp_seconds)")
                }
                == run_ids
            ),
            60,
            what="the recording rules naming every run's outcome",
        )
        yield prometheus, run_ids, quick_start.run_id, discovered[0].run_id
    finally:
        for child in children:
            child.kill()
        prometheus.stop()


def _run_queries() -> list[Any]:
    return [q for q in dashboard_queries(load_dashboard()) if "dgdn_" in q.expr and not q.where.startswith("variable")]


def _expected_empty(query: Any) -> bool:
    return any(name in query.expr for name in ABSENT)


def test_no_panel_mixes_concurrent_runs(three_runs) -> None:
    prometheus, run_ids, _, _ = three_runs
    queries = _run_queries()
    assert len(queries) >= 40
    empty = []
    for query in queries:
        expr = substitute(query.expr, {**VARIABLES, "run_id": ".*"})
        result = prometheus.query(expr)
        if not result:
            empty.append(query)
            continue
        seen = {series["metric"].get("run_id", "") for series in result}
        assert "" not in seen, f"{query.where}: a series that names no run (runs added up): {query.expr}"
        assert seen <= run_ids, (query.where, seen)
        if NEEDS_GPU not in query.expr and not any(name in query.expr for name in CALLBACK_CUDA_ONLY):
            assert seen == run_ids, f"{query.where}: shows {seen}, not the three runs"
    assert all(_expected_empty(query) for query in empty), [query.where for query in empty]


@pytest.mark.parametrize("which", ["quick-start", "discovered"])
def test_one_selected_run_shows_that_run_and_only_it(three_runs, which) -> None:
    """The Run selector set to one run: every panel that has data for it shows it, and nothing of the others."""
    prometheus, _, quick_start, discovered = three_runs
    chosen = quick_start if which == "quick-start" else discovered
    empty = []
    for query in _run_queries():
        result = prometheus.query(substitute(query.expr, {**VARIABLES, "run_id": chosen}))
        assert {series["metric"].get("run_id") for series in result} <= {chosen}, query.where
        if not result:
            empty.append(query)
    assert all(_expected_empty(query) for query in empty), [query.where for query in empty]


def test_the_runs_table_lists_each_run_with_its_outcome_and_ranks(three_runs) -> None:
    prometheus, run_ids, _, _ = three_runs
    queries = [q for q in dashboard_queries(load_dashboard()) if q.where.startswith("Runs:")]
    table = next(q for q in queries if "by (run_id, outcome" in q.expr)
    rows = prometheus.query(substitute(table.expr, {**VARIABLES, "run_id": ".*"}))
    assert {(r["metric"]["run_id"], r["metric"]["outcome"]) for r in rows} == {(run, "running") for run in run_ids}
    ranks = next(q for q in queries if q.expr.startswith("count by (run_id)"))
    counted = prometheus.query(substitute(ranks.expr, {**VARIABLES, "run_id": ".*"}))
    assert {(r["metric"]["run_id"], r["value"][1]) for r in counted} == {(run, "1") for run in run_ids}
    up = next(q for q in queries if "up{" in q.expr)
    answering = prometheus.query(substitute(up.expr, {**VARIABLES, "run_id": ".*"}))
    assert {(r["metric"]["run_id"], r["value"][1]) for r in answering} == {(run, "1") for run in run_ids}
