"""The alert path end to end: a real Prometheus evaluates the shipped rules (time-compressed) on a real
Lightning run, sends to a real Alertmanager running the shipped routing, whose webhooks reach a receiver in the
test."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port, require_tool
from prom_helpers import (
    ALERTMANAGER_EXAMPLES,
    Alertmanager,
    HttpSink,
    Prometheus,
    http_get,
    scaled_rules,
    wait_until,
    webhook_alerts,
)

pytestmark = pytest.mark.slow

#: The shipped rules' durations are divided by this (``prom_helpers.scaled_rules``).
SCALE = 150
#: Training steps whose loss decreases (8 per epoch); then it climbs back up, and from NAN_FROM on it is NaN.
DECREASING_STEPS, NAN_FROM = 16, 24
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


def _post_alerts(alertmanager: Alertmanager, labels: list[dict[str, str]]) -> None:
    request = urllib.request.Request(
        f"{alertmanager.url}/api/v2/alerts",
        data=json.dumps([{"labels": item} for item in labels]).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5):  # noqa: S310 - loopback
        pass


def _suppressed(alertmanager: Alertmanager, alertname: str) -> list[dict[str, Any]]:
    """Alerts Alertmanager holds as inhibited, by name, with their labels."""
    body = json.loads(http_get(f"{alertmanager.url}/api/v2/alerts?inhibited=true&active=false&silenced=false"))
    return [a for a in body if a["labels"]["alertname"] == alertname and a["status"]["inhibitedBy"]]


def test_critical_alert_inhibits_the_warning_of_the_same_instance(alert_path):
    """Alerts posted straight to Alertmanager: routed by severity, and the inhibition rule holds."""
    alertmanager, sink = alert_path["alertmanager"], alert_path["sink"]
    common = {"alertname": "InhibitionProbe", "job": "dgdn-training"}
    _post_alerts(
        alertmanager,
        [
            {**common, "instance": "a:8000", "severity": "critical"},
            {**common, "instance": "a:8000", "severity": "warning"},
            {**common, "instance": "b:8000", "severity": "warning"},
        ],
    )

    def probes(received):
        return [
            (where, alert["labels"]["instance"], alert["labels"]["severity"])
            for where, alert in webhook_alerts(received)
            if alert["labels"]["alertname"] == "InhibitionProbe"
        ]

    wait_until(
        lambda: any(a["labels"]["instance"] == "a:8000" for a in _suppressed(alertmanager, "InhibitionProbe")),
        30,
        what="Alertmanager holding the warning of a:8000 as inhibited",
    )
    # The other instance's warning is in the same group as a:8000's: the notification that carries it was built
    # with the inhibition applied.
    sink.wait_for(
        lambda r: {("/alerts/critical", "a:8000", "critical"), ("/alerts", "b:8000", "warning")} <= set(probes(r)),
        30,
        "the critical alert and the other instance's warning",
    )
    assert ("/alerts", "a:8000", "warning") not in probes(sink.snapshot())


def test_the_exception_of_a_failed_run_reaches_on_call_and_what_it_caused_does_not(alert_path):
    """One rank of a run raises, its other ranks are then killed, cancelled, suspended in a collective or stall: the
    alerts a real Prometheus sends for them, posted straight to Alertmanager running the shipped routing. The
    critical webhook gets DGDNRunFailed with its exception; the deaths, cancels and stalls of the same run are held
    back; another run that dies still pages."""
    alertmanager, sink = alert_path["alertmanager"], alert_path["sink"]
    run = {"job": "dgdn-training", "run_id": "slurm-81750"}
    failed = {**run, "alertname": "DGDNRunFailed", "severity": "critical", "instance": "gpu001:41003", "rank": "0",
              "outcome": "failed", "exception": "ValueError"}  # fmt: skip
    caused = [
        {**run, "alertname": "DGDNRunDown", "severity": "critical", "instance": "gpu002:41003", "rank": "1"},
        {
            **run,
            "alertname": "DGDNRunTerminated",
            "severity": "critical",
            "instance": "gpu003:41003",
            "rank": "2",
            "outcome": "terminated",
            "exception": "SIGTERMException",
            "reason": "cancelled",
        },  # fmt: skip
        {**run, "alertname": "DGDNRunUnreachable", "severity": "warning", "instance": "gpu004:41003", "rank": "3"},
        {
            **run,
            "alertname": "DGDNTrainingStalled",
            "severity": "warning",
            "instance": "gpu004:41003",
            "rank": "3",
            "stage": "train",
        },  # fmt: skip
    ]
    other_run = {**caused[0], "run_id": "slurm-81799", "instance": "gpu009:41003"}
    _post_alerts(alertmanager, [failed, *caused, other_run])

    wait_until(
        lambda: all(_suppressed(alertmanager, alert["alertname"]) for alert in caused),
        30,
        what="Alertmanager holding every alert the failure caused as inhibited",
    )
    sink.wait_for(
        lambda r: (
            {
                (where, alert["labels"]["alertname"], alert["labels"]["run_id"])
                for where, alert in webhook_alerts(r)
                if alert["labels"].get("run_id") in ("slurm-81750", "slurm-81799")
            }
            >= {
                ("/alerts/critical", "DGDNRunFailed", "slurm-81750"),
                ("/alerts/critical", "DGDNRunDown", "slurm-81799"),
            }
        ),
        30,
        "DGDNRunFailed of the failed run and DGDNRunDown of the other run at the critical webhook",
    )
    sent = [alert for _, alert in webhook_alerts(sink.snapshot()) if alert["labels"].get("run_id") == "slurm-81750"]
    assert {alert["labels"]["alertname"] for alert in sent} == {"DGDNRunFailed"}
    assert {alert["labels"]["exception"] for alert in sent} == {"ValueError"}
    # Every alert it caused is held back by DGDNRunFailed itself.
    for alert in caused:
        (held,) = [a for a in _suppressed(alertmanager, alert["alertname"]) if a["labels"]["run_id"] == "slurm-81750"]
        assert held["status"]["inhibitedBy"], alert["alertname"]


def test_high_then_nonfinite_loss_reaches_the_webhook(alert_path, tmp_path):
    """A run whose loss decreases, climbs back up, then is NaN in every step: DGDNHighTrainingLoss reaches the
    default webhook and DGDNTrainingLossNotFinite the critical one, from the shipped rules and routing."""
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
            rule_file=scaled_rules(tmp_path, SCALE),
            alertmanager=f"127.0.0.1:{alertmanager.port}",
        )
        prometheus = state["prometheus"] = Prometheus(prometheus_binary, config, tmp_path, free_port())
        prometheus.wait_ready()
        dt.wait_for_target_up(prometheus)

    def batch(trainer) -> None:
        if trainer.global_step == DECREASING_STEPS + 2:  # the loss is back up
            state["high"] = sink.wait_for(
                lambda r: _firing(r, "DGDNHighTrainingLoss"), ALERT_TIMEOUT_S, "DGDNHighTrainingLoss at the webhook"
            )

    def end(trainer) -> None:
        state["nonfinite"] = sink.wait_for(
            lambda r: _firing(r, "DGDNTrainingLossNotFinite"),
            ALERT_TIMEOUT_S,
            "DGDNTrainingLossNotFinite at the webhook",
        )

    offsets = [100.0 - 5 * step for step in range(DECREASING_STEPS)] + [100.0]
    model = dt.Paced(offsets=offsets, nan_steps=frozenset(range(NAN_FROM, 1000)), step_sleep_s=0.02)
    train, val = dt.loaders()
    try:
        # 8 batches per epoch: the non-finite losses are counted at the end of the fourth.
        dt.trainer([dt.Hooks(start, batch, end), monitor], max_epochs=4).fit(model, train, val)

        high = state["high"][0]
        assert high["labels"]["severity"] == "warning"
        assert high["labels"]["instance"] == state["target"] and high["labels"]["rank"] == "0"
        # A static target: only the run's dgdn_training_info names the run; the alert does too.
        assert high["labels"]["run_id"] == monitor.run_id
        assert high["annotations"]["summary"].startswith(f"Training loss of run {monitor.run_id} rose back above")
        assert _firing(sink.snapshot(), "DGDNHighTrainingLoss", "/alerts")

        nonfinite = state["nonfinite"][0]
        assert nonfinite["labels"]["severity"] == "critical"
        assert nonfinite["labels"]["instance"] == state["target"] and nonfinite["labels"]["run_id"] == monitor.run_id
        assert _firing(sink.snapshot(), "DGDNTrainingLossNotFinite", "/alerts/critical")

        # The run has ended and its endpoint said so before it went: Prometheus holds the completed outcome, so
        # the static target's end raises no crash alert.
        wait_until(
            lambda: state["prometheus"].query('last_over_time(dgdn_run_outcome{outcome="completed"}[1m]) == 1'),
            20,
            what="the completed outcome scraped before the endpoint went",
        )
        assert not [a for a in _firing(sink.snapshot(), "DGDNRunDown") if a["labels"].get("run_id") == monitor.run_id]
    finally:
        if state["prometheus"] is not None:
            state["prometheus"].stop()
