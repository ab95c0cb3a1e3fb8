"""The metrics catalogue (dgdn_lightning_monitor/catalogue.py) against everything that names a metric: a real run's
/metrics (name, type, labels), the documentation's table (rendered from it), the naming conventions, and the
dashboard's and alert rules' queries (every callback series and label they select exists)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from exposition import exposition
from lit_models import GraphClassifier, graph_loaders, quiet_trainer
from prom_helpers import DASHBOARD_FILE, DEPLOY
from prometheus_client.parser import text_string_to_metric_families

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.catalogue import BY_NAME, FAMILIES, TYPES
from dgdn_lightning_monitor.labels import RANK_LABEL_NAMES

ROOT = Path(__file__).resolve().parent.parent
BY_EXPOSED = {family.exposed(): family for family in FAMILIES}
BY_SERIES = {series: family for family in FAMILIES for series in family.series()}
# Labels Prometheus attaches to every scraped series (the target's), beside the rank labels.
TARGET_LABELS = {"job", "instance", "run_id", "__name__"}
# A callback series in a query, not a recording rule's name (those carry a colon).
SERIES = re.compile(r"\b(dgdn_[a-z_]+)\b(?!:)(\{[^}]*\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def test_the_docs_table_is_rendered_from_the_catalogue():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "metrics_catalogue.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_each_family_follows_the_naming_conventions(family):
    assert family.type in TYPES
    assert re.fullmatch(r"[a-z][a-z0-9_]*[a-z0-9]", family.name), family.name
    assert family.name.endswith("_total") == (family.type == "counter"), "counters, and only they, end in _total"
    for unit in ("seconds", "bytes", "ratio", "celsius", "watts"):
        if family.name.endswith(f"_{unit}"):
            assert family.unit == unit, f"{family.name}: its name says {unit}, the catalogue {family.unit!r}"
    assert family.help.endswith(".") and family.meaning and not set(family.labels) & set(RANK_LABEL_NAMES)


def test_every_family_of_a_real_run_is_catalogued_with_its_type_and_labels():
    callback = MonitoringCallback(port=0)
    train, val, *_ = graph_loaders()
    quiet_trainer(max_epochs=1, callbacks=[callback], log_every_n_steps=1).fit(GraphClassifier(), train, val)
    families = list(text_string_to_metric_families(exposition(callback.registry)))
    assert len(families) >= 20
    for exposed in families:
        name = exposed.name + ("_total" if exposed.type == "counter" else "")
        family = BY_EXPOSED.get(name)
        assert family is not None, f"{name} is exported but not in the catalogue"
        kind = "info" if name.endswith("_info") else exposed.type  # the text format writes an info as a gauge
        assert family.type == kind, name
        allowed = set(RANK_LABEL_NAMES) | set(family.labels) | ({"le"} if family.type == "histogram" else set())
        for sample in exposed.samples:
            assert set(sample.labels) <= allowed, f"{name} carries {set(sample.labels) - allowed}, not catalogued"
        assert exposed.documentation == family.help, name


def queries() -> list[tuple[str, str]]:
    """Every PromQL expression of the dashboard and the shipped rules, with where it is."""
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((f"dashboard panel {panel.get('title')!r}", target.get("expr", "")))
            walk(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD_FILE.read_text())
    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        found.append((f"dashboard variable {variable['name']}", str(variable.get("query", ""))))
    for path in sorted(DEPLOY.rglob("rules/*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                found.append((f"{path.relative_to(ROOT)} {rule.get('alert') or rule.get('record')}", rule["expr"]))
    return found


def test_the_dashboard_and_the_rules_query_only_catalogued_series_and_labels():
    used = set()
    for where, expr in queries():
        for series, selector in SERIES.findall(expr):
            family = BY_SERIES.get(series)
            assert family is not None, f"{where}: {series} is not a series of the catalogue"
            used.add(family.name)
            allowed = set(RANK_LABEL_NAMES) | set(family.labels) | TARGET_LABELS | {"le"}
            labels = set(MATCHER.findall(selector))
            assert labels <= allowed, f"{where}: {series} has no label {labels - allowed} (catalogue: {family.labels})"
    # The dashboard shows every family, except those only the rules and the docs use.
    assert len(used) >= len(BY_NAME) - 5, sorted(set(BY_NAME) - used)
