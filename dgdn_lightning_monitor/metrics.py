"""Training metrics as a Prometheus custom collector.

The training thread only updates plain Python attributes; :meth:`TrainingMetrics.collect` turns them into metric
families when ``/metrics`` is scraped. This keeps the per-step cost to a few attribute updates and keeps
``prometheus_client`` objects (and their locks) off the training step.

The scrape itself runs in a thread of the training process and holds the GIL, so
:class:`~dgdn_lightning_monitor.server.MetricsServer` does not build families for these metrics: it calls
:meth:`TrainingMetrics.render`, which writes the same bytes as ``prometheus_client`` from strings pre-rendered per
namespace, rank label set and format, so that each sample line is one f-string.
"""

from __future__ import annotations

import re
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Callable, Optional

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.openmetrics.exposition import escape_label_name
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.utils import floatToGoString

from dgdn_lightning_monitor.graph_size import GraphSize
from dgdn_lightning_monitor.histogram import (
    BATCH_SECONDS_BUCKETS,
    INFERENCE_SECONDS_BUCKETS,
    FastHistogram,
    HistogramLines,
    escape_label_value,
    format_count,
)
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

#: Name escaping schemes a scrape can negotiate (``escaping=`` in its Accept header); :meth:`TrainingMetrics.render`
#: writes these two itself and hands any other to ``prometheus_client``.
UNDERSCORES = "underscores"
ALLOW_UTF8 = "allow-utf-8"
_LEGACY_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")

# Per thread: ids of the collectors that this thread's scrape renders itself (see TrainingMetrics.exported_directly).
_DIRECT = threading.local()

#: Pre-rendered label strings kept per layout (learning-rate groups, histogram series) before the cache is reset.
_MAX_CACHED_SERIES = 1024


def _escape_help(documentation: str, openmetrics: bool) -> str:
    escaped = documentation.replace("\\", "\\\\").replace("\n", "\\n")
    return escaped.replace('"', '\\"') if openmetrics else escaped


class _Layout:
    """What stays the same from scrape to scrape for one namespace, rank label set and output format: each family's
    ``# HELP``/``# TYPE`` lines and the start of each sample line up to its value.

    Args:
        namespace: the metric name prefix; a valid legacy metric name.
        labels: the rank labels on every series.
        openmetrics: OpenMetrics rather than the Prometheus text format 0.0.4.
        escaping: :data:`UNDERSCORES` or :data:`ALLOW_UTF8`.
    """

    def __init__(self, namespace: str, labels: RankLabels, openmetrics: bool, escaping: str) -> None:
        self.key = (namespace, labels)
        self.escaping = escaping
        self.rank_labels = dict(zip(RANK_LABEL_NAMES, labels.values))
        # OpenMetrics with underscore escaping writes sample names with label-name characters only (no colon).
        sample_prefix = namespace.replace(":", "_") if openmetrics and escaping == UNDERSCORES else namespace
        self.header: dict[str, str] = {}
        self.sample_name: dict[str, str] = {}
        for key, (kind, documentation) in METRICS.items():
            family = f"{namespace}_{key}"
            sample = f"{sample_prefix}_{key}"
            shown, shown_kind = family, kind
            if kind == "counter":
                # The family is named without "_total"; its sample and the text format's HELP/TYPE carry it.
                if family.endswith("_total"):
                    family = family[:-len("_total")]
                else:
                    sample += "_total"
                shown = family if openmetrics else family + "_total"
            elif kind == "info":
                sample += "_info"
                if not openmetrics:
                    shown, shown_kind = family + "_info", "gauge"
            self.header[key] = (f"# HELP {shown} {_escape_help(documentation, openmetrics)}\n"
                                f"# TYPE {shown} {shown_kind}\n")
            self.sample_name[key] = sample
        rank = self.label_string({})
        self.line = {key: f"{self.sample_name[key]}{{{rank}}} " for key, (kind, _) in METRICS.items()
                     if kind in ("gauge", "counter")}
        self._histograms: dict[tuple[str, Optional[str], tuple[str, ...]], HistogramLines] = {}
        self._learning_rates: dict[tuple[str, str], str] = {}
        self._info: Optional[tuple[tuple[tuple[str, str], ...], str]] = None

    def label_string(self, extra: Mapping[str, str]) -> str:
        """The rank labels and ``extra`` as written between the braces: sorted by name, values escaped."""
        labels = {**self.rank_labels, **extra}
        return ",".join(f'{escape_label_name(name, self.escaping)}="{escape_label_value(value)}"'
                        for name, value in sorted(labels.items()))

    def histogram(self, key: str, stage: Optional[str], bucket_labels: tuple[str, ...]) -> HistogramLines:
        """Line starts of one histogram series (``stage`` labels the inference histograms)."""
        cache_key = (key, stage, bucket_labels)
        lines = self._histograms.get(cache_key)
        if lines is None:
            name = self.sample_name[key]
            extra = {} if stage is None else {"stage": stage}
            buckets = [f"{name}_bucket{{{self.label_string({**extra, 'le': le})}}} " for le in bucket_labels]
            if float(bucket_labels[0]) >= 0:  # a histogram with a negative bucket has neither count nor sum
                plain = self.label_string(extra)
                lines = HistogramLines(buckets, f"{name}_count{{{plain}}} ", f"{name}_sum{{{plain}}} ")
            else:
                lines = HistogramLines(buckets, None, None)
            if len(self._histograms) >= _MAX_CACHED_SERIES:
                self._histograms.clear()
            self._histograms[cache_key] = lines
        return lines

    def learning_rate(self, optimizer: str, group: str) -> str:
        """Line start of one parameter group's learning rate."""
        start = self._learning_rates.get((optimizer, group))
        if start is None:
            labels = self.label_string({"optimizer": optimizer, "param_group": group})
            start = f"{self.sample_name['learning_rate']}{{{labels}}} "
            if len(self._learning_rates) >= _MAX_CACHED_SERIES:
                self._learning_rates.clear()
            self._learning_rates[(optimizer, group)] = start
        return start

    def info(self, info: dict[str, str]) -> str:
        """The info sample line; its labels are the rank labels overridden by ``info``."""
        key = tuple(info.items())
        cached = self._info
        if cached is None or cached[0] != key:
            cached = self._info = (key, f"{self.sample_name['training']}{{{self.label_string(info)}}} 1.0\n")
        return cached[1]


class _Families:
    """A collector that yields the families it was given (to have ``prometheus_client`` write just these)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


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
        # Pre-rendered exposition strings, per (openmetrics, escaping); each remembers its namespace and labels.
        self._layouts: dict[tuple[bool, str], _Layout] = {}

    # ----------------------------------------------------------------- updates (training thread)
    def observe_train_batch(
        self, seconds: float, end_perf: float, size: GraphSize, trace_id: Optional[str] = None
    ) -> None:
        """Fold one finished training batch in (runs on every step: kept to plain attribute updates)."""
        histogram = self.batch_seconds
        if trace_id is None:
            # FastHistogram.observe without the call: first bound >= value, Prometheus buckets are "less or equal".
            histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
            histogram.sum += seconds
        else:
            histogram.observe(seconds, trace_id)
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
        """The metric families, built from the current values; nothing in a thread whose scrape writes this
        collector itself (inside :meth:`exported_directly`)."""
        if id(self) in getattr(_DIRECT, "ids", ()):
            return
        yield from self._families()

    @contextmanager
    def exported_directly(self) -> Iterator[None]:
        """While open, :meth:`collect` yields nothing in the calling thread, and only there.

        A scrape that writes this collector with :meth:`render` opens it around the registry's own pass, so the
        registry's other collectors are written by ``prometheus_client`` and this one is not written twice.
        Other threads (a concurrent scrape, ``generate_latest`` from the training thread) still see every family.
        """
        ids = getattr(_DIRECT, "ids", None)
        if ids is None:
            ids = _DIRECT.ids = set()
        key = id(self)
        added = key not in ids
        ids.add(key)
        try:
            yield
        finally:
            if added:
                ids.discard(key)

    def render(self, openmetrics: bool = False, escaping: str = UNDERSCORES) -> str:
        """The exposition of this collector's families, byte for byte what ``prometheus_client`` writes for what
        :meth:`collect` yields: ``generate_latest`` (text format 0.0.4) or, with ``openmetrics``, the OpenMetrics
        ``generate_latest`` without its closing ``# EOF`` line.

        Args:
            openmetrics: write OpenMetrics (with exemplars on histogram buckets) instead of the text format.
            escaping: the name escaping scheme the scrape negotiated; schemes other than :data:`UNDERSCORES` and
                :data:`ALLOW_UTF8` are written by ``prometheus_client``.

        Example::

            text = metrics.render()  # "# HELP dgdn_samples_processed_total ..."
        """
        return "".join(header + samples for header, samples in self.render_families(openmetrics, escaping))

    def render_families(self, openmetrics: bool = False, escaping: str = UNDERSCORES) -> list[tuple[str, str]]:
        """:meth:`render`, one ``(header, samples)`` pair per family in :meth:`collect`'s order.

        ``header`` is the family's ``# HELP`` and ``# TYPE`` lines, ``samples`` its sample lines. Collectors of
        several ranks under one namespace give equal headers, so a server can merge their families into one each.
        """
        if escaping not in (UNDERSCORES, ALLOW_UTF8) or not _LEGACY_METRIC_NAME.match(self.namespace):
            return self._render_with_library(openmetrics, escaping)
        layout = self._layout(openmetrics, escaping)
        header, line = layout.header, layout.line
        families: list[tuple[str, str]] = []

        def gauge(key: str, value: Optional[float]) -> None:
            if value is not None:
                families.append((header[key], f"{line[key]}{floatToGoString(value)}\n"))

        logged = self.logged
        for suffix in LOGGED_GAUGES:
            gauge(suffix, logged.get(suffix))
        for key, count in (("samples_processed_total", self.samples_total), ("nodes_processed_total", self.nodes_total),
                           ("edges_processed_total", self.edges_total),
                           ("nonfinite_loss_total", self.nonfinite_losses)):
            families.append((header[key], f"{line[key]}{format_count(count)}\n"))
        gauge("graph_nodes", self.graph_nodes)
        gauge("graph_edges", self.graph_edges)
        gauge("samples_per_second", self.samples_per_second)

        batch = self.batch_seconds
        lines = layout.histogram("batch_processing_seconds", None, batch.bucket_labels)
        families.append((header["batch_processing_seconds"], batch.render(lines, openmetrics)))
        if self.inference_seconds:
            series = []
            for stage, histogram in sorted(self.inference_seconds.items()):
                lines = layout.histogram("inference_time_seconds", stage, histogram.bucket_labels)
                series.append(histogram.render(lines, openmetrics))
            families.append((header["inference_time_seconds"], "".join(series)))

        gauge("epoch_duration_seconds", self.epoch_duration)
        if self.last_step_perf is not None:
            gauge("last_step_timestamp_seconds", self.last_step_perf + self._unix_offset)
        if self.model_figures is not None:
            parameters, trainable, memory = self.model_figures
            gauge("model_parameters", parameters)
            gauge("model_trainable_parameters", trainable)
            gauge("model_memory_usage_bytes", memory)
        progress = self._read_progress()
        if progress is not None:
            gauge("epoch", progress[0])
            gauge("global_step", progress[1])
        rates = self._read_learning_rates()
        if rates:
            samples = "".join(f"{layout.learning_rate(optimizer, group)}{floatToGoString(value)}\n"
                              for optimizer, group, value in rates)
            families.append((header["learning_rate"], samples))
        if self.info:
            families.append((header["training"], layout.info(self.info)))
        return families

    def _layout(self, openmetrics: bool, escaping: str) -> _Layout:
        key = (self.namespace, self.labels)
        layout = self._layouts.get((openmetrics, escaping))
        if layout is None or layout.key != key:  # first scrape in this format, or new labels or namespace
            layout = self._layouts[(openmetrics, escaping)] = _Layout(self.namespace, self.labels, openmetrics,
                                                                      escaping)
        return layout

    def _render_with_library(self, openmetrics: bool, escaping: str) -> list[tuple[str, str]]:
        """:meth:`render_families` through ``prometheus_client``, for names and escapings written rarely."""
        families = []
        for family in self._families():
            if openmetrics:
                text = generate_openmetrics(_Families([family]), escaping=escaping).decode()
                text = text[:-len("# EOF\n")]
            else:
                text = generate_latest(_Families([family]), escaping=escaping).decode()
            lines = text.split("\n", 2)  # "# HELP ...", "# TYPE ...", then the samples
            families.append((f"{lines[0]}\n{lines[1]}\n", lines[2]))
        return families

    def _families(self) -> Iterator[Metric]:
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
