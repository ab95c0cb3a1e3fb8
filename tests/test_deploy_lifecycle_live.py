"""Run lifecycle with the real parts: a real Prometheus running the shipped ``dgdn-training`` scrape job and the
shipped rules, a real Alertmanager running the shipped webhook example, a webhook receiver in the test, and real
Lightning runs. A run discovered both through the static quick-start target and a discovery file is scraped once;
a run that ends normally raises no warning or critical alert; a run killed with SIGKILL raises DGDNRunDown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port, require_tool
from prom_helpers import (
    ALERTMANAGER_EXAMPLES,
    ROOT,
    RULES_FILE,
    Alertmanager,
    HttpSink,
    Prometheus,
    wait_until,
    webhook_alerts,
)

pytestmark = pytest.mark.slow

#: How long an alert may take to reach the webhook: scrape and evaluation every second, `for` cut to 15 s at most,
#: Alertmanager group_wait 1 s; generous for a loaded machine.
ALERT_TIMEOUT_S = 60.0
#: Lifecycle alerts whose `for` the test shortens; the others keep theirs and cannot fire in a short test.
#: DGDNRunDown keeps more than Prometheus needs to drop the target of a run that ended: its discovery manager passes
#: target changes on at most every 5 s, and the endpoint is down in between (the shipped `for` is 1 minute).
SHORTENED = {"DGDNRunDown": "15s", "DGDNMetricsEndpointGone": "1s"}


def lifecycle_rules(workdir: Path) -> Path:
    rules = yaml.safe_load(RULES_FILE.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in SHORTENED:
                rule["for"] = SHORTENED[rule["alert"]]
    path = workdir / "dgdn-alerts.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def webhook_example(sink_url: str, workdir: Path) -> Path:
    """The shipped webhook example pointed at ``sink_url`` (paths kept), its token file in ``workdir``."""
    config = yaml.safe_load(ALERTMANAGER_EXAMPLES["webhook"].read_text())
    token = workdir / "webhook_token"
    token.write_text("lifecycle-test-token\n")
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = sink_url + "/" + webhook["url"].split("//", 1)[1].split("/", 1)[1]
            webhook["http_config"]["authorization"]["credentials_file"] = str(token)
    for route in [config["route"], *config["route"]["routes"]]:
        route.update(group_wait="1s", group_interval="1s")
    path = workdir / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Any:
    """Prometheus (the shipped training job, static target on a port no run uses unless asked) + Alertmanager +
    webhook sink."""
    prometheus_binary = require_tool("prometheus")
    alertmanager_binary = require_tool("alertmanager")
    import deploy_training as dt

    workdir = tmp_path_factory.mktemp("lifecycle")
    targets = workdir / "targets"
    targets.mkdir()
    sink = HttpSink()
    alertmanager = Alertmanager(alertmanager_binary, webhook_example(sink.url, workdir), workdir, free_port())
    static_port = free_port()
    config = dt.shipped_training_config(
        workdir / "prometheus.yml",
        f"127.0.0.1:{static_port}",
        targets,
        rule_files=[lifecycle_rules(workdir)],
        alertmanager=f"127.0.0.1:{alertmanager.port}",
    )
    prometheus = Prometheus(prometheus_binary, config, workdir, free_port())
    try:
        alertmanager.wait_ready()
        prometheus.wait_ready()
        yield {"prometheus": prometheus, "sink": sink, "targets": targets, "static_port": static_port}
    finally:
        prometheus.stop()
        alertmanager.stop()
        sink.close()


def _alerts(received, alertname: str, status: str = "firing") -> list[tuple[str, dict[str, Any]]]:
    return [
        (path, alert)
        for path, alert in webhook_alerts(received)
        if alert["labels"].get("alertname") == alertname and alert["status"] == status
    ]


def _firing_in_prometheus(prometheus: Prometheus, selector: str) -> list[dict[str, Any]]:
    return prometheus.query(f'ALERTS{{alertstate="firing", {selector}}}')


def test_a_run_on_the_static_and_discovered_address_is_scraped_once_and_its_end_is_quiet(stack):
    """The quick-start target and the run's discovery file name the same endpoint: one target, sums equal to the
    run's own count. After the normal end nothing at warning or critical fires, only the info alert of the static
    target."""
    import deploy_training as dt

    from dgdn_lightning_monitor import MonitoringCallback

    prometheus, sink = stack["prometheus"], stack["sink"]
    monitor = MonitoringCallback(
        port=stack["static_port"],
        addr="127.0.0.1",
        targets_dir=stack["targets"],
        targets_host="127.0.0.1",
        tracing=False,
    )
    seen: dict[str, Any] = {}
    max_epochs, train_graphs = 3, 32

    def start(trainer) -> None:
        assert list(stack["targets"].glob("*.json")), "the run wrote no discovery file"
        dt.wait_for_target_up(prometheus)

    def end(trainer) -> None:
        # A scrape after the last step, then everything Prometheus holds about the run.
        wait_until(
            lambda: prometheus.query(f"dgdn_global_step == {trainer.global_step}"),
            20,
            what="a scrape after the last step",
        )
        seen["targets"] = prometheus.api("targets")["activeTargets"]
        seen["up"] = prometheus.query(f'up{{job="{dt.JOB}"}}')
        seen["samples"] = prometheus.query('sum by (rank) (dgdn_samples_processed_total{instance!=""})')
        seen["series"] = prometheus.query('count(dgdn_samples_processed_total{instance!=""})')

    train, val = dt.loaders(train_graphs=train_graphs)
    dt.trainer([dt.Hooks(start, lambda t: None, end), monitor], max_epochs=max_epochs).fit(
        dt.LiveGCN(step_sleep_s=0.02), train, val
    )

    training_targets = [t for t in seen["targets"] if t["labels"]["job"] == dt.JOB]
    assert len(training_targets) == 1, training_targets
    assert "run_id" not in training_targets[0]["labels"]  # merged into the static target
    assert len(seen["up"]) == 1
    assert seen["series"][0]["value"][1] == "1"
    # Ground truth: every training graph once per epoch.
    assert [(s["metric"]["rank"], float(s["value"][1])) for s in seen["samples"]] == [
        ("0", float(train_graphs * max_epochs))
    ]
    assert not list(stack["targets"].glob("*.json")), "the discovery file stayed after a normal end"

    # The static target is now down: the info alert, and nothing at warning or critical.
    info = sink.wait_for(
        lambda r: _alerts(r, "DGDNMetricsEndpointGone"), ALERT_TIMEOUT_S, "DGDNMetricsEndpointGone after the run ended"
    )
    assert info[0][1]["labels"]["severity"] == "info" and info[0][0] == "/alerts"
    time.sleep(5)  # several evaluations and group intervals more
    loud = [
        (path, alert["labels"])
        for path, alert in webhook_alerts(sink.snapshot())
        if alert["status"] == "firing" and alert["labels"].get("severity") in ("warning", "critical")
    ]
    assert not loud, loud
    assert not _firing_in_prometheus(prometheus, 'severity=~"warning|critical"')


def test_a_discovered_run_that_ends_normally_stays_quiet_and_a_killed_one_fires(stack, tmp_path):
    """Two real training processes discovered through files: one ends normally (its file goes, no alert), one is
    killed with SIGKILL (its file stays, DGDNRunDown reaches the critical webhook naming its run)."""
    prometheus, sink = stack["prometheus"], stack["sink"]
    import deploy_training as dt

    from dgdn_lightning_monitor import MonitoringCallback

    # --- a normal end, in this process
    monitor = MonitoringCallback(
        port=0, addr="127.0.0.1", targets_dir=stack["targets"], targets_host="127.0.0.1", tracing=False
    )
    ended: dict[str, Any] = {}

    def start(trainer) -> None:
        ended["target"] = dt.host_port(monitor.metrics_url)
        ended["run_id"] = monitor.run_id
        wait_until(
            lambda: prometheus.query(f'up{{instance="{ended["target"]}"}} == 1'), 30, what="the discovered run scraped"
        )

    train, val = dt.loaders()
    dt.trainer([dt.Hooks(start, lambda t: None, lambda t: None), monitor], max_epochs=2).fit(
        dt.LiveGCN(step_sleep_s=0.02), train, val
    )

    # --- a killed run, in a child process
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "deploy_training.py"), "--targets-dir", str(stack["targets"])],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "serving" not in line and time.monotonic() < deadline and child.poll() is None:
            line = child.stdout.readline()
        assert "serving" in line, f"the training process did not start (exit {child.poll()})"
        target = dt.host_port(line.split()[-1])
        wait_until(
            lambda: prometheus.query(f'dgdn_last_step_timestamp_seconds{{instance="{target}"}}'),
            60,
            what="the child run scraped after a step",
        )
        run_id = prometheus.query(f'up{{instance="{target}"}}')[0]["metric"]["run_id"]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        killed_at = time.monotonic()

        down = sink.wait_for(
            lambda r: [a for a in _alerts(r, "DGDNRunDown") if a[1]["labels"]["run_id"] == run_id],
            ALERT_TIMEOUT_S,
            "DGDNRunDown for the killed run",
        )
        path, alert = down[0]
        assert path == "/alerts/critical" and alert["labels"]["severity"] == "critical"
        assert alert["labels"]["instance"] == target
        assert time.monotonic() - killed_at < ALERT_TIMEOUT_S
        request = next(r for r in sink.snapshot() if r.path == "/alerts/critical")
        assert request.headers.get("Authorization") == "Bearer lifecycle-test-token"
        assert list(stack["targets"].glob(f"*{run_id}.json")), "a killed run's discovery file should stay"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        for leftover in stack["targets"].glob("*.json"):  # the killed run's file, as the alert tells one to do
            leftover.unlink()

    # The run that ended normally never raised DGDNRunDown (nor anything else at warning or critical).
    normal = [
        alert
        for path, alert in webhook_alerts(sink.snapshot())
        if alert["labels"].get("instance") == ended["target"]
        and alert["status"] == "firing"
        and alert["labels"].get("severity") in ("warning", "critical")
    ]
    assert not normal, normal
    assert not _firing_in_prometheus(prometheus, f'instance="{ended["target"]}"')
