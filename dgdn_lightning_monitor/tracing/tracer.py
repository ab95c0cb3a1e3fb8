"""Turns epoch boundaries and :class:`~dgdn_lightning_monitor.tracing.BatchRecord`\\ s into a span tree.

One trace per training epoch::

    train_epoch
    ├── train_batch (sampled)          data_fetch, forward, backward, optimizer_step
    └── validation_epoch
        └── validation_batch (sampled)

Batch and phase spans are built after the batch, with its recorded times, by a background thread: the training
thread only queues the record (five spans cost about 100 µs of SDK work). On CUDA a record is queued once the step
statistics' poll found its events completed, and its spans carry ``gpu.duration_ms``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Optional

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, Status, StatusCode, TraceFlags

from dgdn_lightning_monitor.guards import MonitorErrors, check_optional, describe, forget_threads_after_fork
from dgdn_lightning_monitor.scheduler import identity
from dgdn_lightning_monitor.tracing.provider import TracingSetup, configure_tracing
from dgdn_lightning_monitor.tracing.records import BatchRecord
from dgdn_lightning_monitor.vocabulary import SPAN_STAGES

log = logging.getLogger("dgdn_lightning_monitor.tracing")


Emit = Callable[[BatchRecord], None]


def epoch_ids(key: str, epoch: int) -> tuple[int, int]:
    """The trace id and root span id of one training epoch, derived from ``key`` (shared by the ranks of a run):
    every rank computes the same pair, so their epoch spans join one trace without an exchange."""
    digest = hashlib.sha256(f"{key}/train/{epoch}".encode()).digest()
    return int.from_bytes(digest[:16], "big") or 1, int.from_bytes(digest[16:24], "big") or 1


class SpanBuilder:
    """Turns queued batch records into spans on a background thread.

    Args:
        emit: ``record -> None``; runs on the builder thread.
        interval_s: how often the thread looks at the queue (spans are exported in batches anyway).
        max_queued: records waiting to be built, beyond which new ones are dropped (with one warning).
        errors: where dropped records and spans that could not be built are counted (as ``tracing``).
    """

    def __init__(
        self, emit: Emit, interval_s: float = 0.2, max_queued: int = 2048, errors: Optional[MonitorErrors] = None
    ) -> None:
        self._emit = emit
        self.max_queued = max_queued
        self._interval_s = interval_s
        self._queue: deque[BatchRecord] = deque()  # append/popleft are thread-safe
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.errors = errors if errors is not None else MonitorErrors(log)
        forget_threads_after_fork(self)

    def after_fork_in_child(self) -> None:
        """The builder thread does not exist in a forked child: start afresh there, with an empty queue."""
        self._thread = None
        self._queue.clear()

    def submit(self, record: BatchRecord) -> None:
        if len(self._queue) >= self.max_queued:
            # Records come faster than spans can be built (tracing every step of a very fast loop): drop them
            # rather than let the queue, and the process, grow.
            self.errors.report(
                "tracing",
                "Traced batches arrive faster than their spans can be built; some are dropped. "
                "Raise trace_every_n_steps to trace fewer steps.",
            )
            return
        self._queue.append(record)
        if self._thread is None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="dgdn-span-builder", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._drain()

    def _drain(self) -> None:
        while self._queue:
            record = self._queue.popleft()
            try:
                self._emit(record)
            except Exception as error:  # a span that cannot be built is dropped, never a crash
                self.errors.report(
                    "tracing", "Could not build spans for a traced batch (%s); they are dropped.", describe(error)
                )

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop the thread and build what is left on the calling thread."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout_s)
            if thread.is_alive():
                return  # stuck inside the SDK: leave its queue alone rather than race it
        self._drain()


class TrainingTracer:
    """Builds the span tree of a run from epoch boundaries and sampled batch records.

    Args:
        enabled: ``None`` (auto), ``True`` or ``False``; see :func:`configure_tracing`.
        tracer_provider: a provider to use instead of choosing one (it stays the caller's).
        errors: where tracing failures are counted (as ``tracing``).

    Example::

        tracer = TrainingTracer(enabled=None)
        tracer.start({"training.run_id": "abc"})
        tracer.start_epoch("train", 0)
        tracer.add_batch(record)
        tracer.end_epoch("train")
        tracer.finish(None)
    """

    def __init__(
        self,
        enabled: Optional[bool] = None,
        tracer_provider: Optional[trace.TracerProvider] = None,
        errors: Optional[MonitorErrors] = None,
    ) -> None:
        self.enabled = check_optional("tracing", enabled, bool, "True, False")
        check_optional("tracer_provider", tracer_provider, trace.TracerProvider, "an opentelemetry TracerProvider")
        self.tracer_provider = tracer_provider
        self.errors = errors if errors is not None else MonitorErrors(log)
        self.setup: Optional[TracingSetup] = None
        self.description: Optional[str] = None  # where the last run's spans went; None while tracing was off
        self.delivery: Optional[str] = None  # what became of them, once the run ended; None: none were sent
        self._attributes: dict[str, Any] = {}
        self._share: Optional[str] = None
        self._epochs: dict[str, Span] = {}
        self._trace_ids: dict[str, str] = {}  # of the open epoch spans: formatted once per epoch, not per step
        self._builder = SpanBuilder(self._emit, errors=self.errors)
        # perf_counter_ns -> unix ns; spans need wall-clock times, the step path uses the monotonic clock.
        self._offset_ns = time.time_ns() - time.perf_counter_ns()

    def __getstate__(self) -> dict[str, Any]:
        """Configuration only: a copy in another process (``ddp_spawn``) chooses where its spans go itself."""
        if self.tracer_provider is not None:
            log.warning("The tracer_provider cannot be sent to spawned processes; they follow the OTEL_* variables.")
        return {"enabled": self.enabled, "errors": self.errors}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def start(self, attributes: dict[str, Any], share: Optional[str] = None) -> None:
        """Decide where spans go for this run; ``attributes`` go on every epoch span.

        Args:
            attributes: attributes of every epoch span (``training.rank`` among them).
            share: under DDP, a key every rank of the run shares: each training epoch is then one trace across the
                ranks (see :func:`~dgdn_lightning_monitor.tracing.tracer.epoch_ids`), rooted at rank 0's
                ``train_epoch`` span.
        """
        self._attributes, self._share = dict(attributes), share
        self._offset_ns = time.time_ns() - time.perf_counter_ns()
        if self.setup is None:
            # The run id and the scheduler's job (SLURM, Kubernetes) name the process: resource attributes.
            resource = {**{k: v for k, v in attributes.items() if k == "training.run_id"}, **identity()}
            self.setup = configure_tracing(
                self.enabled, resource_attributes=resource, tracer_provider=self.tracer_provider, errors=self.errors
            )
        self.description = self.setup.description if self.setup is not None else None
        self.delivery = None

    # ------------------------------------------------------------------ epochs
    def start_epoch(self, stage: str, epoch: int) -> None:
        """Open the ``stage`` epoch span: an evaluation epoch under the open ``train_epoch``, if any; under DDP a
        ``train_epoch`` in its epoch's shared trace (rank 0's is its root, the others' are its children)."""
        setup = self.setup
        if setup is None:
            return
        parent = self._epochs.get("train") if stage != "train" else None
        given = epoch_ids(self._share, epoch) if stage == "train" and self._share is not None else None
        if given is not None and self._attributes.get("training.rank") == 0 and setup.ids is not None:
            setup.ids.give(*given)  # rank 0's span is the root of its epoch's trace, with the derived ids
        elif given is not None:  # the others (all ranks when the provider is not ours) are children of those ids
            parent = NonRecordingSpan(SpanContext(*given, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
        context = trace.set_span_in_context(parent) if parent is not None else Context()
        attributes = {**self._attributes, "training.stage": stage, "training.epoch": epoch}
        start = self._ns()  # the clock batch spans use, so children nest exactly
        span = setup.tracer.start_span(f"{stage}_epoch", context, attributes=attributes, start_time=start)
        self.end_epoch(stage)
        self._epochs[stage] = span
        span_context = span.get_span_context()
        if span_context.is_valid:
            self._trace_ids[stage] = format(span_context.trace_id, "032x")

    def end_epoch(self, stage: str) -> None:
        span = self._epochs.pop(stage, None)
        self._trace_ids.pop(stage, None)
        if span is not None:
            span.end(end_time=self._ns())

    def trace_id(self, stage: str) -> Optional[str]:
        """The trace id of the open ``stage`` epoch span, as 32 hex digits (for exemplars), or ``None``."""
        return self._trace_ids.get(stage)

    # ------------------------------------------------------------------ batches
    def epoch_span(self, stage: str) -> Optional[Span]:
        """The open ``stage`` epoch span (the parent of that stage's batch spans), or ``None``."""
        return self._epochs.get(stage)

    def add_batch(self, record: BatchRecord) -> None:
        """Queue a finished batch whose CUDA events (if any) completed; its spans are built on the builder thread,
        under ``record.parent``."""
        if self.setup is not None:
            try:
                self._builder.submit(record)
            except Exception as error:  # e.g. no thread can be started: the spans of this batch are lost
                self.errors.report(
                    "tracing", "Could not queue a traced batch (%s); its spans are dropped.", describe(error)
                )

    def _ns(self, perf_ns: Optional[int] = None) -> int:
        """Wall-clock ns of a ``perf_counter_ns`` reading (of now by default): spans need wall-clock times."""
        return (time.perf_counter_ns() if perf_ns is None else perf_ns) + self._offset_ns

    def _emit(self, record: BatchRecord) -> None:
        setup = self.setup
        if setup is None:
            return
        tracer = setup.tracer
        context = trace.set_span_in_context(record.parent) if record.parent is not None else Context()
        samples, nodes, edges = record.size
        optional = {"training.rank": self._attributes.get("training.rank"), "training.batch_size": samples}
        optional.update({"graph.nodes": nodes, "graph.edges": edges})
        attributes: dict[str, Any] = {
            "training.epoch": record.epoch,
            "training.batch_index": record.batch_idx,
            "training.global_step": record.global_step,
            **{key: value for key, value in optional.items() if value is not None},
        }
        milliseconds = record.device_milliseconds()
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
            for stage in reversed(SPAN_STAGES.values()):  # children first
                span = self._epochs.get(stage)
                if span is not None and exception is not None:
                    span.record_exception(exception)
                    span.set_status(Status(StatusCode.ERROR, describe(exception)))
                self.end_epoch(stage)
        finally:
            setup, self.setup = self.setup, None
            setup.finish()
            self.delivery = setup.delivery()
