"""Lint of the Grafana dashboard: modern panels only, units and descriptions, variables, rate windows, and
every query names metrics that the callback or a shipped exporter exports and is valid PromQL."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from conftest import require_tool
from prom_helpers import (
    CADVISOR_METRICS,
    CALLBACK_GPU_PREFIX,
    CALLBACK_HISTOGRAMS,
    CALLBACK_METRICS,
    DASHBOARD_GENERATOR,
    DCGM_METRICS,
    KNOWN_METRICS,
    NODE_EXPORTER_METRICS,
    RULES_FILE,
    dashboard_queries,
    iter_panels,
    load_dashboard,
    metric_names,
    substitute,
)

MODERN_PANELS = {"timeseries", "stat", "gauge", "table"}
ROWS = ["Where the time goes", "Training", "Graph", "Model", "GPU", "System"]
#: Values for the Grafana variables when a query is handed to promtool or Prometheus.
LINT_VARIABLES = {
    "job": ".*",
    "run_id": ".*",
    "instance": ".*",
    "rank": ".*",
    "gpu_host": ".*",
    "gpu": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    "datasource": "prometheus",
}


@pytest.fixture(scope="module")
def dashboard():
    return load_dashboard()


def data_panels(dashboard):
    return [panel for panel in iter_panels(dashboard) if panel["type"] != "row"]


def rows(dashboard):
    """Row title -> the panels below it (up to the next row)."""
    result, current = {}, None
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current = result.setdefault(panel["title"], [])
            current.extend(panel.get("panels", []))
        elif current is not None:
            current.append(panel)
    return result


def test_dashboard_file_matches_its_generator():
    result = subprocess.run([sys.executable, str(DASHBOARD_GENERATOR), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dashboard_identity(dashboard):
    assert dashboard["uid"] == "dgdn-training"
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 39
    ids = [panel["id"] for panel in iter_panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_only_modern_panel_types(dashboard):
    for panel in data_panels(dashboard):
        assert panel["type"] in MODERN_PANELS, f"{panel['title']}: {panel['type']}"


def test_every_panel_has_a_unit_and_a_description(dashboard):
    for panel in data_panels(dashboard):
        assert panel.get("description", "").strip(), f"{panel['title']} has no description"
        assert panel.get("fieldConfig", {}).get("defaults", {}).get("unit"), f"{panel['title']} has no unit"


def test_panels_use_the_datasource_variable(dashboard):
    for panel in data_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_variables(dashboard):
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "rank"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"]["uid"] == "${datasource}"
        assert variable["multi"] and variable["includeAll"]
        assert f", {name})" in variable["query"]["query"]


def test_panels_do_not_overlap(dashboard):
    cells = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_rate_windows_use_rate_interval(dashboard):
    for query in dashboard_queries(dashboard):
        for match in re.finditer(r"\b(rate|irate|increase)\s*\(", query.expr):
            window = re.match(r"[^\[]*\[([^\]]*)\]", query.expr[match.end() :])
            assert window and window.group(1) == "$__rate_interval", f"{query.where}: {query.expr}"


def test_callback_queries_filter_on_job_instance_rank_and_run(dashboard):
    for query in dashboard_queries(dashboard):
        if query.where.startswith(("variable", "annotation")):
            continue
        for selector in re.finditer(r"\b(dgdn_[\w:]+)(\{[^}]*\})?", query.expr):
            labels = selector.group(2) or ""
            for name in ("job", "instance", "rank"):
                assert f'{name}=~"${name}"' in labels, f"{query.where}: {selector.group(0)}"
            # Pushed final figures of finished runs have no instance; "All" (.*) would match them. Recorded series
            # (a colon in their name) come from scraped series only.
            assert 'instance!=""' in labels or ":" in selector.group(1), f"{query.where}: {selector.group(0)}"
        if "dgdn_" in query.expr:
            # The run is selected on dgdn_training_info or the recorded outcome, which name it on every target.
            assert 'run_id=~"$run_id"' in query.expr, f"{query.where}: {query.expr}"


def test_rows_and_their_panels(dashboard):
    by_row = rows(dashboard)
    assert [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"] == ROWS

    def names(row):
        return {name for panel in by_row[row] for target in panel["targets"] for name in metric_names(target["expr"])}

    training = names("Training")
    assert {
        "dgdn_training_loss",
        "dgdn_validation_loss",
        "dgdn_training_accuracy",
        "dgdn_validation_accuracy",
        "dgdn_samples_processed_total",
        "dgdn_nodes_processed_total",
        "dgdn_edges_processed_total",
        "dgdn_batch_processing_seconds_bucket",
        "dgdn_epoch_duration_seconds",
        "dgdn_global_step",
        "dgdn_learning_rate",
    } <= training
    assert names("Where the time goes") >= {"dgdn_time_seconds_total", "dgdn_goodput_ratio", "dgdn_bottleneck"}
    assert {name for name in names("Graph")} >= {"dgdn_graph_nodes", "dgdn_graph_edges"}
    assert {"dgdn_model_parameters", "dgdn_model_trainable_parameters", "dgdn_model_memory_usage_bytes"} <= names(
        "Model"
    )
    gpu = names("GPU")
    assert any(name.startswith(CALLBACK_GPU_PREFIX) for name in gpu) and gpu & DCGM_METRICS
    system = names("System")
    assert system & NODE_EXPORTER_METRICS and system & CADVISOR_METRICS


def test_batch_time_quantiles_show_exemplars(dashboard):
    panel = next(
        p
        for p in data_panels(dashboard)
        if "dgdn_batch_processing_seconds_bucket" in " ".join(t["expr"] for t in p["targets"])
    )
    exprs = " ".join(t["expr"] for t in panel["targets"])
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.95," in exprs
    assert any(target["exemplar"] for target in panel["targets"])


def test_straggler_panel_names_the_slowest_rank(dashboard):
    panel = next(p for p in data_panels(dashboard) if p["title"] == "Slowest rank")
    target = panel["targets"][0]
    # Own work (data fetch + forward), not batch wall time, which is the same on every rank under DDP.
    assert target["expr"].startswith("topk by (run_id) (1,") and "dgdn_step_phase_seconds_sum" in target["expr"]
    assert 'phase=~"data_fetch|forward"' in target["expr"]
    assert "{{rank}}" in target["legendFormat"]
    assert panel["options"]["textMode"] == "value_and_name"


def test_every_query_names_known_metrics(dashboard):
    for query in dashboard_queries(dashboard):
        names = metric_names(query.expr)
        assert names, f"{query.where}: no metric found in {query.expr}"
        unknown = names - KNOWN_METRICS
        assert not unknown, f"{query.where}: {sorted(unknown)} are exported by nothing in the stack"


def test_dashboard_shows_every_callback_metric(dashboard):
    """Every family the callback exports is on the dashboard, or is a signal a shipped alert rule reads (liveness by
    stage, the run's own loss history, the monitor's errors)."""
    used = set().union(*(metric_names(q.expr) for q in dashboard_queries(dashboard)))
    used |= {name.rsplit("_", 1)[0] for name in used if name.endswith(("_bucket", "_sum", "_count"))}
    expected = {name for name in CALLBACK_METRICS if not name.endswith(("_bucket", "_sum", "_count"))}
    rules = [rule["expr"] for group in yaml.safe_load(RULES_FILE.read_text())["groups"] for rule in group["rules"]]
    read_by_rules = set().union(*(metric_names(expr) for expr in rules))
    missing = expected - used - read_by_rules
    assert not missing, f"neither on the dashboard nor read by an alert rule: {sorted(missing)}"
    assert CALLBACK_HISTOGRAMS <= used


def test_metric_name_parser():
    assert metric_names('sum by (le, rank) (rate(a_bucket{job=~"x", le="1"}[5m])) / on (job) group_left () b') == {
        "a_bucket",
        "b",
    }
    assert metric_names("topk(1, x) or vector(0) and time() - y offset 5m") == {"x", "y"}
    assert metric_names('1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[1m]))') == {
        "node_cpu_seconds_total"
    }
    assert (
        substitute('rate(x{job=~"$job"}[$__rate_interval])', {"job": ".*", "__rate_interval": "1m"})
        == 'rate(x{job=~".*"}[1m])'
    )


def test_every_query_is_valid_promql(dashboard, tmp_path):
    """promtool parses each query (variables substituted) as the expression of a recording rule."""
    promtool = require_tool("promtool")
    rules = [
        {"record": f"dashboard:query_{index}", "expr": substitute(query.expr, LINT_VARIABLES)}
        for index, query in enumerate(dashboard_queries(dashboard))
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_step_phase_panels_and_dcgm_variables(dashboard):
    """A "where does the step go" panel by rank and phase, the data wait share, and DCGM panels filtered by the
    GPU host and GPU variables."""
    panels = {panel["title"]: panel for panel in data_panels(dashboard)}
    where = panels["Where does the step go"]["targets"][0]
    assert "dgdn_step_phase_seconds_sum" in where["expr"] and "by (run_id, rank, phase)" in where["expr"]
    assert 'phase="data_fetch"' in panels["Data wait share of the step"]["targets"][0]["expr"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert {"gpu_host", "gpu"} <= set(variables)
    dcgm = [
        target["expr"]
        for panel in data_panels(dashboard)
        for target in panel["targets"]
        if metric_names(target["expr"]) & DCGM_METRICS
    ]
    assert dcgm and all('Hostname=~"$gpu_host"' in expr and 'gpu=~"$gpu"' in expr for expr in dcgm)
