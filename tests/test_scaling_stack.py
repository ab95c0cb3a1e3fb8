"""Beyond one Prometheus, with the real binaries and the shipped examples of deploy/scaling: remote_write into a
second Prometheus started as a receiver, federation of a training Prometheus into a global one through the
recording rules, and two clustered Alertmanagers that turn one alert into one notification."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port, require_tool
from prom_helpers import DEPLOY, HttpSink, Prometheus, ServerProcess, http_get, run_tool, wait_until, webhook_alerts
from prometheus_client import CollectorRegistry, Gauge, start_http_server

pytestmark = pytest.mark.slow

SCALING = DEPLOY / "scaling"
WAIT_S = 90.0
#: Per-rank figures of a two-rank run the fake endpoint serves; the ground truth of the per-run aggregates.
SAMPLES_PER_SECOND = {"0": 1200.0, "1": 1000.0}
LOSS = {"0": 0.5, "1": 0.25}


@pytest.fixture(scope="module")
def training_endpoint():
    """An HTTP endpoint serving the figures of a two-rank run, as the callback names them, plus a series that
    long-term storage must not receive."""
    registry = CollectorRegistry()
    throughput = Gauge("dgdn_samples_per_second", "x", ["run_id", "rank"], registry=registry)
    loss = Gauge("dgdn_training_loss", "x", ["run_id", "rank"], registry=registry)
    for rank in SAMPLES_PER_SECOND:
        throughput.labels("run-a", rank).set(SAMPLES_PER_SECOND[rank])
        loss.labels("run-a", rank).set(LOSS[rank])
    Gauge("unrelated_process_value", "x", registry=registry).set(7)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


class RemoteWriteReceiver(Prometheus):
    """A Prometheus that accepts remote writes (``--web.enable-remote-write-receiver``)."""

    def __init__(self, binary: str, config: Path, workdir: Path, port: int) -> None:
        ServerProcess.__init__(
            self,
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-remote-write-receiver",
                "--log.level=warn",
            ],
            port,
            workdir / "prometheus.log",
        )


def _started(process: ServerProcess) -> ServerProcess:
    try:
        process.wait_ready(timeout=WAIT_S)
    except BaseException:
        process.stop()
        raise
    return process


def _training_config(source: Path, path: Path, target: str, remote_write_url: str | None = None) -> Path:
    """A shipped config with loopback addresses: the training job scrapes ``target`` every second."""
    config = yaml.safe_load(source.read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    config["scrape_configs"] = [
        {"job_name": "dgdn-training", "scrape_interval": "1s", "static_configs": [{"targets": [target]}]}
    ]
    rules = yaml.safe_load((SCALING / "rules" / "dgdn-federation.yml").read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    rules_path = path.parent / "federation-rules.yml"
    rules_path.write_text(yaml.safe_dump(rules))
    config["rule_files"] = [str(rules_path)]
    if remote_write_url is not None:
        config["remote_write"][0]["url"] = remote_write_url
        config["remote_write"][0]["queue_config"]["batch_send_deadline"] = "1s"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _values(prometheus: Prometheus, expr: str, key: str) -> dict[str, float]:
    return {r["metric"].get(key, ""): float(r["value"][1]) for r in prometheus.query(expr)}


def test_shipped_scaling_configs_pass_promtool_and_compose():
    promtool = require_tool("promtool")
    for config in ("remote-write.yml", "global-prometheus.yml", "prometheus-ha-alertmanager.yml"):
        run_tool([promtool, "check", "config", SCALING / config])
    run_tool([promtool, "check", "rules", SCALING / "rules" / "dgdn-federation.yml"])
    # The HA copy keeps the plain config's jobs, and sends alerts to both Alertmanagers.
    plain = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    ha = yaml.safe_load((SCALING / "prometheus-ha-alertmanager.yml").read_text())
    assert [j["job_name"] for j in ha["scrape_configs"]] == [j["job_name"] for j in plain["scrape_configs"]]
    assert ha["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "alertmanager:9093",
        "alertmanager-2:9093",
    ]
    compose = require_tool("docker-compose")
    merged = run_tool(
        [compose, "-f", DEPLOY / "docker-compose.yml", "-f", SCALING / "docker-compose.ha-alertmanager.yml", "config"],
        stdout_only=True,
    )
    services = yaml.safe_load(merged)["services"]
    assert "--cluster.peer=alertmanager-2:9094" in services["alertmanager"]["command"]
    assert "--cluster.peer=alertmanager:9094" in services["alertmanager-2"]["command"]


def test_remote_write_reaches_a_receiving_prometheus(tmp_path, training_endpoint):
    binary = require_tool("prometheus")
    receiver_dir, sender_dir = tmp_path / "receiver", tmp_path / "sender"
    receiver_dir.mkdir()
    sender_dir.mkdir()
    receiver_config = receiver_dir / "prometheus.yml"
    receiver_config.write_text("global: {scrape_interval: 1m}\n")
    receiver_port = free_port()
    receiver = _started(RemoteWriteReceiver(binary, receiver_config, receiver_dir, receiver_port))
    sender = None
    try:
        config = _training_config(
            SCALING / "remote-write.yml",
            sender_dir / "prometheus.yml",
            training_endpoint,
            f"http://127.0.0.1:{receiver_port}/api/v1/write",
        )
        sender = _started(Prometheus(binary, config, sender_dir, free_port()))
        arrived = wait_until(
            lambda: (
                _values(receiver, 'dgdn_samples_per_second{run_id="run-a"}', "rank")
                if len(receiver.query('dgdn_samples_per_second{run_id="run-a"}')) == 2
                else {}
            ),
            WAIT_S,
            what="the training series in the receiving Prometheus",
        )
        assert arrived == SAMPLES_PER_SECOND
        wait_until(
            lambda: receiver.query("run:dgdn_samples_per_second:sum"),
            WAIT_S,
            what="the recorded per-run series in the receiving Prometheus",
        )
        series = receiver.query('{__name__=~".+"}')
        names = {item["metric"]["__name__"] for item in series}
        assert "unrelated_process_value" not in names  # write_relabel_configs kept only the training metrics
        assert all(item["metric"].get("cluster") == "a" for item in series)  # the sender's external label
    finally:
        if sender is not None:
            sender.stop()
        receiver.stop()


def test_federation_into_a_global_prometheus(tmp_path, training_endpoint):
    binary = require_tool("prometheus")
    training_dir, global_dir = tmp_path / "training", tmp_path / "global"
    training_dir.mkdir()
    global_dir.mkdir()
    config = _training_config(SCALING / "remote-write.yml", training_dir / "prometheus.yml", training_endpoint)
    content = yaml.safe_load(config.read_text())
    del content["remote_write"]
    config.write_text(yaml.safe_dump(content, sort_keys=False))
    training_port = free_port()
    training = _started(Prometheus(binary, config, training_dir, training_port))
    global_server = None
    try:
        shipped = yaml.safe_load((SCALING / "global-prometheus.yml").read_text())
        job = shipped["scrape_configs"][0]
        job["scrape_interval"], job["scrape_timeout"] = "1s", "900ms"
        job["static_configs"] = [{"targets": [f"127.0.0.1:{training_port}"], "labels": {"cluster": "a"}}]
        global_config = global_dir / "prometheus.yml"
        global_config.write_text(yaml.safe_dump(shipped, sort_keys=False))
        global_server = _started(Prometheus(binary, global_config, global_dir, free_port()))

        def federated() -> dict[str, Any]:
            throughput = global_server.query("run:dgdn_samples_per_second:sum")
            loss = global_server.query("run:dgdn_training_loss:avg")
            return {"throughput": throughput, "loss": loss} if throughput and loss else {}

        found = wait_until(federated, WAIT_S, what="the per-run series in the global Prometheus")
        (throughput,) = found["throughput"]
        assert float(throughput["value"][1]) == pytest.approx(sum(SAMPLES_PER_SECOND.values()))
        assert throughput["metric"]["run_id"] == "run-a" and throughput["metric"]["job"] == "dgdn-training"
        assert throughput["metric"]["cluster"] == "a" and "rank" not in throughput["metric"]
        (loss,) = found["loss"]
        assert float(loss["value"][1]) == pytest.approx(sum(LOSS.values()) / len(LOSS))
        # Only the per-run aggregates travel: the per-rank series stay on the training server.
        assert global_server.query("dgdn_samples_per_second") == []
    finally:
        if global_server is not None:
            global_server.stop()
        training.stop()


def test_two_clustered_alertmanagers_send_one_notification(tmp_path):
    prometheus_binary = require_tool("prometheus")
    alertmanager_binary = require_tool("alertmanager")
    sink = HttpSink()
    processes: list[ServerProcess] = []
    try:
        am_config = tmp_path / "alertmanager.yml"
        am_config.write_text(
            yaml.safe_dump(
                {
                    "route": {
                        "receiver": "hook",
                        "group_by": ["alertname"],
                        "group_wait": "1s",
                        "group_interval": "1m",
                        "repeat_interval": "1h",
                    },
                    "receivers": [{"name": "hook", "webhook_configs": [{"url": f"{sink.url}/alerts"}]}],
                }
            )
        )
        web_ports, cluster_ports = [free_port(), free_port()], [free_port(), free_port()]
        for index in (0, 1):
            workdir = tmp_path / f"am{index}"
            workdir.mkdir()
            processes.append(
                ServerProcess(
                    [
                        alertmanager_binary,
                        f"--config.file={am_config}",
                        f"--storage.path={workdir}",
                        f"--web.listen-address=127.0.0.1:{web_ports[index]}",
                        f"--cluster.listen-address=127.0.0.1:{cluster_ports[index]}",
                        f"--cluster.peer=127.0.0.1:{cluster_ports[1 - index]}",
                        "--cluster.peer-timeout=3s",
                        "--cluster.settle-timeout=5s",
                        "--log.level=warn",
                    ],
                    web_ports[index],
                    workdir / "alertmanager.log",
                )
            )
        for process in processes:
            process.wait_ready(timeout=WAIT_S)

        def clustered() -> bool:
            status = json.loads(http_get(f"{processes[0].url}/api/v2/status"))
            return len(status["cluster"]["peers"]) == 2 and status["cluster"]["status"] == "ready"

        wait_until(clustered, WAIT_S, what="the two Alertmanagers to form a cluster")

        # One Prometheus sends the one firing alert to both, as prometheus-ha-alertmanager.yml does.
        rules = tmp_path / "rules.yml"
        rules.write_text(
            yaml.safe_dump(
                {
                    "groups": [
                        {
                            "name": "ha",
                            "interval": "1s",
                            "rules": [
                                {"alert": "DGDNHATestAlert", "expr": "vector(1)", "labels": {"severity": "critical"}}
                            ],
                        }
                    ]
                }
            )
        )
        prom_dir = tmp_path / "prometheus"
        prom_dir.mkdir()
        prom_config = prom_dir / "prometheus.yml"
        prom_config.write_text(
            yaml.safe_dump(
                {
                    "global": {"evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "alerting": {
                        "alertmanagers": [
                            {
                                "static_configs": [
                                    {"targets": [f"127.0.0.1:{web_ports[0]}", f"127.0.0.1:{web_ports[1]}"]}
                                ]
                            }
                        ]
                    },
                }
            )
        )
        prometheus = Prometheus(prometheus_binary, prom_config, prom_dir, free_port())
        processes.append(prometheus)
        prometheus.wait_ready(timeout=WAIT_S)

        def received_alerts(items) -> list:
            return [
                alert for _, alert in webhook_alerts(items) if alert["labels"].get("alertname") == "DGDNHATestAlert"
            ]

        sink.wait_for(received_alerts, WAIT_S, "the notification")
        # Both Alertmanagers hold the alert; the second's turn comes after the peer timeout (3 s) and it must see in
        # the gossiped notification log that the first already notified. Wait well past that.
        for process in processes[:2]:
            wait_until(
                lambda p=process: b"DGDNHATestAlert" in http_get(f"{p.url}/api/v2/alerts"),
                WAIT_S,
                what="the alert in both Alertmanagers",
            )
        time.sleep(12)
        notifications = [item for item in sink.snapshot() if received_alerts([item])]
        assert len(notifications) == 1, [item.path for item in notifications]
    finally:
        for process in reversed(processes):
            process.stop()
        sink.close()
