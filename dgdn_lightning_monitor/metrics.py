"""Training metrics as a Prometheus custom collector.

The training thread only updates plain Python attributes; :meth:`TrainingMetrics.collect` turns them into metric
families when ``/metrics`` is scraped. This keeps the per-step cost to a few attribute updates and keeps
``prometheus_client`` objects (and their locks) off the training step.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Callable, Optional

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from dgdn_lightning_monitor.graph_size import GraphSize
from dgdn_lightning_monitor.histogram import BATCH_SECONDS_BUCKETS, INFERENCE_SECONDS_BUCKETS, FastHistogram
from dgdn_lightning_monitor.labels import RANK_LABEL_NAMES, RankLabels

#: Every family, by name after the namespace: (type, help). The README's metrics table follows this list.
METRICS: dict[str, tuple[str, str]] = {
    "training_loss": ("gauge", "Last logged training loss."),
    "validation_loss": ("gauge", "Last logged validation loss."),
    "training_accuracy": ("gauge", "Last logged training accuracy (ratio)."),
    "validation_accuracy": ("gauge", "Last logged validation accuracy (ratio)."),
    "samples_processed_total": ("counter", "Training samples processed (graphs, events or rows)."),
    "nodes_processed_total": ("counter", "Nodes in processed training batches."),
    "edges_processed_total": ("counter", "Edges (events) in processed training batches."),
    "nonfinite_loss_total": ("counter", "Training losses that were NaN or infinite."),
    "graph_nodes": ("gauge", "Nodes in the last training batch."),
    "graph_edges": ("gauge", "Edges (events) in the last training batch."),
    "samples_per_second": ("gauge", "Training throughput over the recent batches."),
    "batch_processing_seconds": ("histogram", "Wall time of one training batch."),
    "inference_time_seconds": ("histogram", "Per-sample latency of validation, test and predict batches."),
    "epoch_duration_seconds": ("gauge", "Wall time of the last finished training epoch."),
    "last_step_timestamp_seconds": ("gauge", "Unix time at which the last training batch finished."),
    "model_parameters": ("gauge", "Parameters of the model."),
    "model_trainable_parameters": ("gauge", "Parameters that require gradients."),
    "model_memory_usage_bytes": ("gauge", "Bytes held by the model's parameters and buffers."),
    "epoch": ("gauge", "Current training epoch (0-based)."),
    "global_step": ("gauge", "Optimizer steps taken so far."),
    "learning_rate": ("gauge", "Learning rate of each optimizer parameter group."),
    "training": ("info", "Model and library versions of this training run."),
}
_FAMILY_TYPES = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "histogram": HistogramMetricFamily,
                 "info": InfoMetricFamily}

#: Gauges fed from what the LightningModule logs.
LOGGED_GAUGES: tuple[str, ...] = ("training_loss", "validation_loss", "training_accuracy", "validation_accuracy")

#: Stages whose batches count as inference, with their label value.
INFERENCE_STAGES = ("validate", "test", "predict")

LearningRates = list[tuple[str, str, float]]  # (optimizer, param_group, lr)


class TrainingMetrics:
    """Everything the callback measures, exported under ``namespace``.

    Args:
        namespace: metric name prefix, e.g. ``dgdn``.
        throughput_window: number of recent training batches over which ``samples_per_second`` is computed.

    Example::

        metrics = TrainingMetrics("dgdn")
        registry.register(metrics)
        metrics.observe_train_batch(0.012, time.perf_counter(), GraphSize(32, 640, 2048))
    """

    def __init__(self, namespace: str = "dgdn", throughput_window: int = 50) -> None:
        self.namespace = namespace
        self.labels = RankLabels.from_env()
        # Training batches.
        self.samples_total = 0
        self.nodes_total = 0
        self.edges_total = 0
        self.nonfinite_losses = 0
        self.graph_nodes: Optional[int] = None
        self.graph_edges: Optional[int] = None
        self.batch_seconds = FastHistogram(BATCH_SECONDS_BUCKETS)
        self._window: deque[tuple[float, int]] = deque(maxlen=max(2, throughput_window))
        self.last_step_perf: Optional[float] = None
        self.epoch_duration: Optional[float] = None
        # Evaluation batches, one histogram per stage (created when the stage first runs).
        self.inference_seconds: dict[str, FastHistogram] = {}
        # Logged values: metric suffix -> float.
        self.logged: dict[str, float] = {}
        # Model figures: (parameters, trainable parameters, bytes of parameters and buffers).
        self.model_figures: Optional[tuple[int, int, int]] = None
        self.info: dict[str, str] = {}
        # Progress and learning rates are read from the live Trainer at scrape time (not on every step); when
        # the run ends the last values are kept.
        self.progress_source: Optional[Callable[[], tuple[int, int]]] = None
        self.progress: Optional[tuple[int, int]] = None
        self.learning_rate_source: Optional[Callable[[], LearningRates]] = None
        self.learning_rates: LearningRates = []
        # perf_counter and time.time differ by a constant; computing it once converts step times to unix time.
        self._unix_offset = time.time() - time.perf_counter()

    # ----------------------------------------------------------------- updates (training thread)
    def observe_train_batch(
        self, seconds: float, end_perf: float, size: GraphSize, trace_id: Optional[str] = None
    ) -> None:
        """Fold one finished training batch in."""
        self.batch_seconds.observe(seconds, trace_id)
        samples, nodes, edges = size
        if samples is not None:
            self.samples_total += samples
        if nodes is not None:
            self.nodes_total += nodes
            self.graph_nodes = nodes
        if edges is not None:
            self.edges_total += edges
            self.graph_edges = edges
        self._window.append((end_perf, self.samples_total))
        self.last_step_perf = end_perf

    def observe_inference(self, stage: str, seconds: float, samples: Optional[int]) -> None:
        """Fold one finished validation/test/predict batch in, as per-sample latency."""
        histogram = self.inference_seconds.get(stage)
        if histogram is None:
            histogram = self.inference_seconds[stage] = FastHistogram(INFERENCE_SECONDS_BUCKETS)
        histogram.observe(seconds / samples if samples else seconds)

    def set_logged(self, suffix: str, value: float) -> None:
        self.logged[suffix] = value

    def freeze_live_values(self) -> None:
        """Keep the last progress and learning rates, and stop reading the Trainer (the run ended)."""
        self.progress = self._read_progress()
        self.learning_rates = self._read_learning_rates()
        self.progress_source = None
        self.learning_rate_source = None

    # ----------------------------------------------------------------- derived figures
    @property
    def samples_per_second(self) -> Optional[float]:
        window = tuple(self._window)
        if len(window) < 2:
            return None
        (t0, n0), (t1, n1) = window[0], window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def _read_progress(self) -> Optional[tuple[int, int]]:
        source = self.progress_source
        if source is None:
            return self.progress
        try:
            return source()
        except Exception:  # a Trainer being torn down must not break a scrape
            return self.progress

    def _read_learning_rates(self) -> LearningRates:
        source = self.learning_rate_source
        if source is None:
            return self.learning_rates
        try:
            return source()
        except Exception:
            return self.learning_rates

    # ----------------------------------------------------------------- exposition (scrape thread)
    def describe(self) -> list[Metric]:
        """Every family this collector can export, without samples: lets a registry refuse duplicates up front
        without running :meth:`collect` before the run has started."""
        ns = self.namespace
        families: list[Metric] = []
        for name, (kind, doc) in METRICS.items():
            family_type = _FAMILY_TYPES[kind]
            families.append(family_type(f"{ns}_{name}", doc, labels=()))
        return families

    def collect(self) -> Iterator[Metric]:
        ns = self.namespace
        names = list(RANK_LABEL_NAMES)
        values = list(self.labels.values)

        def gauge(name: str, value: Optional[float]) -> Iterable[Metric]:
            if value is None:
                return ()
            family = GaugeMetricFamily(f"{ns}_{name}", METRICS[name][1], labels=names)
            family.add_metric(values, float(value))
            return (family,)

        def counter(name: str, value: int) -> Metric:
            family = CounterMetricFamily(f"{ns}_{name}", METRICS[name][1], labels=names)
            family.add_metric(values, value)
            return family

        for suffix in LOGGED_GAUGES:
            yield from gauge(suffix, self.logged.get(suffix))

        yield counter("samples_processed_total", self.samples_total)
        yield counter("nodes_processed_total", self.nodes_total)
        yield counter("edges_processed_total", self.edges_total)
        yield counter("nonfinite_loss_total", self.nonfinite_losses)
        yield from gauge("graph_nodes", self.graph_nodes)
        yield from gauge("graph_edges", self.graph_edges)
        yield from gauge("samples_per_second", self.samples_per_second)

        batch = HistogramMetricFamily(f"{ns}_batch_processing_seconds", METRICS["batch_processing_seconds"][1],
                                      labels=names)
        self.batch_seconds.add_to(batch, values)
        yield batch

        if self.inference_seconds:
            inference = HistogramMetricFamily(f"{ns}_inference_time_seconds", METRICS["inference_time_seconds"][1],
                                              labels=names + ["stage"])
            for stage, histogram in sorted(self.inference_seconds.items()):
                histogram.add_to(inference, values + [stage])
            yield inference

        yield from gauge("epoch_duration_seconds", self.epoch_duration)
        if self.last_step_perf is not None:
            yield from gauge("last_step_timestamp_seconds", self.last_step_perf + self._unix_offset)

        if self.model_figures is not None:
            parameters, trainable, memory = self.model_figures
            yield from gauge("model_parameters", parameters)
            yield from gauge("model_trainable_parameters", trainable)
            yield from gauge("model_memory_usage_bytes", memory)

        progress = self._read_progress()
        if progress is not None:
            yield from gauge("epoch", progress[0])
            yield from gauge("global_step", progress[1])

        rates = self._read_learning_rates()
        if rates:
            lr = GaugeMetricFamily(f"{ns}_learning_rate", METRICS["learning_rate"][1],
                                   labels=names + ["optimizer", "param_group"])
            for optimizer, group, value in rates:
                lr.add_metric(values + [optimizer, group], value)
            yield lr

        if self.info:
            info = InfoMetricFamily(f"{ns}_training", METRICS["training"][1], labels=names)
            info.add_metric(values, self.info)
            yield info
