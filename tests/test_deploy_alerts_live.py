"""The alert path end to end: a real Prometheus evaluates the shipped rules (with `for:` shortened) on a real
Lightning run, sends to a real Alertmanager running the shipped routing, whose webhooks reach a receiver in the
test."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port, require_tool
from prom_helpers import (
    ALERTMANAGER_EXAMPLES,
    RULES_FILE,
    Alertmanager,
    HttpSink,
    Prometheus,
    wait_until,
    webhook_alerts,
)

pytestmark = pytest.mark.slow

#: Training steps with a loss above the DGDNHighTrainingLoss threshold before the loss turns NaN.
HIGH_LOSS_STEPS = 12
ALERT_TIMEOUT_S = 60.0


def local_alertmanager_config(sink_url: str, workdir: Path) -> Path:
    """The shipped webhook example with its webhooks pointed at ``sink_url`` (paths kept), its token in a file of
    ``workdir``, and short timers."""
    config = yaml.safe_load(ALERTMANAGER_EXAMPLES["webhook"].read_text())
    token = workdir / "webhook_token"
    token.write_text("alert-path-token\n")
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            path = "/" + webhook["url"].split("//", 1)[1].split("/", 1)[1]
            webhook["url"] = sink_url + path
            webhook["http_config"]["authorization"]["credentials_file"] = str(token)
    routes = [config["route"], *config["route"].get("routes", [])]
    for route in routes:
        route.update(group_wait="1s", group_interval="1s")
    path = workdir / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def shortened_rules(workdir: Path) -> Path:
    """The shipped rules with every ``for:`` cut to 1 s, so that a test run fires them within seconds."""
    rules = yaml.safe_load(RULES_FILE.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    path = workdir / "dgdn-alerts.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def alert_path(tmp_path_factory) -> Any:
    binary = require_tool("alertmanager")
    workdir = tmp_path_factory.mktemp("alerting")
    sink = HttpSink()
    alertmanager = Alertmanager(binary, local_alertmanager_config(sink.url, workdir), workdir, free_port())
    try:
        alertmanager.wait_ready()
        yield {"sink": sink, "alertmanager": alertmanager, "workdir": workdir}
    finally:
        alertmanager.stop()
        sink.close()


def _firing(received, alertname: str, path: str | None = None) -> list[dict[str, Any]]:
    return [
        alert
        for where, alert in webhook_alerts(received)
        if alert["labels"].get("alertname") == alertname
        and alert["status"] == "firing"
        and (path is None or where == path)
    ]


def test_critical_alert_inhibits_the_warning_of_the_same_instance(alert_path):
    """Alerts posted straight to Alertmanager: routed by severity, and the inhibition rule holds."""
    alertmanager, sink = alert_path["alertmanager"], alert_path["sink"]
    common = {"alertname": "InhibitionProbe", "job": "dgdn-training"}
    alerts = [
        {"labels": {**common, "instance": "a:8000", "severity": "critical"}},
        {"labels": {**common, "instance": "a:8000", "severity": "warning"}},
        {"labels": {**common, "instance": "b:8000", "severity": "warning"}},
    ]
    request = urllib.request.Request(
        f"{alertmanager.url}/api/v2/alerts",
        data=json.dumps(alerts).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5):  # noqa: S310 - loopback
        pass

    def probes(received):
        return [
            (where, alert["labels"]["instance"], alert["labels"]["severity"])
            for where, alert in webhook_alerts(received)
            if alert["labels"]["alertname"] == "InhibitionProbe"
        ]

    sink.wait_for(
        lambda r: {("/alerts/critical", "a:8000", "critical"), ("/alerts", "b:8000", "warning")} <= set(probes(r)),
        30,
        "the critical alert and the other instance's warning",
    )
    time.sleep(3)  # several group intervals: an uninhibited warning for a:8000 would have been sent by now
    assert ("/alerts", "a:8000", "warning") not in probes(sink.snapshot())


def test_high_then_nonfinite_loss_reaches_the_webhook(alert_path, tmp_path):
    """A run whose loss is far above 10 and then NaN: DGDNHighTrainingLoss reaches the default webhook and
    DGDNTrainingLossNotFinite the critical one, from the shipped rules and routing."""
    prometheus_binary = require_tool("prometheus")
    import deploy_training as dt

    from dgdn_lightning_monitor import MonitoringCallback

    sink, alertmanager = alert_path["sink"], alert_path["alertmanager"]
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False)
    state: dict[str, Any] = {"prometheus": None}

    def start(trainer) -> None:
        state["target"] = dt.host_port(monitor.metrics_url)
        config = dt.write_prometheus_config(
            tmp_path / "prometheus.yml",
            state["target"],
            rule_file=shortened_rules(tmp_path),
            alertmanager=f"127.0.0.1:{alertmanager.port}",
        )
        prometheus = state["prometheus"] = Prometheus(prometheus_binary, config, tmp_path, free_port())
        prometheus.wait_ready()
        dt.wait_for_target_up(prometheus)

    def batch(trainer) -> None:
        if trainer.global_step == HIGH_LOSS_STEPS:  # the last step before the loss turns NaN
            state["high"] = sink.wait_for(
                lambda r: _firing(r, "DGDNHighTrainingLoss"), ALERT_TIMEOUT_S, "DGDNHighTrainingLoss at the webhook"
            )

    def end(trainer) -> None:
        state["nonfinite"] = sink.wait_for(
            lambda r: _firing(r, "DGDNTrainingLossNotFinite"),
            ALERT_TIMEOUT_S,
            "DGDNTrainingLossNotFinite at the webhook",
        )

    model = dt.LiveGCN(loss_offset=50.0, nan_after_step=HIGH_LOSS_STEPS, step_sleep_s=0.02)
    train, val = dt.loaders()
    try:
        # 8 batches per epoch: 3 epochs cover the high-loss steps and a few NaN steps.
        dt.trainer([dt.Hooks(start, batch, end), monitor], max_epochs=3).fit(model, train, val)

        high = state["high"][0]
        assert high["labels"]["severity"] == "warning"
        assert high["labels"]["instance"] == state["target"] and high["labels"]["rank"] == "0"
        assert high["annotations"]["summary"].startswith("Training loss above 10")
        assert _firing(sink.snapshot(), "DGDNHighTrainingLoss", "/alerts")

        nonfinite = state["nonfinite"][0]
        assert nonfinite["labels"]["severity"] == "critical"
        assert nonfinite["labels"]["instance"] == state["target"]
        assert _firing(sink.snapshot(), "DGDNTrainingLossNotFinite", "/alerts/critical")

        # The run has ended and its endpoint said so before it went: Prometheus holds the completed outcome, so
        # the static target's end raises no crash alert.
        wait_until(
            lambda: state["prometheus"].query('last_over_time(dgdn_run_outcome{outcome="completed"}[1m]) == 1'),
            20,
            what="the completed outcome scraped before the endpoint went",
        )
        assert not _firing(sink.snapshot(), "DGDNRunDown")
    finally:
        if state["prometheus"] is not None:
            state["prometheus"].stop()
