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

#: Gauges fed from what the LightningModule logs: metric suffix -> help text.
LOGGED_GAUGES: dict[str, str] = {
    "training_loss": "Last logged training loss.",
    "validation_loss": "Last logged validation loss.",
    "training_accuracy": "Last logged training accuracy (ratio).",
    "validation_accuracy": "Last logged validation accuracy (ratio).",
}

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
        return []  # registering must not run collect() before the run has started

    def collect(self) -> Iterator[Metric]:
        ns = self.namespace
        names = list(RANK_LABEL_NAMES)
        values = list(self.labels.values)

        def gauge(name: str, doc: str, value: Optional[float], unit: str = "") -> Iterable[Metric]:
            if value is None:
                return ()
            family = GaugeMetricFamily(f"{ns}_{name}", doc, labels=names, unit=unit)
            family.add_metric(values, float(value))
            return (family,)

        def counter(name: str, doc: str, value: int) -> Metric:
            family = CounterMetricFamily(f"{ns}_{name}", doc, labels=names)
            family.add_metric(values, value)
            return family

        for suffix, doc in LOGGED_GAUGES.items():
            yield from gauge(suffix, doc, self.logged.get(suffix))

        yield counter("samples_processed_total", "Training samples processed (graphs, events or rows).",
                      self.samples_total)
        yield counter("nodes_processed_total", "Nodes in processed training batches.", self.nodes_total)
        yield counter("edges_processed_total", "Edges (events) in processed training batches.", self.edges_total)
        yield counter("nonfinite_loss_total", "Training losses that were NaN or infinite.", self.nonfinite_losses)
        yield from gauge("graph_nodes", "Nodes in the last training batch.", self.graph_nodes)
        yield from gauge("graph_edges", "Edges (events) in the last training batch.", self.graph_edges)
        yield from gauge("samples_per_second", "Training throughput over the recent batches.",
                         self.samples_per_second)

        batch = HistogramMetricFamily(f"{ns}_batch_processing_seconds", "Wall time of one training batch.",
                                      labels=names)
        self.batch_seconds.add_to(batch, values)
        yield batch

        if self.inference_seconds:
            inference = HistogramMetricFamily(
                f"{ns}_inference_time_seconds",
                "Per-sample latency of validation, test and predict batches.",
                labels=names + ["stage"],
            )
            for stage, histogram in sorted(self.inference_seconds.items()):
                histogram.add_to(inference, values + [stage])
            yield inference

        yield from gauge("epoch_duration_seconds", "Wall time of the last finished training epoch.",
                         self.epoch_duration)
        if self.last_step_perf is not None:
            yield from gauge("last_step_timestamp_seconds", "Unix time at which the last training batch finished.",
                             self.last_step_perf + self._unix_offset)

        if self.model_figures is not None:
            parameters, trainable, memory = self.model_figures
            yield from gauge("model_parameters", "Parameters of the model.", parameters)
            yield from gauge("model_trainable_parameters", "Parameters that require gradients.", trainable)
            yield from gauge("model_memory_usage_bytes", "Bytes held by the model's parameters and buffers.",
                             memory)

        progress = self._read_progress()
        if progress is not None:
            yield from gauge("epoch", "Current training epoch (0-based).", progress[0])
            yield from gauge("global_step", "Optimizer steps taken so far.", progress[1])

        rates = self._read_learning_rates()
        if rates:
            lr = GaugeMetricFamily(f"{ns}_learning_rate", "Learning rate of each optimizer parameter group.",
                                   labels=names + ["optimizer", "param_group"])
            for optimizer, group, value in rates:
                lr.add_metric(values + [optimizer, group], value)
            yield lr

        if self.info:
            info = InfoMetricFamily(f"{ns}_training", "Model and library versions of this training run.",
                                    labels=names)
            info.add_metric(values, self.info)
            yield info

