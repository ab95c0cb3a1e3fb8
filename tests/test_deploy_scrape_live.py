"""A real Prometheus on loopback scrapes a real Lightning training run that uses MonitoringCallback; every dashboard
query on the callback's metrics must return data, and the batch-time exemplars must carry the ids of traces the
run exported."""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import free_port, require_tool
from prom_helpers import (
    CALLBACK_CUDA_ONLY,
    CALLBACK_GPU_PREFIX,
    CALLBACK_METRICS,
    HttpSink,
    Prometheus,
    PromQLError,
    dashboard_queries,
    load_dashboard,
    metric_names,
    substitute,
    wait_until,
)

pytestmark = pytest.mark.slow

#: Scrapes of the run Prometheus must have made before the run may end.
MIN_SCRAPES = 6
RUN_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory) -> Any:
    """Trains a small GCN while a real Prometheus scrapes it every second; queries the dashboard's expressions in
    ``on_train_end``, while the metrics endpoint still serves."""
    prometheus_binary = require_tool("prometheus")
    import deploy_training as dt

    from dgdn_lightning_monitor import MonitoringCallback

    workdir = tmp_path_factory.mktemp("scrape")
    otlp = HttpSink()
    state: dict[str, Any] = {"prometheus": None, "results": {}, "errors": {}, "otlp": otlp}
    dashboard = load_dashboard()

    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{otlp.url}/v1/traces")
        env.delenv("OTEL_TRACES_EXPORTER", raising=False)
        monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=True, trace_every_n_steps=3)
        started = time.monotonic()

        def start(trainer) -> None:
            url = monitor.metrics_url
            assert url, "MonitoringCallback serves no metrics after setup"
            state["target"] = dt.host_port(url)
            config = dt.write_prometheus_config(workdir / "prometheus.yml", state["target"])
            prometheus = state["prometheus"] = Prometheus(prometheus_binary, config, workdir, free_port())
            prometheus.wait_ready()
            dt.wait_for_target_up(prometheus)

        def batch(trainer) -> None:
            if time.monotonic() - started > RUN_TIMEOUT_S:
                raise TimeoutError(f"Prometheus scraped fewer than {MIN_SCRAPES} times in {RUN_TIMEOUT_S:.0f} s")
            if (
                trainer.global_step % 5 == 0
                and trainer.current_epoch >= 2
                and dt.successful_scrapes(state["prometheus"]) >= MIN_SCRAPES
            ):
                trainer.should_stop = True

        def end(trainer) -> None:
            prometheus = state["prometheus"]
            # One more scrape after the last step, so Prometheus holds the run's final figures.
            wait_until(
                lambda: prometheus.query(f"dgdn_global_step == {trainer.global_step}"),
                15,
                what="a scrape after the last step",
            )
            values = {
                "job": dt.JOB,
                "instance": state["target"],
                "run_id": ".*",  # Grafana's "All"
                "rank": "0",
                "gpu_host": ".*",
                "gpu": ".*",
                "__rate_interval": "1m",
                "__interval": "1s",
                "__range": "5m",
            }
            now = time.time()
            for query in dashboard_queries(dashboard):
                expr = substitute(query.expr, values)
                try:
                    state["results"][(query.where, query.expr)] = prometheus.query(expr, at=now)
                except PromQLError as error:
                    state["errors"][(query.where, query.expr)] = str(error)
            batch_time = next(q for q in dashboard_queries(dashboard) if q.exemplar)
            state["exemplars"] = prometheus.exemplars(substitute(batch_time.expr, values), now - 300, now)
            state["variables"] = {
                label: prometheus.api(f"label/{label}/values", **{"match[]": "dgdn_training_info"})
                for label in ("job", "instance", "rank")
            }

        model = dt.LiveGCN(step_sleep_s=0.02)
        train, val = dt.loaders()
        run = dt.trainer([dt.Hooks(start, batch, end), monitor])
        try:
            run.fit(model, train, val)
            state["global_step"] = run.global_step
            yield state
        finally:
            if state["prometheus"] is not None:
                state["prometheus"].stop()
            otlp.close()


def _is_callback_query(expr: str) -> bool:
    names = metric_names(expr)
    on_a_gpu = any(n.startswith(CALLBACK_GPU_PREFIX) or n in CALLBACK_CUDA_ONLY for n in names)
    return bool(names) and names <= CALLBACK_METRICS and not on_a_gpu


def test_every_dashboard_query_is_accepted_by_prometheus(scraped_run):
    assert not scraped_run["errors"], scraped_run["errors"]


def test_every_callback_query_of_the_dashboard_returns_data(scraped_run):
    results = scraped_run["results"]
    callback_queries = [key for key in results if _is_callback_query(key[1])]
    assert len(callback_queries) >= 30
    empty = [f"{where}: {expr}" for (where, expr) in callback_queries if not results[(where, expr)]]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_rates_show_the_run_progressing(scraped_run):
    results = scraped_run["results"]
    samples = next(
        value for (where, expr), value in results.items() if where == "Samples per second" and "rate(" in expr
    )
    assert float(samples[0]["value"][1]) > 0
    step = next(value for (where, _), value in results.items() if where == "Global step")
    assert int(float(step[0]["value"][1])) == scraped_run["global_step"]


def test_dashboard_variables_list_the_run(scraped_run):
    variables = scraped_run["variables"]
    assert variables["job"] == ["dgdn-training"]
    assert variables["instance"] == [scraped_run["target"]]
    assert variables["rank"] == ["0"]


def test_batch_time_exemplars_link_to_exported_traces(scraped_run):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    exemplar_ids = {
        exemplar["labels"]["trace_id"]
        for series in scraped_run["exemplars"]
        for exemplar in series["exemplars"]
        if "trace_id" in exemplar["labels"]
    }
    assert exemplar_ids, f"no trace_id exemplars on the batch time query: {scraped_run['exemplars']}"
    exported = set()
    for item in scraped_run["otlp"].snapshot():
        request = ExportTraceServiceRequest()
        request.ParseFromString(item.body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                exported.update(span.trace_id.hex() for span in scope_spans.spans)
    assert exemplar_ids & exported, "no exemplar trace id was exported as a trace"
