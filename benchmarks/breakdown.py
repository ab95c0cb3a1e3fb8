"""Where MonitoringCallback's per-step time goes: each part of its hooks timed on its own, in a live fit.

A probe callback placed after MonitoringCallback waits until step 30 of a real fit of the tiny model, then calls
the parts of the callback's step path (and a few reference operations) in tight loops with that fit's Trainer,
module, batch and outputs. Each figure is the median over 7 loops of the mean time per call; a loop's mean
excludes nothing, so figures include interpreter overhead, which is what the step pays too.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

from lightning.pytorch import Callback

from benchmarks.common import Receiver, make_trainer, monitoring_callback, otlp_env
from dgdn_testing.models import TensorRegressor, tiny_loader


def per_call_us(
    function: Callable[[], Any], calls: int, loops: int = 7, stat: Callable[[list[float]], float] = statistics.median
) -> float:
    """``stat`` (the median) over ``loops`` of the mean µs per call of ``function`` over ``calls`` calls."""
    means = []
    clock = time.perf_counter_ns
    for _ in range(loops):
        start = clock()
        for _ in range(calls):
            function()
        means.append((clock() - start) / calls / 1e3)
    return stat(means)


def _dgdn() -> tuple[Optional[Any], Optional[Any]]:
    """A DGDN training batch and module (as in the end-to-end benchmark), or Nones when unavailable."""
    try:
        from dgdn_lightning_monitor.dgdn.data import SyntheticTemporalGraph
        from dgdn_lightning_monitor.dgdn.module import DGDNLinkPredictor, TemporalGraphDataModule
    except ImportError:
        return None, None
    graph = SyntheticTemporalGraph(num_nodes=500, num_events=2000, seed=0)
    batch = next(iter(TemporalGraphDataModule(graph, batch_size=200).train_dataloader()))
    return batch, DGDNLinkPredictor.from_graph(graph, hidden_dim=64)


def spaced_us(function: Callable[[], Any], calls: int, pause_s: float = 0.002) -> float:
    """Median µs of single calls of ``function``, with a pause before each."""
    times = []
    for _ in range(calls):
        time.sleep(pause_s)
        start = time.perf_counter_ns()
        function()
        times.append((time.perf_counter_ns() - start) / 1e3)
    return statistics.median(times)


def export_cost_per_span(endpoint: str, spans: int = 512, loops: int = 5) -> dict[str, float]:
    """What the exporter thread spends per span (protobuf encoding and the HTTP request), timed here in the
    calling thread with the SDK's OTLP/HTTP exporter against the live receiver, in batches of ``spans``."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("benchmarks")
    for i in range(spans):
        span = tracer.start_span(
            "forward",
            attributes={"training.epoch": 0, "training.batch_index": i, "training.global_step": i, "graph.nodes": 700},
        )
        span.end()
    finished = list(memory.get_finished_spans())
    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=5)
    encode, export = [], []
    for _ in range(loops):
        start = time.perf_counter_ns()
        encode_spans(finished).SerializeToString()
        encode.append((time.perf_counter_ns() - start) / 1e3 / spans)
        start = time.perf_counter_ns()
        exporter.export(finished)
        export.append((time.perf_counter_ns() - start) / 1e3 / spans)
    exporter.shutdown()
    provider.shutdown()
    return {
        "exporter thread: encode one span (protobuf), batch of 512": statistics.median(encode),
        "exporter thread: export one span (encode + HTTP POST), batch of 512": statistics.median(export),
    }


class _Probe(Callback):
    def __init__(self, callback: Any, calls: int, endpoint: str) -> None:
        self.callback = callback
        self.calls = calls
        self.endpoint = endpoint
        self.figures: dict[str, Optional[float]] = {}
        self.missing: dict[str, str] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != 30:
            return
        import torch
        from torch_geometric.data import Data

        from benchmarks.driver import graph_batches
        from dgdn_lightning_monitor.graph_size import GraphSize
        from dgdn_lightning_monitor.tracing import BatchRecord

        cb, n = self.callback, self.calls
        hops = cb._hops  # the callback's sizer's per-hop counts
        graph = graph_batches(1)[0]
        temporal, dgdn_module = _dgdn()
        now = time.perf_counter()
        size = GraphSize(32, None, None)
        f = self.figures

        def read_logged() -> None:
            from dgdn_lightning_monitor.vocabulary import TRAIN_GAUGES

            cb._run.stats.read_logged(trainer.callback_metrics, TRAIN_GAUGES)

        def part(name: str, measure: Callable[[], float]) -> None:
            # The callback's internals change as it is tuned: a part that no longer exists is left out.
            try:
                f[name] = measure()
            except Exception as error:  # noqa: BLE001 - recorded, not raised
                f[name] = None
                self.missing[name] = f"{type(error).__name__}: {error}"

        part("reference: time.perf_counter()", lambda: per_call_us(time.perf_counter, n))
        part(
            "reference: isinstance(outputs, Mapping) (ABC check)",
            lambda: per_call_us(lambda: isinstance(outputs, Mapping), n),
        )
        part("reference: loss.item()", lambda: per_call_us(outputs["loss"].item, n))
        part(
            "stats.read_logged(trainer.callback_metrics, TRAIN_GAUGES) (every log_every_n_steps)",
            lambda: per_call_us(read_logged, n),
        )
        part("batch size: _sizer(batch), [x, y] tensors", lambda: per_call_us(lambda: cb._sizer(batch), n))
        part("batch size: _sizer(batch), PyG Batch of 32 graphs", lambda: per_call_us(lambda: cb._sizer(graph), n))
        if temporal is not None:
            part("batch size: _sizer(batch), DGDN TemporalData", lambda: per_call_us(lambda: cb._sizer(temporal), n))
        part("per-hop counts: sampled_per_hop(batch), [x, y] tensors", lambda: per_call_us(lambda: hops(batch), n))
        sampled = Data(x=torch.empty(1232, 8), num_sampled_nodes=[32, 300, 900], num_sampled_edges=[320, 900])
        part(
            "per-hop counts: sampled_per_hop(batch), 2-hop sampled Data", lambda: per_call_us(lambda: hops(sampled), n)
        )
        part(
            "stats.keep_loss(outputs, trainer) (with its non-finite fold every 50 steps)",
            lambda: per_call_us(lambda: cb._run.stats.keep_loss(outputs, trainer), n),
        )
        part(
            "metrics.observe_train_batch(...)",
            lambda: per_call_us(lambda: cb.metrics.observe_train_batch(0.001, now, size, None), n),
        )
        part(
            "metrics.observe_train_batch(...) of a 2-hop sampled batch",
            lambda: per_call_us(lambda: cb.metrics.observe_train_batch(0.001, now, size, None, hops(sampled)), n),
        )
        part(
            "count_model(module) (each epoch end), tiny model",
            lambda: per_call_us(lambda: cb._count_model(pl_module), max(n // 10, 50)),
        )
        if dgdn_module is not None:
            part(
                "count_model(module) (each epoch end), DGDN module",
                lambda: per_call_us(lambda: cb._count_model(dgdn_module), max(n // 10, 50)),
            )
            cb._count_model(pl_module)

        def step() -> None:
            cb.on_train_batch_start(trainer, pl_module, batch, batch_idx)
            cb.on_before_backward(trainer, pl_module, outputs["loss"])
            cb.on_after_backward(trainer, pl_module)
            cb.on_before_optimizer_step(trainer, pl_module, None)
            cb.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

        saved = cb.trace_every_n_steps
        cb.trace_every_n_steps = 10**9
        cb._train_batches = 1  # never a multiple of the interval: an untraced step
        part("untraced step, all hooks", lambda: per_call_us(step, n))
        # With the loop's fetch boundaries too, as the callback wraps them (Lightning-private names, read here only).
        loop = trainer.fit_loop.epoch_loop
        before, after = loop._on_before_fetch, loop._on_after_fetch

        def fetched_step() -> None:
            before()
            after()
            step()

        part("untraced step, all hooks and the fetch boundaries", lambda: per_call_us(fetched_step, n))
        # The least of many loops: what the code costs with the least interference of a shared machine, to compare
        # two versions of the callback run one after the other.
        part("untraced step, all hooks, least of 21 loops", lambda: per_call_us(step, n, 21, min))
        part(
            "untraced step, all hooks and the fetch boundaries, least of 21 loops",
            lambda: per_call_us(fetched_step, n, 21, min),
        )
        cb.trace_every_n_steps = 1
        # Traced steps are timed one at a time with pauses in between, so the exporter drains its queue between
        # calls instead of competing for the GIL with every call (the hook_time benchmark shows that case).
        part("traced step, all hooks, spaced calls (training thread only)", lambda: spaced_us(step, 200))
        cb.trace_every_n_steps = saved

        def record_only() -> BatchRecord:
            record = BatchRecord("train", 0, 0, 0, size)
            for mark in (
                "fetch_start",
                "batch_start",
                "backward_start",
                "backward_end",
                "optimizer_start",
                "batch_end",
            ):
                record.mark(mark)
            return record

        part("BatchRecord + 6 marks", lambda: per_call_us(record_only, n))
        record = record_only()
        emit = cb.tracer._emit
        takes_parent = "parent" in inspect.signature(emit).parameters
        build = (lambda: emit(record, None)) if takes_parent else (lambda: emit(record))
        spans = 1 + len(record.phases())
        part(f"building the spans of one traced step ({spans} spans), spaced calls", lambda: spaced_us(build, 200))
        part(f"building the spans of one traced step ({spans} spans), back to back", lambda: per_call_us(build, 100, 5))
        try:
            f.update(export_cost_per_span(self.endpoint))
        except Exception as error:  # noqa: BLE001
            self.missing["exporter"] = f"{type(error).__name__}: {error}"


def run(quick: bool = False, calls: Optional[int] = None) -> dict[str, Any]:
    calls = calls if calls is not None else (500 if quick else 3000)
    with Receiver("live") as receiver, otlp_env(receiver.endpoint):
        callback = monitoring_callback(trace_every_n_steps=10, tracing=True)
        probe = _Probe(callback, calls, receiver.endpoint)
        trainer = make_trainer([callback, probe], max_epochs=1)
        trainer.fit(TensorRegressor(features=8, lr=0.01), train_dataloaders=tiny_loader(40))
    return {
        "name": "breakdown",
        "what": "µs per call of the parts of MonitoringCallback's step path, timed in a live fit",
        "config": {"calls_per_loop": calls, "loops": 7, "statistic": "median of loop means"},
        "us_per_call": probe.figures,
        "not_measured": probe.missing,
    }
