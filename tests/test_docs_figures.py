"""Figures the deploy docs state about the callback's series, measured on a real run."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from exposition import exposition
from lit_models import GraphClassifier, graph_loaders, quiet_trainer

from dgdn_lightning_monitor import MonitoringCallback

PRODUCTION = Path(__file__).resolve().parents[1] / "docs" / "production.md"


def test_the_largest_metric_family_named_in_the_docs_is_the_largest():
    """docs/production.md names the largest family and its series per rank: true for a run that trained,
    validated, tested and predicted (every family and label value present)."""
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, trace_every_n_steps=1)
    train, val, _, _ = graph_loaders()
    trainer = quiet_trainer(max_epochs=1, callbacks=[monitor])
    model = GraphClassifier()
    trainer.fit(model, train, val)
    trainer.test(model, val, verbose=False)
    trainer.predict(model, val)
    series = Counter(
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in exposition(monitor.registry).splitlines()
        if line and not line.startswith("#")
    )
    text = " ".join(PRODUCTION.read_text().split())
    claim = re.search(r"`(dgdn_\w+)` is the largest family: (\d+) series per rank and run", text)
    assert claim, "docs/production.md no longer names the largest family"
    name, count = claim.group(1), int(claim.group(2))
    assert series.most_common(1)[0] == (name, count), series.most_common(3)
    for other, figure in re.findall(r"`(dgdn_\w+_bucket)` \((\d+)\)", text):
        assert series[other] == int(figure), other
    assert series["dgdn_inference_time_seconds_bucket"] == int(re.search(r"(\d+) for validate, test", text).group(1))
