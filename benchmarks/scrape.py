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
Prometheus asks for first); the four cases are interleaved request by request.

Under a scrape storm: the step time of a CPU-bound training loop (a small MLP's forward, backward and SGD step
in this process, which also serves one rank's ``/metrics``) while a child process sends rounds of 50
concurrent scrapes, against the same loop with no scrapes; storm and quiet blocks alternate.
"""

from __future__ import annotations

import random
import statistics
import subprocess
import sys
import time
import urllib.request
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
    metrics.labels = RankLabels(rank=rank, local_rank=rank % 8, node_rank=rank // 8, world_size=world_size)
    now = time.perf_counter() - batches * 0.02
    for i in range(batches):
        now += 0.02
        trace_id = f"{rng.getrandbits(128):032x}" if i % 50 == 0 else None
        metrics.observe_train_batch(rng.lognormvariate(-4, 0.5), now, GraphSize(32, 700 + i % 50, 2800), trace_id)
    for stage in ("validate", "test"):
        for _ in range(1000):
            metrics.observe_inference(stage, rng.lognormvariate(-3, 0.5), 32)
    for suffix, value in (("training_loss", 0.41), ("validation_loss", 0.47), ("training_accuracy", 0.83),
                          ("validation_accuracy", 0.8)):
        metrics.set_logged(suffix, value)
    metrics.nonfinite_losses = 2
    metrics.epoch_duration = 42.0
    metrics.model_figures = (1_234_567, 1_234_567, 4_938_268)
    metrics.info = {"model": "dgdn_lightning_monitor.dgdn.module.DGDNLinkPredictor", "lightning_version": "2.6.6",
                    "torch_version": "2.13.0", "torch_geometric_version": "2.8.1", "run_id": "0123456789ab"}
    metrics.progress = (3, 12_345)
    metrics.learning_rates = [("AdamW", "0", 1e-3), ("AdamW", "1", 1e-4)]
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


def _server(ranks: int) -> Any:
    """A MetricsServer serving ``ranks`` TrainingMetrics."""
    from dgdn_lightning_monitor.server import MetricsServer

    collectors = [filled_metrics(rank, ranks) for rank in range(ranks)]
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collectors[0] if ranks == 1 else MergedRanks(collectors))
    return MetricsServer(registry, "127.0.0.1", 0)


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
            "ranks": ranks, "format": fmt, "requests": len(values), "ms": summarize(values),
            "p99_ms": p99, "body_bytes": sizes[(ranks, fmt)], "samples": series[ranks],
            "exposition_ms": exposition[(ranks, fmt)],
            "collect_ms": collect[ranks],
            "target_ms": TARGET_MS, "met": p99 <= TARGET_MS,
        }
    return {
        "name": "scrape",
        "what": "latency of GET /metrics over loopback (urllib, new connection per request)",
        "config": {"requests_per_case": requests, "training_batches_observed_per_rank": 10_000,
                   "target": "p99 <= 5 ms"},
        "cases": results,
        "storm": storm(blocks=2 if quick else 4, rounds=3 if quick else 6),
    }


STORM_TARGET = 1.10
#: The child process: 50 threads, each scrape a new connection; starts when told, reports the answers it got.
STORM_CLIENT = """
import sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
url, rounds = sys.argv[1], int(sys.argv[2])
def get(_):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
            return response.status
    except Exception:
        return 0
with ThreadPoolExecutor(50) as pool:
    list(pool.map(get, range(50)))  # connections and threads warmed up before the measured rounds
    print("ready", flush=True)
    sys.stdin.readline()
    statuses = [status for _ in range(rounds) for status in pool.map(get, range(50))]
print(sum(status == 200 for status in statuses), len(statuses), flush=True)
"""


def storm(blocks: int, rounds: int) -> dict[str, Any]:
    """Step time of a CPU-bound loop with and without 50-concurrent scrape rounds from a child process."""
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

    server = _server(1)
    server.start()
    url = str(server.url).replace("localhost", "127.0.0.1")
    quiet: list[float] = []
    stormy: list[float] = []
    answered = sent = 0
    try:
        for _ in range(20):
            step()
        for _ in range(blocks):
            child = subprocess.Popen([sys.executable, "-c", STORM_CLIENT, url, str(rounds)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
            assert child.stdin is not None and child.stdout is not None
            child.stdout.readline()  # ready
            child.stdin.write("go\n")
            child.stdin.flush()
            block: list[float] = []
            while child.poll() is None:
                block.append(step())
            ok, total = (int(v) for v in child.stdout.read().split())
            answered, sent = answered + ok, sent + total
            stormy += block
            quiet += [step() for _ in range(len(block))]  # the same number of steps with nothing scraping
    finally:
        server.stop()
    ratio = statistics.median(stormy) / statistics.median(quiet) if stormy and quiet else float("nan")
    # What one round of 50 scrapes costs the loop in all, and that cost spread over a 15 s scrape interval.
    extra_s = (sum(stormy) - len(stormy) * statistics.median(quiet)) / 1e3 / max(1, blocks * rounds) if quiet else 0.0
    return {
        "what": "CPU-bound step (MLP 512x512, batch 256) while a child process sends rounds of 50 concurrent "
                "scrapes of one rank's /metrics, against the same steps with no scrapes",
        "blocks": blocks, "rounds_per_block": rounds, "scrapes_sent": sent, "scrapes_answered_200": answered,
        "step_ms_quiet": summarize(quiet), "step_ms_storm": summarize(stormy), "ratio": ratio,
        "extra_step_seconds_per_round": extra_s, "ratio_spread_over_15s_interval": 1 + extra_s / 15,
        "target": STORM_TARGET, "met": sent > 0 and answered == sent and ratio <= STORM_TARGET,
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
