"""MetricsServer: prometheus_client's exposition (text and OpenMetrics with exemplars, gzip) of a filled
TrainingMetrics, a clear error for a taken port, a fast stop, simultaneous scrapes rendered one at a time, each
after it arrived (never for a client that fails basic auth), and the end of a run: the endpoint serves on, owes a
scrape only to a regular scraper, hands its port to a new run, and is forgotten by a forked child."""

from __future__ import annotations

import gzip
import os
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import pytest
from conftest import require_tool
from exposition import samples, value
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from tls_helpers import basic, bcrypt_hash, fetch, write_web_config

from dgdn_lightning_monitor import PortInUseError
from dgdn_lightning_monitor.graph_size import GraphSize
from dgdn_lightning_monitor.metrics import TrainingMetrics
from dgdn_lightning_monitor.server import MetricsServer, wait_for_final_scrapes
from dgdn_lightning_monitor.web_config import load_web_config

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def filled() -> TrainingMetrics:
    metrics = TrainingMetrics("dgdn")
    for i in range(100):
        metrics.observe_train_batch(
            0.001 * (i + 1), 1000.0 + i, GraphSize(32, 700, 2800), f"{i:032x}" if i % 40 == 0 else None
        )
    for phase, seconds in (("data_fetch", 0.002), ("forward", 0.01)):
        metrics.phase_seconds[phase].observe(seconds)
    metrics.observe_inference("validate", 0.5, 100, 1.0)
    metrics.set_logged("training_loss", float("nan"))
    metrics.set_logged("validation_loss", 0.25, dataloader="0")
    metrics.set_logged("validation_loss", 0.5, dataloader="1")
    metrics.set_run_info({"model": 'pkg.Model"v2"', "run_id": "abc"})
    return metrics


class Counting:
    """A collector that counts its collections and serves ``value`` (set by the test) as a gauge."""

    def __init__(self, value: float = 1.0, collect_s: float = 0.0) -> None:
        self.value = value
        self.collect_s = collect_s  # how long a collection takes: scrapes that arrive meanwhile must wait for it
        self.calls = 0
        self.lock = threading.Lock()

    def collect(self) -> Any:
        with self.lock:
            self.calls += 1
        time.sleep(self.collect_s)
        yield from self.families()

    def families(self) -> list[Any]:
        return [
            GaugeMetricFamily("probe_value", "What the test set.", value=self.value),
            CounterMetricFamily("probe_events", "A counter (OpenMetrics names it with _total).", value=3),
        ]

    def describe(self) -> list[Any]:  # names for the name[] filter, without a collection
        return self.families()


def registry_of(collector: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


@pytest.fixture
def served():
    servers: list[MetricsServer] = []

    def start(registry: CollectorRegistry, **options: Any) -> str:
        server = MetricsServer(registry, "127.0.0.1", 0, **options)
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
        "data_fetch": 0.002,
        "forward": 0.01,
        "backward": 0.0,
        "optimizer_step": 0.0,
    }
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


def test_simultaneous_scrapes_render_one_at_a_time_each_after_its_arrival(served) -> None:
    # 20 scrapers at once: every one is answered, by its own rendering, and never two renderings run together.
    collector = Counting(value=7.0, collect_s=0.02)
    running, most = [0], [0]
    collect = collector.collect

    def counted() -> Any:
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            yield from collect()
        finally:
            running[0] -= 1

    collector.collect = counted  # type: ignore[method-assign]
    url = served(registry_of(collector))
    start = threading.Barrier(20)

    def scrape_together(_: int) -> float:
        start.wait()
        return value(get(url)[1].decode(), "probe_value")

    with ThreadPoolExecutor(20) as pool:
        assert list(pool.map(scrape_together, range(20))) == [7.0] * 20
    assert collector.calls == 20 and most[0] == 1
    for expected in (8.0, 9.0):  # a value set just before a scrape is what that scrape serves
        collector.value = expected
        assert value(get(url)[1].decode(), "probe_value") == expected


def test_variants_are_the_library_output(served) -> None:
    collector = Counting(value=3.5)
    url = served(registry_of(collector))
    reference = registry_of(Counting(value=3.5))  # ground truth: the library's own renderers, outside the server
    text, openmetrics = generate_latest(reference), generate_openmetrics(reference)
    filtered = generate_latest(reference.restricted_registry(["probe_value"]))
    variants = [
        ({}, "text/plain", text, None),
        ({"accept": OPENMETRICS}, "application/openmetrics-text", openmetrics, None),
        ({"encoding": "gzip"}, "text/plain", text, "gzip"),
        ({"accept": OPENMETRICS, "encoding": "gzip"}, "application/openmetrics-text", openmetrics, "gzip"),
        ({"query": "?name[]=probe_value"}, "text/plain", filtered, None),
    ]
    assert b"# EOF" in openmetrics and b"# EOF" not in text and b"probe_events" not in filtered
    for options, content_type, expected, encoding in variants:
        headers, body = get(url + options.get("query", ""), options.get("accept"), options.get("encoding"))
        assert headers["Content-Type"].startswith(content_type)
        assert headers.get("Content-Encoding") == encoding
        assert int(headers["Content-Length"]) == len(body)
        assert (gzip.decompress(body) if encoding else body) == expected, options
    assert collector.calls == len(variants)


def test_basic_auth_is_checked_on_every_request(served, tmp_path: Path) -> None:
    config = write_web_config(tmp_path / "web.yml", {"basic_auth_users": {"prometheus": bcrypt_hash("secret")}})
    collector = Counting(value=4.0)
    url = served(registry_of(collector), web_config=load_web_config(config))
    status, _, body = fetch(url, authorization=basic("prometheus", "secret"))
    assert status == 200 and value(body.decode(), "probe_value") == 4.0 and collector.calls == 1
    for authorization in (None, basic("prometheus", "wrong"), basic("intruder", "secret")):
        status, headers, body = fetch(url, authorization=authorization)
        assert status == 401 and headers["WWW-Authenticate"] == "Basic" and b"probe_value" not in body
    assert collector.calls == 1  # refused before rendering
    status, _, body = fetch(url, authorization=basic("prometheus", "secret"))
    assert status == 200 and value(body.decode(), "probe_value") == 4.0 and collector.calls == 2


def test_a_failed_render_does_not_break_the_next(served) -> None:
    class FailsOnce(Counting):
        def collect(self) -> Any:
            if self.calls == 0:
                self.calls += 1
                raise RuntimeError("collector broke once")
            yield from super().collect()

    collector = FailsOnce(value=9.0)
    url = served(registry_of(collector))
    with pytest.raises(urllib.error.HTTPError) as failed:
        get(url)
    assert failed.value.code == 500
    assert value(get(url)[1].decode(), "probe_value") == 9.0 and collector.calls == 2


class _Counter:
    """A collector whose value changes between renders, to see which one a scrape got."""

    def __init__(self) -> None:
        self.value = 0.0

    def collect(self):
        family = GaugeMetricFamily("dgdn_value", "A value set by the test.")
        family.add_metric([], self.value)
        yield family


def _counting_server(port: int = 0) -> tuple[MetricsServer, _Counter]:
    registry, counter = CollectorRegistry(), _Counter()
    registry.register(counter)
    server = MetricsServer(registry, "127.0.0.1", port)
    server.start()
    return server, counter


def _read(server: MetricsServer) -> float:
    return value(urllib.request.urlopen(str(server.url), timeout=5).read().decode(), "dgdn_value")


def test_an_ended_run_serves_on_and_owes_a_scrape_only_to_a_regular_scraper() -> None:
    """After run_ended the endpoint serves on. Never or once scraped, it owes nothing and a wait returns at once;
    scraped regularly, it owes the next scrape, which reads the values of the end, and then owes nothing."""
    server, counter = _counting_server()
    try:
        server.run_ended()
        started = time.monotonic()
        assert not server.owes_final_scrape() and server.wait_for_final_scrape() is False
        assert _read(server) == 0.0  # once: still no regular scraper
        assert not server.owes_final_scrape() and time.monotonic() - started < 1.0
        server.run_started()
        _read(server)  # twice: a regular scraper, about every second
        time.sleep(1.0)
        _read(server)
        counter.value = 1.0  # how the run ended
        server.run_ended()
        assert server.running and server.owes_final_scrape()
        seen: list[float] = []
        scraper = threading.Timer(0.2, lambda: seen.append(_read(server)))
        scraper.start()
        assert server.wait_for_final_scrape() is True
        scraper.join()
        assert seen == [1.0] and not server.owes_final_scrape()  # rendered after the end
        server.run_started()  # a new run on the endpoint owes nothing for the previous one
        assert not server.owes_final_scrape()
    finally:
        server.stop()


def test_a_scraper_that_stopped_is_waited_for_at_most_twice_its_interval_and_a_second() -> None:
    server, _ = _counting_server()
    try:
        for _ in range(3):  # a scraper every 0.2 s that then stops
            _read(server)
            time.sleep(0.2)
        last = time.monotonic()
        server.run_ended()
        assert server.owes_final_scrape()
        assert server.wait_for_final_scrape() is False
        waited = time.monotonic() - last
        # Due by the last scrape plus two of the largest intervals (0.2 s and what this machine added) and a second.
        assert 1.0 <= waited <= server.deadline() - last + 0.5 < 5.0
        assert not server.owes_final_scrape()  # overdue: no longer waited for, at the exit either
    finally:
        server.stop()


def test_exit_handler_waits_only_for_endpoints_that_owe_a_scrape() -> None:
    """wait_for_final_scrapes (the atexit handler) returns at once with nothing owed, and otherwise once the scrape
    of every owing endpoint has come; an endpoint built with wait_at_exit=False is not waited for."""
    owing, _ = _counting_server()
    skipped = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, wait_at_exit=False)
    skipped.start()
    try:
        started = time.monotonic()
        wait_for_final_scrapes()
        assert time.monotonic() - started < 0.5
        for _ in range(2):  # both scraped every second: each owes the next scrape within 3 s of its last
            for server in (owing, skipped):
                urllib.request.urlopen(str(server.url), timeout=5).read()
            time.sleep(1.0)
        for server in (owing, skipped):
            server.run_ended()
        assert owing.owes_final_scrape() and skipped.owes_final_scrape()
        scraped = threading.Timer(0.5, lambda: urllib.request.urlopen(str(owing.url), timeout=5).read())
        started = time.monotonic()
        scraped.start()
        wait_for_final_scrapes()
        waited = time.monotonic() - started
        read = not owing.owes_final_scrape()  # it returned once the scrape had been sent
        scraped.join()
        assert read and skipped.owes_final_scrape()
        assert 0.4 <= waited < 2.5  # until the owing endpoint's scrape, not the skipped one's deadline
    finally:
        owing.stop()
        skipped.stop()


def test_a_new_endpoint_takes_over_the_port_of_an_ended_run_never_of_a_running_one() -> None:
    first, _ = _counting_server()
    port = first.bound_port
    assert port is not None
    try:
        with pytest.raises(PortInUseError, match=str(port)):  # its run still runs
            MetricsServer(CollectorRegistry(), "127.0.0.1", port).start()
        for _ in range(2):  # scraped regularly: its end is owed, still the new run takes its address
            _read(first)
            time.sleep(0.2)
        first.run_ended()
        second, counter = _counting_server(port)
        try:
            counter.value = 2.0
            assert not first.running and second.bound_port == port and _read(second) == 2.0
        finally:
            second.stop()
    finally:
        first.stop()


def test_a_new_endpoint_closes_ended_ones_that_owe_nothing_and_keeps_one_that_owes() -> None:
    unscraped, _ = _counting_server()
    owing, _ = _counting_server()
    try:
        for _ in range(2):  # every second: owes its next scrape for 3 s
            _read(owing)
            time.sleep(1.0)
        unscraped.run_ended()
        owing.run_ended()
        new, _ = _counting_server()
        try:
            assert not unscraped.running and owing.running
            _read(owing)  # the end read (counted once the server has sent it): the next new endpoint closes it
            assert owing.wait_for_final_scrape() is True
            newer, _ = _counting_server()
            newer.stop()
            assert not owing.running
        finally:
            new.stop()
    finally:
        unscraped.stop()
        owing.stop()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_forgets_the_parents_endpoints_and_waits_for_nothing() -> None:
    """A forked child (a DataLoader worker, a process a user forks) inherits an endpoint that owes a scrape, but not
    its thread or socket: its exit handler returns at once, and it can serve its own endpoint."""
    server, _ = _counting_server()
    try:
        for _ in range(2):
            _read(server)
            time.sleep(1.0)
        server.run_ended()
        assert server.owes_final_scrape()
        pid = os.fork()
        if pid == 0:  # the child: report by exit status only, never return into pytest
            code = 1
            try:
                started = time.monotonic()
                wait_for_final_scrapes()
                own = MetricsServer(CollectorRegistry(), "127.0.0.1", 0)
                own.start()
                own.stop()
                code = 0 if time.monotonic() - started < 1.0 and not server.running else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert server.running and _read(server) == 0.0  # the parent's endpoint is untouched
    finally:
        server.stop()
