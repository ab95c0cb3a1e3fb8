"""What one run gathers from its steps beyond the hook timestamps: non-finite losses, the phase times of traced
steps and the values the module logged, all on the training thread and without synchronising the device.

A scalar on the CPU is read at once. A CUDA scalar is copied into pinned host memory on the current stream with
``non_blocking=True`` and a CUDA event is recorded behind the copy; the value is taken later, once
``event.query()`` says the copy is done. Nothing here ever synchronises the device, not even at the end of a run.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch

from dgdn_lightning_monitor.compat import set_fetch_hooks
from dgdn_lightning_monitor.guards import WarnOnce
from dgdn_lightning_monitor.metrics import LOGGED_GAUGES, TRAIN_GAUGES, TrainingMetrics
from dgdn_lightning_monitor.server import MetricsServer
from dgdn_lightning_monitor.tracing import BatchRecord

#: Training losses are checked for NaN/inf together, every this many steps (and at epoch and run ends).
FOLD_EVERY = 50

Apply = Callable[[float], None]


class StepStatistics:
    """The step figures of one run, folded into ``metrics``.

    Args:
        metrics: where the figures go.
        keys: the key the module logs for each gauge of :data:`~dgdn_lightning_monitor.metrics.LOGGED_GAUGES`.
        warn: the owner's warn-once helper (says once that a configured key is never logged); ``None`` on the
            ranks other than 0, which would only repeat it.

    Example::

        stats = StepStatistics(metrics, {"training_loss": "train_loss", ...}, WarnOnce(log))
        stats.keep_loss(outputs, trainer)  # every step
        stats.read_logged(trainer.callback_metrics, TRAIN_GAUGES)
        stats.finish()
    """

    def __init__(self, metrics: TrainingMetrics, keys: Mapping[str, str], warn: Optional[WarnOnce]) -> None:
        self.metrics, self.keys, self.warn = metrics, keys, warn
        # Device work still running, as (is it done, deliver its result): copied values and traced CUDA steps. A
        # plain list, so the step path tests it without a call.
        self.pending: list[tuple[Callable[[], bool], Callable[[], None]]] = []
        self.losses: list[torch.Tensor] = []  # training losses since the last non-finite count
        self.automatic: Optional[bool] = None  # the module's automatic_optimization, known from its first step
        self.counted_logged_loss: Any = None  # the logged loss last counted (identity: a new tensor per self.log)
        self.warmed_up = False  # the first traced step of a run carries one-time costs: kept out of the means
        self.checked: set[tuple[str, ...]] = set()  # gauge groups whose keys were looked for once

    # ------------------------------------------------------------------------------------------ device reads
    def submit(self, value: Any, apply: Apply) -> None:
        """Deliver ``float(value)`` to ``apply``, now when that costs no synchronisation, else when copied."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return
            if value.device.type == "cuda":
                host = torch.empty((), dtype=value.dtype, pin_memory=True)
                host.copy_(value.detach().reshape(()), non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self.pending.append((event.query, lambda: apply(float(host.item()))))
            elif value.device.type == "cpu":  # other accelerators: no portable async read, skip rather than sync
                apply(float(value.item()))
        elif isinstance(value, (int, float)):
            apply(float(value))

    def poll(self) -> None:
        """Deliver what the device has finished (``Event.query``); never blocks."""
        waiting = []
        for done, deliver in self.pending:
            if done():
                deliver()
            else:
                waiting.append((done, deliver))
        self.pending = waiting

    # ------------------------------------------------------------------------------------------ losses
    def keep_loss(self, outputs: Any, trainer: Any) -> None:
        """Keep this step's loss for the non-finite count, taken every few steps in one go (no read, kernel or
        synchronisation per step). A step that returns no loss (manual optimisation) is counted from the
        training loss the module logged in it, so each step counts once either way."""
        # Lightning's automatic optimisation hands over a detached copy of the scalar loss it backpropagated.
        loss = outputs.get("loss") if self.automatic and type(outputs) is dict else None
        if loss is None and (loss := self._checked_loss(outputs, trainer)) is None:
            return
        losses = self.losses
        losses.append(loss)
        if len(losses) >= FOLD_EVERY:
            self.fold_nonfinite()

    def _checked_loss(self, outputs: Any, trainer: Any) -> Optional[torch.Tensor]:
        """This step's loss when it is not automatic optimisation's (the returned value or the logged loss),
        checked to be one value and kept without its graph; ``None`` when there is none to count."""
        if self.automatic is None:  # the first step tells
            module = getattr(trainer, "lightning_module", None)
            self.automatic = getattr(module, "automatic_optimization", False) is True
        if type(outputs) is dict:  # skips the slower ABC check
            loss = outputs.get("loss")
        elif isinstance(outputs, torch.Tensor):
            loss = outputs
        else:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if loss is None:
            key = self.keys["training_loss"]
            logged = trainer.callback_metrics
            loss = logged.get(key, logged.get(f"{key}_step"))
            if loss is self.counted_logged_loss:  # not logged again in this step
                return None
            self.counted_logged_loss = loss
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # A loss that still carries its graph (manual optimisation) must not keep the graph alive.
            return loss.detach() if loss.requires_grad else loss
        return None

    def fold_nonfinite(self) -> None:
        """Count the non-finite losses kept since the last fold: on the CPU at once, on a GPU with a few kernels
        whose result is read asynchronously."""
        losses, self.losses = self.losses, []
        if not losses:
            return
        metrics = self.metrics
        if not losses[0].is_cuda:  # host values: read in one tight loop, cheaper than a read per step
            for loss in losses:
                finite = math.isfinite(loss.item())
                metrics.nonfinite_losses += not finite
                metrics.nonfinite_streak = 0 if finite else metrics.nonfinite_streak + 1
            return
        flags = torch.isfinite(torch.stack([loss.reshape(()) for loss in losses])).logical_not_()
        self.submit(flags.sum(), self._add_nonfinite)
        # The trailing run of non-finite losses: the whole fold extends the streak, a shorter one replaces it.
        self.submit(flags.flip(0).cumprod(0).sum(), functools.partial(self._extend_streak, len(losses)))

    def _add_nonfinite(self, count: float) -> None:
        self.metrics.nonfinite_losses += int(count)

    def _extend_streak(self, folded: int, trailing: float) -> None:
        metrics = self.metrics
        metrics.nonfinite_streak = metrics.nonfinite_streak + folded if trailing == folded else int(trailing)

    # ------------------------------------------------------------------------------------------ phases
    def add_phases(self, record: BatchRecord) -> None:
        """A traced step's phases; on CUDA its device times follow once its events completed (see :meth:`poll`)."""
        host = {name: (end_ns - start_ns) / 1e9 for name, start_ns, end_ns in record.phases()}
        self.metrics.observe_phases(host, device=record.events is not None, warm_up=not self.warmed_up)
        self.warmed_up = True
        if record.events is not None:
            self.when_ready(record, self._add_device_phases)

    def when_ready(self, record: BatchRecord, deliver: Callable[[BatchRecord], None]) -> None:
        """Hand a traced record to ``deliver`` (e.g. the tracer) once its CUDA events completed: at once on the CPU,
        else when :meth:`poll` finds them done. (A record still on the device when the run ends is dropped.)"""
        if record.events is None:
            deliver(record)
        else:
            self.pending.append((record.device_ready, functools.partial(deliver, record)))

    def _add_device_phases(self, record: BatchRecord) -> None:
        for name, milliseconds in record.device_milliseconds().items():
            if name in self.metrics.phase_seconds and name != "data_fetch":  # the host waits for data
                self.metrics.phase_seconds[name].observe(milliseconds / 1e3)

    # ------------------------------------------------------------------------------------------ logged values
    def read_logged(self, logged: Mapping[str, Any], gauges: Sequence[str], check: bool = False) -> None:
        """Feed ``gauges`` from ``logged`` (``trainer.callback_metrics``); with ``check``, say once per group of
        gauges which configured keys the module has not logged, and what it did log."""
        missing = []
        for gauge in gauges:
            key = self.keys[gauge]
            for name in (key, f"{key}_step", f"{key}_epoch"):  # on_step and on_epoch both: key_step, key_epoch
                if logged.get(name) is not None:
                    self.submit(logged[name], functools.partial(self.metrics.set_logged, gauge))
                    break
            else:  # several evaluation loaders: Lightning logs "<key>/dataloader_idx_<N>" only
                prefix = f"{key}/dataloader_idx_"
                loaders = [(name[len(prefix) :], value) for name, value in logged.items() if name.startswith(prefix)]
                for loader, value in loaders:
                    self.submit(value, functools.partial(self.metrics.set_logged, gauge, dataloader=loader))
                if not loaders:
                    missing.append(gauge)
        if check and self.warn is not None and tuple(gauges) not in self.checked:
            self.checked.add(tuple(gauges))
            if missing:
                self.warn(
                    f"never-logged {gauges}",
                    "MonitoringCallback: the module has not logged %s by the end of its first %s, so %s stays "
                    "absent; it logged: %s. Pass the key it logs as %s.",
                    ", ".join(repr(self.keys[gauge]) for gauge in missing),
                    "training epoch" if gauges == TRAIN_GAUGES else "validation",
                    ", ".join(f"{self.metrics.namespace}_{gauge}" for gauge in missing),
                    ", ".join(sorted(logged)) or "nothing",
                    " / ".join(LOGGED_GAUGES[gauge] for gauge in missing),
                )

    def finish(self, timeout_s: float = 1.0) -> None:
        """At the end of a run: count the last losses and deliver what is pending, polling (not synchronising) for
        up to ``timeout_s``.

        The copies were queued behind the last training work, so they complete as soon as the device catches
        up; a device that does not within the bound keeps its last values unread.
        """
        self.fold_nonfinite()
        deadline = time.monotonic() + timeout_s
        self.poll()
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.001)
            self.poll()
        self.pending = []


def watch_fetches(trainer: Any, run: Any) -> Callable[[], None]:
    """Time the training loop's own fetch of each batch into ``run.fetch_start_ns`` / ``run.fetch_end_ns``, and
    return how to stop. Lightning has no public hook around the fetch; its epoch loop's ``_on_before_fetch`` and
    ``_on_after_fetch`` (the profiler's boundaries) are wrapped on this Trainer's loop only, so ``data_fetch``
    excludes logging, mid-epoch validation and checkpointing. Without them ``data_fetch`` runs from the end of the
    previous batch (a test fails loudly when that happens)."""
    loop: Any = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    before, after = getattr(loop, "_on_before_fetch", None), getattr(loop, "_on_after_fetch", None)
    if not (callable(before) and callable(after)):
        return lambda: None
    clock = time.perf_counter_ns

    def before_fetch() -> None:
        run.fetch_start_ns = clock()
        before()

    def after_fetch() -> None:
        after()
        run.fetch_end_ns = clock()

    set_fetch_hooks(loop, before_fetch, after_fetch)

    def unwatch() -> None:
        for name in ("_on_before_fetch", "_on_after_fetch"):
            loop.__dict__.pop(name, None)

    return unwatch


class RunState:
    """What one run of a :class:`~dgdn_lightning_monitor.MonitoringCallback` holds between its hooks: built in
    ``setup``, dropped when the run ends."""

    def __init__(self, trainer: Any, server: MetricsServer, stats: StepStatistics, trace_floor_s: float) -> None:
        self.server, self.stats = server, stats
        self.read_every = max(1, int(getattr(trainer, "log_every_n_steps", 0) or 50))
        self.train_epochs = self.fetch_start_ns = self.fetch_end_ns = 0
        self.epoch_start = self.eval_start = self.batch_start = 0.0
        # Whether the next training batch is traced (a run's first is: its warm-up step), and from when one is traced
        # whatever its number; set-up counts as a traced batch.
        self.trace_next, self.trace_due = True, time.perf_counter() + trace_floor_s
        self.record: Optional[BatchRecord] = None
        self.batch: Any = None  # the batch in flight, sized only if its step runs out of memory
        self.batch_idx = -1
        self.eval_record: Optional[BatchRecord] = None
        self.model_figures_final = False
        self.unwatch_fetches = watch_fetches(trainer, self)


def lightning_stage(trainer: Any) -> str:
    """Lightning's running stage: ``validate``, ``test`` or ``predict`` in the evaluation hooks."""
    stage = trainer.state.stage
    return stage.value if stage is not None else "validate"


def span_stage(trainer: Any) -> str:
    """The name the spans and batch records of Lightning's running evaluation stage carry."""
    stage = lightning_stage(trainer)
    return "validation" if stage == "validate" else stage
