"""Why a rank's training is slow and what to change: a verdict from the :mod:`~dgdn_lightning_monitor.time_ledger`
totals over a sliding window, with hysteresis, and one concrete hint naming the setting to change.

The rule, evaluated by :meth:`BottleneckJudge.evaluate` (at scrape time, and on the callback's own clock):

1. **Window**: from the newest evaluation back to the latest earlier one that lies at least ``window_steps``
   training steps *and* ``window_s`` seconds before it (the longer of the two; before that much history, everything
   since the first evaluation). Its wall time leaves out ``setup``, ``sanity_check`` and ``lost_progress``: one-time
   costs that no setting of the steady state changes.
2. **Shares** of that wall time, one per cause (:data:`CAUSES`):

   - ``input``: ``data_wait``, the loop waiting for its next batch; it is ``sampling`` instead when the sampler's
     own time is given and takes at least :data:`SAMPLING_PART` of the data wait (where PyG's sampler cannot be
     timed apart, a slow sampler shows as ``input``);
   - ``host_to_device``: moving the batch to the device, from the end of its fetch to the training step's first
     hook (Lightning's batch-transfer hooks and the copy: the ledger's
     :attr:`~dgdn_lightning_monitor.time_ledger.TimeLedger.transfer_s`). It is part of the step's compute, and is
     taken out of ``compute``;
   - ``validation``, ``checkpoint``, ``between_steps``, ``stall``: those categories;
   - ``straggler`` (DDP), the time the ranks wait for each other in the gradient all-reduce, from every rank's
     *own work* per training step (:data:`OWN_WORK`: ``data_wait`` + ``forward`` + ``between_steps``, what a rank
     does outside the all-reduce; :attr:`BottleneckJudge.own_work`, shared by
     :mod:`~dgdn_lightning_monitor.peers`). The larger of two figures, as a share of this rank's step time: how much
     longer this rank's forward, and all its own work, take than its peers' medians (the lesser of the two: this
     rank is the straggler, a slower device or larger batches; a slower input or logger shows as its own ``input``
     or ``between_steps``), and how much longer the slowest peer's own work takes than this rank's (this rank waits
     for that peer). Without the peers' figures (one process, or before every rank has a window) it is 0. A rank
     that waits at the start of its forward (DDP broadcasting buffers, ``broadcast_buffers=True`` with BatchNorm
     statistics) counts that wait as its own work: it sees no peer slower than itself;
   - ``compute``: the steps' compute (``forward`` + ``backward`` + ``optimizer_step``), the healthy verdict.
3. **Candidate**: the non-compute cause with the largest share if that is at least :data:`BOTTLENECK_SHARE` (20 %,
   as TraceML), else ``compute``. Causes at :data:`WARNING_SHARE` (10 %) or more are listed as warnings.
4. **Hysteresis**: the current verdict holds while its share stays at or above ``BOTTLENECK_SHARE -``
   :data:`RELEASE_MARGIN` (15 %), unless another cause exceeds it by that margin. A different candidate becomes
   the verdict once it was the candidate in :data:`HOLD_EVALUATIONS` (3) consecutive evaluations, and not before
   the window holds :data:`MIN_STEPS` (20) training steps: the step gate delays the verdict, not the evidence, so a
   run slow from its start is named at its 20th step. Evaluations closer than ``min_interval_s`` to the last
   counted one return the verdict unchanged, so a second scraper does not speed the hysteresis up.
5. **Stall** bypasses the gate and the hysteresis: while the ledger's ``stall`` grows (the run is past the stall
   threshold with no progress) the verdict is ``stall`` at once, whatever the window's steps.

Example::

    judge = BottleneckJudge(RunSettings.from_trainer(trainer, stall_after_s=600.0))
    verdict = judge.evaluate(time.perf_counter(), steps, ledger.totals())
    verdict.cause, verdict.hint  # "input", "the loop waits for batches 41 % of the time: num_workers=0 ..."
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple, Optional, Union

from dgdn_lightning_monitor.guards import check
from dgdn_lightning_monitor.time_ledger import CATEGORIES, COMPUTE

#: Every verdict; ``compute`` is the healthy one.
CAUSES: tuple[str, ...] = (
    "compute",
    "input",
    "sampling",
    "host_to_device",
    "validation",
    "checkpoint",
    "between_steps",
    "straggler",
    "stall",
)
#: A cause is the bottleneck from this share of the window's wall time on.
BOTTLENECK_SHARE = 0.20
#: A cause is listed as a warning from this share on.
WARNING_SHARE = 0.10
#: The current verdict ends when its share falls below ``BOTTLENECK_SHARE - RELEASE_MARGIN``; another cause takes
#: over a standing verdict only when it exceeds it by this much.
RELEASE_MARGIN = 0.05
#: Consecutive evaluations a new candidate must hold before it becomes the verdict.
HOLD_EVALUATIONS = 3
#: Training steps the window must hold before any verdict but ``compute`` (``stall`` excepted).
MIN_STEPS = 20
#: The data wait is ``sampling`` when the sampler's time is at least this part of it.
SAMPLING_PART = 0.5
#: The categories of a rank's own work in a training step, what it does outside the gradient all-reduce where
#: DDP's ranks wait for each other (the wait itself shows in ``backward``).
OWN_WORK: tuple[str, ...] = ("data_wait", "forward", "between_steps")

_OUTSIDE = ("setup", "sanity_check", "lost_progress")  # one-time costs, left out of the window's wall time
_IN_WINDOW = tuple(name for name in CATEGORIES if name not in _OUTSIDE)
_MAX_POINTS = 4096  # a long stall adds evaluations without steps; the window never needs more


NumNeighbors = Union[tuple[int, ...], dict[str, tuple[int, ...]]]


@dataclass(frozen=True)
class RunSettings:
    """The settings a hint names, as the run has them (``None``: not known, e.g. not a PyTorch ``DataLoader``).

    Build it with :meth:`from_trainer` once the Trainer has its training loader (``on_train_start``).
    """

    loader: str = ""  #: class name of the training loader (``NeighborLoader``, ``DataLoader``...)
    batch_size: Optional[int] = None
    num_workers: Optional[int] = None
    pin_memory: Optional[bool] = None
    persistent_workers: Optional[bool] = None
    prefetch_factor: Optional[int] = None
    #: a neighbour sampler's fan-out per hop (per edge type ``"src__rel__dst"`` for heterogeneous graphs)
    num_neighbors: Optional[NumNeighbors] = None
    device: str = ""  #: the root device's type (``cuda``, ``cpu``...)
    val_check_interval: Optional[Union[int, float]] = None
    check_val_every_n_epoch: Optional[int] = None
    limit_val_batches: Optional[Union[int, float]] = None
    #: the first ``ModelCheckpoint``'s schedule (``None`` without one)
    checkpoint_every_n_train_steps: Optional[int] = None
    checkpoint_every_n_epochs: Optional[int] = None
    checkpoint_train_time_interval: Optional[timedelta] = None
    save_top_k: Optional[int] = None
    async_checkpoint: Optional[bool] = None  #: whether checkpoints are written by ``AsyncCheckpointIO``
    log_every_n_steps: Optional[int] = None
    stall_after_s: Union[float, str, None] = None  #: the stall threshold (``stall_dump_after_s``: also ``"auto"``)

    @classmethod
    def from_trainer(cls, trainer: Any, stall_after_s: Union[float, str, None] = None) -> RunSettings:
        """Read the settings of ``trainer`` and its training loader (``trainer.train_dataloader``, set once ``fit``
        has set up its data: from ``on_train_start`` on; before that the loader's fields stay ``None``).

        Args:
            trainer: a Lightning ``Trainer``.
            stall_after_s: the callback's ``stall_dump_after_s``.
        """
        loader = first_loader(getattr(trainer, "train_dataloader", None))
        sampler = getattr(loader, "node_sampler", None) or getattr(loader, "link_sampler", None)  # PyG loaders
        checkpoint = getattr(trainer, "checkpoint_callback", None)
        strategy = getattr(trainer, "strategy", None)
        try:
            device = str(strategy.root_device.type) if strategy is not None else ""
        except Exception:  # a strategy without a device yet
            device = ""
        return cls(
            loader=type(loader).__name__ if loader is not None else "",
            batch_size=_int_or_none(getattr(loader, "batch_size", None)),
            num_workers=_int_or_none(getattr(loader, "num_workers", None)),
            pin_memory=_bool_or_none(getattr(loader, "pin_memory", None)),
            persistent_workers=_bool_or_none(getattr(loader, "persistent_workers", None)),
            prefetch_factor=_int_or_none(getattr(loader, "prefetch_factor", None)),
            num_neighbors=_fan_out(getattr(sampler, "num_neighbors", None)),
            device=device,
            val_check_interval=getattr(trainer, "val_check_interval", None),
            check_val_every_n_epoch=getattr(trainer, "check_val_every_n_epoch", None),
            limit_val_batches=getattr(trainer, "limit_val_batches", None),
            **_checkpoint_schedule(checkpoint),
            async_checkpoint=_async_checkpoint(strategy),
            log_every_n_steps=_int_or_none(getattr(trainer, "log_every_n_steps", None)),
            stall_after_s=stall_after_s,
        )


def first_loader(loaders: Any) -> Any:
    """The first loader of what ``trainer.train_dataloader`` holds (one loader, or a dict or list of them)."""
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    elif isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return loaders


def _int_or_none(value: Any) -> Optional[int]:
    return value if type(value) is int else None


def _bool_or_none(value: Any) -> Optional[bool]:
    return value if isinstance(value, bool) else None


def _fan_out(num_neighbors: Any) -> Optional[NumNeighbors]:
    """PyG's ``NumNeighbors`` (a sampler's ``num_neighbors``: ``.values``, a list or a dict by edge type)."""
    values = getattr(num_neighbors, "values", num_neighbors)
    if isinstance(values, Mapping):
        return {"__".join(key) if isinstance(key, tuple) else str(key): tuple(v) for key, v in values.items()}
    if isinstance(values, (list, tuple)):
        return tuple(int(v) for v in values)
    return None


def _checkpoint_schedule(callback: Any) -> dict[str, Any]:
    """The schedule of a ``ModelCheckpoint``. Lightning keeps ``every_n_train_steps`` and ``train_time_interval``
    only privately (``every_n_epochs`` and ``save_top_k`` are public): this is the one place that reads them."""
    if callback is None:
        return {}
    return {
        "checkpoint_every_n_train_steps": _int_or_none(getattr(callback, "_every_n_train_steps", None)),
        "checkpoint_every_n_epochs": _int_or_none(getattr(callback, "every_n_epochs", None)),
        "checkpoint_train_time_interval": getattr(callback, "_train_time_interval", None),
        "save_top_k": _int_or_none(getattr(callback, "save_top_k", None)),
    }


def _async_checkpoint(strategy: Any) -> Optional[bool]:
    try:
        from lightning.pytorch.plugins.io import AsyncCheckpointIO

        return isinstance(strategy.checkpoint_io, AsyncCheckpointIO)
    except Exception:  # a strategy without checkpoint IO
        return None


@dataclass(frozen=True)
class Verdict:
    """What :meth:`BottleneckJudge.evaluate` says.

    Attributes:
        cause: one of :data:`CAUSES`.
        hint: one sentence: what takes the time and the setting to change, with its current value.
        shares: every cause's share of the window's wall time (empty before a window exists).
        warnings: the other causes at :data:`WARNING_SHARE` or more, largest first.
        window_steps: training steps in the window.
        window_s: the window's wall time (setup, sanity check and lost progress left out).
    """

    cause: str
    hint: str
    shares: Mapping[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    window_steps: int = 0
    window_s: float = 0.0


class _Point(NamedTuple):
    """The cumulative figures of one evaluation."""

    time: float
    steps: int
    seconds: Mapping[str, float]
    sampling_s: float
    transfer_s: float
    sampled_edges: tuple[int, ...]


class BottleneckJudge:
    """A rank's bottleneck verdict by the rule of this module's docstring.

    Args:
        settings: the run's settings, for the hints.
        window_steps: the window covers at least this many training steps...
        window_s: ...and at least this many seconds (5 minutes: the dashboard's rate window).
        min_interval_s: evaluations closer than this to the last counted one change nothing.

    Example::

        judge = BottleneckJudge(settings)
        verdict = judge.evaluate(now, steps, ledger.totals(now), transfer_s=copy_seconds)
    """

    def __init__(
        self,
        settings: RunSettings = RunSettings(),
        window_steps: int = 100,
        window_s: float = 300.0,
        min_interval_s: float = 5.0,
    ) -> None:
        check("settings", settings, isinstance(settings, RunSettings), "a RunSettings")
        check("window_steps", window_steps, type(window_steps) is int and window_steps >= 1, "an integer >= 1")
        for name, value in (("window_s", window_s), ("min_interval_s", min_interval_s)):
            valid = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
            check(name, value, valid and not isinstance(value, bool), "a finite number of seconds >= 0")
        self.settings = settings
        self.window_steps, self.window_s, self.min_interval_s = window_steps, float(window_s), float(min_interval_s)
        self._points: deque[_Point] = deque(maxlen=_MAX_POINTS)
        self._cause = "compute"
        self._pending: Optional[str] = None  # a candidate other than the verdict, and for how many evaluations
        self._streak = 0
        self.verdict = Verdict("compute", hint("compute", settings, {}, {}))
        #: this rank's seconds per training step of each :data:`OWN_WORK` category over its latest window: what its
        #: peers pass as ``peers``; ``None`` before a window with steps exists.
        self.own_work: Optional[dict[str, float]] = None

    def evaluate(
        self,
        now: float,
        steps: int,
        seconds: Mapping[str, float],
        *,
        sampling_s: Optional[float] = None,
        transfer_s: Optional[float] = None,
        sampled_edges: Optional[Sequence[int]] = None,
        peers: Optional[Mapping[int, Mapping[str, float]]] = None,
    ) -> Verdict:
        """The verdict after a new evaluation; every figure but ``peers`` is cumulative since the run's start.

        Args:
            now: ``time.perf_counter()`` of the evaluation.
            steps: training steps so far.
            seconds: :meth:`~dgdn_lightning_monitor.time_ledger.TimeLedger.totals` at ``now``.
            sampling_s: seconds a neighbour sampler took for the batches so far, where it can be timed apart.
            transfer_s: seconds spent moving batches to the device (the ledger's ``transfer_s``).
            sampled_edges: edges the sampler drew per hop so far (hop 1 first, as ``sampled_edges_total``).
            peers: the other ranks' :attr:`own_work`, by rank.
        """
        points = self._points
        if points and now - points[-1].time < self.min_interval_s:
            return self.verdict
        edges = tuple(sampled_edges) if sampled_edges is not None else ()
        point = _Point(now, steps, dict(seconds), sampling_s or 0.0, transfer_s or 0.0, edges)
        previous = points[-1] if points else None
        points.append(point)
        while len(points) > 2:  # drop the oldest while the next one still spans a full window
            second = points[1]
            if steps - second.steps < self.window_steps or now - second.time < self.window_s:
                break
            points.popleft()
        if previous is None:
            return self.verdict
        shares, facts = self._shares(points[0], point, peers)
        stalled = point.seconds.get("stall", 0.0) > previous.seconds.get("stall", 0.0)
        self._decide(shares, facts, stalled)
        return self.verdict

    def _shares(
        self, old: _Point, new: _Point, peers: Optional[Mapping[int, Mapping[str, float]]]
    ) -> tuple[dict[str, float], dict[str, Any]]:
        delta = {name: new.seconds.get(name, 0.0) - old.seconds.get(name, 0.0) for name in _IN_WINDOW}
        wall = sum(delta.values())
        steps = new.steps - old.steps
        facts: dict[str, Any] = {"steps": steps, "wall": wall}
        if wall <= 0:
            return {}, facts
        transfer = min(max(new.transfer_s - old.transfer_s, 0.0), wall)
        data_wait = delta["data_wait"]
        sampling = max(new.sampling_s - old.sampling_s, 0.0)
        sampled = data_wait > 0 and sampling >= SAMPLING_PART * data_wait
        facts["sampling_part"] = sampling / data_wait if data_wait > 0 else 0.0
        hops = [
            n - (old.sampled_edges[i] if i < len(old.sampled_edges) else 0) for i, n in enumerate(new.sampled_edges)
        ]
        if hops and sum(hops) > 0:
            hop = max(range(len(hops)), key=hops.__getitem__)
            facts["hop"], facts["hop_part"] = hop + 1, hops[hop] / sum(hops)
        shares = dict.fromkeys(CAUSES, 0.0)
        shares["compute"] = max(sum(delta[name] for name in COMPUTE) - transfer, 0.0) / wall
        shares["sampling" if sampled else "input"] = data_wait / wall
        shares["host_to_device"] = transfer / wall
        for name in ("validation", "checkpoint", "between_steps", "stall"):
            shares[name] = delta[name] / wall
        if steps > 0:
            own = self.own_work = {name: delta[name] / steps for name in OWN_WORK}
            if peers:
                shares["straggler"] = _straggler(own, peers, wall / steps, facts)
        return shares, facts

    def _decide(self, shares: dict[str, float], facts: dict[str, Any], stalled: bool) -> None:
        if stalled:  # no progress past the threshold right now: said at once
            self._cause, self._pending, self._streak = "stall", None, 0
        elif shares:
            current = self._cause
            best = max((c for c in CAUSES if c != "compute"), key=shares.__getitem__)
            candidate = best if shares[best] >= BOTTLENECK_SHARE else "compute"
            held = current != "compute" and shares[current] >= BOTTLENECK_SHARE - RELEASE_MARGIN
            if held and (candidate == "compute" or shares[candidate] < shares[current] + RELEASE_MARGIN):
                candidate = current
            if candidate == current:
                self._pending, self._streak = None, 0
            else:
                self._streak = self._streak + 1 if candidate == self._pending else 1
                self._pending = candidate
                if self._streak >= HOLD_EVALUATIONS and (candidate == "compute" or facts["steps"] >= MIN_STEPS):
                    self._cause, self._pending, self._streak = candidate, None, 0
        cause = self._cause
        warnings = sorted(
            (c for c in CAUSES if c not in ("compute", cause) and shares.get(c, 0.0) >= WARNING_SHARE),
            key=lambda c: -shares[c],
        )
        self.verdict = Verdict(
            cause,
            hint(cause, self.settings, shares, facts),
            shares,
            tuple(warnings),
            int(facts["steps"]),
            float(facts["wall"]),
        )


def _straggler(
    own: Mapping[str, float], peers: Mapping[int, Mapping[str, float]], step_s: float, facts: dict[str, Any]
) -> float:
    """The ``straggler`` share (see the module's rule) from this rank's and its peers' own work per step; what it
    found goes to ``facts`` (``own``/``peer`` seconds, and ``slow_rank`` when a peer is the straggler)."""
    totals = {rank: sum(figures.get(name, 0.0) for name in OWN_WORK) for rank, figures in peers.items()}
    mine = sum(own.values())
    forward = statistics.median(figures.get("forward", 0.0) for figures in peers.values())
    # Slower in forward *and* in all its own work: a rank that waited at the forward's start (DDP broadcasting
    # buffers) has a longer forward but no more work than the peer it waited for.
    slow = max(min(own["forward"] - forward, mine - statistics.median(totals.values())), 0.0)
    rank = max(totals, key=totals.__getitem__)
    waits = max(totals[rank] - mine, 0.0)
    if slow >= waits:
        facts.update(own=own["forward"], peer=forward)
    else:
        facts.update(own=mine, peer=totals[rank], slow_rank=rank)
    return max(slow, waits) / step_s


def _percent(share: Optional[float]) -> str:
    return f"{share:.0%}" if share is not None else "an unknown part"


def hint(cause: str, settings: RunSettings, shares: Mapping[str, float] = {}, facts: Mapping[str, Any] = {}) -> str:
    """One sentence for ``cause``: what takes the time, and the setting to change with its current value.

    Args:
        cause: one of :data:`CAUSES`.
        settings: the run's settings.
        shares: each cause's share of the window's wall time.
        facts: what the judge found besides: ``sampling_part`` (the sampler's part of the data wait), ``hop`` and
            ``hop_part`` (the hop drawing most sampled edges, from 1, and its part), ``own`` and ``peer`` (this
            rank's forward and its peers' median forward seconds per step; with ``slow_rank``, that peer's own work
            and this rank's).
    """
    s, share = settings, _percent(shares.get(cause))
    if cause == "compute":
        return (
            f"the steps' compute takes {share} of the time and nothing else stands out: the model itself is the "
            f"limit; a larger batch (batch_size={s.batch_size}) uses the device better"
        )
    if cause == "input":
        if s.num_workers == 0:
            return (
                f"the loop waits for batches {share} of the time: num_workers=0 prepares every batch on the "
                "training thread; set num_workers to a few (e.g. 4) with persistent_workers=True"
            )
        restart = " and persistent_workers=False restarts them every epoch" if s.persistent_workers is False else ""
        return (
            f"the loop waits for batches {share} of the time: the num_workers={s.num_workers} workers do not keep "
            f"up{restart}; raise num_workers (prefetch_factor={s.prefetch_factor})"
        )
    if cause == "sampling":
        hop = facts.get("hop")
        fan_out = s.num_neighbors
        where = f"hop {hop} draws {_percent(facts.get('hop_part'))} of the sampled edges: " if hop else ""
        per_hop = ""
        if hop and isinstance(fan_out, tuple) and hop <= len(fan_out):
            per_hop = f" (hop {hop}: {fan_out[hop - 1]})"
        workers = " or sample in worker processes (num_workers=0)" if s.num_workers == 0 else ""
        return (
            f"the loop waits for batches {share} of the time, {_percent(facts.get('sampling_part'))} of it in "
            f"neighbour sampling; {where}lower the fan-out num_neighbors={_show(fan_out)}{per_hop}{workers}"
        )
    if cause == "host_to_device":
        if s.device in ("", "cpu"):  # nothing to copy: the time is the module's own batch-transfer hooks
            return (
                f"moving batches to the device takes {share} of the time on the {s.device or 'device'}, where nothing "
                "is copied: the module's batch-transfer hooks (on_before_batch_transfer, transfer_batch_to_device, "
                "on_after_batch_transfer) do that work; move it into the loader (num_workers="
                f"{s.num_workers}) or the step"
            )
        if s.pin_memory:
            return (
                f"copying batches to the {s.device} takes {share} of the time with pin_memory=True: "
                "the batches themselves are large; keep static node features on the device and send indices"
            )
        return (
            f"copying batches to the {s.device} takes {share} of the time: pin_memory={s.pin_memory}; "
            "set pin_memory=True so the copy runs from page-locked memory"
        )
    if cause == "validation":
        return (
            f"validation takes {share} of the time: val_check_interval={s.val_check_interval}, "
            f"check_val_every_n_epoch={s.check_val_every_n_epoch}, limit_val_batches={s.limit_val_batches}; "
            "validate less often or on fewer batches"
        )
    if cause == "checkpoint":
        schedule = (
            f"ModelCheckpoint(every_n_train_steps={s.checkpoint_every_n_train_steps}, "
            f"every_n_epochs={s.checkpoint_every_n_epochs}, train_time_interval={s.checkpoint_train_time_interval}, "
            f"save_top_k={s.save_top_k})"
            if s.save_top_k is not None
            else "no ModelCheckpoint (saved by trainer.save_checkpoint)"
        )
        asynchronous = (
            "save less often"
            if s.async_checkpoint
            else f"save less often, or write in the background: async_checkpoint={s.async_checkpoint}, "
            "pass plugins=[AsyncCheckpointIO()]"
        )
        return f"saving checkpoints takes {share} of the time: {schedule}; {asynchronous}"
    if cause == "between_steps":
        return (
            f"{share} of the time passes between steps, outside the monitor's view (loggers, other callbacks): "
            f"log_every_n_steps={s.log_every_n_steps}; log less often, and profile the other callbacks' batch hooks"
        )
    if cause == "straggler":
        if "own" not in facts:  # a standing verdict evaluated without the peers' figures (the run's end)
            return (
                "the ranks were waiting for each other in the gradient all-reduce when their figures were last "
                f"shared; each rank's own verdict says which one is slower (batch_size={s.batch_size})"
            )
        own, peer = f"{facts['own']:.3g} s", f"{facts['peer']:.3g} s"
        if "slow_rank" in facts:
            rank = facts["slow_rank"]
            return (
                f"rank {rank}'s own work (data wait, forward, time between steps) takes {peer} per step against this "
                f"rank's {own}: this rank waits {share} of the time for it in the gradient all-reduce; rank {rank}'s "
                f"own verdict says why (its input: num_workers={s.num_workers} on this rank)"
            )
        return (
            f"this rank's forward takes {own} per step against its peers' median {peer}: the other ranks wait "
            f"{share} of the time for it in the gradient all-reduce; look for a slower device here (its clocks, "
            f"another process on it) or larger batches on this rank (batch_size={s.batch_size})"
        )
    if cause == "stall":
        after = s.stall_after_s
        if isinstance(after, (int, float)):
            threshold = f"stall_dump_after_s={after} s"
        else:
            threshold = f"the threshold learned from the run (stall_dump_after_s={after!r})"
        return (
            f"no progress for longer than {threshold} ({share} of the time past it): the stack dumps in dgdn-dumps/ "
            "show where each thread waits"
        )
    raise ValueError(f"cause must be one of {', '.join(CAUSES)}, got {cause!r}")


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)
