"""Training metrics as a Prometheus custom collector.

The training thread only updates plain Python attributes; :meth:`TrainingMetrics.collect` turns them into metric
families when ``/metrics`` is scraped, and ``prometheus_client`` writes them. This keeps the per-step cost to a few
attribute updates and keeps ``prometheus_client`` objects (and their locks) off the training step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import add
from typing import Any, NamedTuple, Optional

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from dgdn_lightning_monitor.bottleneck import CAUSES, BottleneckJudge, Verdict
from dgdn_lightning_monitor.catalogue import TRAINING_FAMILIES
from dgdn_lightning_monitor.graph_size import GraphSize, HopCounts
from dgdn_lightning_monitor.guards import MonitorErrors
from dgdn_lightning_monitor.histogram import (
    BATCH_SECONDS_BUCKETS,
    INFERENCE_SECONDS_BUCKETS,
    PHASE_SECONDS_BUCKETS,
    FastHistogram,
)
from dgdn_lightning_monitor.labels import RANK_LABEL_NAMES, RankLabels
from dgdn_lightning_monitor.model_info import LearningRates, ModelFigures, learning_rates
from dgdn_lightning_monitor.outcome import OUTCOMES, RUNNING
from dgdn_lightning_monitor.time_ledger import CATEGORIES, COMPUTE, TimeLedger
from dgdn_lightning_monitor.vocabulary import LOGGED_GAUGES, PHASES, PROGRESS_UNITS, STAGES
from dgdn_lightning_monitor.watchdog import ProgressIntervals

#: Every family of this collector by name after the namespace, with its type and help (from the catalogue).
METRICS: dict[str, tuple[str, str]] = {family.name: (family.type, family.help) for family in TRAINING_FAMILIES}
_FAMILY_TYPES = {
    "gauge": GaugeMetricFamily,
    "counter": CounterMetricFamily,
    "histogram": HistogramMetricFamily,
    "info": InfoMetricFamily,
}


def _add_per_hop(totals: tuple[int, ...], counts: Optional[Sequence[int]]) -> tuple[int, ...]:
    """``totals`` plus ``counts``, hop by hop (a new tuple: a scrape reads whole tuples, never one half-updated)."""
    if counts is None:
        return totals
    if len(counts) > len(totals):
        totals += (0,) * (len(counts) - len(totals))
    elif len(counts) < len(totals):
        counts = (*counts, *(0,) * (len(totals) - len(counts)))
    return tuple(map(add, totals, counts))


@dataclass(frozen=True)
class RunTotals:
    """What bounds a run, read once when it starts (``on_train_start`` of a fit, the evaluation stage's start
    otherwise): the basis of ``<namespace>_progress_ratio`` and ``<namespace>_eta_seconds``.

    Args:
        stage: ``train`` for a fit, else the evaluation run's stage (``validate``, ``test``, ``predict``).
        start: ``time.perf_counter()`` when the run started.
        steps: a fit's optimizer steps in all (``trainer.estimated_stepping_batches``), ``None`` when unbounded.
        accumulate: training batches per optimizer step.
        time_left: seconds ``max_time`` (Lightning's ``Timer``) left the fit at ``start``, ``None`` without one.
        duration: the ``Timer``'s whole duration (a resumed fit has used part of it).
        batches: an evaluation run's batches in all, ``None`` when its loaders have no length.
    """

    stage: str
    start: float
    steps: Optional[int] = None
    accumulate: int = 1
    time_left: Optional[float] = None
    duration: Optional[float] = None
    batches: Optional[int] = None


class _Validations(NamedTuple):
    """The validation passes of the current fit, replaced whole at each pass's end (a scrape reads one tuple)."""

    passes: int = 0
    seconds: float = 0.0
    first_at: int = 0  # training batches of the fit before the first pass, and before the last
    last_at: int = 0
    recent: tuple[tuple[float, float], ...] = ()  # (start, end) of the last passes, to take out of the step rate


class TimeReport(NamedTuple):
    """Where the time went (:meth:`TrainingMetrics.time_report`)."""

    seconds: dict[str, float]  #: per category of :data:`~dgdn_lightning_monitor.time_ledger.CATEGORIES`
    goodput_ratio: float  #: the run's steps' compute over its wall time
    verdict: Verdict  #: the bottleneck judge's verdict


class TrainingMetrics:
    """Everything the callback measures, exported under ``namespace``. The parts tell it what happened through its
    methods (training thread); :meth:`collect` reads it (scrape thread).

    Args:
        namespace: metric name prefix, e.g. ``dgdn``.
        throughput_window: number of recent training batches over which ``samples_per_second`` is computed.
        errors: the monitor's error counts, exported as ``<namespace>_monitor_errors_total`` (the callback's, which
            every part reports to); by default a new one.

    Example::

        metrics = TrainingMetrics("dgdn")
        registry.register(metrics)
        metrics.observe_train_batch(0.012, time.perf_counter(), GraphSize(32, 640, 2048))
    """

    def __init__(
        self, namespace: str = "dgdn", throughput_window: int = 50, errors: Optional[MonitorErrors] = None
    ) -> None:
        self.namespace = namespace
        self.labels = RankLabels()  # a single process until the callback's setup knows the Trainer's ranks
        self.errors = errors if errors is not None else MonitorErrors(logging.getLogger("dgdn_lightning_monitor"))
        # Training batches.
        self.samples_total = 0
        self.nodes_total = 0
        self.edges_total = 0
        self.nonfinite_losses = 0
        # Per hop (index), nodes and edges drawn by a neighbour sampler.
        self.sampled_nodes: tuple[int, ...] = ()
        self.sampled_edges: tuple[int, ...] = ()
        self.nonfinite_streak = 0
        # The run's own loss history, for alerts that hold at any loss scale (reset when a run sets up).
        self.loss_range: Optional[tuple[float, float]] = None  # (lowest, highest) finite training loss
        self.best_validation_loss: Optional[float] = None
        self.evaluations_since_best: Optional[int] = None
        self.graph_nodes: Optional[int] = None
        self.graph_edges: Optional[int] = None
        # The largest training batch that completed (OOM forensics): by nodes for graphs, by samples otherwise.
        self.largest_batch: Optional[GraphSize] = None
        self.largest_weight = 0
        self.batch_seconds = FastHistogram(BATCH_SECONDS_BUCKETS)
        self.phase_seconds = {phase: FastHistogram(PHASE_SECONDS_BUCKETS) for phase in PHASES}
        # Host phase times of traced steps for summary(): totals without each run's warm-up step, and the last
        # warm-up step's own figures (reported only while nothing else was traced).
        self.phase_totals: dict[str, float] = {}
        self.phase_steps = 0
        self.warm_up_phases: dict[str, float] = {}
        self._window: deque[tuple[float, int]] = deque(maxlen=max(2, throughput_window))
        self.last_step_perf: Optional[float] = None
        # Progress in any stage (liveness), read at scrape time: a training step is told by last_step_perf and
        # counted by batch_seconds; every other unit (evaluation or sanity batch, checkpoint save) here.
        self.last_unit_perf: Optional[float] = None
        self.progress_counts: dict[str, int] = dict.fromkeys(PROGRESS_UNITS, 0)
        # The intervals that followed each unit's progress within a stage, which the stall watchdog learns from:
        # the unit of the last progress since the current stage began (None before its first) takes the next one.
        self.intervals = {unit: ProgressIntervals(unit) for unit in PROGRESS_UNITS}
        self._train_intervals = self.intervals["train"]
        self.last_unit: Optional[ProgressIntervals] = None
        self._last_event_perf = 0.0
        # () -> {stage: seconds} of the stall watchdog's thresholds in force, or None when it is off; at scrape time.
        self.stall_thresholds: Optional[Callable[[], Mapping[str, float]]] = None
        self.run_start_perf: Optional[float] = None
        self.stage: Optional[str] = None
        self.stage_since = 0.0
        self.stage_seconds: dict[str, float] = {}
        self._stage_lock = threading.Lock()  # stage changes (not per step) against a scrape: a counter never drops
        self.stall_dumps = 0
        self.ooms = 0
        # () -> (nodes, edges) of the largest batch estimated to fit the device, or None; called at scrape time.
        self.batch_capacity: Optional[Callable[[], Optional[tuple[float, float]]]] = None
        self.epoch_duration: Optional[float] = None
        # Dicts the scrape thread iterates are replaced, never grown, by the training thread (see set_logged).
        # Evaluation batches, one histogram per stage (created when the stage first runs).
        self.inference_seconds: dict[str, FastHistogram] = {}
        # Logged values: (metric suffix, dataloader index or None for a single loader) -> float.
        self.logged: dict[tuple[str, Optional[str]], float] = {}
        self.model_figures: Optional[ModelFigures] = None
        self.info: dict[str, str] = {}
        # (outcome, exception class) from dgdn_lightning_monitor.outcome; None before the first set-up.
        self.outcome: Optional[tuple[str, str]] = None
        # Why a scheduler terminated the run (dgdn_lightning_monitor.scheduler.termination_reason), else "".
        self.outcome_reason = ""
        # Progress and learning rates are read from the live Trainer at scrape time (not on every step); when
        # the run ends the last values are kept.
        self._trainer: Optional[Any] = None
        self.progress: Optional[tuple[int, int]] = None
        self.learning_rates: LearningRates = []
        # perf_counter and time.time differ by a constant; computing it once converts step times to unix time.
        self._unix_offset = time.time() - time.perf_counter()
        # Progress and ETA of the current run, computed at scrape time from its totals (read once at its start),
        # the Trainer's step, the throughput window and the fit's validation passes (recorded at stage changes).
        self.run_totals: Optional[RunTotals] = None
        self._totals_base = 0  # training batches (a fit) or the stage's batches (evaluation) before the run
        self._validations = _Validations()
        self._final_progress: Optional[tuple[str, float]] = None  # (stage, ratio) kept when the run ended
        # Where the time goes (watch_time): the run's ledger and judge, the earlier runs' totals, the last report.
        self._time_source: Optional[tuple[TimeLedger, BottleneckJudge, Callable[[], Optional[float]], Any, Any]] = None
        self._time_base: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
        self._time_last: Optional[TimeReport] = None
        self._time_lock = threading.Lock()  # the judge's evaluations (scrapes, summary) one at a time

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_trainer": None, "_stage_lock": None, "_time_source": None, "_time_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _stage_lock=threading.Lock(), _time_lock=threading.Lock())

    # ----------------------------------------------------------------- the run (set-up, epoch and run ends)
    def set_labels(self, labels: RankLabels) -> None:
        """The ranks this process holds in the run (known from the Trainer's ``setup`` on)."""
        self.labels = labels

    def set_run_info(self, info: dict[str, str]) -> None:
        """The labels of ``<namespace>_training_info`` (:func:`~dgdn_lightning_monitor.model_info.run_info`)."""
        self.info = info

    def set_model_figures(self, figures: ModelFigures) -> None:
        """(parameters, trainable parameters, bytes) of the model
        (:func:`~dgdn_lightning_monitor.model_info.count_model`)."""
        self.model_figures = figures

    def set_batch_capacity(self, estimate: Callable[[], Optional[tuple[float, float]]]) -> None:
        """``() -> (nodes, edges)`` of the largest batch estimated to fit the device, or ``None``; called at
        scrape time."""
        self.batch_capacity = estimate

    def bind(self, trainer: Any) -> None:
        """Read epoch, step and learning rates from ``trainer`` at scrape time (held weakly)."""
        try:
            self._trainer = weakref.ref(trainer)
        except TypeError:  # a stand-in Trainer without weak references
            self._trainer = lambda: trainer

    def freeze_live_values(self) -> None:
        """Keep the last progress and learning rates, and stop reading the Trainer (the run ended)."""
        self.progress, self.learning_rates = self._live()
        self._trainer = None

    def start_run(self) -> None:
        """A run (``fit``, ``validate``, ``test``, ``predict``) set up: it starts idle, with no loss history."""
        self.run_start_perf = time.perf_counter()
        self.intervals = {unit: ProgressIntervals(unit) for unit in PROGRESS_UNITS}  # learned from this run only
        self._train_intervals = self.intervals["train"]
        self.run_totals, self._final_progress = None, None
        self.loss_range = self.best_validation_loss = self.evaluations_since_best = None
        self.nonfinite_streak = 0
        self.outcome, self.outcome_reason = RUNNING, ""
        self.enter_stage("idle", self.run_start_perf)

    def end_run(self, outcome: tuple[str, str], reason: str = "") -> None:
        """The run ended with ``outcome`` (:func:`~dgdn_lightning_monitor.outcome.classify`): keep its last live
        values, go idle, and say how it ended, the ``reason`` first so that no scrape sees one without the other."""
        self.freeze_live_values()
        self._final_progress, self.run_totals = self.progress_estimate()[0], None
        self.enter_stage("idle")
        self.outcome_reason = reason
        self.outcome = outcome

    def enter_stage(self, stage: str, now: Optional[float] = None) -> None:
        """The run moved to ``stage`` (one of :data:`~dgdn_lightning_monitor.vocabulary.STAGES`); at stage changes
        only, never per step."""
        now = time.perf_counter() if now is None else now
        self.last_unit = None  # a stage's first unit has its own allowance (loaders starting, compiling)
        with self._stage_lock:
            if self.stage is not None:
                self.stage_seconds[self.stage] = self.stage_seconds.get(self.stage, 0.0) + now - self.stage_since
            if self.stage == "validate" and stage == "train" and self.run_totals is not None:
                self._validation_ended(self.stage_since, now)
            self.stage, self.stage_since = stage, now

    def set_run_totals(self, totals: RunTotals) -> None:
        """What bounds the run that starts now (see :class:`RunTotals`); its progress counts from here."""
        if totals.stage == "train":
            self._totals_base, self._validations = self.batch_seconds.count, _Validations()
        else:
            self._totals_base = self.progress_counts.get(totals.stage, 0)
        self.run_totals = totals

    def _validation_ended(self, start: float, end: float) -> None:
        """A validation pass of the fit ran from ``start`` to ``end`` (at a stage change, never per step)."""
        done, at = self._validations, self.batch_seconds.count - self._totals_base
        recent = (*done.recent, (start, end))[-max(2, self._window.maxlen or 2) :]
        first_at = done.first_at if done.passes else at
        self._validations = _Validations(done.passes + 1, done.seconds + end - start, first_at, at, recent)

    def epoch_ended(self, duration: float) -> None:
        """A training epoch ended after ``duration`` seconds."""
        self.epoch_duration = duration
        # What follows (epoch-end hooks, checkpoint saves, the next epoch's loaders) is no step's interval: the next
        # step gets a first unit's allowance.
        self.last_unit = None

    def set_stall_thresholds(self, thresholds: Callable[[], Mapping[str, float]]) -> None:
        """``() -> {stage: seconds}``: the stall watchdog's thresholds in force; called at scrape time."""
        self.stall_thresholds = thresholds

    def count_stall_dump(self) -> None:
        """The stall watchdog wrote a dump."""
        self.stall_dumps += 1

    def count_oom(self) -> None:
        """A step of this process ran out of memory."""
        self.ooms += 1

    # ----------------------------------------------------------------- steps and batches (training thread)
    def observe_train_batch(
        self,
        seconds: float,
        end_perf: float,
        size: GraphSize,
        trace_id: Optional[str] = None,
        hops: Optional[HopCounts] = None,
    ) -> None:
        """Fold one finished training batch in (runs on every step: kept to plain attribute updates); ``hops`` are
        the per-hop counts of a sampled batch (:func:`~dgdn_lightning_monitor.graph_size.sampled_per_hop`)."""
        self.batch_seconds.observe(seconds, trace_id)
        samples, nodes, edges = size
        if samples is not None:
            self.samples_total += samples
        if nodes is not None:
            self.nodes_total += nodes
            self.graph_nodes = nodes
            if nodes > self.largest_weight:
                self.largest_weight, self.largest_batch = nodes, size
        elif samples is not None and samples > self.largest_weight:
            self.largest_weight, self.largest_batch = samples, size
        if edges is not None:
            self.edges_total += edges
            self.graph_edges = edges
        if hops is not None:
            self.sampled_nodes = _add_per_hop(self.sampled_nodes, hops[0])
            self.sampled_edges = _add_per_hop(self.sampled_edges, hops[1])
        self._window.append((end_perf, self.samples_total))
        self.last_step_perf = end_perf
        previous = self.last_unit  # the interval since the stage's last progress is learned for that unit
        if previous is not None:
            previous.ring.append(end_perf - self._last_event_perf)
        self.last_unit, self._last_event_perf = self._train_intervals, end_perf

    def record_nonfinite(self, count: int) -> None:
        """``count`` more training losses were NaN or infinite."""
        self.nonfinite_losses += count

    def record_nonfinite_streak(self, folded: int, trailing: int) -> None:
        """The last ``folded`` training losses ended in ``trailing`` non-finite ones: all of them extend the streak,
        fewer replace it."""
        self.nonfinite_streak = self.nonfinite_streak + folded if trailing == folded else trailing

    @property
    def last_progress_perf(self) -> Optional[float]:
        """``time.perf_counter()`` of the last progress in any stage, or ``None`` before the first."""
        return max((t for t in (self.last_step_perf, self.last_unit_perf) if t is not None), default=None)

    def mark_progress(self, stage: str, end_perf: float) -> None:
        """One unit of progress in ``stage`` (an evaluation batch, ``checkpoint`` for a checkpoint save); training
        steps count through :meth:`observe_train_batch`."""
        self.last_unit_perf = end_perf
        previous = self.last_unit
        if previous is not None:
            previous.add(end_perf - self._last_event_perf)
        self.last_unit, self._last_event_perf = self.intervals.get(stage), end_perf
        counts = self.progress_counts
        if stage in counts:
            counts[stage] += 1
        else:  # a new stage: a new dict, so a scrape copying the old one never sees it resize
            self.progress_counts = {**counts, stage: 1}

    def observe_inference(self, stage: str, seconds: float, samples: Optional[int], end_perf: float) -> None:
        """Fold one finished validation/test/predict batch in, as per-sample latency, and as progress."""
        self.mark_progress(stage, end_perf)
        histogram = self.inference_seconds.get(stage)
        if histogram is None:  # a new stage: a new dict, so a scrape iterating the old one never sees it resize
            histogram = FastHistogram(INFERENCE_SECONDS_BUCKETS)
            self.inference_seconds = {**self.inference_seconds, stage: histogram}
        histogram.observe(seconds / samples if samples else seconds)

    def set_logged(self, suffix: str, value: float, dataloader: Optional[str] = None) -> None:
        key = (suffix, dataloader)
        if key in self.logged:
            self.logged[key] = value  # same size: safe while a scrape iterates
        else:  # a new key: a new dict, so a scrape iterating the old one never sees it resize
            self.logged = {**self.logged, key: value}
        if dataloader is not None and dataloader != "0" or not math.isfinite(value):
            return  # the run's history follows the single (or first) loader, finite values only
        if suffix == "training_loss":
            low, high = self.loss_range or (value, value)
            self.loss_range = (min(low, value), max(high, value))
        elif suffix == "validation_loss":  # read once per validation evaluation, at its end
            if self.best_validation_loss is None or value < self.best_validation_loss:
                self.best_validation_loss, self.evaluations_since_best = value, 0
            else:
                self.evaluations_since_best = (self.evaluations_since_best or 0) + 1

    def observe_phases(self, host: dict[str, float], device: bool, warm_up: bool) -> None:
        """A traced step's phases in host seconds: into the phase histogram (on CUDA only ``data_fetch``, the
        others get device times once measured) and, unless it is a run's warm-up step, into :meth:`phase_means`."""
        for name, seconds in host.items():
            if not device or name == "data_fetch":
                self.phase_seconds[name].observe(seconds)
        if warm_up:
            self.warm_up_phases = host
            return
        for name, seconds in host.items():
            self.phase_totals[name] = self.phase_totals.get(name, 0.0) + seconds
        self.phase_steps += 1

    def observe_device_phases(self, milliseconds: Mapping[str, float]) -> None:
        """A traced CUDA step's device time of each phase, once its events completed (``data_fetch`` keeps its
        host time: the host waits for data)."""
        for name, value in milliseconds.items():
            if name in self.phase_seconds and name != "data_fetch":
                self.phase_seconds[name].observe(value / 1e3)

    # ----------------------------------------------------------------- where the time goes
    def watch_time(
        self,
        ledger: TimeLedger,
        judge: BottleneckJudge,
        sampling_s: Callable[[], Optional[float]],
        on_change: Callable[[Verdict], None],
        peers: Callable[[], Optional[Mapping[int, Mapping[str, float]]]] = lambda: None,
    ) -> None:
        """Export ``ledger`` (a run set up) and ``judge``'s verdict, evaluated at scrape time (never on the step
        path) with the sampler's seconds from ``sampling_s()`` and the other ranks' own work from ``peers()``;
        ``on_change(verdict)`` when the verdict changes."""
        with self._time_lock:
            self._time_source = (ledger, judge, sampling_s, on_change, peers)

    def freeze_time(self) -> None:
        """The run ended: its last figures stay exported, and its totals are where the next run's count on from."""
        report = self.time_report()
        with self._time_lock:
            if self._time_source is not None and report is not None:
                self._time_base, self._time_last = dict(report.seconds), report
            self._time_source = None

    def time_report(self, now: Optional[float] = None) -> Optional[TimeReport]:
        """Seconds per category (earlier runs of this collector included), the run's goodput ratio and the
        judge's verdict after an evaluation at ``now``; the last run's figures once it ended, ``None`` before."""
        now = time.perf_counter() if now is None else now
        with self._time_lock:
            source = self._time_source
            if source is None:
                return self._time_last
            ledger, judge, sampling_s, on_change, peers = source
            totals = ledger.totals(now)
            cause = judge.verdict.cause
            verdict = judge.evaluate(
                now,
                self.batch_seconds.count,
                totals,
                sampling_s=sampling_s(),
                transfer_s=ledger.transfer_s,
                sampled_edges=self.sampled_edges,
                peers=peers(),
            )
            wall = sum(totals.values())
            goodput = sum(totals[name] for name in COMPUTE) / wall if wall > 0 else 0.0
            base = self._time_base
            report = TimeReport({name: base[name] + totals[name] for name in CATEGORIES}, goodput, verdict)
        if verdict.cause != cause:
            on_change(verdict)
        return report

    # ----------------------------------------------------------------- derived figures
    def phase_means(self) -> dict[str, float]:
        """Mean host seconds of each phase per traced step, leaving out each run's warm-up step."""
        if not self.phase_steps:
            return dict(self.warm_up_phases)
        return {name: total / self.phase_steps for name, total in self.phase_totals.items()}

    @property
    def samples_per_second(self) -> Optional[float]:
        window = tuple(self._window)
        if len(window) < 2:
            return None
        (t0, n0), (t1, n1) = window[0], window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def _seconds_per_batch(self, since: float, pauses: tuple[tuple[float, float], ...]) -> Optional[float]:
        """Recent seconds per training batch since ``since``, over the throughput window, without the time spent
        in ``pauses`` (validation passes: their time is estimated on its own)."""
        ends = [end for end, _ in tuple(self._window) if end >= since]
        if len(ends) < 2:
            return None
        first, last = ends[0], ends[-1]
        paused = sum(max(0.0, min(end, last) - max(start, first)) for start, end in pauses)
        busy = last - first - paused
        return busy / (len(ends) - 1) if busy > 0 else None

    def progress_estimate(self, now: Optional[float] = None) -> tuple[Optional[tuple[str, float]], Optional[float]]:
        """``((stage, progress ratio), ETA seconds)`` of the current run, each ``None`` when unknown: the ratio when
        nothing bounds the run, the ETA also before its rate is known. Computed on demand, from the values the
        step path keeps anyway.

        A fit's ratio is its optimizer steps of ``estimated_stepping_batches``, its ETA the remaining batches at the
        recent rate plus, once a validation pass was measured, the passes still to come (spaced as so far, the one
        running less the time it ran) at their mean duration; when ``max_time`` ends it first, by that estimate,
        the ratio and ETA are the Timer's, plus the validation pass Lightning runs when the Timer stops the fit. An
        evaluation run's ratio is its batches of the stage's batches, its ETA the remaining ones at its mean rate so
        far."""
        totals = self.run_totals
        if totals is None:
            return self._final_progress, None
        now = time.perf_counter() if now is None else now
        if totals.stage != "train":
            if totals.batches is None or totals.batches <= 0:
                return None, None
            done = self.progress_counts.get(totals.stage, 0) - self._totals_base
            last = self.last_unit_perf
            eta = None
            if done > 0 and last is not None and last > totals.start:
                eta = max(0, totals.batches - done) * (last - totals.start) / done
            return (totals.stage, min(1.0, done / totals.batches)), eta
        validations = self._validations
        mean_validation = validations.seconds / validations.passes if validations.passes else None
        ratio: Optional[float] = None
        candidates: list[tuple[float, float]] = []  # (ETA, ratio) of each bound
        if totals.steps is not None:
            progress, _ = self._live()
            step = progress[1] if progress is not None else 0
            ratio = min(1.0, step / totals.steps)
            per_batch = self._seconds_per_batch(totals.start, validations.recent)
            if per_batch is None:
                return ("train", ratio), None
            batches_left = max(0, totals.steps - step) * totals.accumulate
            eta = batches_left * per_batch
            if mean_validation is not None:
                done = self.batch_seconds.count - self._totals_base
                spacing = (
                    (validations.last_at - validations.first_at) / (validations.passes - 1)
                    if validations.passes > 1
                    else validations.first_at
                )
                if spacing > 0:  # the passes still to come, spaced as so far, the one running less its time so far
                    eta += math.floor((done - validations.last_at + batches_left) / spacing + 1e-6) * mean_validation
                    if self.stage == "validate":
                        eta -= min(mean_validation, max(0.0, now - self.stage_since))
            candidates.append((eta, ratio))
        if totals.time_left is not None and totals.duration:
            left = max(0.0, totals.time_left - (now - totals.start))
            candidates.append((left + (mean_validation or 0.0), min(1.0, 1.0 - left / totals.duration)))
        if not candidates:
            return None, None
        eta, ratio = min(candidates)
        return ("train", ratio), eta

    def _live(self) -> tuple[Optional[tuple[int, int]], LearningRates]:
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None:
            return self.progress, self.learning_rates
        try:
            return (int(trainer.current_epoch), int(trainer.global_step)), learning_rates(trainer)
        except Exception:  # a Trainer being torn down must not break a scrape
            return self.progress, self.learning_rates

    def capacity(self) -> tuple[Optional[float], Optional[float]]:
        try:
            estimate = self.batch_capacity() if self.batch_capacity is not None else None
        except Exception:  # a failing fit leaves the gauges out, never the scrape
            estimate = None
        return estimate if estimate is not None else (None, None)

    # ----------------------------------------------------------------- exposition (scrape thread)
    def describe(self) -> list[Metric]:
        """Every family this collector can export, without samples: lets a registry refuse duplicates up front
        without running :meth:`collect` before the run has started."""
        return [
            _FAMILY_TYPES[kind](f"{self.namespace}_{name}", doc, labels=()) for name, (kind, doc) in METRICS.items()
        ]

    def collect(self) -> Iterator[Metric]:
        """The metric families, built from the current values, group by group."""
        values = list(self.labels.values)
        progress, rates = self._live()
        yield from self._logged_families(values)
        yield from self._batch_families(values)
        yield from self._stall_families(values)  # before the progress time: a race only shortens the idle time
        yield from self._timestamp_families(values)
        yield from self._loss_history_families(values)
        yield from self._model_families(values, progress)
        yield from self._incident_families(values)
        yield from self._per_hop_families(values)
        yield from self._stage_families(values)
        yield from self._progress_families(values)
        yield from self._time_families(values)
        yield from self._outcome_families(values)
        yield from self._histogram_families(values)
        yield from self._learning_rate_families(values, rates)
        yield from self._monitor_families(values)

    def _family(self, name: str, extra: Iterable[str] = ()) -> Any:
        kind, documentation = METRICS[name]
        labels = [*RANK_LABEL_NAMES, *extra]
        return _FAMILY_TYPES[kind](f"{self.namespace}_{name}", documentation, labels=labels)

    def _singles(self, values: list[str], *figures: tuple[str, Optional[float]]) -> Iterator[Metric]:
        """One family of one series per figure, left out while its value is ``None``."""
        for name, value in figures:
            if value is not None:
                metric = self._family(name)
                metric.add_metric(values, float(value))
                yield metric

    def _logged_families(self, values: list[str]) -> Iterator[Metric]:
        for suffix in LOGGED_GAUGES:
            entries = sorted((loader, v) for (key, loader), v in self.logged.items() if key == suffix)
            per_loader = [(loader, v) for loader, v in entries if loader is not None]
            if per_loader:  # several loaders: one series each; Lightning then logs no plain key
                metric = self._family(suffix, ["dataloader"])
                for loader, v in per_loader:
                    metric.add_metric(values + [loader], v)
                yield metric
            elif entries:
                yield from self._singles(values, (suffix, entries[0][1]))

    def _batch_families(self, values: list[str]) -> Iterator[Metric]:
        yield from self._singles(
            values,
            ("samples_processed_total", self.samples_total),
            ("nodes_processed_total", self.nodes_total),
            ("edges_processed_total", self.edges_total),
            ("nonfinite_loss_total", self.nonfinite_losses),
            ("graph_nodes", self.graph_nodes),
            ("graph_edges", self.graph_edges),
            ("samples_per_second", self.samples_per_second),
            ("epoch_duration_seconds", self.epoch_duration),
        )

    def _stall_families(self, values: list[str]) -> Iterator[Metric]:
        try:
            thresholds = self.stall_thresholds() if self.stall_thresholds is not None else None
        except Exception:  # a watchdog being torn down must not break a scrape
            thresholds = None
        if thresholds:
            metric = self._family("stall_threshold_seconds", ["stage"])
            for stage, seconds in thresholds.items():
                metric.add_metric(values + [stage], seconds)
            yield metric

    def _timestamp_families(self, values: list[str]) -> Iterator[Metric]:
        def unix(perf: Optional[float]) -> Optional[float]:
            return perf + self._unix_offset if perf is not None else None

        yield from self._singles(
            values,
            ("last_step_timestamp_seconds", unix(self.last_step_perf)),
            ("last_progress_timestamp_seconds", unix(self.last_progress_perf)),
            ("run_start_timestamp_seconds", unix(self.run_start_perf)),
            ("stage_start_timestamp_seconds", unix(self.stage_since) if self.stage is not None else None),
        )

    def _loss_history_families(self, values: list[str]) -> Iterator[Metric]:
        loss_min, loss_max = self.loss_range or (None, None)
        yield from self._singles(
            values,
            ("nonfinite_loss_streak", self.nonfinite_streak),
            ("training_loss_min", loss_min),
            ("training_loss_max", loss_max),
            ("validation_evaluations_since_best", self.evaluations_since_best),
        )

    def _model_families(self, values: list[str], progress: Optional[tuple[int, int]]) -> Iterator[Metric]:
        parameters, trainable, memory = self.model_figures or (None, None, None)
        epoch, step = progress or (None, None)
        yield from self._singles(
            values,
            ("model_parameters", parameters),
            ("model_trainable_parameters", trainable),
            ("model_memory_usage_bytes", memory),
            ("epoch", epoch),
            ("global_step", step),
        )

    def _incident_families(self, values: list[str]) -> Iterator[Metric]:
        nodes, edges = self.capacity()
        yield from self._singles(
            values,
            ("stall_dumps_total", self.stall_dumps),
            ("oom_total", self.ooms),
            ("batch_capacity_nodes", nodes),
            ("batch_capacity_edges", edges),
        )

    def _per_hop_families(self, values: list[str]) -> Iterator[Metric]:
        for name, totals, first_hop in (
            ("sampled_nodes_total", self.sampled_nodes, 0),
            ("sampled_edges_total", self.sampled_edges, 1),
        ):
            if totals:
                per_hop = self._family(name, ["hop"])
                for hop, total in enumerate(totals, first_hop):
                    per_hop.add_metric(values + [str(hop)], total)
                yield per_hop

    def _stage_families(self, values: list[str]) -> Iterator[Metric]:
        with self._stage_lock:
            stage, seconds = self.stage, dict(self.stage_seconds)
            if stage is None:
                return
            seconds[stage] = seconds.get(stage, 0.0) + max(0.0, time.perf_counter() - self.stage_since)
        current = self._family("stage", ["stage"])
        spent = self._family("stage_seconds_total", ["stage"])
        for name in STAGES:
            current.add_metric(values + [name], 1.0 if name == stage else 0.0)
            spent.add_metric(values + [name], seconds.get(name, 0.0))
        progress = self._family("progress_total", ["stage"])
        counts = {**self.progress_counts}
        counts["train"] = counts.get("train", 0) + self.batch_seconds.count  # one observation per training step
        for name in PROGRESS_UNITS:
            progress.add_metric(values + [name], float(counts.get(name, 0)))
        yield from (current, spent, progress)

    def _progress_families(self, values: list[str]) -> Iterator[Metric]:
        progress, eta = self.progress_estimate()
        if progress is None:  # nothing bounds the run (or none ran)
            return
        stage, ratio = progress
        for name, value in (("progress_ratio", ratio), ("eta_seconds", eta)):
            if value is not None:
                metric = self._family(name, ["stage"])
                metric.add_metric(values + [stage], value)
                yield metric

    def _time_families(self, values: list[str]) -> Iterator[Metric]:
        try:
            report = self.time_report()
        except Exception as error:  # a ledger whose writer died mid-write: the scrape goes on without it
            self.errors.report("metrics", "Could not read the time ledger (%s)", repr(error))
            return
        if report is None:
            return
        spent = self._family("time_seconds_total", ["category"])
        for name in CATEGORIES:
            spent.add_metric(values + [name], report.seconds[name])
        goodput = self._family("goodput_ratio")
        goodput.add_metric(values, report.goodput_ratio)
        verdict = self._family("bottleneck", ["cause"])
        for cause in CAUSES:
            verdict.add_metric(values + [cause], 1.0 if cause == report.verdict.cause else 0.0)
        yield from (spent, goodput, verdict)

    def _outcome_families(self, values: list[str]) -> Iterator[Metric]:
        outcome = self.outcome
        if outcome is None or self.stage is None:  # before the first set-up
            return
        # Every outcome, 1 for the current one (a state set): the last scrape before an endpoint vanished says
        # whether it was still running, which tells a crash from a normal end.
        state = self._family("run_outcome", ["outcome", "exception", "reason"])
        reason = self.outcome_reason if outcome[0] == "terminated" else ""
        for name in OUTCOMES:
            current = name == outcome[0]
            labels = [name, outcome[1], reason] if current else [name, "", ""]
            state.add_metric(values + labels, 1.0 if current else 0.0)
        yield state

    def _histogram_families(self, values: list[str]) -> Iterator[Metric]:
        batch = self._family("batch_processing_seconds")
        self.batch_seconds.add_to(batch, values)
        yield batch
        if any(histogram.count for histogram in self.phase_seconds.values()):
            phases = self._family("step_phase_seconds", ["phase"])
            for phase, histogram in self.phase_seconds.items():
                histogram.add_to(phases, values + [phase])
            yield phases
        if self.inference_seconds:
            inference = self._family("inference_time_seconds", ["stage"])
            for stage, histogram in sorted(self.inference_seconds.items()):
                histogram.add_to(inference, values + [stage])
            yield inference

    def _learning_rate_families(self, values: list[str], rates: LearningRates) -> Iterator[Metric]:
        if rates:
            lr = self._family("learning_rate", ["optimizer", "param_group"])
            for optimizer, group, rate in rates:
                lr.add_metric(values + [optimizer, group], rate)
            yield lr

    def _monitor_families(self, values: list[str]) -> Iterator[Metric]:
        errors = self._family("monitor_errors_total", ["part"])
        for part, count in self.errors.counts.items():
            errors.add_metric(values + [part], count)
        yield errors
        if self.info:
            info = self._family("training")
            info.add_metric(values, self.info)
            yield info
