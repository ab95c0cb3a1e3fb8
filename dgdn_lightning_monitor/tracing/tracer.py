"""Turns epoch boundaries and :class:`BatchRecord`\\ s into a span tree.

One trace per training epoch::

    train_epoch
    ├── train_batch (sampled)          data_fetch, forward, backward, optimizer_step
    └── validation_epoch
        └── validation_batch (sampled)

Batch and phase spans are created after the batch finished, with the recorded start and end times, by a
background thread: the training thread only queues the record (building five spans costs about 100 µs of SDK
work). On CUDA a record waits (without blocking anyone) until its events completed, then its spans carry
``gpu.duration_ms``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Optional

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, Status, StatusCode

from dgdn_lightning_monitor.guards import WarnOnce, forget_threads_after_fork
from dgdn_lightning_monitor.scheduler import identity
from dgdn_lightning_monitor.tracing.provider import TracingSetup, configure_tracing
from dgdn_lightning_monitor.tracing.records import BatchRecord

log = logging.getLogger("dgdn_lightning_monitor.tracing")


Emit = Callable[[BatchRecord, Optional[Span], bool], None]


class SpanBuilder:
    """Turns queued batch records into spans on a background thread.

    Args:
        emit: ``(record, parent epoch span, with device times)`` -> None; runs on the builder thread.
        interval_s: how often the thread looks at the queue (spans are exported in batches anyway).
        max_queued: records waiting to be built, beyond which new ones are dropped (with one warning).
    """

    def __init__(self, emit: Emit, interval_s: float = 0.2, max_queued: int = 2048) -> None:
        self._emit = emit
        self.max_queued = max_queued
        self.dropped = 0
        self._interval_s = interval_s
        self._queue: deque[tuple[BatchRecord, Optional[Span]]] = deque()  # append/popleft are thread-safe
        self._waiting: list[tuple[BatchRecord, Optional[Span]]] = []  # records whose CUDA work is still running
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._warn = WarnOnce(log)
        forget_threads_after_fork(self)

    def after_fork_in_child(self) -> None:
        """The builder thread does not exist in a forked child: start afresh there, with an empty queue."""
        self._thread = None
        self._queue.clear()
        self._waiting = []

    def submit(self, record: BatchRecord, parent: Optional[Span]) -> None:
        if len(self._queue) >= self.max_queued:
            # Records come faster than spans can be built (tracing every step of a very fast loop): drop them
            # rather than let the queue, and the process, grow.
            self.dropped += 1
            self._warn(
                "dropped",
                "Traced batches arrive faster than their spans can be built; some are dropped. "
                "Raise trace_every_n_steps to trace fewer steps.",
            )
            return
        self._queue.append((record, parent))
        if self._thread is None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="dgdn-span-builder", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._drain(final=False)

    def _drain(self, final: bool) -> None:
        items, self._waiting = self._waiting, []
        while self._queue:
            items.append(self._queue.popleft())
        for record, parent in items:
            ready = record.device_ready()
            if not (ready or final):
                self._waiting.append((record, parent))
                continue
            try:
                self._emit(record, parent, ready)  # at the end, records still on the device get CPU times only
            except Exception as error:  # a span that cannot be built is dropped, never a crash
                self._warn("emit", "Could not build spans for a traced batch (%s); they are dropped.", error)

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop the thread and build what is left on the calling thread."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout_s)
            if thread.is_alive():
                return  # stuck inside the SDK: leave its queue alone rather than race it
        self._drain(final=True)


class TrainingTracer:
    """Builds the span tree of a run from epoch boundaries and sampled batch records.

    Args:
        enabled: ``None`` (auto), ``True`` or ``False``; see :func:`configure_tracing`.
        tracer_provider: a provider to use instead of choosing one (it stays the caller's).

    Example::

        tracer = TrainingTracer(enabled=None)
        tracer.start({"training.run_id": "abc"})
        tracer.start_epoch("train", 0, {"training.epoch": 0})
        tracer.add_batch(record)
        tracer.end_epoch("train")
        tracer.finish(None)
    """

    def __init__(self, enabled: Optional[bool] = None, tracer_provider: Optional[trace.TracerProvider] = None) -> None:
        self.enabled = enabled
        self.tracer_provider = tracer_provider
        self.setup: Optional[TracingSetup] = None
        self._attributes: dict[str, Any] = {}
        self._epochs: dict[str, Span] = {}
        self._trace_ids: dict[str, tuple[Span, str]] = {}
        self._builder = SpanBuilder(self._emit)
        # perf_counter_ns -> unix ns; spans need wall-clock times, the step path uses the monotonic clock.
        self._offset_ns = time.time_ns() - time.perf_counter_ns()

    def __getstate__(self) -> dict[str, Any]:
        """Configuration only: a copy in another process (``ddp_spawn``) chooses where its spans go itself."""
        if self.tracer_provider is not None:
            log.warning(
                "The tracer_provider cannot be sent to spawned processes; they choose where spans go "
                "from the OTEL_* variables instead."
            )
        return {"enabled": self.enabled}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    @property
    def active(self) -> bool:
        return self.setup is not None

    def start(self, attributes: dict[str, Any]) -> None:
        """Decide where spans go for this run; ``attributes`` go on every epoch span."""
        self._attributes = dict(attributes)
        self._offset_ns = time.time_ns() - time.perf_counter_ns()
        if self.setup is None:
            # The run id and the scheduler's job (SLURM, Kubernetes) name the process: resource attributes.
            resource = {**{k: v for k, v in attributes.items() if k == "training.run_id"}, **identity()}
            self.setup = configure_tracing(
                self.enabled, resource_attributes=resource, tracer_provider=self.tracer_provider
            )

    # ------------------------------------------------------------------ epochs
    def start_epoch(
        self, stage: str, epoch: int, attributes: dict[str, Any], remote_parent: Optional[SpanContext] = None
    ) -> None:
        """Open the ``stage`` epoch span; ``remote_parent`` (rank 0's ``train_epoch`` under DDP) becomes the
        parent of a span that has no local parent, so all ranks' spans of an epoch share one trace."""
        if self.setup is None:
            return
        parent = self._epochs.get("train") if stage != "train" else None
        if parent is None and remote_parent is not None and remote_parent.is_valid:
            parent = NonRecordingSpan(remote_parent)
        context = trace.set_span_in_context(parent) if parent is not None else Context()
        span = self.setup.tracer.start_span(
            f"{stage}_epoch",
            context=context,
            attributes={
                **self._attributes,
                "training.stage": stage,
                "training.epoch": epoch,
                **{f"training.{k}": v for k, v in attributes.items() if k != "epoch"},
            },
            start_time=self._ns(),  # the clock batch spans use, so children nest exactly
        )
        self.end_epoch(stage)
        self._epochs[stage] = span

    def end_epoch(self, stage: str) -> None:
        span = self._epochs.pop(stage, None)
        if span is not None:
            span.end(end_time=self._ns())

    def span_context(self, stage: str) -> Optional[SpanContext]:
        """The context of the open ``stage`` epoch span (to share with other ranks), or ``None``."""
        span = self._epochs.get(stage)
        return span.get_span_context() if span is not None else None

    def trace_id(self, stage: str) -> Optional[str]:
        """The trace id of the open ``stage`` epoch span, as 32 hex digits (for exemplars), or ``None``."""
        span = self._epochs.get(stage)
        if span is None:
            return None
        known = self._trace_ids.get(stage)
        if known is None or known[0] is not span:  # formatted once per epoch span, not per traced step
            context = span.get_span_context()
            known = self._trace_ids[stage] = (span, format(context.trace_id, "032x") if context.is_valid else "")
        return known[1] or None

    # ------------------------------------------------------------------ batches
    def add_batch(self, record: BatchRecord) -> None:
        """Queue a finished batch; its spans are built on the builder thread, under the open epoch span."""
        if self.setup is not None:
            self._builder.submit(record, self._epochs.get(record.stage))

    def _ns(self, perf_ns: Optional[int] = None) -> int:
        """Wall-clock ns of a ``perf_counter_ns`` reading (of now by default): spans need wall-clock times."""
        return (time.perf_counter_ns() if perf_ns is None else perf_ns) + self._offset_ns

    def _emit(self, record: BatchRecord, parent: Optional[Span], device_times: bool = True) -> None:
        setup = self.setup
        if setup is None:
            return
        tracer = setup.tracer
        context = trace.set_span_in_context(parent) if parent is not None else Context()
        samples, nodes, edges = record.size
        optional = {"training.rank": self._attributes.get("training.rank"), "training.batch_size": samples}
        optional.update({"graph.nodes": nodes, "graph.edges": edges})
        attributes: dict[str, Any] = {
            "training.epoch": record.epoch,
            "training.batch_index": record.batch_idx,
            "training.global_step": record.global_step,
            **{key: value for key, value in optional.items() if value is not None},
        }
        milliseconds = record.device_milliseconds() if device_times else {}
        if "batch" in milliseconds:
            attributes["gpu.duration_ms"] = milliseconds["batch"]
        batch = tracer.start_span(
            f"{record.stage}_batch", context=context, attributes=attributes, start_time=self._ns(record.start_ns)
        )
        batch_context = trace.set_span_in_context(batch)
        for name, start_ns, end_ns in record.phases():
            phase_attributes = {"gpu.duration_ms": milliseconds[name]} if name in milliseconds else None
            span = tracer.start_span(
                name, context=batch_context, start_time=self._ns(start_ns), attributes=phase_attributes
            )
            span.end(end_time=self._ns(end_ns))
        batch.end(end_time=self._ns(record.end_ns))

    # ------------------------------------------------------------------ end of run
    def finish(self, exception: Optional[BaseException]) -> None:
        """End open spans (with error status after an exception) and deliver spans within the flush bound."""
        if self.setup is None:
            return
        try:
            self._builder.close()
            for stage in ("predict", "test", "validation", "train"):  # children first
                span = self._epochs.get(stage)
                if span is not None and exception is not None:
                    span.record_exception(exception)
                    span.set_status(Status(StatusCode.ERROR, f"{type(exception).__name__}: {exception}"))
                self.end_epoch(stage)
        finally:
            setup, self.setup = self.setup, None
            setup.finish()
