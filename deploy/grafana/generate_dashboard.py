#!/usr/bin/env python3
"""Writes deploy/grafana/dashboards/dgdn-training.json, the Grafana dashboard of the stack.

The JSON file is what Grafana loads; this script is its source, so that every panel gets the same
structure (data source variable, unit, description, legend). After editing a panel here run

    python deploy/grafana/generate_dashboard.py

and commit both files; tests/test_deploy_dashboard.py fails when they differ.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "dgdn-training.json"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: Label filter of every query on the callback's metrics. ``instance!=""`` leaves out the final figures each rank
#: pushes to the Pushgateway at the end of a run: they arrive without an instance and never go stale, so with
#: "All" instances (``.*`` also matches a missing label) they would add finished runs to sums, maxima and the
#: time since the last step for ever.
SEL = 'job=~"$job", run_id=~"$run_id", instance=~"$instance", instance!="", rank=~"$rank"'
#: Which run each rank serves, among the selected runs. Only dgdn_training_info, which every rank exports, names
#: the run of the static quick-start target (its other series carry no run_id); a discovered target carries it on
#: every series. :func:`with_run` joins every query on the callback's metrics with it, so the Run selector picks
#: the quick-start target's runs too.
RUN_OF_RANK = f"max by (job, instance, rank, run_id) (dgdn_training_info{{{SEL}}})"

#: Mean training batch time of each rank, the basis of the straggler panels (and of DGDNRankStraggler).
PER_RANK_BATCH = (
    f"sum by (job, rank) (rate(dgdn_batch_processing_seconds_sum{{{SEL}}}[$__rate_interval]))\n"
    f"/ sum by (job, rank) (rate(dgdn_batch_processing_seconds_count{{{SEL}}}[$__rate_interval]))"
)


#: Each rank's mean data fetch + forward time per sampled step: its own work, which no rank waits in under
#: synchronous DDP (the wait for a slow rank happens in the gradient all-reduce, during backward). The basis of
#: the straggler panels, as of DGDNRankStraggler (recording rule
#: dgdn_rank:step_own_work_seconds:mean_recent).
OWN_WORK = (
    f'sum by (job, rank) (rate(dgdn_step_phase_seconds_sum{{{SEL}, phase=~"data_fetch|forward"}}[$__rate_interval]))\n'
    f'/ sum by (job, rank) (rate(dgdn_step_phase_seconds_count{{{SEL}, phase="forward"}}[$__rate_interval]))'
)
#: Each rank's own work divided by the mean of the other ranks of its job; 1 for a job with a single rank.
OWN_WORK_VS_OTHERS = (
    f"(\n{OWN_WORK}\n/ (\n  (sum by (job) ({OWN_WORK}) - on (job) group_right () ({OWN_WORK}))\n"
    f"  / on (job) group_left () ((count by (job) ({OWN_WORK}) > 1) - 1)\n)\n)\n"
    f"or\n(({OWN_WORK}) / ({OWN_WORK}))"
)
#: Time per sampled step in each phase, by rank and phase.
PHASE_RATE = f"sum by (rank, phase) (rate(dgdn_step_phase_seconds_sum{{{SEL}}}[$__rate_interval]))"
PHASE_TOTAL = f"sum by (rank) (rate(dgdn_step_phase_seconds_sum{{{SEL}}}[$__rate_interval]))"
#: DCGM exporter series of the selected GPU hosts and GPUs.
DCGM_SEL = 'Hostname=~"$gpu_host", gpu=~"$gpu"'


class Dashboard:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self._next_id = 1

    def _id(self) -> int:
        value = self._next_id
        self._next_id += 1
        return value

    def row(self, title: str) -> None:
        self.panels.append(
            {
                "id": self._id(),
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
            }
        )
        self.y += 1

    def line(self, height: int, *panels: dict[str, Any]) -> None:
        """Places panels side by side on one line; each carries its width in ``_w``."""
        x = 0
        for panel in panels:
            width = panel.pop("_w")
            panel["id"] = self._id()
            panel["gridPos"] = {"h": height, "w": width, "x": x, "y": self.y}
            x += width
            self.panels.append(panel)
        if x > 24:
            raise ValueError(f"panels of one line are {x} wide")
        self.y += height


def target(
    expr: str,
    legend: str = "__auto",
    ref: str = "A",
    *,
    instant: bool = False,
    table: bool = False,
    exemplar: bool = False,
) -> dict[str, Any]:
    return {
        "refId": ref,
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": not instant,
        "instant": instant,
        "format": "table" if table else "time_series",
        "exemplar": exemplar,
    }


def _targets(queries: list[tuple[str, str]], exemplar: bool = False) -> list[dict[str, Any]]:
    return [target(expr, legend, chr(ord("A") + i), exemplar=exemplar) for i, (expr, legend) in enumerate(queries)]


def _thresholds(steps: Optional[list[tuple[Optional[float], str]]]) -> dict[str, Any]:
    steps = steps or [(None, "green")]
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for value, color in steps]}


def timeseries(
    title: str,
    description: str,
    unit: str,
    queries: list[tuple[str, str]],
    width: int,
    *,
    exemplar: bool = False,
    min_: Optional[float] = None,
    max_: Optional[float] = None,
    log_scale: bool = False,
    draw: str = "line",
    thresholds=None,
    stack: bool = False,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "thresholds": _thresholds(thresholds),
        "custom": {
            "drawStyle": draw,
            "lineWidth": 1,
            "fillOpacity": 10 if draw == "line" else 80,
            "pointSize": 5,
            "showPoints": "auto" if draw == "line" else "always",
            "spanNulls": False,
            "axisPlacement": "auto",
            "axisSoftMin": 0 if min_ is None and not log_scale else None,
            "scaleDistribution": {"type": "log", "log": 10} if log_scale else {"type": "linear"},
            "thresholdsStyle": {"mode": "off" if thresholds is None else "line"},
        },
    }
    if stack:
        defaults["custom"]["stacking"] = {"mode": "normal", "group": "A"}
    if defaults["custom"]["axisSoftMin"] is None:
        del defaults["custom"]["axisSoftMin"]
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return {
        "_w": width,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": _targets(queries, exemplar),
    }


def stat(
    title: str,
    description: str,
    unit: str,
    queries: list[tuple[str, str]],
    width: int,
    *,
    thresholds=None,
    text_mode: str = "auto",
    graph: bool = False,
    mappings=None,
    decimals: Optional[int] = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "thresholds"},
        "thresholds": _thresholds(thresholds),
        "mappings": mappings or [],
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "_w": width,
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area" if graph else "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": text_mode,
            "wideLayout": True,
            "showPercentChange": False,
        },
        "targets": _targets(queries),
    }


def gauge(
    title: str,
    description: str,
    unit: str,
    queries: list[tuple[str, str]],
    width: int,
    *,
    min_: float,
    max_: float,
    thresholds,
) -> dict[str, Any]:
    return {
        "_w": width,
        "type": "gauge",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": min_,
                "max": max_,
                "color": {"mode": "thresholds"},
                "thresholds": _thresholds(thresholds),
                "decimals": 2,
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showThresholdLabels": False,
            "showThresholdMarkers": True,
            "orientation": "auto",
            "minVizHeight": 75,
            "minVizWidth": 75,
            "sizing": "auto",
        },
        "targets": _targets(queries),
    }


def table(title: str, description: str, unit: str, expr: str, width: int, hide: list[str]) -> dict[str, Any]:
    return {
        "_w": width,
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"align": "auto", "cellOptions": {"type": "auto"}},
                "thresholds": _thresholds(None),
            },
            "overrides": [],
        },
        "options": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"]}},
        "targets": [target(expr, "__auto", instant=True, table=True)],
        "transformations": [{"id": "organize", "options": {"excludeByName": {name: True for name in hide}}}],
    }


_AGGREGATION = re.compile(r"\b(sum|max|min|avg|count|topk)\s*(by\s*\(([^)]*)\))?\s*\(")
_ON = re.compile(r"\bon \(([^)]*)\)")


def per_run(expr: str) -> str:
    """``expr`` grouped by run: every aggregation and every vector match keeps ``run_id``, so no panel adds up,
    compares or picks among the series of concurrent runs (each rank of a run keeps its ``rank``)."""

    def aggregation(match: re.Match) -> str:
        name, labels = match.group(1), match.group(3)
        kept = [label.strip() for label in labels.split(",")] if labels is not None else []
        if "run_id" not in kept:
            kept.insert(1 if kept[:1] == ["job"] else 0, "run_id")
        return f"{name} by ({', '.join(kept)}) ("

    def matching(match: re.Match) -> str:
        kept = [label.strip() for label in match.group(1).split(",")]
        return match.group(0) if "run_id" in kept else f"on ({', '.join(['run_id', *kept])})"

    return _ON.sub(matching, _AGGREGATION.sub(aggregation, expr))


def per_run_legend(legend: str) -> str:
    return legend if "{{run_id}}" in legend or legend == "__auto" else f"{{{{run_id}}}} · {legend}"


#: A selector of a callback metric other than dgdn_training_info inside a range function, or alone.
_METRIC = r"\bdgdn_(?!training_info\b)\w+\{" + re.escape(SEL) + r"[^}]*\}"
_LEAF = re.compile(rf"\b[a-z_]+\({_METRIC}\[[^\]]+\]\)|{_METRIC}(?!\[)")


def with_run(expr: str) -> str:
    """``expr`` with the run of each rank (``run_id``, from :data:`RUN_OF_RANK`) joined to every selector of a
    callback metric, or to the range function around it, in place of a ``run_id`` filter on the selector."""

    def join(match: re.Match) -> str:
        leaf = match.group(0).replace(f"{{{SEL}", "{" + SEL.replace(', run_id=~"$run_id"', ""), 1)
        return f"({leaf} * on (job, instance, rank) group_left (run_id) {RUN_OF_RANK})"

    return _LEAF.sub(join, expr)


def group_by_run(panels: list[dict[str, Any]]) -> None:
    """Applies :func:`per_run` and :func:`with_run` to every query on the callback's metrics (machine-wide panels
    stay as they are)."""
    for panel in panels:
        for tgt in panel.get("targets", []):
            if "dgdn_" in tgt.get("expr", "") and "_run_table" not in panel:
                tgt["expr"] = with_run(per_run(tgt["expr"]))
                tgt["legendFormat"] = per_run_legend(tgt["legendFormat"])
        panel.pop("_run_table", None)


def runs_table() -> dict[str, Any]:
    """One row per run: id, start, whether its targets answer, outcome, ranks, samples/s and last loss. Each rank's
    outcome comes from the recording rule dgdn_rank:run_outcome:timestamp_seconds (deploy/prometheus/rules), which
    keeps it, with its run id, after the run ended, on the static target as on discovered ones."""
    outcomes = (
        "last_over_time(dgdn_rank:run_outcome:timestamp_seconds"
        '{job=~"$job", run_id=~"$run_id", instance=~"$instance", rank=~"$rank"}[$__range])'
    )
    run_of_target = f"max by (job, instance, run_id) (dgdn_training_info{{{SEL}}})"
    queries = [
        ("Ranks", f"count by (run_id) (count by (job, instance, rank, run_id) ({outcomes}))"),
        ("Started", f"min by (run_id) (min_over_time({outcomes[len('last_over_time(') :]}) * 1000"),
        (
            "Up",
            f'min by (run_id) (up{{job=~"$job", instance=~"$instance"}} * on (job, instance) group_left (run_id) '
            f"{run_of_target})",
        ),
        (
            "Outcome",
            f"max by (run_id, outcome, exception) (topk by (job, instance, rank, run_id) (1, {outcomes})) * 0 + 1",
        ),
        ("Samples/s", with_run(f"sum by (run_id) (dgdn_samples_per_second{{{SEL}}})")),
        ("Last loss", with_run(f"avg by (run_id) (dgdn_training_loss{{{SEL}}})")),
    ]
    targets = []
    for index, (name, expr) in enumerate(queries):
        tgt = target(expr, name, chr(ord("A") + index), instant=True, table=True)
        targets.append(tgt)
    renames = {f"Value #{chr(ord('A') + i)}": name for i, (name, _) in enumerate(queries)}
    renames.update(run_id="Run", outcome="Outcome", exception="Exception")
    return {
        "_w": 24,
        "_run_table": True,
        "type": "table",
        "title": "Runs: state and outcome",
        "description": "Every run in the time range: its id, when it was first scraped in the range, whether all its "
        "ranks answer (Up 1) or not (0, or empty once its targets are gone), how it ended or that it is running "
        "(dgdn_run_outcome; failed runs name the exception), its ranks, samples per second summed over its ranks and "
        "its last training loss (mean of its ranks). Runs of the quick-start target are listed with their run id "
        "like discovered ones.",
        "datasource": DATASOURCE,
        "fieldConfig": {
            "defaults": {
                "unit": "none",
                "custom": {"align": "auto", "cellOptions": {"type": "auto"}},
                "thresholds": _thresholds(None),
            },
            "overrides": [
                {
                    "matcher": {"id": "byName", "options": "Started"},
                    "properties": [{"id": "unit", "value": "dateTimeAsIso"}],
                },
                {
                    "matcher": {"id": "byName", "options": "Samples/s"},
                    "properties": [{"id": "unit", "value": "suffix: samples/s"}],
                },
            ],
        },
        "options": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"]}},
        "targets": targets,
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True}, "renameByName": renames},
            },
        ],
    }


def time_row(d: Dashboard) -> None:
    """Where each rank's wall time goes (the time ledger), its goodput and the bottleneck verdict."""
    d.row("Where the time goes")
    d.line(
        8,
        timeseries(
            "Where the time goes",
            "Share of each rank's wall time per category (dgdn_time_seconds_total: seconds per second, stacked to "
            "100 %): set-up, sanity check, data wait, forward, backward, optimizer step, validation, checkpoint, "
            "between steps (loggers, other callbacks), stall (past the stall threshold without progress), lost "
            "progress (a resumed run's previous attempt after its last checkpoint).",
            "percentunit",
            [
                (
                    f"sum by (rank, category) (rate(dgdn_time_seconds_total{{{SEL}}}[$__rate_interval]))",
                    "{{category}} · rank {{rank}}",
                )
            ],
            12,
            draw="bars",
            stack=True,
            min_=0,
        ),
        stat(
            "Goodput",
            "Share of each rank's wall time since set-up spent in the training steps' compute (forward, backward, "
            "optimizer step): dgdn_goodput_ratio.",
            "percentunit",
            [(f"dgdn_goodput_ratio{{{SEL}}}", "rank {{rank}}")],
            4,
            thresholds=[(None, "red"), (0.5, "orange"), (0.8, "green")],
            graph=True,
        ),
        stat(
            "Bottleneck",
            "What limits each rank now (dgdn_bottleneck, judged over the recent window): compute (healthy), input "
            "(raise num_workers, persistent_workers=True), sampling (lower the fan-out num_neighbors at the dominant "
            "hop), host_to_device (pin_memory=True), validation (val_check_interval, limit_val_batches), checkpoint "
            "(save less often or AsyncCheckpointIO), between_steps (log_every_n_steps), stall (see the stack "
            "dumps). The training log and summary() carry the full hint with the current values.",
            "none",
            [(f"dgdn_bottleneck{{{SEL}}} == 1", "rank {{rank}}: {{cause}}")],
            8,
            text_mode="name",
        ),
    )


def training_row(d: Dashboard) -> None:
    """The runs in view and how their training goes: loss and accuracy, throughput, batch and epoch time, step and
    epoch, stragglers and where each sampled step's time goes."""
    d.row("Training")
    d.line(6, runs_table())
    d.line(
        4,
        stat(
            "Progress",
            "Fraction of each run done of its known total (`stage` train: optimizer steps of the fit's "
            "estimated stepping batches, or the share of `max_time` used when that ends it first; an evaluation "
            "run's batches). No value when nothing bounds the run (`max_epochs=-1` without `max_steps` or "
            "`max_time`). Lowest over the run's ranks.",
            "percentunit",
            [(f"min by (stage) (dgdn_progress_ratio{{{SEL}}})", "{{stage}}")],
            12,
            text_mode="value_and_name",
            graph=True,
            decimals=1,
        ),
        stat(
            "Time left (ETA)",
            "Estimated time until each run ends: remaining batches at the recent batch rate plus the validation "
            "passes still to come at their mean duration, or what `max_time` leaves when that ends the fit first. "
            "No value when nothing bounds the run, or after it ended. Highest over the run's ranks.",
            "s",
            [(f"max by (stage) (dgdn_eta_seconds{{{SEL}}})", "{{stage}}")],
            12,
            text_mode="value_and_name",
        ),
    )
    d.line(
        8,
        timeseries(
            "Loss",
            "Last logged training loss (`train_loss`) and validation loss (`val_loss`) of each rank. "
            "A NaN or infinite loss shows as a gap; see the non-finite counter below.",
            "none",
            [
                (f"dgdn_training_loss{{{SEL}}}", "train · rank {{rank}}"),
                (f"dgdn_validation_loss{{{SEL}}}", "validation · rank {{rank}}"),
            ],
            12,
        ),
        timeseries(
            "Accuracy",
            "Last logged training accuracy (`train_acc`) and validation accuracy (`val_acc`) of each rank, as a ratio.",
            "percentunit",
            [
                (f"dgdn_training_accuracy{{{SEL}}}", "train · rank {{rank}}"),
                (f"dgdn_validation_accuracy{{{SEL}}}", "validation · rank {{rank}}"),
            ],
            12,
            min_=0,
            max_=1,
        ),
    )
    d.line(
        8,
        timeseries(
            "Samples per second",
            "Training samples (graphs, events or rows) processed per second by each "
            "rank, from the samples counter, and the callback's own figure over its recent batches.",
            "suffix: samples/s",
            [
                (f"sum by (rank) (rate(dgdn_samples_processed_total{{{SEL}}}[$__rate_interval]))", "rank {{rank}}"),
                (f"dgdn_samples_per_second{{{SEL}}}", "recent batches · rank {{rank}}"),
            ],
            8,
        ),
        timeseries(
            "Nodes and edges per second",
            "Nodes and edges of the training batches processed per second, summed over the selected ranks.",
            "suffix: /s",
            [
                (f"sum(rate(dgdn_nodes_processed_total{{{SEL}}}[$__rate_interval]))", "nodes"),
                (f"sum(rate(dgdn_edges_processed_total{{{SEL}}}[$__rate_interval]))", "edges"),
            ],
            8,
        ),
        timeseries(
            "Batch time p50 / p95",
            "Median and 95th percentile of the wall time of one training batch over "
            "the selected ranks. Exemplar dots belong to traced steps: click one to open its trace in "
            "Jaeger.",
            "s",
            [
                (
                    "histogram_quantile(0.5, sum by (le) "
                    f"(rate(dgdn_batch_processing_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                    "p50",
                ),
                (
                    "histogram_quantile(0.95, sum by (le) "
                    f"(rate(dgdn_batch_processing_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                    "p95",
                ),
            ],
            8,
            exemplar=True,
        ),
    )
    d.line(
        4,
        stat(
            "Global step",
            "Optimizer steps taken so far (highest over the selected ranks).",
            "none",
            [(f"max(dgdn_global_step{{{SEL}}})", "step")],
            4,
        ),
        stat(
            "Epoch",
            "Current training epoch, counted from 0 (highest over the selected ranks).",
            "none",
            [(f"max(dgdn_epoch{{{SEL}}})", "epoch")],
            4,
        ),
        stat(
            "Since last step",
            "Time since the last finished training batch, for the rank that waited longest. "
            "DGDNTrainingStalled fires above the run's dgdn_stall_threshold_seconds (15 minutes without it).",
            "s",
            [(f"max(time() - dgdn_last_step_timestamp_seconds{{{SEL}}})", "since last step")],
            4,
            thresholds=[(None, "green"), (120, "yellow"), (600, "red")],
        ),
        stat(
            "Non-finite losses",
            "Training losses that were NaN or infinite, summed over the selected ranks.",
            "none",
            [(f"sum(dgdn_nonfinite_loss_total{{{SEL}}})", "non-finite losses")],
            4,
            thresholds=[(None, "green"), (1, "red")],
        ),
        stat(
            "Slowest rank",
            "The rank with the longest mean data fetch + forward time per sampled step: the "
            "straggler every synchronous step waits for (batch wall times are equal under DDP).",
            "s",
            [(f"topk(1, {OWN_WORK})", "rank {{rank}} ({{job}})")],
            8,
            text_mode="value_and_name",
        ),
    )
    d.line(
        8,
        timeseries(
            "Epoch duration",
            "Wall time of the last finished training epoch of each rank.",
            "s",
            [(f"dgdn_epoch_duration_seconds{{{SEL}}}", "rank {{rank}}")],
            8,
        ),
        timeseries(
            "Learning rate",
            "Learning rate of every optimizer parameter group (logarithmic axis).",
            "none",
            [(f"dgdn_learning_rate{{{SEL}}}", "{{optimizer}} group {{param_group}} · rank {{rank}}")],
            8,
            log_scale=True,
        ),
        gauge(
            "Own work vs. other ranks",
            "Each rank's mean data fetch + forward time per sampled step divided "
            "by the mean of the other ranks of its job (1 for a single rank). DGDNRankStraggler fires at 1.5 "
            "and above.",
            "suffix: × others",
            [(OWN_WORK_VS_OTHERS, "rank {{rank}}")],
            8,
            min_=0,
            max_=3,
            thresholds=[(None, "green"), (1.2, "yellow"), (1.5, "red")],
        ),
    )
    d.line(
        8,
        timeseries(
            "Mean batch time per rank",
            "Mean wall time of one training batch of each rank. One rank far above the others is a straggler.",
            "s",
            [(PER_RANK_BATCH, "rank {{rank}} ({{job}})")],
            12,
        ),
        table(
            "Runs",
            "The training runs in view: model class, run id and library versions of each rank.",
            "none",
            f"dgdn_training_info{{{SEL}}}",
            12,
            ["Time", "Value", "__name__"],
        ),
    )
    d.line(
        8,
        timeseries(
            "Where does the step go",
            "Share of a sampled training step each rank spends in each phase: "
            "data_fetch (waiting for the batch), forward, backward (which includes waiting for the other "
            "ranks in DDP's gradient all-reduce) and optimizer_step. Device time on CUDA.",
            "percentunit",
            [(f"{PHASE_RATE}\n/ on (rank) group_left () {PHASE_TOTAL}", "{{phase}} · rank {{rank}}")],
            12,
            min_=0,
            max_=1,
        ),
        timeseries(
            "Data wait share of the step",
            "Share of a sampled training step each rank spends waiting for "
            "its next batch. High values mean the input pipeline, not the GPU, sets the pace.",
            "percentunit",
            [
                (
                    f'sum by (rank) (rate(dgdn_step_phase_seconds_sum{{{SEL}, phase="data_fetch"}}'
                    f"[$__rate_interval]))\n/ {PHASE_TOTAL}",
                    "rank {{rank}}",
                )
            ],
            12,
            min_=0,
            max_=1,
            thresholds=[(None, "green"), (0.3, "orange")],
        ),
    )


def graph_row(d: Dashboard) -> None:
    """The graph batches: their size, what was processed so far, the largest batch that fits, what a neighbour
    sampler drew, progress by stage, and the errors the run and the monitor met (out of memory, stall dumps, monitor
    errors)."""
    d.row("Graph")
    d.line(
        8,
        timeseries(
            "Last batch size",
            "Nodes and edges (events) in the last training batch of each rank.",
            "short",
            [
                (f"dgdn_graph_nodes{{{SEL}}}", "nodes · rank {{rank}}"),
                (f"dgdn_graph_edges{{{SEL}}}", "edges · rank {{rank}}"),
            ],
            8,
        ),
        timeseries(
            "Edges per node",
            "Edges per node of the last training batch of each rank (twice the mean "
            "degree for undirected graphs stored with both directions).",
            "none",
            [(f"dgdn_graph_edges{{{SEL}}} / dgdn_graph_nodes{{{SEL}}}", "rank {{rank}}")],
            8,
        ),
        timeseries(
            "Nodes per sample",
            "Mean nodes per training sample (graph) over the rate window.",
            "none",
            [
                (
                    f"sum by (rank) (rate(dgdn_nodes_processed_total{{{SEL}}}[$__rate_interval]))\n"
                    f"/ sum by (rank) (rate(dgdn_samples_processed_total{{{SEL}}}[$__rate_interval]))",
                    "rank {{rank}}",
                )
            ],
            8,
        ),
    )
    d.line(
        4,
        stat(
            "Samples processed",
            "Training samples processed so far, summed over the selected ranks.",
            "short",
            [(f"sum(dgdn_samples_processed_total{{{SEL}}})", "samples")],
            8,
            graph=True,
        ),
        stat(
            "Nodes processed",
            "Nodes in the training batches processed so far, summed over the selected ranks.",
            "short",
            [(f"sum(dgdn_nodes_processed_total{{{SEL}}})", "nodes")],
            8,
            graph=True,
        ),
        stat(
            "Edges processed",
            "Edges in the training batches processed so far, summed over the selected ranks.",
            "short",
            [(f"sum(dgdn_edges_processed_total{{{SEL}}})", "edges")],
            8,
            graph=True,
        ),
    )
    d.line(
        8,
        timeseries(
            "Largest batch that fits (estimate)",
            "Nodes and edges of the largest batch estimated to fit each rank's GPU (a linear fit of "
            "sampled steps' peak memory against their batch's nodes and edges, extrapolated to the device's "
            "memory), against the last batch. CUDA runs only.",
            "short",
            [
                (f"dgdn_batch_capacity_nodes{{{SEL}}}", "fits: nodes · rank {{rank}}"),
                (f"dgdn_batch_capacity_edges{{{SEL}}}", "fits: edges · rank {{rank}}"),
                (f"dgdn_graph_nodes{{{SEL}}}", "last: nodes · rank {{rank}}"),
                (f"dgdn_graph_edges{{{SEL}}}", "last: edges · rank {{rank}}"),
            ],
            16,
        ),
        stat(
            "Out-of-memory errors",
            "Out-of-memory errors raised by a step, summed over the selected ranks. DGDNOutOfMemory fires "
            "on each; the run's log names the failing batch.",
            "none",
            [(f"sum(dgdn_oom_total{{{SEL}}})", "out of memory")],
            4,
            thresholds=[(None, "green"), (1, "red")],
        ),
        stat(
            "Stall dumps",
            "Stack dumps written because a rank made no progress for stall_dump_after_s, summed over the "
            "selected ranks; the files are in dgdn-dumps/ beside the run's logs.",
            "none",
            [(f"sum(dgdn_stall_dumps_total{{{SEL}}})", "stall dumps")],
            4,
            thresholds=[(None, "green"), (1, "orange")],
        ),
    )

    d.line(
        8,
        timeseries(
            "Sampled per batch and hop",
            "Mean nodes (hop 0: the seeds) and edges a neighbour sampler drew per training batch at each hop: "
            "the figures num_neighbors tunes. Empty for loaders that do not sample per hop.",
            "short",
            [
                (
                    f"sum by (hop) (rate(dgdn_sampled_nodes_total{{{SEL}}}[$__rate_interval]))\n"
                    f"/ ignoring (hop) group_left () "
                    f"sum (rate(dgdn_batch_processing_seconds_count{{{SEL}}}[$__rate_interval]))",
                    "nodes · hop {{hop}}",
                ),
                (
                    f"sum by (hop) (rate(dgdn_sampled_edges_total{{{SEL}}}[$__rate_interval]))\n"
                    f"/ ignoring (hop) group_left () "
                    f"sum (rate(dgdn_batch_processing_seconds_count{{{SEL}}}[$__rate_interval]))",
                    "edges · hop {{hop}}",
                ),
            ],
            12,
        ),
        timeseries(
            "Progress by stage",
            "Units of progress per second in each stage (training steps, evaluation batches, checkpoint saves): "
            "the signal of the liveness alerts, which stay silent while any stage progresses.",
            "ops",
            [(f"sum by (stage) (rate(dgdn_progress_total{{{SEL}}}[$__rate_interval])) > 0", "{{stage}}")],
            8,
        ),
        stat(
            "Monitor errors",
            "Errors the monitor degraded on, by part (it skipped what it could not measure while training went "
            "on); the run's log has the first one's cause.",
            "none",
            [
                (
                    f"sum by (part) (dgdn_monitor_errors_total{{{SEL}}}) > 0 "
                    f"or sum(dgdn_monitor_errors_total{{{SEL}}})",
                    "{{part}}",
                )
            ],
            4,
            thresholds=[(None, "green"), (1, "orange")],
        ),
    )


def model_row(d: Dashboard) -> None:
    """The model's parameters and memory, and the latency and rate of its inference batches."""
    d.row("Model")
    d.line(
        5,
        stat(
            "Parameters",
            "Parameters of the model (highest over the selected ranks).",
            "short",
            [(f"max(dgdn_model_parameters{{{SEL}}})", "parameters")],
            6,
        ),
        stat(
            "Trainable parameters",
            "Parameters that require gradients.",
            "short",
            [(f"max(dgdn_model_trainable_parameters{{{SEL}}})", "trainable")],
            6,
        ),
        stat(
            "Model memory",
            "Bytes held by the model's parameters and buffers.",
            "bytes",
            [(f"max(dgdn_model_memory_usage_bytes{{{SEL}}})", "memory")],
            6,
        ),
        gauge(
            "Trainable share",
            "Share of the parameters that are trained (the rest is frozen).",
            "percentunit",
            [
                (
                    f"max(dgdn_model_trainable_parameters{{{SEL}}}) / max(dgdn_model_parameters{{{SEL}}})",
                    "trainable share",
                )
            ],
            6,
            min_=0,
            max_=1,
            thresholds=[(None, "blue")],
        ),
    )
    d.line(
        8,
        timeseries(
            "Inference latency per sample",
            "Median and 95th percentile of the per-sample latency of validation, test and predict batches, by stage.",
            "s",
            [
                (
                    "histogram_quantile(0.5, sum by (le, stage) "
                    f"(rate(dgdn_inference_time_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                    "p50 · {{stage}}",
                ),
                (
                    "histogram_quantile(0.95, sum by (le, stage) "
                    f"(rate(dgdn_inference_time_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                    "p95 · {{stage}}",
                ),
            ],
            12,
        ),
        timeseries(
            "Inference batches per second",
            "Validation, test and predict batches per second, by stage.",
            "suffix: batches/s",
            [(f"sum by (stage) (rate(dgdn_inference_time_seconds_count{{{SEL}}}[$__rate_interval]))", "{{stage}}")],
            12,
        ),
    )


def gpu_row(d: Dashboard) -> None:
    """Each rank's GPUs as the callback samples them (NVML, the PyTorch allocator), and every GPU of the host as the
    DCGM exporter reports it."""
    d.row("GPU")
    d.line(
        8,
        timeseries(
            "GPU utilisation",
            "Share of time a kernel ran on each GPU of each rank, sampled by the callback through NVML.",
            "percentunit",
            [(f"dgdn_gpu_utilization_ratio{{{SEL}}}", "GPU {{gpu}} · rank {{rank}}")],
            8,
            min_=0,
            max_=1,
        ),
        gauge(
            "GPU memory: tensor peak",
            "Peak memory held by tensors of each rank (PyTorch allocator) as a share "
            "of the GPU's total. DGDNGPUMemoryHigh fires above 90% (warning) and 97% (critical); NVML's used "
            "memory also counts the allocator's cache and sits high in healthy runs.",
            "percentunit",
            [
                (
                    f"dgdn_gpu_max_memory_allocated_bytes{{{SEL}}}\n/ on (job, instance, rank, gpu) "
                    f"dgdn_gpu_memory_total_bytes{{{SEL}}}",
                    "GPU {{gpu}} · rank {{rank}}",
                )
            ],
            8,
            min_=0,
            max_=1,
            thresholds=[(None, "green"), (0.9, "orange"), (0.97, "red")],
        ),
        timeseries(
            "GPU memory (NVML)",
            "Device memory used and total of each GPU, from NVML.",
            "bytes",
            [
                (f"dgdn_gpu_memory_used_bytes{{{SEL}}}", "used · GPU {{gpu}} · rank {{rank}}"),
                (f"dgdn_gpu_memory_total_bytes{{{SEL}}}", "total · GPU {{gpu}} · rank {{rank}}"),
            ],
            8,
        ),
    )
    d.line(
        8,
        timeseries(
            "PyTorch allocator memory",
            "Memory the PyTorch caching allocator of each rank has allocated to "
            "tensors, reserved from the device, and its allocation peak.",
            "bytes",
            [
                (f"dgdn_gpu_memory_allocated_bytes{{{SEL}}}", "allocated · GPU {{gpu}} · rank {{rank}}"),
                (f"dgdn_gpu_memory_reserved_bytes{{{SEL}}}", "reserved · GPU {{gpu}} · rank {{rank}}"),
                (f"dgdn_gpu_max_memory_allocated_bytes{{{SEL}}}", "peak · GPU {{gpu}} · rank {{rank}}"),
            ],
            8,
        ),
        timeseries(
            "GPU temperature",
            "GPU core temperature, from NVML.",
            "celsius",
            [(f"dgdn_gpu_temperature_celsius{{{SEL}}}", "GPU {{gpu}} · rank {{rank}}")],
            8,
        ),
        timeseries(
            "GPU power",
            "GPU power draw, from NVML.",
            "watt",
            [(f"dgdn_gpu_power_watts{{{SEL}}}", "GPU {{gpu}} · rank {{rank}}")],
            8,
        ),
    )
    d.line(
        8,
        stat(
            "GPU monitoring",
            "Whether the callback's NVML sampling works on each rank (1) or is off: no GPU, no "
            "driver, or NVML failed (0).",
            "none",
            [(f"dgdn_gpu_monitoring_up{{{SEL}}}", "rank {{rank}}")],
            4,
            thresholds=[(None, "red"), (1, "green")],
            mappings=[
                {"type": "value", "options": {"0": {"text": "off", "index": 0}, "1": {"text": "on", "index": 1}}}
            ],
        ),
        timeseries(
            "DCGM GPU utilisation",
            "GPU utilisation reported by the DCGM exporter (started with the `gpu` "
            "compose profile) for every GPU of the host.",
            "percent",
            [(f"DCGM_FI_DEV_GPU_UTIL{{{DCGM_SEL}}}", "GPU {{gpu}} {{modelName}} · {{Hostname}}")],
            10,
            min_=0,
            max_=100,
        ),
        timeseries(
            "DCGM frame-buffer memory",
            "Frame-buffer memory used and free on every GPU of the host, from the DCGM exporter.",
            "mbytes",
            [
                (f"DCGM_FI_DEV_FB_USED{{{DCGM_SEL}}}", "used · GPU {{gpu}} · {{Hostname}}"),
                (f"DCGM_FI_DEV_FB_FREE{{{DCGM_SEL}}}", "free · GPU {{gpu}} · {{Hostname}}"),
            ],
            10,
        ),
    )
    d.line(
        8,
        timeseries(
            "DCGM power",
            "Power draw of every GPU of the host, from the DCGM exporter.",
            "watt",
            [(f"DCGM_FI_DEV_POWER_USAGE{{{DCGM_SEL}}}", "GPU {{gpu}} · {{Hostname}}")],
            12,
        ),
        timeseries(
            "DCGM temperature",
            "Core temperature of every GPU of the host, from the DCGM exporter.",
            "celsius",
            [(f"DCGM_FI_DEV_GPU_TEMP{{{DCGM_SEL}}}", "GPU {{gpu}} · {{Hostname}}")],
            12,
        ),
    )


def system_row(d: Dashboard) -> None:
    """The hosts and containers of the stack (node-exporter, cAdvisor) and the targets Prometheus scrapes."""
    d.row("System")
    fs = 'fstype!~"tmpfs|overlay|squashfs|nsfs"'
    d.line(
        8,
        timeseries(
            "Host CPU",
            "Share of CPU time the host spent outside idle, from node-exporter.",
            "percentunit",
            [('1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[$__rate_interval]))', "{{instance}}")],
            8,
            min_=0,
            max_=1,
        ),
        timeseries(
            "Host memory",
            "Share of the host's memory not available to new processes, from node-exporter.",
            "percentunit",
            [("1 - node_memory_MemAvailable_bytes / node_memory_MemTotal_bytes", "{{instance}}")],
            8,
            min_=0,
            max_=1,
        ),
        timeseries(
            "Host load",
            "One-minute load average against the number of CPUs, from node-exporter.",
            "short",
            [
                ("node_load1", "load1 · {{instance}}"),
                ('count by (instance) (node_cpu_seconds_total{mode="idle"})', "CPUs · {{instance}}"),
            ],
            8,
        ),
    )
    d.line(
        8,
        timeseries(
            "File system usage",
            "Share of each host file system in use, from node-exporter.",
            "percentunit",
            [(f"1 - node_filesystem_avail_bytes{{{fs}}} / node_filesystem_size_bytes{{{fs}}}", "{{mountpoint}}")],
            8,
            min_=0,
            max_=1,
        ),
        timeseries(
            "Container CPU",
            "CPU cores used by each container on the host, from cAdvisor.",
            "suffix: cores",
            [('sum by (name) (rate(container_cpu_usage_seconds_total{name!=""}[$__rate_interval]))', "{{name}}")],
            8,
        ),
        timeseries(
            "Container memory",
            "Working-set memory of each container on the host, from cAdvisor.",
            "bytes",
            [('sum by (name) (container_memory_working_set_bytes{name!=""})', "{{name}}")],
            8,
        ),
    )
    d.line(
        8,
        timeseries(
            "Container network",
            "Bytes received and sent per second by each container, from cAdvisor.",
            "Bps",
            [
                (
                    'sum by (name) (rate(container_network_receive_bytes_total{name!=""}[$__rate_interval]))',
                    "received · {{name}}",
                ),
                (
                    'sum by (name) (rate(container_network_transmit_bytes_total{name!=""}[$__rate_interval]))',
                    "sent · {{name}}",
                ),
            ],
            12,
        ),
        table(
            "Scrape targets",
            "Every target Prometheus scrapes and whether the last scrape succeeded (1) or failed (0).",
            "none",
            "up",
            12,
            ["Time", "__name__"],
        ),
    )


def query_variable(name: str, label: str, query: str, sort: int) -> dict[str, Any]:
    """A multi-value selector of the label values ``query`` returns; "All" matches any value (``.*``), a missing
    label too."""
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "regex": "",
        "sort": sort,
        "hide": 0,
    }


def variables() -> list[dict[str, Any]]:
    """The data source, and the job, run, instance, rank and DCGM GPU selectors every query filters on."""
    return [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Data source",
            "query": "prometheus",
            "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
            "options": [],
            "refresh": 1,
            "regex": "",
            "hide": 0,
            "includeAll": False,
            "multi": False,
        },
        query_variable("job", "Job", "label_values(dgdn_training_info, job)", 1),
        query_variable("run_id", "Run", 'label_values(dgdn_training_info{job=~"$job", instance!=""}, run_id)', 1),
        query_variable("instance", "Instance", 'label_values(dgdn_training_info{job=~"$job"}, instance)', 1),
        query_variable(
            "rank",
            "Rank",
            'label_values(dgdn_training_info{job=~"$job", instance=~"$instance", instance!=""}, rank)',
            3,
        ),
        query_variable("gpu_host", "GPU host (DCGM)", "label_values(DCGM_FI_DEV_GPU_UTIL, Hostname)", 1),
        query_variable("gpu", "GPU (DCGM)", 'label_values(DCGM_FI_DEV_GPU_UTIL{Hostname=~"$gpu_host"}, gpu)', 3),
    ]


def annotations() -> list[dict[str, Any]]:
    """Grafana's own annotations and alerts, and the firing DGDN alerts of the selected runs."""
    return [
        {
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        },
        {
            "datasource": DATASOURCE,
            "enable": True,
            "hide": False,
            "iconColor": "red",
            "name": "Firing DGDN alerts",
            "expr": 'ALERTS{alertstate="firing", alertname=~"DGDN.*", run_id=~"$run_id"}',
            "titleFormat": "{{alertname}}",
            "textFormat": "run {{run_id}}: {{instance}} rank {{rank}} ({{severity}})",
            "useValueForTime": False,
            "step": "60s",
        },
    ]


def build() -> dict[str, Any]:
    d = Dashboard()
    # Panel ids and grid positions follow the order the rows are laid out in.
    for row in (time_row, training_row, graph_row, model_row, gpu_row, system_row):
        row(d)
    group_by_run(d.panels)

    return {
        "uid": "dgdn-training",
        "title": "DGDN training",
        "description": "Training, graph, model, GPU and system metrics of runs monitored by "
        "dgdn_lightning_monitor.MonitoringCallback.",
        "tags": ["dgdn", "gnn", "lightning", "training"],
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "10s",
        "schemaVersion": 41,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "weekStart": "",
        "links": [],
        "annotations": {"list": annotations()},
        "templating": {"list": variables()},
        "panels": d.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
