"""``dgdn_monitor_errors_total{part}``: every error the monitor degrades on is counted by part, the first of each
part is warned with its cause, and the alert's promtool test uses the series a real run exports."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml
from conftest import free_port
from fake_pynvml import FakeDevice, FakeNVML
from prometheus_client import CollectorRegistry

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.gpu import GPUMonitor
from dgdn_lightning_monitor.guards import ERROR_PARTS, MonitorErrors
from exposition import exposition, samples, value
from lit_models import GraphClassifier, graph_loaders, quiet_trainer
from prom_helpers import RULES_TEST_FILE

#: Labels a scrape target adds to each of its series: a discovered run's id, a pod's identity.
TARGET_LABELS = ("run_id", "namespace", "pod", "container")


def test_the_first_error_of_each_part_is_warned_the_rest_counted(caplog):
    errors = MonitorErrors(logging.getLogger("dgdn_lightning_monitor"))
    with caplog.at_level("WARNING", logger="dgdn_lightning_monitor"):
        for i in range(3):
            errors.report("push", "push failed (%s)", f"cause {i}")
        errors.report("gpu")  # counted only: the part words its own warning
        errors.report("tracing", "export failed (%s)", "refused")
    assert errors.counts == {**dict.fromkeys(ERROR_PARTS, 0), "push": 3, "gpu": 1, "tracing": 1}
    assert [r.getMessage() for r in caplog.records] == ["push failed (cause 0)", "export failed (refused)"]


def failing_run(tmp_path: Path, monkeypatch, caplog) -> tuple[MonitoringCallback, int]:
    """A real fit in which sizing, the discovery file, span export and the final push all fail."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{free_port()}/v1/traces")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")

    def broken(batch):
        raise RuntimeError("no size here")

    callback = MonitoringCallback(
        port=0,
        batch_size_fn=broken,
        targets_dir=blocker / "targets",  # cannot be created under a file
        pushgateway_url=f"http://127.0.0.1:{free_port()}",
        tracing=True,
        trace_every_n_steps=1,
    )
    train, val, _, _ = graph_loaders()
    with caplog.at_level("WARNING", logger="dgdn_lightning_monitor"):
        trainer = quiet_trainer(max_epochs=2, callbacks=[callback])
        trainer.fit(GraphClassifier(), train, val)
    batches = trainer.global_step + 2 * len(val)  # every training and validation batch failed to size
    return callback, batches


def test_a_real_run_counts_each_failing_part_and_warns_each_once(tmp_path, monkeypatch, caplog):
    callback, batches = failing_run(tmp_path, monkeypatch, caplog)
    text = exposition(callback.registry)
    counted = {labels["part"]: v for labels, v in samples(text)["dgdn_monitor_errors_total"]}
    assert set(counted) == set(ERROR_PARTS)
    assert counted["graph_size"] == batches == 14
    assert counted["discovery"] == 1 and counted["push"] == 1
    assert counted["tracing"] >= 1  # every failed export request (spans leave in batches)
    assert counted["metrics"] == counted["gpu"] == counted["exchange"] == 0
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("Could not size a batch (RuntimeError: no size here)" in m for m in messages) == 1
    assert sum("discovery file" in m for m in messages) == 1
    assert sum("Could not push the final metrics" in m for m in messages) == 1
    assert sum("Could not export spans" in m for m in messages) == 1


def test_gpu_failures_are_counted_as_gpu():
    errors = MonitorErrors(logging.getLogger("dgdn_lightning_monitor.gpu"))
    nvml = FakeNVML([FakeDevice()])
    nvml.fail("nvmlDeviceGetUtilizationRates")
    monitor = GPUMonitor("dgdn", devices=[0], poll_interval_s=0.02, nvml=nvml, errors=errors)
    CollectorRegistry().register(monitor)
    monitor.start([], {"rank": "0"})
    try:
        deadline = time.monotonic() + 10
        while errors.counts["gpu"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        monitor.stop()
    assert errors.counts["gpu"] >= 3  # every failed sample round, not only the first
    assert sum(errors.counts.values()) == errors.counts["gpu"]


def test_the_alert_tests_use_the_series_a_real_run_exports(tmp_path, monkeypatch, caplog):
    callback, _ = failing_run(tmp_path, monkeypatch, caplog)
    exported = {
        frozenset(labels.items()) for labels, _ in samples(exposition(callback.registry))["dgdn_monitor_errors_total"]
    }
    cases = yaml.safe_load(RULES_TEST_FILE.read_text())["tests"]
    scraped = [  # what Prometheus stores of a scraped rank: the exported labels plus its target's
        series["series"]
        for case in cases
        for series in case.get("input_series", [])
        if series["series"].startswith("dgdn_monitor_errors_total") and 'instance=""' not in series["series"]
    ]
    assert scraped
    for series in scraped:
        labels = dict(
            pair.split("=", 1) for pair in series.split("{", 1)[1].rstrip("}").replace('"', "").split(", ")
        )
        assert labels.pop("job") == "dgdn-training" and labels.pop("instance")
        for target_label in TARGET_LABELS:  # what a discovery file or a PodMonitor adds to every series
            labels.pop(target_label, None)
        assert frozenset(labels.items()) in exported, series
    assert value(exposition(callback.registry), "dgdn_monitor_errors_total", part="graph_size") == 14
