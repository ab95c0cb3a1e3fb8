"""What one run of a :class:`~dgdn_lightning_monitor.MonitoringCallback` holds between its hooks, and the timing of
the training loop's own fetch of each batch.

Example::

    run = RunState(trainer, server, stats, trace_floor_s=10.0, stall_after_s=600.0)  # in setup: times the fetches
    ...
    run.unwatch()  # when the run ends
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Optional

from dgdn_lightning_monitor.bottleneck import BottleneckJudge, first_loader
from dgdn_lightning_monitor.compat import fetch_hooks, restore_fetch_hooks, set_fetch_hooks
from dgdn_lightning_monitor.server import MetricsServer
from dgdn_lightning_monitor.steps import StepStatistics
from dgdn_lightning_monitor.time_ledger import TimeLedger
from dgdn_lightning_monitor.tracing import BatchRecord


def watch_fetches(trainer: Any, run: Any) -> Callable[[], None]:
    """Time the training loop's own fetch of each batch into ``run.fetch_start_ns`` / ``run.fetch_end_ns`` and
    ``run.ledger`` (``data_wait``), and return how to stop. Lightning has no public hook around the fetch; its epoch
    loop's ``_on_before_fetch`` and ``_on_after_fetch`` (the profiler's boundaries) are wrapped on this Trainer's
    loop only, so ``data_fetch`` excludes logging, mid-epoch validation and checkpointing. Without them
    ``data_fetch`` runs from the end of the previous batch (a test fails loudly when that happens)."""
    loop: Any = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    hooks = fetch_hooks(loop)
    if hooks is None:
        return lambda: None
    before, after = hooks
    clock = time.perf_counter_ns
    fetch_started, fetch_ended = run.ledger.fetch_started, run.ledger.fetch_ended

    def before_fetch() -> None:
        run.fetch_start_ns = now = clock()
        fetch_started(now / 1e9)  # perf_counter() seconds, computed as perf_counter() does
        before()

    def after_fetch() -> None:
        after()
        run.fetch_end_ns = now = clock()
        fetch_ended(now / 1e9)

    set_fetch_hooks(loop, before_fetch, after_fetch)
    return lambda: restore_fetch_hooks(loop)


def watch_checkpoints(trainer: Any, ledger: TimeLedger) -> Optional[Callable[[], None]]:
    """Time every checkpoint save of ``trainer`` whole as ``checkpoint`` in ``ledger`` (progress at its end), by
    wrapping this Trainer's public ``save_checkpoint`` (``ModelCheckpoint`` calls it); returns how to stop, or
    ``None`` when it cannot be wrapped (then ``on_save_checkpoint`` enters ``checkpoint``)."""
    save = getattr(trainer, "save_checkpoint", None)
    if save is None:  # a Trainer stand-in
        return None
    own = getattr(trainer, "__dict__", {}).get("save_checkpoint")  # wrapped on this instance (by the user): kept

    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        previous = ledger.enter("checkpoint", time.perf_counter())
        try:
            return save(*args, **kwargs)
        finally:
            now = time.perf_counter()
            ledger.progress(now)
            ledger.enter(previous, now)

    try:
        trainer.save_checkpoint = save_checkpoint
    except (AttributeError, TypeError):  # a Trainer stand-in with slots
        return None

    def restore() -> None:
        if own is not None:
            trainer.save_checkpoint = own
        else:
            vars(trainer).pop("save_checkpoint", None)

    return restore


def watch_sampler(loaders: Any, run: Any) -> Callable[[], None]:
    """With a PyG ``NeighborLoader``/``LinkNeighborLoader`` (the first training loader) that samples on the
    training thread (``num_workers=0``), add the seconds of each sampling call (``node_sampler.sample_from_nodes``
    or ``link_sampler.sample_from_edges``, wrapped on that sampler instance) to ``run.sampling_s``; returns how to
    stop. In worker processes the sampler cannot be timed (its time is part of the data wait)."""
    loader = first_loader(loaders)
    if getattr(loader, "num_workers", None) != 0:
        return lambda: None
    for attribute, method in (("node_sampler", "sample_from_nodes"), ("link_sampler", "sample_from_edges")):
        sampler = getattr(loader, attribute, None)
        sample = getattr(sampler, method, None)
        if callable(sample):
            break
    else:
        return lambda: None
    clock = time.perf_counter
    run.sampling_s = 0.0

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return sample(*args, **kwargs)
        finally:
            run.sampling_s += clock() - start

    own = vars(sampler).get(method)
    setattr(sampler, method, timed)

    def restore() -> None:
        if own is not None:
            setattr(sampler, method, own)
        else:
            vars(sampler).pop(method, None)

    return restore


class RunState:
    """What one run of a :class:`~dgdn_lightning_monitor.MonitoringCallback` holds between its hooks: built in
    ``setup``, dropped when the run ends.

    Args:
        trainer: the run's Trainer (its ``log_every_n_steps`` and training loop).
        server: the endpoint serving this run.
        stats: the run's step figures.
        trace_floor_s: longest time between two traced training steps.
        stall_after_s: the stall threshold of the run's :class:`~dgdn_lightning_monitor.time_ledger.TimeLedger`.
        judge: the run's bottleneck judge (by default one with its default window).
        start: when the ledger starts (``perf_counter``; by default now): the start of the callback's ``setup``.
        stall_learned: the threshold is learned (``stall_after_s`` its floor; the watchdog marks each stall).
    """

    def __init__(
        self,
        trainer: Any,
        server: MetricsServer,
        stats: StepStatistics,
        trace_floor_s: float,
        stall_after_s: Optional[float] = None,
        judge: Optional[BottleneckJudge] = None,
        start: Optional[float] = None,
        stall_learned: bool = False,
    ) -> None:
        self.server, self.stats = server, stats
        # Where the run's time goes, from now on; the sampled steps' phases split its compute.
        self.ledger = stats.ledger = TimeLedger(
            stall_after_s, time.perf_counter() if start is None else start, learned=stall_learned
        )
        self.judge = judge if judge is not None else BottleneckJudge()
        self.sampling_s: Optional[float] = None  # a PyG sampler's seconds, where it runs on the training thread
        self.peers: Any = None  # the run's PeerExchange (set up by the callback)
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
        self.unwatch_checkpoints = watch_checkpoints(trainer, self.ledger)
        self.unwatch_sampler: Callable[[], None] = lambda: None  # from on_train_start (the loader is known then)
        self.ledger_file: Any = None  # the ledger's side file (a Path, set by the callback)
        self.ledger_side_due = math.inf  # when it is written next (never before the first checkpoint)
        self.ledger_resume = "setup"  # the category an evaluation interrupted

    def unwatch(self) -> None:
        """Undo every wrapper this run put on the Trainer and its loader."""
        self.unwatch_fetches()
        if self.unwatch_checkpoints is not None:
            self.unwatch_checkpoints()
        self.unwatch_sampler()
