"""What one run of a :class:`~dgdn_lightning_monitor.MonitoringCallback` holds between its hooks, and the timing of
the training loop's own fetch of each batch.

Example::

    run = RunState(trainer, server, stats, trace_floor_s=10.0)  # in setup; it times the fetches from now on
    ...
    run.unwatch_fetches()  # when the run ends
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

from dgdn_lightning_monitor.compat import fetch_hooks, restore_fetch_hooks, set_fetch_hooks
from dgdn_lightning_monitor.server import MetricsServer
from dgdn_lightning_monitor.steps import StepStatistics
from dgdn_lightning_monitor.tracing import BatchRecord


def watch_fetches(trainer: Any, run: Any) -> Callable[[], None]:
    """Time the training loop's own fetch of each batch into ``run.fetch_start_ns`` / ``run.fetch_end_ns``, and
    return how to stop. Lightning has no public hook around the fetch; its epoch loop's ``_on_before_fetch`` and
    ``_on_after_fetch`` (the profiler's boundaries) are wrapped on this Trainer's loop only, so ``data_fetch``
    excludes logging, mid-epoch validation and checkpointing. Without them ``data_fetch`` runs from the end of the
    previous batch (a test fails loudly when that happens)."""
    loop: Any = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    hooks = fetch_hooks(loop)
    if hooks is None:
        return lambda: None
    before, after = hooks
    clock = time.perf_counter_ns

    def before_fetch() -> None:
        run.fetch_start_ns = clock()
        before()

    def after_fetch() -> None:
        after()
        run.fetch_end_ns = clock()

    set_fetch_hooks(loop, before_fetch, after_fetch)
    return lambda: restore_fetch_hooks(loop)


class RunState:
    """What one run of a :class:`~dgdn_lightning_monitor.MonitoringCallback` holds between its hooks: built in
    ``setup``, dropped when the run ends.

    Args:
        trainer: the run's Trainer (its ``log_every_n_steps`` and training loop).
        server: the endpoint serving this run.
        stats: the run's step figures.
        trace_floor_s: longest time between two traced training steps.
    """

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
