"""What one run gathers from its steps beyond the hook timestamps: non-finite losses, the phase times of traced
steps and the values the module logged, all on the training thread and without synchronising the device.

A scalar on the CPU is read at once. A CUDA scalar is copied into pinned host memory on the current stream with
``non_blocking=True`` and a CUDA event is recorded behind the copy; the value is taken later, once
``event.query()`` says the copy is done. Nothing here ever synchronises the device, not even at the end of a run.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch

from dgdn_lightning_monitor.guards import WarnOnce
from dgdn_lightning_monitor.metrics import TrainingMetrics
from dgdn_lightning_monitor.time_ledger import TimeLedger
from dgdn_lightning_monitor.tracing import BatchRecord
from dgdn_lightning_monitor.vocabulary import LOGGED_GAUGES, TRAIN_GAUGES

#: Training losses are checked for NaN/inf together, every this many steps (and at epoch and run ends).
FOLD_EVERY = 50

log = logging.getLogger(__name__)

Apply = Callable[[float], None]

NEVER_LOGGED = (
    "MonitoringCallback: the module has not logged %s by the end of its first %s, so %s stays absent; it logged: "
    "%s. Pass the key it logs as %s."
)


class StepStatistics:
    """The step figures of one run, folded into ``metrics``.

    Args:
        metrics: where the figures go.
        keys: the key the module logs for each gauge of :data:`~dgdn_lightning_monitor.vocabulary.LOGGED_GAUGES`.
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
        self.checked = WarnOnce(log)  # gauge groups looked for in this run: the first check of each counts
        self.ledger: Optional[TimeLedger] = None  # the run's time ledger: traced steps' phases split its compute

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
        if not losses[0].is_cuda:  # host values: read in one tight loop, cheaper than a read per step
            nonfinite = [not math.isfinite(loss.item()) for loss in losses]
            trailing = next((i for i, flag in enumerate(reversed(nonfinite)) if not flag), len(nonfinite))
            self.metrics.record_nonfinite(sum(nonfinite))
            self.metrics.record_nonfinite_streak(len(losses), trailing)
            return
        flags = torch.isfinite(torch.stack([loss.reshape(()) for loss in losses])).logical_not_()
        self.submit(flags.sum(), self._add_nonfinite)
        # The trailing run of non-finite losses: the whole fold extends the streak, a shorter one replaces it.
        self.submit(flags.flip(0).cumprod(0).sum(), functools.partial(self._extend_streak, len(losses)))

    def _add_nonfinite(self, count: float) -> None:
        self.metrics.record_nonfinite(int(count))

    def _extend_streak(self, folded: int, trailing: float) -> None:
        self.metrics.record_nonfinite_streak(folded, int(trailing))

    # ------------------------------------------------------------------------------------------ phases
    def add_phases(self, record: BatchRecord) -> None:
        """A traced step's phases; on CUDA its device times follow once its events completed (see :meth:`poll`)."""
        host = {name: (end_ns - start_ns) / 1e9 for name, start_ns, end_ns in record.phases()}
        self.metrics.observe_phases(host, device=record.events is not None, warm_up=not self.warmed_up)
        self.warmed_up = True
        if record.events is not None:
            self.when_ready(record, self._add_device_phases)
        elif self.ledger is not None:
            self.ledger.phase_sample(host)

    def when_ready(self, record: BatchRecord, deliver: Callable[[BatchRecord], None]) -> None:
        """Hand a traced record to ``deliver`` (e.g. the tracer) once its CUDA events completed: at once on the CPU,
        else when :meth:`poll` finds them done. (A record still on the device when the run ends is dropped.)"""
        if record.events is None:
            deliver(record)
        else:
            self.pending.append((record.device_ready, functools.partial(deliver, record)))

    def _add_device_phases(self, record: BatchRecord) -> None:
        milliseconds = record.device_milliseconds()
        self.metrics.observe_device_phases(milliseconds)
        if self.ledger is not None:
            self.ledger.phase_sample({name: value / 1e3 for name, value in milliseconds.items()})

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
        if check and self.warn is not None and self.checked(tuple(gauges), None) and missing:
            self.warn(
                f"never-logged {gauges}",
                NEVER_LOGGED,
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
