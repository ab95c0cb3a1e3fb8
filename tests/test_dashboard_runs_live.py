"""The dashboard with two runs training at once on one node: a real Prometheus (the training job as ``make
stack-native`` derives it) scrapes two real training processes discovered with default ports, and every query of
every panel on the callback's metrics, run against it, keeps the two runs apart (each result series names one run)
and shows both; with one run selected, only that run."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import free_port, require_tool
from prom_helpers import (
    CALLBACK_CUDA_ONLY,
    CALLBACK_SAMPLED_METRICS,
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


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Any:
    import deploy_training as dt

    binary = require_tool("prometheus")
    workdir = tmp_path_factory.mktemp("dashboard-runs")
    targets = workdir / "targets"
    targets.mkdir()
    config = dt.shipped_training_config(workdir / "prometheus.yml", f"127.0.0.1:{free_port()}", targets)
    prometheus = Prometheus(binary, config, workdir, free_port())
    # trace every step: the phase panels need sampled steps; short sleeps keep both runs training meanwhile
    children = [Child("--targets-dir", str(targets), "--port", "default", "--step-sleep", "0.03") for _ in range(2)]
    try:
        prometheus.wait_ready()
        for child in children:
            child.serving()
        run_ids = {child.run_id for child in children}
        assert len(run_ids) == 2
        for run_id in run_ids:
            wait_until(
                lambda run_id=run_id: prometheus.query(
                    f'count_over_time(dgdn_step_phase_seconds_count{{run_id="{run_id}", phase="forward"}}[1m]) >= 15'
                ),
                120,
                what=f"run {run_id} scraped for 15 s with sampled steps",
            )
        yield prometheus, run_ids
    finally:
        for child in children:
            child.kill()
        prometheus.stop()


def _run_queries() -> list[Any]:
    return [q for q in dashboard_queries(load_dashboard()) if "dgdn_" in q.expr and not q.where.startswith("variable")]


def test_no_panel_mixes_two_concurrent_runs(two_runs) -> None:
    prometheus, run_ids = two_runs
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
            assert seen == run_ids, f"{query.where}: shows {seen}, not both runs"
    # Only the GPU panels (and the CUDA capacity estimate) stay empty: these runs train on the CPU; the per-hop
    # panel too: their batches are not sampled per hop.
    absent = (NEEDS_GPU, *CALLBACK_CUDA_ONLY, *CALLBACK_SAMPLED_METRICS)
    assert all(any(name in query.expr for name in absent) for query in empty), [query.where for query in empty]


def test_one_selected_run_shows_only_that_run(two_runs) -> None:
    prometheus, run_ids = two_runs
    chosen = sorted(run_ids)[0]
    for query in _run_queries():
        result = prometheus.query(substitute(query.expr, {**VARIABLES, "run_id": chosen}))
        assert {series["metric"].get("run_id") for series in result} <= {chosen}, query.where


def test_the_runs_table_lists_each_run_with_its_outcome_and_ranks(two_runs) -> None:
    prometheus, run_ids = two_runs
    table = next(q for q in dashboard_queries(load_dashboard()) if q.where.startswith("Runs") and "outcome" in q.expr)
    rows = prometheus.query(substitute(table.expr, {**VARIABLES, "run_id": ".*"}))
    assert {(r["metric"]["run_id"], r["metric"]["outcome"]) for r in rows} == {(run, "running") for run in run_ids}
    ranks = next(q for q in dashboard_queries(load_dashboard()) if q.where.startswith("Runs") and "count by" in q.expr)
    counted = prometheus.query(substitute(ranks.expr, {**VARIABLES, "run_id": ".*"}))
    assert {(r["metric"]["run_id"], r["value"][1]) for r in counted} == {(run, "1") for run in run_ids}
