"""OpenTelemetry spans for the phases of training: records on the step path, spans built after the fact."""

from dgdn_lightning_monitor.tracing.provider import TracingSetup, configure_tracing
from dgdn_lightning_monitor.tracing.records import BatchRecord
from dgdn_lightning_monitor.tracing.tracer import TrainingTracer

__all__ = ["BatchRecord", "TracingSetup", "TrainingTracer", "configure_tracing"]
