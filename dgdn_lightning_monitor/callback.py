"""``MonitoringCallback``: a thin adapter from Lightning's hooks to the monitoring parts, hook -> part -> sink.
Batch hooks -> ``GraphSizer`` and timestamps -> ``TrainingMetrics`` -> ``/metrics`` and a final push; sampled steps
-> ``BatchRecord`` -> ``StepStatistics`` -> the phase histogram and ``TrainingTracer``'s spans; losses and logged
values -> ``StepStatistics`` (asynchronous on a GPU) -> gauges; GPU figures -> ``GPUMonitor``'s thread; progress ->
``StallWatchdog``; sampled steps' peak memory -> ``CapacitySampler``; an out-of-memory error -> ``OOMForensics``;
hook times -> ``TimeLedger`` -> ``BottleneckJudge`` at scrape time and every ``verdict_every_s`` (with the peers'
figures under DDP, ``PeerExchange``) -> the time families, a hint in the log.
Nothing on the step path synchronises the device or touches a Prometheus object.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, Literal, Optional, Union

import prometheus_client
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry
from typing_extensions import override

from dgdn_lightning_monitor.bottleneck import BottleneckJudge, RunSettings, Verdict
from dgdn_lightning_monitor.capacity import CapacitySampler
from dgdn_lightning_monitor.distributed import DEFAULT_JOB, DistributedRun
from dgdn_lightning_monitor.gpu import GPUMonitor
from dgdn_lightning_monitor.graph_size import SIZING_FAILED, UNKNOWN, GraphSize, GraphSizer
from dgdn_lightning_monitor.guards import (
    MonitorErrors,
    WarnOnce,
    check,
    check_int,
    check_namespace,
    check_optional,
    describe,
)
from dgdn_lightning_monitor.labels import RankLabels
from dgdn_lightning_monitor.metrics import RunTotals, TrainingMetrics
from dgdn_lightning_monitor.model_info import count_model, run_info
from dgdn_lightning_monitor.oom import OOMForensics
from dgdn_lightning_monitor.outcome import classify
from dgdn_lightning_monitor.peers import PeerExchange
from dgdn_lightning_monitor.run_state import RunState, watch_sampler
from dgdn_lightning_monitor.scheduler import check_launch, scheduler_run_id, termination_reason
from dgdn_lightning_monitor.server import MetricsServer, start_rank_server
from dgdn_lightning_monitor.steps import StepStatistics
from dgdn_lightning_monitor.time_ledger import lost_seconds, read_side_file, write_side_file
from dgdn_lightning_monitor.tracing import BatchRecord, TrainingTracer
from dgdn_lightning_monitor.vocabulary import (
    LOGGED_GAUGES,
    TRAIN_GAUGES,
    VALIDATION_GAUGES,
    lightning_stage,
    span_stage,
)
from dgdn_lightning_monitor.watchdog import FLOOR_S, StallWatchdog, dump_directory
from dgdn_lightning_monitor.web_config import load_web_config

log = logging.getLogger(__name__)


class MonitoringCallback(Callback):
    r"""Export a Lightning training run to Prometheus (``/metrics``) and OpenTelemetry (spans).

    Add it to any ``Trainer``; it serves metrics from ``setup`` on. When a run (``fit``, ``validate``, ``test``,
    ``predict``) ends, also in an exception, the endpoint serves on with how it ended (``<namespace>_run_outcome``) and
    the run returns at once; the next run of the callback serves from the same endpoint. The endpoint goes with the
    process, whose exit waits (once, at most twice the scrape interval plus a second, 30 s at most) until a scrape has
    read how the last run ended, only when something scrapes it regularly: a process killed before that is told from
    one that ended. Counters keep counting across several ``fit`` calls with the same callback.

    Args:
        port: TCP port of ``/metrics``; ``0`` picks a free one (:attr:`metrics_url`). By default 8000 (the stack's
            quick-start target; a free one, with a warning, when taken), with ``targets_dir`` a free one (the
            discovery file says which). Under DDP each rank serves ``port + local_rank``.
        addr: interface to bind; the default ``0.0.0.0`` lets a Prometheus container reach the host.
        namespace: prefix of every metric name.
        registry: a ``prometheus_client.CollectorRegistry`` to register into; by default a private one, so two
            Trainers in one process never clash.
        train_loss_key, val_loss_key, train_acc_key, val_acc_key: names the LightningModule logs with
            ``self.log``; their values feed the loss and accuracy gauges.
        batch_size_fn: ``batch -> int`` samples in a batch, when the built-in rules (graphs of a PyG ``Batch``,
            events of ``TemporalData``, rows of a tensor) do not fit.
        graph_size_fn: ``batch -> (nodes, edges)``, overriding the built-in graph size rules.
        throughput_window: training batches over which ``samples_per_second`` is computed.
        trace_every_n_steps: trace one training step (and one evaluation batch) in this many, each run's first
            step, and one whenever :attr:`trace_floor_s` passed since the last traced one; traced steps feed the
            phase histogram, :meth:`summary` and (CUDA) the capacity estimate.
        tracing: ``None`` (auto: follow the ``OTEL_*`` variables, an application-wide TracerProvider, or a
            receiver answering on ``localhost:4318``), ``True`` (export even if nothing answers yet) or ``False``.
        gpu_devices: ``"auto"`` (the CUDA devices this rank trains on), a list of GPU indices, or ``None``.
        gpu_poll_interval_s: seconds between two NVML samples, from a background thread.
        run_id: identifies the run in ``<namespace>_training_info`` and in traces; when omitted, the SLURM or
            Kubeflow job's id (:func:`~dgdn_lightning_monitor.scheduler.scheduler_run_id`), else a random one.
        tracer_provider: an OpenTelemetry ``TracerProvider`` to send spans to (it stays yours: flushed at the
            end of a run, never shut down); by default one is chosen as described for ``tracing``.
        port_per_local_rank: under DDP, offset the port by the local rank so the ranks of one machine do not
            clash; ``False`` when every rank has its own network namespace (one container per rank).
        targets_dir: directory of Prometheus file-SD files (``deploy/prometheus/targets``): each node's local rank
            0 lists its ranks' endpoints there, refreshed every 30 s, removed at the end, expired after 3 minutes.
        targets_host: host name written into those files; by default the machine's host name (or ``addr``
            when it is a specific address), which ``make stack`` lets its Prometheus container resolve.
        pushgateway_url: a Pushgateway (``http://host:9091``) to which every rank pushes its final figures
            when the run ends, grouped by ``job``, ``run_id`` and ``rank``; a failed push only warns.
        job: Prometheus job name used in discovery files and pushes.
        web_config_file: a Prometheus web configuration file (TLS, client certificates, basic auth) for the
            endpoint, read here so that a bad file fails at construction; ``metrics_url`` then says ``https``.
        stall_dump_after_s: after this many seconds without progress in any stage, write every thread's stack
            (and the flight recorder's trace) to ``dgdn-dumps/`` in ``trainer.log_dir``; ``"auto"``: a threshold
            per stage learned from the run's own intervals (3 x their 99th percentile, 10 s to 600 s; 600 s until
            50 are known and for a stage's first unit), exported as ``<namespace>_stall_threshold_seconds``;
            ``None``: off.
        memory_snapshot: on CUDA, record PyTorch's allocation history during the run and write it to
            ``dgdn-dumps/`` when a step runs out of memory (see :mod:`~dgdn_lightning_monitor.oom`).
        wait_for_final_scrape: at the exit of the process, keep the endpoint up until a scrape has read how the last
            run ended, when something scraped it regularly (see above); ``False``: the process exits at once, and a
            Prometheus that had not scraped the end yet last saw the run running (``DGDNRunDown`` on a static target).

    Example::

        from lightning.pytorch import Trainer
        from dgdn_lightning_monitor import MonitoringCallback

        trainer = Trainer(max_epochs=5, callbacks=[MonitoringCallback(port=8000)])
        trainer.fit(model, datamodule)  # curl http://localhost:8000/metrics meanwhile
    """

    #: Longest time between two traced training steps, so that a 5-minute window holds 30 samples per rank at any rate.
    trace_floor_s: float = 10.0
    #: The window of the bottleneck judge (:class:`~dgdn_lightning_monitor.bottleneck.BottleneckJudge`), at least
    #: this many training steps and seconds, and the shortest time between two counted evaluations.
    bottleneck_window: tuple[int, float, float] = (100, 300.0, 5.0)
    #: Longest time between two writes of the time ledger's side file (next to the stall dumps).
    ledger_file_every_s: float = 30.0
    #: Seconds between two evaluations of the bottleneck verdict by the callback's own clock during ``fit``, each
    #: sharing the straggler figures with the other ranks under DDP
    #: (:class:`~dgdn_lightning_monitor.peers.PeerExchange`).
    verdict_every_s: float = 5.0

    def __init__(
        self,
        port: Optional[int] = None,
        addr: str = "0.0.0.0",
        namespace: str = "dgdn",
        registry: Optional[CollectorRegistry] = None,
        *,
        train_loss_key: str = "train_loss",
        val_loss_key: str = "val_loss",
        train_acc_key: str = "train_acc",
        val_acc_key: str = "val_acc",
        batch_size_fn: Optional[Callable[[Any], int]] = None,
        graph_size_fn: Optional[Callable[[Any], tuple[int, int]]] = None,
        throughput_window: int = 50,
        trace_every_n_steps: int = 50,
        tracing: Optional[bool] = None,
        gpu_devices: Union[Literal["auto"], Sequence[int], None] = "auto",
        gpu_poll_interval_s: float = 5.0,
        run_id: Optional[str] = None,
        tracer_provider: Optional[TracerProvider] = None,
        port_per_local_rank: bool = True,
        targets_dir: Optional[Union[str, os.PathLike]] = None,
        targets_host: Optional[str] = None,
        pushgateway_url: Optional[str] = None,
        job: str = DEFAULT_JOB,
        web_config_file: Optional[Union[str, os.PathLike]] = None,
        stall_dump_after_s: Union[float, Literal["auto"], None] = "auto",
        memory_snapshot: bool = False,
        wait_for_final_scrape: bool = True,
    ) -> None:
        super().__init__()
        self.port = None if port is None else check_int("port", port, 0, 65535)
        self.addr = check("addr", addr, isinstance(addr, str) and bool(addr.strip()), "a host name or IP address")
        self.namespace = check_namespace(namespace)
        check_optional("registry", registry, CollectorRegistry, "a prometheus_client.CollectorRegistry")
        keys = zip(LOGGED_GAUGES.items(), (train_loss_key, val_loss_key, train_acc_key, val_acc_key))
        self.keys = {
            gauge: check(name, key, isinstance(key, str) and bool(key), "a non-empty string")
            for (gauge, name), key in keys
        }
        self.trace_every_n_steps = check_int("trace_every_n_steps", trace_every_n_steps, 1)
        check("run_id", run_id, run_id != "" and isinstance(run_id, (str, type(None))), "a non-empty string or None")
        self.run_id = run_id or scheduler_run_id() or uuid.uuid4().hex[:12]
        valid = isinstance(port_per_local_rank, bool)
        self.port_per_local_rank = check("port_per_local_rank", port_per_local_rank, valid, "True or False")
        valid = isinstance(wait_for_final_scrape, bool)
        self.wait_for_final_scrape = check("wait_for_final_scrape", wait_for_final_scrape, valid, "True or False")
        self._web_config_file = web_config_file
        self.web_config: Any = load_web_config(web_config_file) if web_config_file is not None else None
        # Every part counts the errors it degrades on here; the metrics export the counts.
        self.errors = errors = MonitorErrors(logging.getLogger("dgdn_lightning_monitor"))
        self.metrics = TrainingMetrics(namespace, check_int("throughput_window", throughput_window, 2), errors)
        sizer = GraphSizer(batch_size_fn, graph_size_fn, errors)
        self._sizer, self._hops = sizer.resolve(), sizer.sampled_per_hop
        https = self.web_config is not None and self.web_config.scheme == "https"
        self._dist = DistributedRun(job, targets_dir, targets_host, pushgateway_url, https, errors)
        self._capacity = CapacitySampler(
            self.metrics, errors
        )  # resets the allocator's peak: the GPU collector keeps it
        self.gpu = GPUMonitor(namespace, gpu_devices, gpu_poll_interval_s, errors=errors, peaks=self._capacity.peaks)
        self.tracer = TrainingTracer(enabled=tracing, tracer_provider=tracer_provider, errors=errors)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._register()
        self._memory = OOMForensics(
            self.metrics, self._sizer, memory_snapshot, self._capacity.allocator_figures, errors
        )
        self._watchdog = StallWatchdog(stall_dump_after_s, self.metrics, errors)
        self._warn = WarnOnce(log)
        self._train_batches = 0  # across runs: drives trace sampling
        self._run: Optional[RunState] = None
        self._ledger_state: Optional[dict[str, Any]] = None  # a checkpoint's ledger, until the run carries it on
        self._setups = 0  # runs set up so far
        self._server: Optional[MetricsServer] = None  # serves on after a run; the next run reuses it

    # ------------------------------------------------------------------------------------------ public API
    @property
    def metrics_url(self) -> Optional[str]:
        """``http://host:port/metrics`` while the endpoint serves (from ``setup`` on, after the run too), else
        ``None``."""
        server = self._server
        return server.url if server is not None and server.running else None

    def summary(self) -> dict[str, Any]:
        """Figures for a closing report.

        Returns:
            ``steps``, ``samples`` and ``samples_per_second`` (recent); ``phase_seconds``, the mean host seconds
            of each phase per traced training step without each run's first (warm-up) one; ``stall_dumps``
            (paths), ``out_of_memory`` (the last record, or ``None``) and ``batch_capacity`` (estimated
            ``(nodes, edges)`` of the largest batch that fits the device, or ``(None, None)``); ``progress_ratio``
            (the current or last run's fraction done, ``None`` when nothing bounds it) and ``eta_seconds`` (``None``
            when unknown or after the run), as ``<namespace>_progress_ratio`` and ``<namespace>_eta_seconds``;
            ``time_seconds`` (seconds per :data:`~dgdn_lightning_monitor.time_ledger.CATEGORIES`),
            ``goodput_ratio``, ``bottleneck`` (the verdict's cause) and ``hint`` (what to change), each ``None``
            before the first set-up.
        """
        progress, eta = self.metrics.progress_estimate()
        time_report = self.metrics.time_report()
        return {
            "steps": self._train_batches,
            "samples": self.metrics.samples_total,
            "samples_per_second": self.metrics.samples_per_second,
            "phase_seconds": self.metrics.phase_means(),
            "stall_dumps": list(self._watchdog.dumps),
            "out_of_memory": self._memory.last_oom,
            "batch_capacity": self.metrics.capacity(),
            "progress_ratio": progress[1] if progress is not None else None,
            "eta_seconds": eta,
            "time_seconds": time_report.seconds if time_report else None,
            "goodput_ratio": time_report.goodput_ratio if time_report else None,
            "bottleneck": time_report.verdict.cause if time_report else None,
            "hint": time_report.verdict.hint if time_report else None,
        }

    # ------------------------------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        """Settings and counters, for ``strategy="ddp_spawn"`` (it pickles the callbacks into every worker); the
        parts that hold threads, sockets or a provider rebuild themselves in the worker."""
        state = {**self.__dict__, "_run": None, "_server": None, "web_config": None}  # an SSL context does not pickle
        state["registry"] = "global" if self.registry is prometheus_client.REGISTRY else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.web_config = load_web_config(self._web_config_file) if self._web_config_file is not None else None
        global_registry = state["registry"] == "global"
        self.registry = prometheus_client.REGISTRY if global_registry else CollectorRegistry(auto_describe=True)
        try:
            self._register()
        except ValueError:  # a copy inside the process that registered the original: stay private
            self.registry = CollectorRegistry(auto_describe=True)
            self._register()

    def _register(self) -> None:
        self.registry.register(self.metrics)
        try:
            self.registry.register(self.gpu)
        except ValueError:
            self.registry.unregister(self.metrics)
            raise

    # ------------------------------------------------------------------------------------------ run lifecycle
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        start = time.perf_counter()  # the time ledger counts from here
        labels = RankLabels.from_trainer(trainer)
        check_launch(trainer.world_size, trainer.global_rank, self._warn)  # processes Lightning did not join
        self.metrics.set_labels(labels)
        self.metrics.start_run()
        self.metrics.bind(trainer)
        failure: Optional[Exception] = None
        server = self._server
        try:  # a taken port fails here, before any training step
            if server is None or not server.running:  # else the endpoint of this callback's previous run serves on
                rank, per_rank, wait = labels.local_rank, self.port_per_local_rank, self.wait_for_final_scrape
                server = self._server = start_rank_server(
                    self.registry, self.addr, self.port, rank, per_rank, self._dist.targets_dir, self.web_config, wait
                )
            server.run_started()
        except (OSError, OverflowError, ValueError) as error:
            failure = error
        # Every rank takes part in the exchange, also one whose server failed, so that no rank waits forever;
        # under DDP every rank adopts rank 0's run id.
        bound = server.bound_port if server is not None and failure is None else None
        self.run_id = self._dist.exchange(labels, self.addr, bound, self.run_id)
        self.metrics.set_run_info(run_info(pl_module, self.run_id, type(trainer.strategy).__name__))
        dumps = dump_directory(trainer)  # trainer.log_dir: a broadcast under DDP, so every rank takes it here
        if failure is not None:
            raise failure
        assert server is not None  # built whenever nothing failed
        attributes = {"training.run_id": self.run_id, **{f"training.{k}": v for k, v in asdict(labels).items()}}
        self.tracer.start(attributes, share=self._dist.trace_key)
        stats = StepStatistics(self.metrics, self.keys, self._warn if labels.rank == 0 else None)  # rank 0 says it
        stall_after_s, learned = self._stall_threshold()
        judge = BottleneckJudge(RunSettings(stall_after_s=self._watchdog.after_s), *self.bottleneck_window)
        run = self._run = RunState(trainer, server, stats, self.trace_floor_s, stall_after_s, judge, start, learned)
        self._watchdog.on_stall = run.ledger.stalled  # a learned threshold's stalls begin where the watchdog says
        run.ledger_file = dumps / f"time-ledger-rank{labels.rank}.json"
        # The peers' keys of this run and stage (the same count on every rank), and of this attempt: torchrun's
        # agent keeps its store, with the keys of the attempts before, across restarts of the workers.
        self._setups += 1
        namespace = f"{self.run_id}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{stage}-{self._setups}"
        run.peers = PeerExchange(
            labels.rank,
            trainer.world_size,
            namespace,
            self.metrics.time_report,
            lambda: judge.own_work,
            self.errors,
            self.verdict_every_s,
        )
        self.metrics.watch_time(run.ledger, judge, lambda: run.sampling_s, self._verdict_changed, run.peers.figures)
        self._carry_ledger(run)
        run.model_figures_final = self._count_model(pl_module)
        root = trainer.strategy.root_device
        self.gpu.start([root.index or 0] if root.type == "cuda" else [], labels.as_dict())
        self._dist.publish(labels, self.run_id)
        self._capacity.start(root)
        self._memory.start(root, dumps, labels.rank)
        self._watchdog.start(dumps, labels.rank)
        if stage == "fit":  # the verdict is about training steps
            run.peers.start()
        log.info("Serving training metrics at %s", self.metrics_url)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._end_run(None)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        batch, batch_idx = (self._run.batch, self._run.batch_idx) if self._run is not None else (None, -1)
        self._memory.on_exception(exception, trainer, batch, batch_idx)  # an OOM, before the figures are final
        self._end_run(exception)

    def _end_run(self, exception: Optional[BaseException]) -> None:
        """Release everything the run started; safe to call twice (on_exception, then teardown)."""
        run, self._run = self._run, None
        if run is None:
            return
        run.unwatch()
        run.peers.stop()
        self._write_ledger_file(run)
        self._watchdog.stop()
        self._watchdog.on_stall = None
        self._memory.stop()
        try:
            run.stats.finish()
        except Exception as error:  # a lost device must not turn the end of a run into a crash
            self.errors.report("metrics", "Could not read the last training values: %s", describe(error))
        outcome = classify(exception)
        self.metrics.end_run(outcome, termination_reason(outcome[0]))  # before the final push, which carries it
        self.gpu.stop()
        # The endpoint serves on: the next scrape reads the outcome (the end of a run is told from a crash), and the
        # process's exit waits for it; the discovery file goes once it did.
        run.server.run_ended()
        self._dist.finish(self.registry, self.metrics.labels, self.run_id, run.server)  # discovery file, Pushgateway
        self.tracer.finish(exception)
        self.metrics.freeze_time()  # last: the run's time ends here

    def _stall_threshold(self) -> tuple[Optional[float], bool]:
        """The time ledger's stall threshold and whether it is learned: the watchdog's fixed seconds; with
        ``"auto"`` its floor, the stalls marked by the watchdog (:attr:`StallWatchdog.on_stall`); ``None`` when
        off (no ``stall`` category)."""
        threshold = self._watchdog.after_s
        if threshold == "auto":
            return FLOOR_S, True
        return (None if threshold is None else float(threshold)), False

    # ------------------------------------------------------------------------------------------ where the time goes
    @override
    def state_dict(self) -> dict[str, Any]:
        """The time ledger's totals, and where its side file is (a resumed run reads the time lost after this
        checkpoint from it)."""
        run = self._run
        if run is None:
            return {}
        run.ledger_side_due = 0.0  # from the first checkpoint on, the side file says how long the run went on after
        return {"time_ledger": {**run.ledger.state_dict(), "side_file": str(run.ledger_file)}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._ledger_state = state_dict.get("time_ledger")
        if self._run is not None:
            self._carry_ledger(self._run)

    def _carry_ledger(self, run: RunState) -> None:
        """Carry on from a checkpoint's ledger, and count the previous attempt's time after it as lost progress."""
        state, self._ledger_state = self._ledger_state, None
        if not state:
            return
        try:
            run.ledger.load_state_dict(state)
            last = read_side_file(state.get("side_file"))
            if last is not None:
                run.ledger.add_lost_progress(lost_seconds(state, last))
        except ValueError as error:
            self.errors.report(
                "metrics", "Could not carry the time ledger on from the checkpoint (%s)", describe(error)
            )

    def _write_ledger_file(self, run: RunState, now: Optional[float] = None) -> None:
        """The ledger's state into its side file (not per step: epoch ends, traced steps now and then, the end),
        once a checkpoint holds the ledger (without one there is nothing to resume from)."""
        if run.ledger_side_due == math.inf:
            return
        now = time.perf_counter() if now is None else now
        run.ledger_side_due = now + self.ledger_file_every_s
        try:
            write_side_file(run.ledger_file, run.ledger.state_dict(now))
        except Exception as error:  # a full disk
            self.errors.report("metrics", "Could not write the time ledger's side file (%s)", describe(error))

    def _verdict_changed(self, verdict: Verdict) -> None:
        """Say the bottleneck verdict once per change (from the thread that evaluated it)."""
        say = log.info if verdict.cause == "compute" else log.warning
        say("Rank %d is limited by %s: %s", self.metrics.labels.rank, verdict.cause, verdict.hint)

    # ------------------------------------------------------------------------------------------ training
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_totals(trainer, "train")
        run = self._run
        if run is None:
            return
        try:  # the training loader is known from here on
            run.judge.settings = RunSettings.from_trainer(trainer, self._watchdog.after_s)
            run.unwatch_sampler = watch_sampler(trainer.train_dataloader, run)
        except Exception as error:
            self._degrade(error)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        run = self._run
        if run is None:
            return
        run.epoch_start = time.perf_counter()
        self.metrics.enter_stage("train", run.epoch_start)
        # What the module logged in its own on_train_epoch_end; after a first epoch, a key never logged is said.
        run.stats.read_logged(trainer.callback_metrics, TRAIN_GAUGES, check=run.train_epochs > 0)
        self.tracer.start_epoch("train", trainer.current_epoch)  # under DDP in the epoch's trace of every rank
        run.fetch_start_ns = time.perf_counter_ns()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        start, run = time.perf_counter(), self._run
        if run is None:
            return
        run.ledger.batch_started(start)  # the time since the fetch moved the batch to the device
        run.batch, run.batch_idx = batch, batch_idx  # sized only if its step runs out of memory
        if run.trace_next:  # decided at the previous batch's end, which also timed this one's fetch
            run.trace_next = False
            try:
                record = run.record = self._record("train", trainer, pl_module, batch_idx)
                record.mark("fetch_start", run.fetch_start_ns)
                if run.fetch_end_ns > run.fetch_start_ns:
                    record.mark("fetch_end", run.fetch_end_ns)
                self._capacity.sample_start()  # CUDA: this step's peak memory against its size (its own errors)
                record.mark("batch_start")
            except Exception as error:
                self._degrade(error, "tracing")
            start = time.perf_counter()  # the batch starts after its trace record's set-up
        run.batch_start = start  # an untraced step reads the clock once

    # Each marks its own phase boundary: a shared helper's extra call measured ~3 µs a step (3 hooks) in hook_time.
    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Any) -> None:
        if self._run is not None and self._run.record is not None:
            self._run.record.mark("backward_start")

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._run is not None and self._run.record is not None:
            self._run.record.mark("backward_end")

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._run is not None and self._run.record is not None:
            self._run.record.mark("optimizer_start")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        end, run = time.perf_counter(), self._run
        if run is None:
            return
        run.ledger.step_ended(end)
        run.batch = None  # the next batch must not meet this one in memory because of monitoring
        # Each part degrades on its own: a batch that cannot be sized still counts its step, progress and time.
        try:
            size = self._sizer(batch)  # the same batch object on_train_batch_start saw
            hops = self._hops(batch) if size.nodes is not None else None  # only a graph is sampled by hops
        except Exception as error:
            self._degrade(error, "graph_size")
            size, hops = UNKNOWN, None
        record, run.record = run.record, None
        if record is not None:
            self._end_traced_step(run, record, size)
            if end > run.ledger_side_due:  # traced steps come every trace_floor_s at least
                self._write_ledger_file(run, end)
        try:
            trace_id = self.tracer.trace_id("train") if record is not None else None
            self.metrics.observe_train_batch(end - run.batch_start, end, size, trace_id, hops)
            self._train_batches += 1
            stats = run.stats
            stats.keep_loss(outputs, trainer)
            if stats.pending:
                stats.poll()
            if self._train_batches % run.read_every == 0:
                stats.read_logged(trainer.callback_metrics, TRAIN_GAUGES)
        except Exception as error:
            self._degrade(error)
        if self._train_batches % self.trace_every_n_steps == 0 or end > run.trace_due:  # or after trace_floor_s
            run.trace_next, run.trace_due = True, end + self.trace_floor_s  # the next batch is traced
            run.fetch_start_ns = time.perf_counter_ns()  # its fetch, when Lightning does not say

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        run = self._run
        if run is None:
            return
        self.metrics.epoch_ended(time.perf_counter() - run.epoch_start)
        run.stats.read_logged(trainer.callback_metrics, TRAIN_GAUGES)
        run.stats.fold_nonfinite()
        run.train_epochs += 1
        self._write_ledger_file(run)
        if not run.model_figures_final:
            run.model_figures_final = self._count_model(pl_module)  # lazy layers have their sizes now
        self.tracer.end_epoch("train")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._run is not None:  # what the module logged in its last on_train_epoch_end
            self._run.stats.read_logged(trainer.callback_metrics, TRAIN_GAUGES, check=True)

    # ------------------------------------------------------------------------------------------ evaluation
    def _eval_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit":  # within a fit (sanity check, validation passes) the fit's progress goes on
            self._start_totals(trainer, lightning_stage(trainer, "validate"))

    def _eval_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.metrics.enter_stage(lightning_stage(trainer, "validate"))
        if self._run is not None:  # any evaluation counts as validation, back to where it interrupted at its end
            category = "sanity_check" if trainer.sanity_checking else "validation"
            self._run.ledger_resume = self._run.ledger.enter(category, time.perf_counter())
        if self._run is not None and not trainer.sanity_checking:
            self.tracer.start_epoch(span_stage(trainer), trainer.current_epoch)

    def _eval_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        run = self._run
        if run is None or trainer.sanity_checking:
            return
        run.eval_record = None
        if batch_idx % self.trace_every_n_steps == 0:
            try:
                record = run.eval_record = self._record(span_stage(trainer), trainer, pl_module, batch_idx)
                record.mark("batch_start")
            except Exception as error:
                self._degrade(error, "tracing")
        run.batch, run.batch_idx = batch, batch_idx
        run.eval_start = time.perf_counter()

    def _eval_batch_end(
        self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        end, run = time.perf_counter(), self._run
        if run is None:
            return
        run.batch = None
        run.ledger.progress(end)
        if trainer.sanity_checking:
            self.metrics.mark_progress("sanity_check", end)  # liveness only
            return
        try:
            size = self._sizer(batch)
        except Exception as error:
            self._degrade(error, "graph_size")
            size = UNKNOWN
        record, run.eval_record = run.eval_record, None
        part = "metrics"
        try:
            stage = lightning_stage(trainer, "validate")
            self.metrics.observe_inference(stage, end - run.eval_start, size.samples, end)
            if record is not None:
                part = "tracing"
                record.mark("batch_end")
                record.size = size
                run.stats.when_ready(record, self.tracer.add_batch)
                part = "metrics"
            if run.stats.pending:
                run.stats.poll()
        except Exception as error:
            self._degrade(error, part)

    def _eval_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.metrics.enter_stage("train" if trainer.state.fn == "fit" else "idle")
        if self._run is not None:
            self._run.ledger.enter(self._run.ledger_resume, time.perf_counter())
        if self._run is not None and not trainer.sanity_checking:
            self.tracer.end_epoch(span_stage(trainer))

    on_validation_start = on_test_start = on_predict_start = override(_eval_start)
    on_validation_epoch_start = on_test_epoch_start = on_predict_epoch_start = override(_eval_epoch_start)
    on_validation_batch_start = on_test_batch_start = on_predict_batch_start = override(_eval_batch_start)
    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = override(_eval_batch_end)
    on_validation_epoch_end = on_test_epoch_end = on_predict_epoch_end = override(_eval_epoch_end)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._run is not None and not trainer.sanity_checking:  # after the module's own epoch-end logging
            self._run.stats.read_logged(trainer.callback_metrics, VALIDATION_GAUGES, check=True)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        now = time.perf_counter()
        self.metrics.mark_progress("checkpoint", now)
        if self._run is not None and self._run.unwatch_checkpoints is None:  # save_checkpoint could not be wrapped
            self._run.ledger.enter("checkpoint", now)  # until the next hook that moves the ledger

    # ------------------------------------------------------------------------------------------ helpers
    def _record(self, stage: str, trainer: Trainer, pl_module: LightningModule, batch_idx: int) -> BatchRecord:
        cuda, parent = pl_module.device.type == "cuda", self.tracer.epoch_span(stage)  # its spans go there, later
        return BatchRecord(stage, trainer.current_epoch, batch_idx, trainer.global_step, UNKNOWN, cuda, parent)

    def _end_traced_step(self, run: RunState, record: BatchRecord, size: GraphSize) -> None:
        """A traced training step's end: its peak memory, record, phases and spans, each part's error its own."""
        part = "memory"
        try:
            self._capacity.sample_end(size)
            part = "tracing"
            record.mark("batch_end")
            record.size = size
            part = "metrics"
            run.stats.add_phases(record)
            part = "tracing"
            run.stats.when_ready(record, self.tracer.add_batch)  # on CUDA once its events completed
        except Exception as error:
            self._degrade(error, part)

    def _start_totals(self, trainer: Trainer, stage: str) -> None:
        """Read what bounds the run that starts (once: ``estimated_stepping_batches`` may size the loaders) and hand
        it to the metrics, which compute progress and ETA from it at scrape time."""
        try:
            self.metrics.set_run_totals(_run_totals(trainer, stage))
        except Exception as error:  # no progress figures for this run; training goes on
            self._degrade(error)

    def _count_model(self, module: LightningModule) -> bool:
        """Export the model's figures; returns whether they are final (no lazy layer waits for its first batch)."""
        figures, final = count_model(module)
        self.metrics.set_model_figures(figures)
        return final

    def _degrade(self, error: Exception, part: str = "metrics") -> None:
        """A monitoring fault never stops training: counted under its ``part``, said once, training goes on."""
        message = _DEGRADED.get(part, _DEGRADED["metrics"])
        self.errors.report(part, message, describe(error), exc_info=error)


#: The Trainer attribute holding each evaluation stage's batches per loader.
_STAGE_BATCHES = {"validate": "num_val_batches", "test": "num_test_batches", "predict": "num_predict_batches"}


def _run_totals(trainer: Trainer, stage: str) -> RunTotals:
    """What bounds the run of ``stage`` that ``trainer`` starts (:class:`~dgdn_lightning_monitor.metrics.RunTotals`):
    an infinite or non-positive total is no bound."""
    now = time.perf_counter()
    if stage != "train":
        batches = sum(getattr(trainer, _STAGE_BATCHES[stage], None) or [])
        return RunTotals(stage, now, batches=int(batches) if 0 < batches < float("inf") else None)
    steps = trainer.estimated_stepping_batches
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)  # type: ignore[attr-defined]
    time_left = timer.time_remaining() if timer is not None else None
    duration = time_left + timer.time_elapsed() if timer is not None and time_left is not None else None
    return RunTotals(
        stage,
        now,
        steps=int(steps) if 0 < steps < float("inf") else None,
        accumulate=max(1, int(trainer.accumulate_grad_batches)),
        time_left=time_left,
        duration=duration,
    )


#: What the first error of each part a batch hook degrades on says.
_DEGRADED = {
    "graph_size": SIZING_FAILED,
    "tracing": "Could not trace a batch (%s); its spans are dropped, training continues.",
    "metrics": "Monitoring hit an error and skips what it could not measure; training continues (%s)",
}
