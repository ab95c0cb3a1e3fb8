"""The span builder keeps its queue bounded when traced batches arrive faster than spans can be built, and builds
a CUDA step only once the step statistics' poll found its events done."""

from __future__ import annotations

import logging
import threading
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dgdn_lightning_monitor.graph_size import GraphSize
from dgdn_lightning_monitor.metrics import TrainingMetrics
from dgdn_lightning_monitor.steps import StepStatistics
from dgdn_lightning_monitor.tracing import BatchRecord, TrainingTracer
from dgdn_lightning_monitor.tracing.tracer import SpanBuilder
from dgdn_lightning_monitor.vocabulary import LOGGED_GAUGES


def record(index: int) -> BatchRecord:
    r = BatchRecord("train", 0, index, index, GraphSize(1, 2, 3))
    r.mark("batch_start")
    r.mark("batch_end")
    return r


def test_queue_is_bounded_and_the_drop_is_reported_once(caplog):
    release = threading.Event()
    built: list[int] = []

    def slow_emit(r: BatchRecord) -> None:
        release.wait(5)  # a builder that cannot keep up
        built.append(r.batch_idx)

    builder = SpanBuilder(slow_emit, interval_s=0.5, max_queued=10)  # first look after the burst
    with caplog.at_level(logging.WARNING, logger="dgdn_lightning_monitor"):
        for index in range(100):
            builder.submit(record(index))
    time.sleep(0.05)
    dropped = builder.errors.counts["tracing"]
    assert dropped == 100 - 10  # each one counted
    assert sum("faster than their spans can be built" in r.getMessage() for r in caplog.records) == 1
    release.set()
    builder.close()
    assert len(built) == 100 - dropped  # everything queued was built, nothing else


class FakeEvent:
    """Stands in for a ``torch.cuda.Event`` (no CUDA device here): done when the test says so."""

    def __init__(self, at_ms: float) -> None:
        self.at_ms, self.done, self.queries = at_ms, False, 0

    def query(self) -> bool:
        self.queries += 1
        return self.done

    def elapsed_time(self, end: "FakeEvent") -> float:
        return end.at_ms - self.at_ms


def test_a_cuda_step_reaches_the_tracer_once_the_step_statistics_poll_finds_it_done():
    # One poller: the step statistics query the events; the span builder only builds what it is handed.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = TrainingTracer(tracer_provider=provider)
    tracer.start({"training.rank": 0})
    tracer.start_epoch("train", 0)
    metrics = TrainingMetrics()
    stats = StepStatistics(metrics, {gauge: gauge for gauge in LOGGED_GAUGES}, None)
    step = BatchRecord("train", 0, 0, 0, GraphSize(1, 2, 3), parent=tracer.epoch_span("train"))
    for mark in ("batch_start", "backward_start", "backward_end", "optimizer_start", "batch_end"):
        step.mark(mark)
    step.events = {"batch_start": FakeEvent(0.0), "backward_start": FakeEvent(3.0), "backward_end": FakeEvent(7.0),
                   "optimizer_start": FakeEvent(7.5), "batch_end": FakeEvent(9.0)}  # fmt: skip
    stats.add_phases(step)
    stats.when_ready(step, tracer.add_batch)
    stats.poll()
    assert not tracer._builder._queue and metrics.phase_seconds["backward"].count == 0  # still on the device
    for event in step.events.values():
        event.done = True
    stats.poll()
    assert not stats.pending and len(tracer._builder._queue) == 1
    assert metrics.phase_seconds["backward"].sum == 0.004  # device time, 7 - 3 ms
    tracer.finish(None)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert spans["train_batch"].attributes["gpu.duration_ms"] == 9.0
    assert spans["backward"].attributes["gpu.duration_ms"] == 4.0
    assert spans["train_batch"].parent.span_id == spans["train_epoch"].context.span_id
    assert step.events["batch_end"].queries == 2 * 2  # two polls of its two deliveries; the builder never asks
