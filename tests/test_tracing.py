"""Span tree, OTLP export to a real receiver, failure behaviour and exemplars."""

from __future__ import annotations

import logging
from collections import Counter
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from dgdn_lightning_monitor import MonitoringCallback
from exposition import exposition, value
from lit_models import GraphClassifier, graph_loaders, quiet_trainer
from otlp_receiver import OTLPReceiver

PHASES = ("data_fetch", "forward", "backward", "optimizer_step")
OTEL_VARIABLES = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                  "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                  "OTEL_EXPORTER_OTLP_TIMEOUT")


@pytest.fixture(autouse=True)
def clean_otel_environment(monkeypatch):
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def fit(callback, epochs=2, model=None, extra=()):
    train, val, *_ = graph_loaders()  # 36 training graphs in 5 batches, 12 validation graphs in 2
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[callback, *extra], log_every_n_steps=1)
    trainer.fit(model or GraphClassifier(), train, val)
    return trainer


def in_memory(**kwargs):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return MonitoringCallback(port=0, tracer_provider=provider, **kwargs), exporter


def by_name(spans, name):
    return [s for s in spans if s.name == name]


def test_span_tree_one_trace_per_epoch_with_sampled_batches_and_phases():
    callback, exporter = in_memory(trace_every_n_steps=2, run_id="run-42")
    fit(callback, epochs=2)
    spans = exporter.get_finished_spans()
    epochs = by_name(spans, "train_epoch")
    assert len(epochs) == 2 and len({e.context.trace_id for e in epochs}) == 2
    assert all(e.parent is None for e in epochs)
    assert [e.attributes["training.epoch"] for e in epochs] == [0, 1]
    assert epochs[0].attributes["training.run_id"] == "run-42" and epochs[0].attributes["training.rank"] == 0

    batches = by_name(spans, "train_batch")
    # 10 training steps, every 2nd traced: steps 0, 2, 4, 6, 8 (batch indices 0, 2, 4, 1, 3).
    assert [(b.attributes["training.epoch"], b.attributes["training.batch_index"]) for b in batches] == \
        [(0, 0), (0, 2), (0, 4), (1, 1), (1, 3)]
    assert [b.attributes["training.global_step"] for b in batches] == [0, 2, 4, 6, 8]
    epoch_of = {e.context.span_id: e for e in epochs}
    for batch in batches:
        parent = epoch_of[batch.parent.span_id]
        assert batch.context.trace_id == parent.context.trace_id
        assert parent.start_time <= batch.start_time <= batch.end_time <= parent.end_time
        assert batch.attributes["training.batch_size"] in (8, 4)
        assert batch.attributes["graph.nodes"] > 0 and batch.attributes["graph.edges"] > 0
        children = [s for s in spans if s.parent is not None and s.parent.span_id == batch.context.span_id]
        assert [c.name for c in children] == list(PHASES)
        for child in children:
            assert batch.start_time <= child.start_time <= child.end_time <= batch.end_time
        # Phases follow each other without overlap.
        assert all(a.end_time <= b.start_time for a, b in zip(children, children[1:]))

    validations = by_name(spans, "validation_epoch")
    assert len(validations) == 2
    for validation in validations:
        assert validation.parent.span_id in epoch_of
    val_batches = by_name(spans, "validation_batch")
    assert len(val_batches) == 2  # batch index 0 of each validation run
    assert {v.parent.span_id for v in val_batches} == {v.context.span_id for v in validations}


def test_unsampled_steps_create_no_spans():
    callback, exporter = in_memory(trace_every_n_steps=50)
    callback.trace_floor_s = float("inf")  # on a loaded machine the fit may outlast the 10 s floor
    fit(callback, epochs=2)
    assert len(by_name(exporter.get_finished_spans(), "train_batch")) == 1  # step 0 only
    assert callback.summary()["phase_seconds"]["forward"] > 0


def test_test_and_predict_have_their_own_traces():
    callback, exporter = in_memory(trace_every_n_steps=1)
    trainer = quiet_trainer(callbacks=[callback])
    _, val, *_ = graph_loaders()
    trainer.test(GraphClassifier(), val, verbose=False)
    trainer.predict(GraphClassifier(), val)
    spans = exporter.get_finished_spans()
    assert len(by_name(spans, "test_epoch")) == 1 and len(by_name(spans, "test_batch")) == 2
    assert len(by_name(spans, "predict_epoch")) == 1 and len(by_name(spans, "predict_batch")) == 2
    assert by_name(spans, "test_epoch")[0].parent is None


def test_exception_ends_open_spans_with_error_status():
    class Boom(GraphClassifier):
        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1 and batch_idx == 2:
                raise ValueError("diverged")
            return super().training_step(batch, batch_idx)

    callback, exporter = in_memory(trace_every_n_steps=1)
    with pytest.raises(ValueError):
        fit(callback, epochs=3, model=Boom())
    epochs = by_name(exporter.get_finished_spans(), "train_epoch")
    assert len(epochs) == 2
    assert epochs[0].status.status_code is StatusCode.UNSET
    failed = epochs[1]
    assert failed.status.status_code is StatusCode.ERROR and "diverged" in failed.status.description
    assert [e.name for e in failed.events] == ["exception"]


def test_end_to_end_otlp_export_to_a_real_receiver(monkeypatch):
    with OTLPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        callback = MonitoringCallback(port=0, trace_every_n_steps=5, run_id="e2e")
        fit(callback, epochs=2)
        spans = receiver.spans
    # What became of the spans, from the exporter's own results: every one the receiver decoded, delivered.
    assert callback.tracer.delivery == f"{len(spans)} spans delivered to {receiver.endpoint}"
    epochs = [s for s in spans if s.name == "train_epoch"]
    assert len(epochs) == 2
    resource = epochs[0].resource
    assert resource["service.name"] == "dgdn-training"
    assert resource["training.run_id"] == "e2e"
    assert resource["deployment.environment"] == "test"
    batches = [s for s in spans if s.name == "train_batch"]
    assert len(batches) == 2
    for batch in batches:
        parent = next(e for e in epochs if e.span_id == batch.parent_span_id)
        assert batch.trace_id == parent.trace_id
        phases = [s for s in spans if s.parent_span_id == batch.span_id]
        assert sorted(p.name for p in phases) == sorted(PHASES)
        assert all(batch.start_ns <= p.start_ns <= p.end_ns <= batch.end_ns for p in phases)
        assert batch.attributes["training.batch_size"] in (8, 4)
    assert abs(epochs[0].start_ns / 1e9 - time.time()) < 120  # wall-clock times, not the monotonic clock


def test_service_name_from_environment(monkeypatch):
    with OTLPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "my-gnn")
        fit(MonitoringCallback(port=0, trace_every_n_steps=5), epochs=1)
        assert {s.resource["service.name"] for s in receiver.spans} == {"my-gnn"}


def test_otel_traces_exporter_none_and_tracing_false_turn_it_off(monkeypatch):
    with OTLPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
        fit(MonitoringCallback(port=0, tracing=False, trace_every_n_steps=1), epochs=1)
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
        fit(MonitoringCallback(port=0, trace_every_n_steps=1), epochs=1)
        assert receiver.requests == 0


def test_console_exporter(monkeypatch, tmp_path):
    # In a child process: the console exporter binds sys.stdout when the SDK is imported.
    script = tmp_path / "console_run.py"
    script.write_text(textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from dgdn_lightning_monitor import MonitoringCallback
        from lit_models import GraphClassifier, graph_loaders, quiet_trainer
        train, val, *_ = graph_loaders()
        quiet_trainer(max_epochs=1, callbacks=[MonitoringCallback(port=0, trace_every_n_steps=5)]).fit(
            GraphClassifier(), train, val)
    """))
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console"}
    result = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert '"name": "train_epoch"' in result.stdout and '"name": "forward"' in result.stdout


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_auto_mode_without_receiver_is_off_with_one_line(caplog):
    if not _port_is_free(4318):
        pytest.skip("something listens on localhost:4318 here")
    with caplog.at_level(logging.DEBUG):
        callback = MonitoringCallback(port=0, trace_every_n_steps=1)
        fit(callback, epochs=1)
    lines = [r for r in caplog.records if "trac" in r.getMessage().lower() and r.name.startswith("dgdn")]
    assert len(lines) == 1 and "OTEL_EXPORTER_OTLP_ENDPOINT" in lines[0].getMessage()
    assert callback.tracer.setup is None and callback.tracer.description is None
    assert callback.tracer.delivery is None  # no spans were sent


def test_auto_mode_finds_a_local_receiver(monkeypatch):
    if not _port_is_free(4318):
        pytest.skip("something listens on localhost:4318 here")
    import dgdn_lightning_monitor.tracing.provider as provider

    with OTLPReceiver() as receiver:
        monkeypatch.setattr(provider, "LOCAL_OTLP_PORT", receiver.port)
        monkeypatch.setattr(provider, "LOCAL_OTLP_HOST", "127.0.0.1")
        fit(MonitoringCallback(port=0, trace_every_n_steps=5), epochs=1)
        assert len(receiver.named("train_epoch")) == 1


def _closed_port_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/traces"


HOOKS_ON_THE_TRAINING_PATH = ("on_train_epoch_start", "on_train_batch_start", "on_before_backward",
                              "on_after_backward", "on_before_optimizer_step", "on_train_batch_end",
                              "on_train_epoch_end", "on_validation_epoch_start", "on_validation_batch_start",
                              "on_validation_batch_end", "on_validation_epoch_end", "on_validation_end")


def time_hooks(callback) -> dict[str, float]:
    """Wrap the callback's training-path hooks to add up the seconds spent inside them."""
    spent = {"seconds": 0.0}
    for name in HOOKS_ON_THE_TRAINING_PATH:
        hook = getattr(callback, name)

        def timed(*args, _hook=hook, **kwargs):
            start = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                spent["seconds"] += time.perf_counter() - start

        setattr(callback, name, timed)
    return spent


@pytest.mark.parametrize("failure", ["down", "hang", "error"])
def test_broken_collector_neither_slows_training_nor_floods_the_log(monkeypatch, caplog, failure):
    with OTLPReceiver(mode="hang" if failure == "hang" else "error") as receiver:
        endpoint = _closed_port_endpoint() if failure == "down" else receiver.endpoint
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
        with caplog.at_level(logging.DEBUG):
            callback = MonitoringCallback(port=0, trace_every_n_steps=1)
            in_hooks = time_hooks(callback)
            ended = []

            class EndTimer(pl.Callback):
                def on_train_end(self, trainer, pl_module):
                    ended.append(time.perf_counter())

            # 20 traced steps with validation: exports fail (or hang) while training runs.
            fit(callback, epochs=4, model=GraphClassifier(step_sleep_s=0.02), extra=[EndTimer()])
            run_end = time.perf_counter() - ended[0]
            assert callback.tracer.setup is None
    # The training thread never waits for the collector: the hooks cost what they cost without one (a few
    # hundred microseconds a step at most), and the end of the run waits at most the 2 s flush bound.
    assert in_hooks["seconds"] < 0.5, in_hooks
    assert run_end < 3.0
    # One warning of ours; of the exporter's own records, each different message once (repeats are muted).
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    ours = [r for r in warnings if r.name.startswith("dgdn_lightning_monitor")]
    assert len(ours) == 1, [r.getMessage() for r in warnings]
    theirs = [(r.name, r.msg) for r in caplog.records if r.name.startswith("opentelemetry.exporter")]
    assert theirs and len(theirs) == len(set(theirs)), theirs  # the first of each gets through
    assert value(exposition(callback.registry), "dgdn_monitor_errors_total", part="tracing") >= 1
    # None of the spans arrived, and the closing figures say so (not where spans were meant to go).
    assert callback.tracer.delivery.startswith(f"spans dropped: {endpoint} did not accept ")
    dropped, of = callback.tracer.delivery.split(" did not accept ")[1].split(";")[0].split(" of ")
    assert int(dropped) == int(of) > 0
    assert receiver.spans == []


@pytest.mark.parametrize("env_delay", [None, "600000"])
def test_the_export_delay_is_ours_unless_otel_bsp_schedule_delay_says_otherwise(monkeypatch, env_delay):
    # With our 1 s delay spans reach the receiver while training runs; OTEL_BSP_SCHEDULE_DELAY=600000 (10 minutes)
    # holds them until the final flush.
    if env_delay:
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", env_delay)
    with OTLPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
        during: list[int] = []

        class WaitAtTheEnd(pl.Callback):
            def on_train_end(self, trainer, pl_module):
                deadline = time.monotonic() + (10 if env_delay is None else 3)
                while time.monotonic() < deadline and not (env_delay is None and receiver.spans):
                    time.sleep(0.05)
                during.append(len(receiver.spans))

        callback = MonitoringCallback(port=0, trace_every_n_steps=1)
        fit(callback, epochs=1, extra=[WaitAtTheEnd()])
        assert callback.tracer.setup is None  # flushed and shut down
        names = Counter(span.name for span in receiver.spans)
    assert (during[0] > 0) == (env_delay is None)
    # Every span arrived (the last ones at the flush): 5 training batches of 36 graphs, 2 of 12 validation graphs.
    assert names["train_batch"] == names["backward"] == names["optimizer_step"] == 5
    assert names["validation_batch"] == 2 and names["forward"] == 5 + 2 and names["train_epoch"] == 1


def test_the_destination_is_computed_from_the_otel_variables(monkeypatch, caplog):
    from dgdn_lightning_monitor.tracing.provider import configure_tracing

    for variables, expected in (
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "http://collector:4318/v1/traces"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:1/x"},
            "http://b:1/x",
        ),
    ):
        for name, setting in variables.items():
            monkeypatch.setenv(name, setting)
        setup = configure_tracing(None)
        assert setup is not None and setup.description == f"spans to {expected}"
        setup.provider.shutdown()
        for name in variables:
            monkeypatch.delenv(name)


def test_exemplars_link_batch_time_to_traces():
    callback, exporter = in_memory(trace_every_n_steps=2)
    texts = []

    class OpenMetricsScrape(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            request = urllib.request.Request(callback.metrics_url,
                                             headers={"Accept": "application/openmetrics-text; version=1.0.0"})
            with urllib.request.urlopen(request, timeout=5) as response:
                assert "openmetrics" in response.headers["Content-Type"]
                texts.append(response.read().decode())

    fit(callback, epochs=1, extra=[OpenMetricsScrape()])
    text = texts[0]
    exemplar_lines = [line for line in text.splitlines()
                      if line.startswith("dgdn_batch_processing_seconds_bucket") and "# {trace_id=" in line]
    assert exemplar_lines
    trace_id = format(by_name(exporter.get_finished_spans(), "train_epoch")[0].context.trace_id, "032x")
    assert all(f'trace_id="{trace_id}"' in line for line in exemplar_lines)
