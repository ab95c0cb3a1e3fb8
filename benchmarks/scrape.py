"""Scrape latency of ``/metrics``: one rank's series, and eight ranks' series served by one endpoint.

Each rank is a :class:`~dgdn_lightning_monitor.metrics.TrainingMetrics` with its own
:class:`~dgdn_lightning_monitor.labels.RankLabels`, filled as after a long run (10k training batches, some with
exemplars, validation and test latencies, logged values, model figures, two learning rates, progress). They are
served by one :class:`~dgdn_lightning_monitor.server.MetricsServer` (``prometheus_client``'s WSGI app, the path
the callback uses); a registry refuses two collectors with the same metric names, so the eight are wrapped in one
collector that collects each rank and merges the samples of a metric into one family (one ``# HELP``/``# TYPE``
per metric, as Prometheus requires). In a real DDP
run each rank serves its own port; one endpoint with eight label sets is the heavier case. Requests use urllib
over loopback, a new connection each, in the Prometheus text format and in OpenMetrics (with exemplars, which
Prometheus asks for first); the four cases are interleaved request by request. Every request collects and
renders: the figures are a real render's.

Under a scrape storm: the step time of a CPU-bound training loop (a small MLP's forward, backward and SGD step
in this process, which also serves one rank's ``/metrics`` with the defaults) while a child process sends one
round of 50 concurrent scrapes per second, each a new connection, for several seconds. That is a deliberate worst
case: 50 scrapers at a 1 s interval are 15 times denser than 50 Prometheus servers at the default 15 s interval
(one Prometheus, or an HA pair, is what a run normally sees). The mean and median step time over the whole storm
period are compared with quiet periods of the same length interleaved with them; the same storm against
``prometheus_client``'s own server, which renders concurrent scrapes in parallel, shows what rendering one at a
time buys.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace
from typing import Any, Optional

from prometheus_client import CollectorRegistry

from benchmarks.common import percentile, summarize

TARGET_MS = 5.0
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def filled_metrics(rank: int, world_size: int, batches: int = 10_000) -> Any:
    """A TrainingMetrics holding what a long run leaves behind."""
    from dgdn_lightning_monitor.graph_size import GraphSize
    from dgdn_lightning_monitor.labels import RankLabels
    from dgdn_lightning_monitor.metrics import TrainingMetrics

    rng = random.Random(rank)
    metrics = TrainingMetrics("dgdn")
    metrics.set_labels(RankLabels(rank=rank, local_rank=rank % 8, node_rank=rank // 8, world_size=world_size))
    metrics.start_run()  # stage, progress and outcome families
    now = time.perf_counter() - batches * 0.02
    metrics.enter_stage("train", now)
    hops = ((32, 320, 2900), (310, 2880))  # a 2-hop neighbour sampler's nodes and edges per hop
    for i in range(batches):
        now += 0.02
        trace_id = f"{rng.getrandbits(128):032x}" if i % 50 == 0 else None
        size = GraphSize(32, 700 + i % 50, 2800)
        metrics.observe_train_batch(rng.lognormvariate(-4, 0.5), now, size, trace_id, hops)
    for stage in ("validate", "test"):
        for _ in range(1000):
            metrics.observe_inference(stage, rng.lognormvariate(-3, 0.5), 32, now)
    for suffix, value in (
        ("training_loss", 0.41),
        ("validation_loss", 0.47),
        ("training_accuracy", 0.83),
        ("validation_accuracy", 0.8),
    ):
        metrics.set_logged(suffix, value)
    metrics.record_nonfinite(2)
    metrics.epoch_ended(42.0)
    metrics.set_model_figures((1_234_567, 1_234_567, 4_938_268))
    metrics.set_run_info({
        "model": "dgdn_lightning_monitor.dgdn.module.DGDNLinkPredictor",
        "lightning_version": "2.6.6",
        "torch_version": "2.13.0",
        "torch_geometric_version": "2.8.1",
        "run_id": "0123456789ab",
    })
    # A run that ended at epoch 3, step 12345, with two parameter groups (what a scrape after the run reads).
    optimizer = type("AdamW", (), {"param_groups": [{"lr": 1e-3}, {"lr": 1e-4}]})()
    metrics.bind(SimpleNamespace(current_epoch=3, global_step=12_345, optimizers=[optimizer]))
    metrics.freeze_live_values()
    return metrics


class MergedRanks:
    """One collector for several ranks' TrainingMetrics: each metric family once, holding every rank's samples."""

    def __init__(self, ranks: list[Any]) -> None:
        self.ranks = ranks

    def describe(self) -> list[Any]:
        return self.ranks[0].describe()

    def collect(self) -> Any:
        merged: dict[str, Any] = {}
        for metrics in self.ranks:
            for family in metrics.collect():
                known = merged.get(family.name)
                if known is None:
                    merged[family.name] = family
                else:
                    known.samples.extend(family.samples)
        return iter(merged.values())


def _registry(ranks: int) -> CollectorRegistry:
    collectors = [filled_metrics(rank, ranks) for rank in range(ranks)]
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collectors[0] if ranks == 1 else MergedRanks(collectors))
    return registry


def _server(ranks: int) -> Any:
    """A MetricsServer serving ``ranks`` TrainingMetrics."""
    from dgdn_lightning_monitor.server import MetricsServer

    return MetricsServer(_registry(ranks), "127.0.0.1", 0)


class _LibraryServer:
    """``prometheus_client.start_http_server`` (renders concurrent scrapes in parallel), as a reference."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry, self.url = registry, None

    def start(self) -> None:
        from prometheus_client import start_http_server

        self._httpd, self._thread = start_http_server(0, "127.0.0.1", self.registry)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/metrics"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _get(url: str, accept: Optional[str]) -> tuple[float, int]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return (time.perf_counter() - start) * 1e3, len(body)


def run(quick: bool = False, requests: Optional[int] = None) -> dict[str, Any]:
    requests = requests if requests is not None else (100 if quick else 500)
    servers = {ranks: _server(ranks) for ranks in (1, 8)}
    for server in servers.values():
        server.start()
    cases = [(ranks, fmt) for ranks in (1, 8) for fmt in ("text", "openmetrics")]
    times: dict[tuple[int, str], list[float]] = {case: [] for case in cases}
    sizes: dict[tuple[int, str], int] = {}
    series: dict[int, int] = {}
    try:
        for ranks, server in servers.items():
            assert server.url is not None
            url = server.url.replace("localhost", "127.0.0.1")
            series[ranks] = _count_samples(url)
        for i in range(requests + 10):  # the first 10 rounds warm up
            for j in range(len(cases)):
                ranks, fmt = cases[(i + j) % len(cases)]
                url = servers[ranks].url.replace("localhost", "127.0.0.1")  # type: ignore[union-attr]
                ms, size = _get(url, OPENMETRICS if fmt == "openmetrics" else None)
                if i >= 10:
                    times[(ranks, fmt)].append(ms)
                sizes[(ranks, fmt)] = size
    finally:
        for server in servers.values():
            server.stop()
    exposition = {case: _exposition_ms(servers[case[0]].registry, case[1], 50 if quick else 200) for case in cases}
    collect = {ranks: _collect_ms(servers[ranks].registry, 50 if quick else 200) for ranks in servers}
    results = {}
    for ranks, fmt in cases:
        values = times[(ranks, fmt)]
        p99 = percentile(values, 99)
        results[f"{ranks}_rank{'s' if ranks > 1 else ''}_{fmt}"] = {
            "ranks": ranks,
            "format": fmt,
            "requests": len(values),
            "ms": summarize(values),
            "p99_ms": p99,
            "body_bytes": sizes[(ranks, fmt)],
            "samples": series[ranks],
            "exposition_ms": exposition[(ranks, fmt)],
            "collect_ms": collect[ranks],
            # Each rank serves its own port: the target is one rank's; eight ranks on one endpoint is a reference.
            "target_ms": TARGET_MS if ranks == 1 else None,
            "met": p99 <= TARGET_MS if ranks == 1 else None,
        }
    return {
        "name": "scrape",
        "what": "latency of GET /metrics over loopback (urllib, new connection per request), every request a "
        "real collection and render",
        "config": {
            "requests_per_case": requests,
            "training_batches_observed_per_rank": 10_000,
            "target": "p99 <= 5 ms",
        },
        "cases": results,
        "storm": storm(blocks=2 if quick else 4, seconds=4 if quick else 6),
    }


STORM_TARGET = 1.10
STORM_SCRAPERS = 50
#: The child process: 50 threads, each scrape a new connection. After a warm-up round it waits to be told to
#: start, then sends one round of 50 concurrent scrapes at the start of every second for ``seconds`` seconds and
#: reports, when the last second is over, the answers it got and each scrape's latency.
STORM_CLIENT = """
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
url, seconds, scrapers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def get(_):
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
            status = response.status
    except Exception:
        status = 0
    return status, (time.perf_counter() - start) * 1e3
with ThreadPoolExecutor(scrapers) as pool:
    list(pool.map(get, range(scrapers)))  # threads started and the server warmed up before the measured rounds
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    answers = []
    for second in range(seconds):
        time.sleep(max(0.0, start + second - time.perf_counter()))
        answers += pool.map(get, range(scrapers))
    time.sleep(max(0.0, start + seconds - time.perf_counter()))
print(json.dumps(answers), flush=True)
"""


def storm(blocks: int, seconds: int) -> dict[str, Any]:
    """Step time of a CPU-bound loop during storms of 50-concurrent scrape rounds (one per second) from a child
    process, against quiet periods of the same length; with the endpoint (one render at a time) and with
    ``prometheus_client``'s own server (renders in parallel)."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(256, 512)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        return (time.perf_counter() - start) * 1e3

    def steps_for(duration_s: float) -> list[float]:
        end = time.perf_counter() + duration_s
        times = []
        while time.perf_counter() < end:
            times.append(step())
        return times

    configs = {"one_render_at_a_time": _server(1), "parallel_renders": _LibraryServer(_registry(1))}
    for server in configs.values():
        server.start()
    quiet: list[float] = []
    stormy: dict[str, list[float]] = {name: [] for name in configs}
    answers: dict[str, list[tuple[int, float]]] = {name: [] for name in configs}
    try:
        steps_for(1.0)  # warm-up
        for block in range(blocks):
            order = list(configs) if block % 2 == 0 else list(reversed(configs))
            for name in order:
                url = str(configs[name].url).replace("localhost", "127.0.0.1")
                child = subprocess.Popen(
                    [sys.executable, "-c", STORM_CLIENT, url, str(seconds), str(STORM_SCRAPERS)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert child.stdin is not None and child.stdout is not None
                child.stdout.readline()  # ready: the child's start-up is not part of the storm
                time.sleep(0.5)  # let the start-up's CPU settle before either period is timed
                quiet += steps_for(seconds)
                child.stdin.write("go\n")
                child.stdin.flush()
                block_steps = []
                while child.poll() is None:
                    block_steps.append(step())
                stormy[name] += block_steps
                answers[name] += [(int(a), float(b)) for a, b in json.loads(child.stdout.read())]
    finally:
        for server in configs.values():
            server.stop()
    quiet_mean = statistics.fmean(quiet) if quiet else float("nan")
    quiet_median = statistics.median(quiet) if quiet else float("nan")
    cases = {}
    for name, times in stormy.items():
        latencies = [ms for status, ms in answers[name] if status == 200]
        sent, ok = len(answers[name]), sum(status == 200 for status, _ in answers[name])
        ratio = statistics.fmean(times) / quiet_mean if times and quiet else float("nan")
        cases[name] = {
            "step_ms_storm": summarize(times),
            "step_ms_storm_mean": statistics.fmean(times) if times else None,
            "ratio_mean": ratio,
            "ratio_median": statistics.median(times) / quiet_median if times and quiet else float("nan"),
            "scrapes_sent": sent,
            "scrapes_answered_200": ok,
            "scrape_ms": summarize(latencies),
            "scrape_p99_ms": percentile(latencies, 99) if latencies else None,
            "met": sent > 0 and ok == sent and ratio <= STORM_TARGET,
        }
    return {
        "what": f"CPU-bound step (MLP 512x512, batch 256, this process) during {seconds} s storms of one round of "
        f"{STORM_SCRAPERS} concurrent scrapes per second (new connection each) from a child process, "
        f"against quiet periods of the same length interleaved with them; a worst case 15x denser than "
        f"{STORM_SCRAPERS} Prometheus servers at the default 15 s interval",
        "blocks": blocks,
        "seconds_per_storm": seconds,
        "scrapers": STORM_SCRAPERS,
        "step_ms_quiet": summarize(quiet),
        "step_ms_quiet_mean": quiet_mean,
        "cases": cases,
        "target": STORM_TARGET,
        "met": cases["one_render_at_a_time"]["met"],
    }


def _exposition_ms(registry: CollectorRegistry, fmt: str, times: int) -> dict[str, Any]:
    """What the scrape costs without HTTP: collecting the registry and rendering it, in this thread."""
    from prometheus_client import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

    render = generate_openmetrics if fmt == "openmetrics" else generate_latest
    values = []
    for _ in range(times):
        start = time.perf_counter()
        render(registry)
        values.append((time.perf_counter() - start) * 1e3)
    return summarize(values)


def _collect_ms(registry: CollectorRegistry, times: int) -> dict[str, Any]:
    """The collectors' own share: building the metric families, without rendering them to text."""
    values = []
    for _ in range(times):
        start = time.perf_counter()
        list(registry.collect())
        values.append((time.perf_counter() - start) * 1e3)
    return summarize(values)


def _count_samples(url: str) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(len(family.samples) for family in text_string_to_metric_families(text))
