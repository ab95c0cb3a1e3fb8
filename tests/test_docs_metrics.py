"""The metrics catalogue (docs/metrics.md, between its metrics-table markers) and the callback's /metrics agree, name
for name and type for type."""

from __future__ import annotations

import re
from pathlib import Path

from exposition import exposition
from lit_models import GraphClassifier, graph_loaders, quiet_trainer
from prometheus_client.parser import text_string_to_metric_families

from dgdn_lightning_monitor import MonitoringCallback, gpu
from dgdn_lightning_monitor.metrics import METRICS

CATALOGUE = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
TABLE = re.compile(r"^<!-- metrics-table:start -->\n(.*?)^<!-- metrics-table:end -->$", re.MULTILINE | re.DOTALL)
ROW = re.compile(r"^\| `(dgdn_[a-z_]+)` \| (gauge|counter|histogram|info) \|")


def catalogue_table() -> dict[str, str]:
    (table,) = TABLE.findall(CATALOGUE.read_text())
    rows = {}
    for line in table.splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def exported_names() -> dict[str, str]:
    names = {f"dgdn_{name}" + ("_info" if kind == "info" else ""): kind for name, (kind, _) in METRICS.items()}
    for name in gpu._HELP:  # every GPU series is a gauge
        names[f"dgdn_{name}"] = "gauge"
    return names


def test_catalogue_lists_every_metric_with_its_type():
    assert catalogue_table() == exported_names()


def test_every_family_of_a_real_run_is_in_the_catalogue():
    callback = MonitoringCallback(port=0)
    train, val, *_ = graph_loaders()
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], log_every_n_steps=1)
    trainer.fit(GraphClassifier(), train, val)
    table = catalogue_table()
    families = list(text_string_to_metric_families(exposition(callback.registry)))
    assert len(families) >= 20
    for family in families:
        name = family.name + ("_total" if family.type == "counter" else "")
        kind = "info" if name.endswith("_info") else family.type  # the text format writes an info as a gauge
        assert table.get(name) == kind, name
