"""TrainingMetrics writing its own exposition, and MetricsServer serving it: the same bytes and families as
prometheus_client writes from ``collect()``, in both formats, over HTTP with and without gzip."""

from __future__ import annotations

import gzip
import math
import subprocess
import threading
import urllib.error
import urllib.request
from typing import Any, Optional

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from conftest import require_tool
from dgdn_lightning_monitor.graph_size import GraphSize
from dgdn_lightning_monitor.labels import RankLabels
from dgdn_lightning_monitor.metrics import TrainingMetrics
from dgdn_lightning_monitor.server import MetricsServer

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# What Prometheus 3 asks for: OpenMetrics first, with UTF-8 names allowed.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
                     "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;"
                     "escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1")
ESCAPINGS = ("underscores", "allow-utf-8", "dots", "values")


def filled(rank: int = 0, world_size: int = 1, namespace: str = "dgdn", batches: int = 300) -> TrainingMetrics:
    """A TrainingMetrics holding every kind of figure, with awkward values where the formats need escaping."""
    metrics = TrainingMetrics(namespace)
    metrics.labels = RankLabels(rank=rank, local_rank=rank % 4, node_rank=rank // 4, world_size=world_size)
    now = 1000.0
    for i in range(batches):
        now += 0.02
        seconds = 0.0004 * (1 + (i * 7 + rank) % 200)  # spread over many buckets
        trace_id = f"{i * 7919 + rank:032x}" if i % 40 == 0 else None  # exemplars on some buckets only
        metrics.observe_train_batch(seconds, now, GraphSize(32, 700 + i % 50, 2800), trace_id)
    metrics.observe_train_batch(45.0, now + 45.0, GraphSize(None, None, None))  # the +Inf bucket
    for stage, count in (("validate", 50), ("test", 20), ("predict", 5)):
        for i in range(count):
            metrics.observe_inference(stage, 0.001 * (i + 1), 32 if i % 3 else None)
    metrics.set_logged("training_loss", float("nan"))
    metrics.set_logged("validation_loss", float("inf"))
    metrics.set_logged("training_accuracy", -0.0)
    metrics.set_logged("validation_accuracy", 1e-12)
    metrics.nonfinite_losses = 3
    metrics.samples_total = 12_345_678  # past 1e6: written with an exponent
    metrics.epoch_duration = 42.125
    metrics.model_figures = (1_234_567, 1_000, 4_938_268)
    metrics.info = {"model": 'pkg.Model"v2"\\ with\nnewline', "torch_version": "2.5.0+cu121", "run_id": "abc",
                    "zz_last": "é ü", "build.host": "node-1"}  # a label name that needs escaping
    metrics.progress_source = lambda: (3, 12_345)
    metrics.learning_rate_source = lambda: [("AdamW", "0", 1e-3), ("AdamW", "1", float("-inf")),
                                            ('SGD "b"', "0", 0.5)]
    return metrics


def registry_of(*collectors: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    for collector in collectors:
        registry.register(collector)
    return registry


class MergedRanks:
    """Several ranks' TrainingMetrics as one registered collector: each family once, holding every rank's samples."""

    def __init__(self, ranks: list[TrainingMetrics]) -> None:
        self.ranks = ranks

    def describe(self) -> list[Any]:
        return self.ranks[0].describe()

    def collect(self) -> list[Any]:
        merged: dict[str, Any] = {}
        for metrics in self.ranks:
            for family in metrics.collect():
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        return list(merged.values())


def normalized(families: Any) -> list[tuple]:
    """Families as comparable tuples (NaN compares equal to NaN)."""

    def number(x: Optional[float]) -> Any:
        return "NaN" if x is not None and math.isnan(x) else x

    out = []
    for family in families:
        samples = []
        for s in family.samples:
            exemplar = None
            if s.exemplar is not None:
                exemplar = (sorted(s.exemplar.labels.items()), number(s.exemplar.value), s.exemplar.timestamp)
            samples.append((s.name, sorted(s.labels.items()), number(s.value), s.timestamp, exemplar))
        out.append((family.name, family.type, family.documentation, family.unit, samples))
    return out


def get(url: str, accept: Optional[str] = None, encoding: Optional[str] = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    headers = {}
    if accept:
        headers["Accept"] = accept
    if encoding:
        headers["Accept-Encoding"] = encoding
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, header_items, body = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, header_items, body = error.code, dict(error.headers), error.read()
    if header_items.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return status, header_items, body


@pytest.fixture
def served():
    """Start MetricsServers; each is stopped at the end of the test."""
    servers: list[MetricsServer] = []

    def start(registry: CollectorRegistry, direct: tuple = ()) -> str:
        server = MetricsServer(registry, "127.0.0.1", 0, direct=direct)
        server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.bound_port}/metrics"

    yield start
    for server in servers:
        server.stop()


# ------------------------------------------------------------------------------------------ render() itself
@pytest.mark.parametrize("rank,world_size", [(0, 1), (5, 8), (13, 16)])
def test_render_is_byte_for_byte_the_library_output(rank, world_size):
    metrics = filled(rank, world_size)
    registry = registry_of(metrics)
    text = metrics.render(False)
    assert text == generate_latest(registry).decode()
    openmetrics = metrics.render(True)
    assert openmetrics + "# EOF\n" == generate_openmetrics(registry).decode()
    assert "# EOF" not in openmetrics
    exemplar_lines = [line for line in openmetrics.splitlines() if " # {trace_id=" in line]
    assert exemplar_lines and all(line.startswith("dgdn_batch_processing_seconds_bucket{") for line in exemplar_lines)
    assert ' # {trace_id="' not in text  # the text format has no exemplars
    for needle in ('model="pkg.Model\\"v2\\"\\\\ with\\nnewline"', "NaN", "+Inf", "-Inf", "1.2345678e+07",
                   'stage="predict"', 'optimizer="SGD \\"b\\""', 'param_group="1"'):
        assert needle in text, needle


def test_render_of_a_fresh_collector_and_after_the_labels_change():
    metrics = TrainingMetrics("dgdn")
    registry = registry_of(metrics)
    for _ in range(2):  # the second pass uses what the first pre-rendered
        assert metrics.render(False) == generate_latest(registry).decode()
        assert metrics.render(True) + "# EOF\n" == generate_openmetrics(registry).decode()
    metrics.labels = RankLabels(rank=2, local_rank=2, node_rank=0, world_size=4)
    metrics.observe_train_batch(0.01, 5.0, GraphSize(1, 2, 3), "f" * 32)
    metrics.info = {"model": "m"}
    assert 'rank="2"' in metrics.render(False)
    assert metrics.render(False) == generate_latest(registry).decode()
    assert metrics.render(True) + "# EOF\n" == generate_openmetrics(registry).decode()
    metrics.info = {"model": "other", "rank": "overridden"}  # an info label may shadow a rank label
    assert metrics.render(False) == generate_latest(registry).decode()


@pytest.mark.parametrize("namespace", ["dgdn", "team:dgdn", "dgdn.v2"])
@pytest.mark.parametrize("escaping", ESCAPINGS)
def test_render_follows_every_name_escaping(namespace, escaping):
    metrics = filled(namespace=namespace, batches=50)
    registry = registry_of(metrics)
    assert metrics.render(False, escaping) == generate_latest(registry, escaping=escaping).decode()
    assert (metrics.render(True, escaping) + "# EOF\n"
            == generate_openmetrics(registry, escaping=escaping).decode())


def test_render_families_split_header_and_samples():
    metrics = filled()
    families = metrics.render_families(True)
    assert "".join(h + s for h, s in families) == metrics.render(True)
    assert [h.split("\n")[1].split()[2] for h, _ in families] == [f.name for f in metrics.collect()]
    assert all(h.startswith("# HELP ") and h.count("\n") == 2 for h, _ in families)


def test_collect_is_empty_only_in_the_thread_that_renders_directly():
    metrics = filled(batches=10)
    registry = registry_of(metrics)
    full = generate_latest(registry).decode()
    seen: list[str] = []
    with metrics.exported_directly():
        assert list(metrics.collect()) == []
        with metrics.exported_directly():  # nested: still left out, and still after the inner one closes
            pass
        assert generate_latest(registry) == b""
        thread = threading.Thread(target=lambda: seen.append(generate_latest(registry).decode()))
        thread.start()
        thread.join()
        other = filled(1, 2, batches=10)
        assert list(other.collect())  # another collector is not affected
    assert seen == [full]
    assert generate_latest(registry).decode() == full


# ------------------------------------------------------------------------------------------ served over HTTP
@pytest.mark.parametrize("encoding", [None, "gzip", "deflate, gzip;q=0.5"])
@pytest.mark.parametrize("accept", [None, OPENMETRICS, PROMETHEUS_ACCEPT, "text/plain;version=1.0.0"])
def test_served_scrape_equals_the_library(served, accept, encoding):
    metrics = filled(2, 4)
    requests = Counter("other_requests", "Something else in the registry.", ["path"], registry=None)
    requests.labels(path='/a"b').inc(3)
    registry = registry_of(metrics, requests)
    fast = served(registry, direct=(metrics,))
    reference = served(registry)

    status, headers, body = get(fast, accept, encoding)
    ref_status, ref_headers, ref_body = get(reference, accept, encoding)
    assert status == ref_status == 200
    assert headers["Content-Type"] == ref_headers["Content-Type"]
    assert headers.get("Content-Encoding") == ref_headers.get("Content-Encoding")
    assert (headers.get("Content-Encoding") == "gzip") == (encoding is not None)
    assert int(headers["Content-Length"]) > 0
    text = body.decode()
    openmetrics = headers["Content-Type"].startswith("application/openmetrics-text")
    assert openmetrics == (accept is not None and accept.startswith("application/openmetrics-text"))
    parse = parse_openmetrics if openmetrics else parse_text
    encoder, content_type = choose_encoder(accept)  # the library's pick of format and name escaping
    assert headers["Content-Type"] == content_type
    library = encoder(registry).decode()
    assert normalized(parse(text)) == normalized(parse(library))
    assert text == ref_body.decode() == library  # TrainingMetrics is registered first: even the order is the same
    if openmetrics:
        assert text.endswith("\n# EOF\n") and text.count("# EOF") == 1
        assert ' # {trace_id="' in text


def test_openmetrics_ends_with_one_eof_when_nothing_else_is_registered(served):
    metrics = filled()
    rendered: list[tuple] = []
    collected: list[int] = []
    render_families, collect = metrics.render_families, metrics.collect

    def counting_render(*args: Any) -> Any:
        rendered.append(args)
        return render_families(*args)

    def counting_collect() -> list[Any]:
        families = list(collect())
        collected.append(len(families))
        return families

    metrics.render_families, metrics.collect = counting_render, counting_collect  # type: ignore[method-assign]
    url = served(registry_of(metrics), direct=(metrics,))
    _, headers, body = get(url, OPENMETRICS)
    text = body.decode()
    # Written once, by render_families; the registry's pass in the serving thread got nothing from collect().
    assert rendered == [(True, "underscores")] and collected == [0]
    assert headers["Content-Type"].startswith(OPENMETRICS)
    assert text == metrics.render(True) + "# EOF\n"
    assert text.count("# EOF") == 1
    # A direct collector missing from the registry is served all the same.
    url = served(CollectorRegistry(), direct=(metrics,))
    assert get(url, OPENMETRICS)[2].decode() == text
    assert get(url)[2].decode() == metrics.render(False)


def test_eight_ranks_in_one_endpoint_merge_into_one_family_each(served):
    ranks = [filled(rank, 8, batches=60) for rank in range(8)]
    registry = registry_of(MergedRanks(ranks))  # what generate_latest sees: one family per metric
    url = served(registry, direct=tuple(ranks))
    for accept, generate in ((None, generate_latest), (OPENMETRICS, generate_openmetrics)):
        for encoding in (None, "gzip"):
            body = get(url, accept, encoding)[2].decode()
            assert body == generate(registry).decode()
    text = get(url)[2].decode()
    assert text.count("# TYPE dgdn_batch_processing_seconds histogram\n") == 1
    assert len({labels["rank"] for family in parse_text(text) for _, labels, *_ in family.samples}) == 8


def test_name_filters_favicon_and_other_methods_behave_like_the_library(served):
    metrics = filled(batches=20)
    requests = Counter("other_requests", "Something else in the registry.", registry=None)
    registry = registry_of(metrics, requests)
    fast = served(registry, direct=(metrics,))
    reference = served(registry)
    query = "?name[]=dgdn_epoch&name[]=other_requests_total"
    for accept in (None, OPENMETRICS):
        fast_result = get(fast + query, accept)
        assert fast_result == get(reference + query, accept)
        assert "dgdn_epoch" in fast_result[2].decode() and "dgdn_global_step" not in fast_result[2].decode()
    favicon = get(fast.replace("/metrics", "/favicon.ico"))
    assert favicon[0] == 200 and favicon[2] == b""
    for method in ("POST", "OPTIONS", "HEAD"):
        status, headers, body = get(fast, method=method)
        ref_status, ref_headers, ref_body = get(reference, method=method)
        assert (status, headers.get("Allow"), body) == (ref_status, ref_headers.get("Allow"), ref_body)


def test_promtool_accepts_the_served_text(served):
    promtool = require_tool("promtool")
    single = filled()
    requests = Counter("other_requests", "Something else in the registry.", registry=None)
    requests.inc()
    ranks = [filled(rank, 8, batches=40) for rank in range(8)]
    for registry, direct in ((registry_of(single, requests), (single,)), (registry_of(MergedRanks(ranks)), ranks)):
        url = served(registry, direct=tuple(direct))
        for encoding in (None, "gzip"):
            text = get(url, encoding=encoding)[2].decode()
            result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                                    timeout=30)
            assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
                result.stdout + result.stderr
