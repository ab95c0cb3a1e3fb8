"""MetricsServer: prometheus_client's exposition (text and OpenMetrics with exemplars, gzip) of a filled
TrainingMetrics, a clear error for a taken port, a fast stop, and many concurrent scrapes all answered."""

from __future__ import annotations

import gzip
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from conftest import require_tool
from dgdn_lightning_monitor import PortInUseError
from dgdn_lightning_monitor.graph_size import GraphSize
from dgdn_lightning_monitor.metrics import TrainingMetrics
from dgdn_lightning_monitor.server import MetricsServer
from exposition import samples

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def filled() -> TrainingMetrics:
    metrics = TrainingMetrics("dgdn")
    for i in range(100):
        metrics.observe_train_batch(0.001 * (i + 1), 1000.0 + i, GraphSize(32, 700, 2800),
                                    f"{i:032x}" if i % 40 == 0 else None)
    for phase, seconds in (("data_fetch", 0.002), ("forward", 0.01)):
        metrics.phase_seconds[phase].observe(seconds)
    metrics.observe_inference("validate", 0.5, 100)
    metrics.set_logged("training_loss", float("nan"))
    metrics.set_logged("validation_loss", 0.25, dataloader="0")
    metrics.set_logged("validation_loss", 0.5, dataloader="1")
    metrics.info = {"model": 'pkg.Model"v2"', "run_id": "abc"}
    return metrics


@pytest.fixture
def served():
    servers: list[MetricsServer] = []

    def start(registry: CollectorRegistry) -> str:
        server = MetricsServer(registry, "127.0.0.1", 0)
        server.start()
        servers.append(server)
        return str(server.url)

    yield start
    for server in servers:
        server.stop()


def get(url: str, accept: Optional[str] = None, encoding: Optional[str] = None) -> tuple[dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if accept:
        request.add_header("Accept", accept)
    if encoding:
        request.add_header("Accept-Encoding", encoding)
    with urllib.request.urlopen(request, timeout=10) as response:
        return dict(response.headers), response.read()


def test_text_openmetrics_and_gzip_are_the_library_output(served) -> None:
    metrics = filled()
    registry = CollectorRegistry()
    registry.register(metrics)
    url = served(registry)
    headers, body = get(url)
    assert headers["Content-Type"].startswith("text/plain") and body == generate_latest(registry)
    found = samples(body.decode())
    assert [v for labels, v in found["dgdn_validation_loss"]] == [0.25, 0.5]
    assert {labels["dataloader"] for labels, _ in found["dgdn_validation_loss"]} == {"0", "1"}
    assert {labels["phase"]: v for labels, v in found["dgdn_step_phase_seconds_sum"]} == {
        "data_fetch": 0.002, "forward": 0.01, "backward": 0.0, "optimizer_step": 0.0}
    headers, body = get(url, accept=OPENMETRICS, encoding="gzip")
    assert headers["Content-Encoding"] == "gzip" and headers["Content-Type"].startswith("application/openmetrics")
    families = {f.name: f for f in parse_openmetrics(gzip.decompress(body).decode())}
    exemplars = [s.exemplar for s in families["dgdn_batch_processing_seconds"].samples if s.exemplar]
    assert {e.labels["trace_id"] for e in exemplars} == {f"{i:032x}" for i in (0, 40, 80)}


def test_promtool_accepts_the_served_text(served) -> None:
    promtool = require_tool("promtool")
    registry = CollectorRegistry()
    registry.register(filled())
    text = get(served(registry))[1].decode()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_taken_port_names_the_port_and_stop_is_fast(served) -> None:
    registry = CollectorRegistry()
    url = served(registry)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(PortInUseError, match=str(port)):
        MetricsServer(registry, "127.0.0.1", port).start()
    server = MetricsServer(registry, "127.0.0.1", 0)
    server.start()
    started = time.perf_counter()
    server.stop()
    assert time.perf_counter() - started < 1.0 and server.url is not None and not server.running
