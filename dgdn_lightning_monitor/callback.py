"""``MonitoringCallback``: a thin adapter from Lightning's hooks to the monitoring parts.

Data flows one way: a hook takes a timestamp and the batch, the measurement (graph size, durations, logged
values) is folded into :class:`~dgdn_lightning_monitor.metrics.TrainingMetrics` (served to Prometheus) and, on
sampled steps, into a :class:`~dgdn_lightning_monitor.tracing.BatchRecord` handed to the tracer. GPU figures are
sampled by their own thread. Nothing on the step path synchronises the device or touches a Prometheus object.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal, Optional, Union

import lightning
import prometheus_client
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from dgdn_lightning_monitor.distributed import DEFAULT_JOB, DistributedRun
from dgdn_lightning_monitor.gpu import GPUMonitor
from dgdn_lightning_monitor.graph_size import UNKNOWN, GraphSizer
from dgdn_lightning_monitor.labels import RankLabels
from dgdn_lightning_monitor.logged import LoggedValues, pick
from dgdn_lightning_monitor.metrics import LearningRates, TrainingMetrics
from dgdn_lightning_monitor.scalars import DeferredScalars
from dgdn_lightning_monitor.server import MetricsServer
from dgdn_lightning_monitor.tracing import BatchRecord, TrainingTracer

log = logging.getLogger(__name__)

# Training losses are checked for NaN/inf together, every this many steps (and at epoch and run ends).
_FOLD_EVERY = 50

_NAMESPACE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _check_int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def _check_key(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _check_callable(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be a callable or None, got {value!r}")
    return value


class MonitoringCallback(Callback):
    r"""Export a Lightning training run to Prometheus (``/metrics``) and OpenTelemetry (spans).

    Add it to any ``Trainer``; it serves metrics from ``setup`` until the run ends (also when it ends in an
    exception). Counters keep counting across several ``fit`` calls with the same callback.

    Args:
        port: TCP port of the ``/metrics`` endpoint; ``0`` picks a free one (see :attr:`metrics_url`). Under
            DDP each rank serves ``port + local_rank`` (see ``port_per_local_rank``).
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
        trace_every_n_steps: trace one training step (and one evaluation batch) in this many; phase timings of
            those steps also feed :meth:`summary`.
        tracing: ``None`` (auto: follow the ``OTEL_*`` variables, an application-wide TracerProvider, or a
            receiver answering on ``localhost:4318``), ``True`` (export even if nothing answers yet) or ``False``.
        gpu_devices: ``"auto"`` (the CUDA devices this rank trains on), a list of GPU indices, or ``None``.
        gpu_poll_interval_s: seconds between two NVML samples, from a background thread.
        run_id: identifies the run in ``<namespace>_training_info`` and in traces; generated when omitted.
        tracer_provider: an OpenTelemetry ``TracerProvider`` to send spans to (it stays yours: flushed at the
            end of a run, never shut down); by default one is chosen as described for ``tracing``.
        port_per_local_rank: under DDP, offset the port by the local rank so the ranks of one machine do not
            clash; ``False`` when every rank has its own network namespace (one container per rank).
        targets_dir: directory of Prometheus file-SD files (e.g. ``deploy/prometheus/targets``): the local
            rank 0 of every node writes one listing its ranks' endpoints while the run lasts.
        targets_host: host name written into those files; by default the machine's host name (or ``addr``
            when it is a specific address). ``"host.docker.internal"`` suits a Prometheus container.
        pushgateway_url: a Pushgateway (``http://host:9091``) to which every rank pushes its final figures
            when the run ends, grouped by ``job``, ``run_id`` and ``rank``; a failed push only warns.
        job: Prometheus job name used in discovery files and pushes.

    Under DDP the ranks agree on rank 0's ``run_id`` and exchange their endpoints at set-up, and, when rank 0
    traces, rank 0 shares its ``train_epoch`` span once per epoch so that every rank's spans of that epoch
    join one trace: no collective is added to the training step.

    Example::

        from lightning.pytorch import Trainer
        from dgdn_lightning_monitor import MonitoringCallback

        trainer = Trainer(max_epochs=5, callbacks=[MonitoringCallback(port=8000)])
        trainer.fit(model, datamodule)  # curl http://localhost:8000/metrics meanwhile
    """

    def __init__(
        self,
        port: int = 8000,
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
    ) -> None:
        super().__init__()
        self.port = _check_int("port", port, 0, 65535)
        if not isinstance(addr, str) or not addr.strip():
            raise ValueError(f"addr must be a host name or IP address, got {addr!r}")
        self.addr = addr
        if not isinstance(namespace, str) or not _NAMESPACE.match(namespace) or namespace.endswith("_"):
            raise ValueError(
                f"namespace must be a Prometheus name prefix like 'dgdn' (letters, digits, underscores; not "
                f"starting with a digit or ending with '_'), got {namespace!r}"
            )
        self.namespace = namespace
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise ValueError(f"registry must be a prometheus_client.CollectorRegistry or None, got {registry!r}")
        self.keys = {
            "training_loss": _check_key("train_loss_key", train_loss_key),
            "validation_loss": _check_key("val_loss_key", val_loss_key),
            "training_accuracy": _check_key("train_acc_key", train_acc_key),
            "validation_accuracy": _check_key("val_acc_key", val_acc_key),
        }
        self._sizer = GraphSizer(_check_callable("batch_size_fn", batch_size_fn),
                                 _check_callable("graph_size_fn", graph_size_fn)).resolve()
        self.trace_every_n_steps = _check_int("trace_every_n_steps", trace_every_n_steps, 1)
        if tracing is not None and not isinstance(tracing, bool):
            raise ValueError(f"tracing must be True, False or None (auto), got {tracing!r}")
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise ValueError(f"run_id must be a non-empty string or None, got {run_id!r}")
        self.run_id = run_id or uuid.uuid4().hex[:12]
        if not isinstance(port_per_local_rank, bool):
            raise ValueError(f"port_per_local_rank must be True or False, got {port_per_local_rank!r}")
        self.port_per_local_rank = port_per_local_rank
        self._dist = DistributedRun(job=job, targets_dir=targets_dir, targets_host=targets_host,
                                    pushgateway_url=pushgateway_url)

        self.metrics = TrainingMetrics(namespace, _check_int("throughput_window", throughput_window, 2))
        self.gpu = GPUMonitor(namespace, devices=gpu_devices, poll_interval_s=gpu_poll_interval_s)
        if tracer_provider is not None and not isinstance(tracer_provider, TracerProvider):
            raise ValueError(f"tracer_provider must be an opentelemetry TracerProvider or None, got {tracer_provider!r}")
        self.tracer = TrainingTracer(enabled=tracing, tracer_provider=tracer_provider)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry.register(self.metrics)
        self.registry.register(self.gpu)
        self._server: Optional[MetricsServer] = None
        self._scalars = DeferredScalars()

        # Per-run state, reset in setup.
        self._running = False
        self._train_batches = 0  # training batches seen by this callback, across fits (drives trace sampling)
        self._batch_start = 0.0
        self._fetch_start_ns = 0
        self._record: Optional[BatchRecord] = None
        self._eval_start = 0.0
        self._eval_record: Optional[BatchRecord] = None
        self._epoch_start = 0.0
        self._losses: list[torch.Tensor] = []  # training losses since the last non-finite count
        self._phase_totals: dict[str, float] = {}
        self._phase_steps = 0
        self._model_figures_final = False
        self._degraded = False
        # Where Lightning counts the batches that stepped, and its logging interval: looked up once per epoch
        # so that the logging-step test on every batch is one attribute read and a modulo.
        self._epoch_loop: Any = None
        self._log_every = 1
        self._logged_values: Optional[LoggedValues] = None  # attached to the Trainer's loggers during a run
        self._trainer_ref: Optional[Callable[[], Any]] = None

    # ------------------------------------------------------------------------------------------ public API
    @property
    def metrics_url(self) -> Optional[str]:
        """``http://host:port/metrics`` while the endpoint serves, else ``None``."""
        return self._server.url if self._server is not None and self._server.running else None

    def summary(self) -> dict[str, Any]:
        """Figures for a closing report.

        Returns:
            ``steps`` and ``samples`` (training batches and samples seen), ``samples_per_second`` (recent
            throughput) and ``phase_seconds``: mean seconds per traced training step of ``data_fetch``,
            ``forward``, ``backward`` and ``optimizer_step``.
        """
        steps = max(self._phase_steps, 1)
        return {
            "steps": self._train_batches,
            "samples": self.metrics.samples_total,
            "samples_per_second": self.metrics.samples_per_second,
            "phase_seconds": {name: total / steps for name, total in self._phase_totals.items()},
        }

    # ------------------------------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        """Settings and counters, for ``strategy="ddp_spawn"`` (it pickles the callbacks into every worker).

        Locks, threads, the HTTP server and a tracer provider cannot cross a process boundary: they are left
        out and :meth:`__setstate__` builds new ones. A worker registers into its own
        ``prometheus_client.REGISTRY`` when the callback was given the global one, else into a private registry.
        """
        state = self.__dict__.copy()
        state["registry"] = "global" if self.registry is prometheus_client.REGISTRY else None
        state["gpu"] = (self.gpu.devices, self.gpu.poll_interval_s)
        if getattr(self.tracer, "tracer_provider", None) is not None:
            log.warning("The tracer_provider cannot be sent to spawned processes; they choose where spans go "
                        "from the OTEL_* variables instead.")
        state["tracer"] = (self.tracer.enabled, self.tracer.service_name, self.tracer.flush_timeout_s)
        metrics = copy.copy(self.metrics)
        metrics.progress_source = metrics.learning_rate_source = None  # bound to a Trainer of this process
        state["metrics"] = metrics
        state.update(_server=None, _running=False, _scalars=None, _record=None, _eval_record=None,
                     _losses=[], _epoch_loop=None, _logged_values=None,
                     _trainer_ref=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild what :meth:`__getstate__` left out."""
        state = dict(state)
        registry = state.pop("registry")
        devices, poll_interval_s = state.pop("gpu")
        enabled, service_name, flush_timeout_s = state.pop("tracer")
        self.__dict__.update(state)
        self.gpu = GPUMonitor(self.namespace, devices=devices, poll_interval_s=poll_interval_s)
        self.tracer = TrainingTracer(enabled=enabled, service_name=service_name, flush_timeout_s=flush_timeout_s)
        self.registry = CollectorRegistry(auto_describe=True)
        if registry == "global":
            self.registry = prometheus_client.REGISTRY
            registered = []
            try:
                for collector in (self.metrics, self.gpu):
                    self.registry.register(collector)
                    registered.append(collector)
            except ValueError:  # a copy inside the process that already registered the original: stay private
                for collector in registered:
                    self.registry.unregister(collector)
                self.registry = CollectorRegistry(auto_describe=True)
        if self.registry is not prometheus_client.REGISTRY:
            self.registry.register(self.metrics)
            self.registry.register(self.gpu)
        self._scalars = DeferredScalars()

    # ------------------------------------------------------------------------------------------ run lifecycle
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        labels = RankLabels.from_trainer(trainer)
        self.run_id = self._dist.agree_run_id(self.run_id)  # under DDP: rank 0's id (a collective of all ranks)
        self.metrics.labels = labels
        self.metrics.info = self._info(pl_module, labels)
        self.metrics.progress_source = lambda: (trainer.current_epoch, trainer.global_step)
        self.metrics.learning_rate_source = lambda: _learning_rates(trainer)
        self._update_model_figures(pl_module)
        port = self.port + labels.local_rank if self.port and self.port_per_local_rank else self.port
        self._server = MetricsServer(self.registry, self.addr, port, direct=(self.metrics,))
        failure: Optional[Exception] = None
        try:
            if port > 65535:
                raise ValueError(f"port {self.port} + local_rank {labels.local_rank} is above 65535; pass a lower "
                                 f"port, port=0 or port_per_local_rank=False")
            self._server.start()  # a taken port fails here, before any training step
        except (OSError, OverflowError, ValueError) as error:
            failure = error
        else:
            self.tracer.start({"training.run_id": self.run_id, "training.rank": labels.rank,
                               "training.local_rank": labels.local_rank, "training.node_rank": labels.node_rank,
                               "training.world_size": labels.world_size})
        # Every rank takes part in the exchange, also one whose server failed, so that no rank waits forever.
        self._dist.exchange(labels, self.addr, self._server.bound_port if failure is None else None,
                            self.tracer.active)
        if failure is not None:
            raise failure
        self._running = True
        # Logged values come from Lightning's own logging when it has loggers (it makes the numbers anyway);
        # otherwise the callback reads them itself at the same points. Detached again when the run ends.
        self._logged_values = None
        try:
            self._trainer_ref = weakref.ref(trainer)  # no cycle: the Trainer already holds this callback
        except TypeError:  # an object that cannot be weakly referenced (a stand-in Trainer)
            self._trainer_ref = lambda: trainer
        if getattr(trainer, "loggers", None):
            self._logged_values = LoggedValues(self._take_logged)
            trainer.loggers = [*trainer.loggers, self._logged_values]
        root = trainer.strategy.root_device
        self.gpu.start([root.index or 0] if root.type == "cuda" else [], labels.as_dict())
        self._dist.publish(labels, self.run_id)
        log.info("Serving training metrics at %s", self.metrics_url)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._end_run(None)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._end_run(exception)

    def _end_run(self, exception: Optional[BaseException]) -> None:
        """Release everything the run started; safe to call twice (on_exception, then teardown)."""
        if not self._running:
            return
        self._running = False
        try:
            self._scalars.flush()
            self._fold_nonfinite()
            self._scalars.flush()
        except Exception as error:  # a lost device must not turn the end of a run into a crash
            log.warning("Could not read the last training values: %s", error)
        self.metrics.freeze_live_values()
        self._detach_logger()
        self.gpu.stop()
        self._dist.finish(self.registry, self.metrics.labels, self.run_id)  # discovery file, Pushgateway
        self.tracer.finish(exception)
        if self._server is not None:
            self._server.stop()

    # ------------------------------------------------------------------------------------------ training
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_loop, self._log_every = _logging_step_source(trainer)
        if self._dist.rank == 0:
            self.tracer.start_epoch("train", trainer.current_epoch, {})
            self._dist.share_span_context(self.tracer.span_context("train"))  # no-op unless DDP and rank 0 traces
        else:
            parent = self._dist.share_span_context(None)
            self.tracer.start_epoch("train", trainer.current_epoch, {}, remote_parent=parent)
        self._fetch_start_ns = time.perf_counter_ns()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._train_batches % self.trace_every_n_steps == 0:
            try:
                record = BatchRecord("train", trainer.current_epoch, batch_idx, trainer.global_step, UNKNOWN,
                                     cuda=pl_module.device.type == "cuda")
                record.mark("fetch_start", self._fetch_start_ns)
                record.mark("batch_start")
                self._record = record
            except Exception as error:
                self._degrade(error)
        self._batch_start = time.perf_counter()

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self._record is not None:
            self._record.mark("backward_start")

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._record is not None:
            self._record.mark("backward_end")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._record is not None:
            self._record.mark("optimizer_start")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        end = time.perf_counter()
        try:
            size = self._sizer(batch)  # the same batch object on_train_batch_start saw
            record, self._record = self._record, None
            trace_id = None
            if record is not None:
                record.mark("batch_end")
                record.size = size
                trace_id = self.tracer.trace_id("train")
            self.metrics.observe_train_batch(end - self._batch_start, end, size, trace_id)
            self._train_batches += 1
            if record is not None:
                self._add_phases(record)
                self.tracer.add_batch(record)
            self._keep_loss(outputs)
            if len(self._losses) >= _FOLD_EVERY:
                self._fold_nonfinite()
            if self._scalars.pending:
                self._scalars.poll()
            if self._logged_values is None:
                loop = self._epoch_loop
                if (
                    (loop._batches_that_stepped + 1) % self._log_every == 0 or trainer.should_stop
                    if loop is not None
                    else _is_logging_step(trainer)
                ):
                    # No logger: Lightning makes no numbers, so read the logged tensors at its logging steps.
                    self._read_logged(trainer, ("training_loss", "training_accuracy"))
        except Exception as error:
            self._degrade(error)
        if self._train_batches % self.trace_every_n_steps == 0:  # the next batch is traced: time its fetch
            self._fetch_start_ns = time.perf_counter_ns()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.metrics.epoch_duration = time.perf_counter() - self._epoch_start
        self._read_logged(trainer, ("training_loss", "training_accuracy"))
        self._fold_nonfinite()
        if not self._model_figures_final:
            self._update_model_figures(pl_module)  # lazily initialised layers have their sizes now
        self.tracer.end_epoch("train")

    # ------------------------------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.tracer.start_epoch("validation", trainer.current_epoch, {})

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking:
            self._start_eval_batch("validation", trainer, pl_module, batch, batch_idx)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._end_eval_batch("validate", batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.tracer.end_epoch("validation")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._read_logged(trainer, ("validation_loss", "validation_accuracy"))

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.tracer.start_epoch("test", trainer.current_epoch, {})

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._start_eval_batch("test", trainer, pl_module, batch, batch_idx)

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._end_eval_batch("test", batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.tracer.end_epoch("test")

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.tracer.start_epoch("predict", trainer.current_epoch, {})

    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._start_eval_batch("predict", trainer, pl_module, batch, batch_idx)

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._end_eval_batch("predict", batch)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.tracer.end_epoch("predict")

    # ------------------------------------------------------------------------------------------ helpers
    def _degrade(self, error: Exception) -> None:
        """A monitoring fault never stops training: say so once, keep going."""
        if not self._degraded:
            self._degraded = True
            log.warning("Monitoring hit an error and skips what it could not measure; training continues (%s: %s)",
                        type(error).__name__, error, exc_info=error)

    def _start_eval_batch(
        self, span_stage: str, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._eval_record = None
        if batch_idx % self.trace_every_n_steps == 0:
            try:
                record = BatchRecord(span_stage, trainer.current_epoch, batch_idx, trainer.global_step, UNKNOWN,
                                     cuda=pl_module.device.type == "cuda")
                record.mark("batch_start")
                self._eval_record = record
            except Exception as error:
                self._degrade(error)
        self._eval_start = time.perf_counter()

    def _end_eval_batch(self, stage: str, batch: Any) -> None:
        seconds = time.perf_counter() - self._eval_start
        try:
            size = self._sizer(batch)
            self.metrics.observe_inference(stage, seconds, size.samples)
            record, self._eval_record = self._eval_record, None
            if record is not None:
                record.mark("batch_end")
                record.size = size
                self.tracer.add_batch(record)
        except Exception as error:
            self._degrade(error)

    def _add_phases(self, record: BatchRecord) -> None:
        for name, start_ns, end_ns in record.phases():
            self._phase_totals[name] = self._phase_totals.get(name, 0.0) + (end_ns - start_ns) / 1e9
        self._phase_steps += 1

    def _keep_loss(self, outputs: Any) -> None:
        """Keep this step's loss for the non-finite count, which is taken every few steps in one go: no read,
        no kernel and no synchronisation per step."""
        if type(outputs) is dict:  # what automatic optimization hands over; skips the slower ABC check
            loss = outputs.get("loss")
        elif isinstance(outputs, torch.Tensor):
            loss = outputs
        else:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # A loss that still carries its graph (manual optimization) must not keep the graph alive.
            self._losses.append(loss.detach() if loss.requires_grad else loss)

    def _fold_nonfinite(self) -> None:
        """Count the non-finite losses kept since the last fold: on the CPU at once, on a GPU with a few kernels
        whose result is read asynchronously."""
        losses, self._losses = self._losses, []
        if not losses:
            return
        if not losses[0].is_cuda:  # host values: read in one tight loop, cheaper than a read per step
            self._add_nonfinite(sum(1 for loss in losses if not math.isfinite(loss.item())))
            return
        if any(loss.dim() for loss in losses):
            losses = [loss.reshape(()) for loss in losses]
        nonfinite = torch.isfinite(torch.stack(losses)).logical_not_().sum()
        self._scalars.submit(nonfinite, lambda value: self._add_nonfinite(int(value)))

    def _add_nonfinite(self, count: int) -> None:
        self.metrics.nonfinite_losses += count

    def _read_logged(self, trainer: Trainer, suffixes: Sequence[str]) -> None:
        """Read logged values where Lightning has just computed them (a logging step without a logger, an epoch
        end, the end of validation); on a GPU the value is copied asynchronously."""
        logged = trainer.callback_metrics
        for suffix in suffixes:
            value = pick(logged, self.keys[suffix])
            if value is not None:
                self._scalars.submit(value, lambda v, s=suffix: self.metrics.set_logged(s, v))

    def _take_logged(self, logged: Mapping[str, float]) -> None:
        """What Lightning hands its loggers, already Python numbers."""
        for suffix, key in self.keys.items():
            value = pick(logged, key)
            if value is not None:
                self.metrics.set_logged(suffix, float(value))

    def _detach_logger(self) -> None:
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if self._logged_values is not None and trainer is not None:
            trainer.loggers = [lg for lg in trainer.loggers if lg is not self._logged_values]
        self._logged_values = None

    def _update_model_figures(self, pl_module: LightningModule) -> None:
        """Count parameters and bytes; repeated at epoch ends only while lazy layers are still uninitialised."""
        parameters = trainable = memory = 0
        lazy = False
        for parameter in pl_module.parameters():
            if isinstance(parameter, torch.nn.parameter.UninitializedParameter):
                lazy = True
                continue
            count = parameter.numel()
            parameters += count
            trainable += count if parameter.requires_grad else 0
            memory += count * parameter.element_size()
        for buffer in pl_module.buffers():
            if isinstance(buffer, torch.nn.parameter.UninitializedBuffer):
                lazy = True
            else:
                memory += buffer.numel() * buffer.element_size()
        self.metrics.model_figures = (parameters, trainable, memory)
        self._model_figures_final = not lazy

    def _info(self, pl_module: LightningModule, labels: RankLabels) -> dict[str, str]:
        try:
            import torch_geometric

            pyg_version = torch_geometric.__version__
        except ImportError:  # pragma: no cover - a dependency, but the callback works without it
            pyg_version = "none"
        model = type(pl_module)
        return {
            "model": f"{model.__module__}.{model.__qualname__}",
            "lightning_version": lightning.__version__,
            "torch_version": torch.__version__,
            "torch_geometric_version": pyg_version,
            "run_id": self.run_id,
        }


def _is_logging_step(trainer: Trainer) -> bool:
    """Whether Lightning sends logged values to its loggers after this training batch."""
    try:
        return bool(trainer._logger_connector.should_update_logs)
    except AttributeError:  # a Lightning without this private property: same rule, on the step count
        every = trainer.log_every_n_steps or 0
        return every > 0 and trainer.global_step % every == 0


def _logging_step_source(trainer: Trainer) -> tuple[Any, int]:
    """Lightning's loop object holding ``_batches_that_stepped``, and ``log_every_n_steps``; ``(None, 1)`` when
    this Lightning keeps them elsewhere (then :func:`_is_logging_step` is asked on every batch)."""
    every = trainer.log_every_n_steps
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if not every or not hasattr(loop, "_batches_that_stepped"):
        return None, 1
    return loop, int(every)


def _learning_rates(trainer: Trainer) -> LearningRates:
    """Each optimizer's param-group learning rates; read at scrape time, never per step."""
    rates: LearningRates = []
    optimizers = list(trainer.optimizers)
    names = [type(optimizer).__name__ for optimizer in optimizers]
    for index, optimizer in enumerate(optimizers):
        name = names[index] if names.count(names[index]) == 1 else f"{names[index]}-{index}"
        for group_index, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor):
                if lr.device.type != "cpu" or lr.numel() != 1:
                    continue  # reading a device tensor from the scrape thread would synchronise
                lr = lr.item()
            if isinstance(lr, (int, float)):
                rates.append((name, str(group_index), float(lr)))
    return rates
