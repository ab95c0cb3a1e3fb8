"""Where spans go: an OpenTelemetry TracerProvider chosen the OpenTelemetry way, made safe for training.

Order of precedence:

1. ``tracing=False``: off.
2. A TracerProvider the application already installed globally: used as is (the application owns it).
3. ``OTEL_TRACES_EXPORTER``: ``none`` (off), ``console``, or ``otlp`` (OTLP over HTTP/protobuf).
4. ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, or ``tracing=True``: OTLP.
5. Nothing configured: OTLP to ``localhost:4318`` if a receiver answers there, else off (one log line).

An owned provider exports through the SDK's bounded queue from a background thread; the ``OTEL_BSP_*`` and
``OTEL_EXPORTER_OTLP_*`` variables win over our defaults (1 s export delay, 1 s request timeout). Failures are
counted and warned once (the exporter's own log says each message once); the final flush is waited for at most
``FLUSH_TIMEOUT_S``, so a collector that is down or hangs never slows or stalls training or its end.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from dgdn_lightning_monitor.compat import OTLP_EXPORTER_LOGGERS
from dgdn_lightning_monitor.guards import MonitorErrors, WarnOnce, describe

log = logging.getLogger("dgdn_lightning_monitor.tracing")

DEFAULT_SERVICE_NAME = "dgdn-training"
LOCAL_OTLP_HOST, LOCAL_OTLP_PORT = "localhost", 4318
PROBE_TIMEOUT_S = 0.2  # how long the auto mode waits for the local receiver to accept a connection
EXPORT_TIMEOUT_S = 1.0  # per OTLP request, unless OTEL_EXPORTER_OTLP_*TIMEOUT says otherwise
SCHEDULE_DELAY_MS = 1000  # between two exports, unless OTEL_BSP_SCHEDULE_DELAY says otherwise
FLUSH_TIMEOUT_S = 2.0  # the final flush, at the end of a run
INSTRUMENTATION_NAME = "dgdn_lightning_monitor"


class ReportingExporter(SpanExporter):
    """Wraps an exporter so that failures are counted (as ``tracing`` errors), the first is warned, and none
    raises into the SDK's worker thread; the spans of each export are counted as ``delivered`` or ``dropped``
    by the exporter's own result.

    Args:
        exporter: the exporter that sends spans.
        destination: where it sends them, for the warning.
        errors: where failures are counted.
    """

    def __init__(self, exporter: SpanExporter, destination: str, errors: Optional[MonitorErrors] = None) -> None:
        self.exporter = exporter
        self.destination = destination
        self.errors = errors if errors is not None else MonitorErrors(log)
        self.delivered = self.dropped = 0  # spans, by the result of the export that carried them

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.exporter.export(spans)
        except Exception as error:  # pragma: no cover - exporters return FAILURE, but never let one escape
            result, reason = SpanExportResult.FAILURE, describe(error)
        else:
            reason = "the receiver did not accept them"
        if result is SpanExportResult.SUCCESS:
            self.delivered += len(spans)
        else:
            self.dropped += len(spans)
            self.errors.report(
                "tracing",
                "Could not export spans to %s (%s); spans are dropped, training continues.",
                self.destination,
                reason,
            )
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class GivenIds(RandomIdGenerator):
    """Random ids, except for the next span the calling thread starts after :meth:`give` (a root span whose ids
    every rank derives alike)."""

    def __init__(self) -> None:
        self._given = threading.local()  # the span builder thread starts spans at the same time

    def give(self, trace_id: int, span_id: int) -> None:
        self._given.ids = (trace_id, span_id)

    def generate_trace_id(self) -> int:
        ids = getattr(self._given, "ids", None)
        return ids[0] if ids else super().generate_trace_id()

    def generate_span_id(self) -> int:  # the SDK asks for it after the trace id: the given pair is used up
        ids, self._given.ids = getattr(self._given, "ids", None), None
        return ids[1] if ids else super().generate_span_id()


@dataclass
class TracingSetup:
    """A tracer (where spans are started), one line saying where spans go, and how to finish with it: the
    ``provider`` this setup made (shut down at the end) with its ``exporter`` and id generator ``ids``, or a
    ``borrowed`` one of the application (flushed at the end, never shut down)."""

    tracer: trace.Tracer
    description: str
    provider: Optional[TracerProvider] = None
    exporter: Optional[ReportingExporter] = None
    borrowed: Optional[trace.TracerProvider] = None
    ids: Optional[GivenIds] = None
    flushed: Optional[bool] = None  # whether the final flush finished in time; None before it
    _filter: Callable[[logging.LogRecord], bool] = field(default_factory=lambda: _first_of_each_message())

    def finish(self) -> bool:
        """Flush and shut down an owned provider within ``FLUSH_TIMEOUT_S``; flush only one we do not own.

        Returns:
            True when everything was flushed in time.
        """
        provider, borrowed = self.provider, self.borrowed

        def target() -> None:
            try:
                if provider is not None:
                    provider.force_flush()
                    provider.shutdown()
                elif borrowed is not None and hasattr(borrowed, "force_flush"):
                    borrowed.force_flush()
            except Exception as error:  # pragma: no cover - shutdown of a broken exporter
                log.debug("Trace flush failed: %s", error)

        worker = threading.Thread(target=target, name="dgdn-trace-flush", daemon=True)
        worker.start()
        worker.join(FLUSH_TIMEOUT_S)
        finished = self.flushed = not worker.is_alive()
        if not finished:  # counted; warned unless a failed export already was (one line about a collector is enough)
            errors = self.exporter.errors if self.exporter is not None else MonitorErrors(log)
            message = "Spans were not delivered within %.1f s at the end of the run; the rest are dropped."
            errors.report("tracing", message, FLUSH_TIMEOUT_S)
        for name in OTLP_EXPORTER_LOGGERS:
            logging.getLogger(name).removeFilter(self._filter)
        return finished

    def delivery(self) -> str:
        """What became of the spans, from the exporter's own results: delivered, dropped, or none sent."""
        exporter = self.exporter
        if exporter is None:  # the application's provider: its own exporters know
            return f"spans handed to {self.description} (its exporters tell whether they arrived)"
        destination, delivered, dropped = exporter.destination, exporter.delivered, exporter.dropped
        if dropped:
            said = f"spans dropped: {destination} did not accept {dropped} of {delivered + dropped}"
        elif delivered:
            said = f"{delivered} spans delivered to {destination}"
        else:
            said = f"no spans sent to {destination}"
        if self.flushed is False:
            said += f"; those still queued after the {FLUSH_TIMEOUT_S:g} s flush bound were dropped"
        return said


def _first_of_each_message() -> Callable[[logging.LogRecord], bool]:
    """A log filter that lets the first record of each message (format string, per logger) through, not repeats."""
    first = WarnOnce(log)
    return lambda record: first((record.name, record.msg), None)


def _receiver_answers() -> bool:
    """Whether something accepts TCP connections on the local OTLP port (a cheap probe for a collector)."""
    try:
        with socket.create_connection((LOCAL_OTLP_HOST, LOCAL_OTLP_PORT), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _otlp_exporter(endpoint: Optional[str]) -> tuple[SpanExporter, str]:
    """An OTLP/HTTP exporter and where it sends: ``endpoint`` if given, else the OpenTelemetry variables (the
    traces endpoint as is, or the base endpoint plus ``/v1/traces``), else the local receiver."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    env_timeout = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=None if env_timeout else EXPORT_TIMEOUT_S)
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or f"http://{LOCAL_OTLP_HOST}:{LOCAL_OTLP_PORT}"
    destination = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or f"{base.rstrip('/')}/v1/traces"
    return exporter, destination


def configure_tracing(
    enabled: Optional[bool],
    resource_attributes: Optional[dict[str, object]] = None,
    tracer_provider: Optional[trace.TracerProvider] = None,
    errors: Optional[MonitorErrors] = None,
) -> Optional[TracingSetup]:
    """Choose where spans go (see the module docstring); ``None`` means tracing is off.

    Args:
        enabled: ``None`` for auto, ``True`` to export even if no receiver answers yet, ``False`` for off.
        resource_attributes: extra resource attributes (e.g. the run id); ``service.name`` is
            ``DEFAULT_SERVICE_NAME`` unless ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES`` name one.
        tracer_provider: use this provider (it stays the caller's: flushed at the end, never shut down).
        errors: where export failures are counted.
    """
    if enabled is False:
        return None
    given = tracer_provider or trace.get_tracer_provider()
    if not isinstance(given, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):  # the application's own
        return TracingSetup(given.get_tracer(INSTRUMENTATION_NAME), "the application's TracerProvider", borrowed=given)

    choice = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower().split(",")[0].strip()
    if choice == "none" and enabled is not True:
        log.info("Tracing is off (OTEL_TRACES_EXPORTER=none).")
        return None
    if choice not in ("", "otlp", "none", "console"):
        log.warning(
            "OTEL_TRACES_EXPORTER=%s is not supported here (use otlp, console or none); tracing is off.", choice
        )
        return None
    endpoint_set = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    exporter: SpanExporter
    if choice == "console":
        exporter, destination = ConsoleSpanExporter(), "the console"
    elif choice != "none" and (choice == "otlp" or endpoint_set or enabled is True):
        exporter, destination = _otlp_exporter(None)
    elif _receiver_answers():
        exporter, destination = _otlp_exporter(f"http://{LOCAL_OTLP_HOST}:{LOCAL_OTLP_PORT}/v1/traces")
    else:
        log.info(
            "Tracing is off: no OTLP receiver answers on %s:%s. Start the stack (make stack) or set "
            "OTEL_EXPORTER_OTLP_ENDPOINT to send spans to Jaeger.",
            LOCAL_OTLP_HOST,
            LOCAL_OTLP_PORT,
        )
        return None

    reporting = ReportingExporter(exporter, destination, errors)
    # Resource.create merges OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES in; our service name is the default only.
    resource = Resource.create(dict(resource_attributes or {}))  # type: ignore[arg-type]
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    ids = GivenIds()
    provider = TracerProvider(resource=resource, id_generator=ids)
    # The SDK's queue bound (2048 spans, more are dropped unless OTEL_BSP_MAX_QUEUE_SIZE says otherwise) with a
    # shorter delay than its 5 s unless OTEL_BSP_SCHEDULE_DELAY is set. (The SDK does not use an export timeout
    # of its processor; the exporter's request timeout bounds an export.)
    delay = None if os.environ.get("OTEL_BSP_SCHEDULE_DELAY") else SCHEDULE_DELAY_MS
    processor = BatchSpanProcessor(reporting, schedule_delay_millis=delay)
    provider.add_span_processor(processor)
    setup = TracingSetup(
        provider.get_tracer(INSTRUMENTATION_NAME), f"spans to {destination}", provider, reporting, ids=ids
    )
    for name in OTLP_EXPORTER_LOGGERS:  # the exporter logs each failed request and retry: each message once
        logging.getLogger(name).addFilter(setup._filter)
    log.info("Tracing: %s", setup.description)
    return setup
