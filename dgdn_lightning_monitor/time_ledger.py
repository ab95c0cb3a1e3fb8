"""Where every second of a run went: a ledger that puts each moment since set-up into exactly one category.

Categories (:data:`CATEGORIES`):

``setup``
    from the ledger's start until the first training fetch (also between the sanity check and that fetch).
``sanity_check``
    Lightning's sanity-check validation.
``data_wait``
    the training loop waiting for its next batch (the fetch: DataLoader, sampler, collate).
``forward``, ``backward``, ``optimizer_step``
    the step's compute, from the end of its fetch to the end of its batch. Its first part, moving the batch to
    the device (from the fetch's end to the batch's first hook, :meth:`TimeLedger.batch_started`), is also kept
    apart as :attr:`TimeLedger.transfer_s`.
``validation``
    validation during ``fit``.
``checkpoint``
    saving a checkpoint.
``between_steps``
    from the end of one batch to the next fetch: what runs outside the monitor's view (loggers, other callbacks,
    the loop itself).
``stall``
    the part of a gap between two progress events (the ledger's start, a training step's end, an evaluation or
    sanity-check batch's end, a checkpoint save) that exceeds the stall threshold, whatever category it would
    have gone to: a gap of 700 s between two steps' ends with a 600 s threshold leaves its first 600 s where they
    were spent (``data_wait``, when the loader hung) and counts its last 100 s as ``stall``. A read during a stall
    shows the excess so far. With a threshold learned from the run (``stall_dump_after_s="auto"``) the ledger is
    told where each stall begins (:meth:`TimeLedger.stalled`, by the watchdog at its deadline): ``stall`` is then
    exactly the time past the threshold the watchdog judged by.
``lost_progress``
    for a resumed or requeued run, the previous attempt's time after its last checkpoint
    (:meth:`TimeLedger.add_lost_progress`, :func:`lost_seconds`).

The compute split. Phase marks exist on sampled (traced) steps only, so the ledger counts each step's whole
compute time every step and splits it into ``forward``/``backward``/``optimizer_step`` by the proportions of the
sampled steps (:meth:`TimeLedger.phase_sample`): an exponentially weighted mean of each sample's shares, a new
sample weighing :data:`PHASE_SAMPLE_WEIGHT`, so the run's warm-up step fades out and a change of balance shows
within a few samples. Compute is folded into the three phases with the shares in force when a new sample
arrives, so a read never sees a phase's total go down (they are exported as counters). Until the first sample
all compute counts as ``forward``: the phase table (:data:`~dgdn_lightning_monitor.vocabulary.PHASES`) runs forward
from the batch start to the first backward/optimizer mark or the batch end, so a step with no known marks is all
forward; an even split would invent backward and optimizer time that a module without them never spends. The
run's first step is traced, so this covers one step (a few on CUDA, until its device times are read).

Reads (:meth:`TimeLedger.totals`, from the scrape thread) and writes (the training thread) share no lock; every
category's total only ever grows from one read to the next (a counter that went back down would read to
Prometheus as a reset), and the totals of a read sum to its time minus the start. Two rules make that so:

- every write is bracketed by a sequence number, odd while it is under way (a seqlock); a read copies the few
  fields and keeps the copy only when the number was even and unchanged across it, else it retries. A torn copy
  could count an interval twice (closed and still open) or not at all;
- a read first publishes its time as a floor, and a transition stamped earlier counts as at the floor: the
  training thread takes its time before the call and may be switched out in between, and a read in that gap has
  already given the time up to its own to the category the transition then closes. The floor moves that transition
  by at most the gap, so the ledger never takes back what a read reported.

The writer pays two integer stores and one comparison per transition; readers take a lock among themselves only.

From the callback's hooks: ``setup`` builds the ledger; the fetch hooks call :meth:`~TimeLedger.fetch_started`
and :meth:`~TimeLedger.fetch_ended`, ``on_train_batch_start`` :meth:`~TimeLedger.batch_started`,
``on_train_batch_end`` :meth:`~TimeLedger.step_ended`; the sanity check and
validation :meth:`~TimeLedger.enter` their category and back, each of their batches being
:meth:`~TimeLedger.progress`; a sampled step's phases go to :meth:`~TimeLedger.phase_sample`. A checkpoint save
is timed whole by wrapping the Trainer's public ``save_checkpoint`` (which ``ModelCheckpoint`` calls; it builds the
checkpoint, calls ``on_save_checkpoint``, writes it and waits for the other ranks): ``enter("checkpoint")`` before,
back to the category it interrupted after. Where that cannot be wrapped, ``on_save_checkpoint`` (called before
the write) enters ``checkpoint`` and the next hook that moves the ledger ends it, which also counts what runs after
the write in the same hook chain. With ``AsyncCheckpointIO`` only the part training waits for counts.

Example::

    ledger = TimeLedger(stall_after_s=600.0, now=time.perf_counter())  # in setup: "setup" from now on
    ledger.fetch_started(t0)  # the loop asks for a batch: data_wait
    ledger.fetch_ended(t1)  # the batch is there: compute
    ledger.step_ended(t2)  # on_train_batch_end: between_steps, and progress
    ledger.totals(time.perf_counter())  # {"setup": ..., "data_wait": ..., ...}, summing to now - ledger.start
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

#: Every category, in the order of :meth:`TimeLedger.totals`.
CATEGORIES: tuple[str, ...] = (
    "setup",
    "sanity_check",
    "data_wait",
    "forward",
    "backward",
    "optimizer_step",
    "validation",
    "checkpoint",
    "between_steps",
    "stall",
    "lost_progress",
)
#: The categories that are the step's compute (the numerator of the goodput ratio).
COMPUTE: tuple[str, ...] = ("forward", "backward", "optimizer_step")
#: The weight of a new sampled step's phase shares in the running shares.
PHASE_SAMPLE_WEIGHT = 0.25

_INDEX = {name: index for index, name in enumerate(CATEGORIES)}
_SETUP, _DATA_WAIT, _BETWEEN, _STALL, _LOST = (
    _INDEX[name] for name in ("setup", "data_wait", "between_steps", "stall", "lost_progress")
)
_FORWARD, _BACKWARD, _OPTIMIZER = (_INDEX[name] for name in COMPUTE)
_STEP = len(CATEGORIES)  # the slot of compute not yet split into phases (the category during a step)
#: What :meth:`TimeLedger.enter` accepts: the categories a hook can open ("compute": a step's compute).
ENTERABLE: dict[str, int] = {
    **{name: _INDEX[name] for name in ("setup", "sanity_check", "data_wait", "validation", "checkpoint")},
    "between_steps": _BETWEEN,
    "compute": _STEP,
}
_NAMES = {index: name for name, index in ENTERABLE.items()}
_Snapshot = tuple[list[float], int, float, float, tuple[float, float, float]]
_READ_TRIES = 1000  # a write takes a few bytecodes; only a writer killed mid-write (Ctrl-C) exhausts this


def _seconds_arg(name: str, value: Any) -> float:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not valid:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


class TimeLedger:
    """Partition the wall time of one rank's run into :data:`CATEGORIES`; one ledger per run (or carried on with
    :meth:`load_state_dict`).

    Times are ``time.perf_counter()`` seconds taken by the caller, never decreasing (a time earlier than the last
    transition counts as that transition's time). Transitions are a few attribute updates, for the step path.

    Args:
        stall_after_s: the stall threshold (the watchdog's ``stall_dump_after_s``); ``None``: no ``stall``. With
            ``learned``, the least a learned threshold can be.
        now: when the ledger starts (the callback's ``setup``); the run is in ``setup`` from then on.
        learned: the threshold is learned elsewhere: a gap turns into ``stall`` only from where :meth:`stalled`
            says, never before ``stall_after_s``.

    Example::

        ledger = TimeLedger(600.0, now=time.perf_counter())
        previous = ledger.enter("validation", time.perf_counter())
        ledger.progress(time.perf_counter())  # each validation batch's end
        ledger.enter(previous, time.perf_counter())
        ledger.goodput_ratio(time.perf_counter())
    """

    def __init__(
        self, stall_after_s: Optional[float] = None, now: Optional[float] = None, *, learned: bool = False
    ) -> None:
        if stall_after_s is not None and (_seconds_arg("stall_after_s", stall_after_s) <= 0):
            raise ValueError(f"stall_after_s must be seconds > 0 or None, got {stall_after_s!r}")
        start = time.perf_counter() if now is None else float(now)
        self._stall_after = math.inf if stall_after_s is None else float(stall_after_s)
        self._start = start  # moved back by carried and lost seconds, so that the totals sum to now - start
        # Everything below is written under the sequence number _version (odd while a write is under way).
        self._version = 0
        self._seconds = [0.0] * (len(CATEGORIES) + 1)  # closed intervals per category, + compute not yet split
        self._category = _SETUP
        self._since = start  # start of the open interval
        self._stall_from = start + self._stall_after  # the open gap turns into stall from here
        # learned: _stall_from is only the earliest it can; the stall begins at the latest mark past the gap's start.
        self._learned = learned
        self._stall_mark = -math.inf
        self._shares = (1.0, 0.0, 0.0)  # forward, backward, optimizer_step shares of compute (see the module doc)
        self._sampled = False
        self._carried: dict[str, float] = {}  # what load_state_dict added
        self._floor = -math.inf  # the latest read's time: no transition is stamped before it (module docstring)
        self._reading = threading.Lock()  # among readers only
        self._last_read: Optional[_Snapshot] = None  # the last consistent copy (see _snapshot)
        #: seconds of the steps' compute spent moving batches to the device (see :meth:`batch_started`); one float,
        #: written by the training thread only, so a read from another thread needs no lock.
        self.transfer_s = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reading": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _reading=threading.Lock())

    # ------------------------------------------------------------------------------------------ transitions
    # The three per-step transitions are written out in full (one call each, the common case first): a shared
    # helper would cost a second call per transition.
    def fetch_started(self, now: float) -> None:
        """The training loop asks for its next batch (``before_fetch``): ``data_wait``."""
        version = self._version + 1
        self._version = version
        since = self._since
        if since <= now <= self._stall_from and self._floor <= now:
            self._seconds[self._category] += now - since
        else:
            now = self._close_late(now)
        self._category = _DATA_WAIT
        self._since = now
        self._version = version + 1

    def fetch_ended(self, now: float) -> None:
        """The batch is there (``after_fetch``): the step's compute, until :meth:`step_ended`."""
        version = self._version + 1
        self._version = version
        since = self._since
        if since <= now <= self._stall_from and self._floor <= now:
            self._seconds[self._category] += now - since
        else:
            now = self._close_late(now)
        self._category = _STEP
        self._since = now
        self._version = version + 1

    def step_ended(self, now: float) -> None:
        """A training batch ended (``on_train_batch_end``): progress, then ``between_steps``."""
        version = self._version + 1
        self._version = version
        since = self._since
        if since <= now <= self._stall_from and self._floor <= now:
            self._seconds[self._category] += now - since
        else:
            now = self._close_late(now)
        self._category = _BETWEEN
        self._since = now
        self._stall_from = now + self._stall_after
        self._version = version + 1

    def batch_started(self, now: float) -> None:
        """The batch is on the device (``on_train_batch_start``): the time since its fetch ended went to moving it
        there (Lightning's batch-transfer hooks and the copy) and counts to :attr:`transfer_s`. Nothing when no
        fetch ended since the last step (a ``training_step`` that fetches its own batches)."""
        if self._category == _STEP and now > self._since:
            self.transfer_s += now - self._since

    def stalled(self, at: float) -> None:
        """With a learned threshold: the current gap turned into a stall at ``at`` (``perf_counter`` seconds). From
        the thread that judged it (one attribute write); never earlier than the latest read, so that no read has
        counted the time since elsewhere."""
        self._stall_mark = max(at, self._floor)

    def _stall_begins(self, stall_from: float) -> float:
        """Where the open gap turns into stall: ``stall_from``, or with a learned threshold the mark when it is past
        the gap's start (infinity without one)."""
        if not self._learned:
            return stall_from
        mark = self._stall_mark
        return max(mark, stall_from) if mark >= stall_from - self._stall_after else math.inf

    def _close_late(self, now: float) -> float:
        """Close the open interval at ``now`` when that is past the stall threshold (the excess into ``stall``), or
        at the interval's start or a read's floor when ``now`` is before them; returns the time closed at. Inside a
        write."""
        since = self._since
        now = max(now, since, self._floor)
        seconds, stall_from = self._seconds, self._stall_begins(self._stall_from)
        if now <= stall_from:
            seconds[self._category] += now - since
            return now
        if stall_from > since:
            seconds[self._category] += stall_from - since
            since = stall_from
        seconds[_STALL] += now - since
        return now

    def _switch(self, to: int, now: float, progress: bool) -> None:
        """The transitions that are not per step: close the open interval at ``now`` and open ``to``; with
        ``progress``, the gap the stall threshold applies to starts again at ``now``."""
        version = self._version + 1
        self._version = version
        since = self._since
        if since <= now <= self._stall_from and self._floor <= now:
            self._seconds[self._category] += now - since
        else:
            now = self._close_late(now)
        self._category = to
        self._since = now
        if progress:
            self._stall_from = now + self._stall_after
        self._version = version + 1

    def progress(self, now: float) -> None:
        """Progress outside a training step (an evaluation or sanity-check batch, a checkpoint save): the gap
        that the stall threshold applies to starts again; the category stays."""
        self._switch(self._category, now, True)

    def enter(self, category: str, now: float) -> str:
        """Move to ``category`` (one of :data:`ENTERABLE`) at ``now``, for the transitions that are not per step
        (sanity check, validation, checkpoint); returns the category left, to :meth:`enter` again afterwards."""
        index = ENTERABLE.get(category)
        if index is None:
            raise ValueError(f"category must be one of {', '.join(ENTERABLE)}, got {category!r}")
        previous = self._category
        self._switch(index, now, False)
        return _NAMES[previous]

    def phase_sample(self, phases: Mapping[str, float]) -> None:
        """A sampled step's phase seconds (host or device), as :data:`~dgdn_lightning_monitor.vocabulary.PHASES`
        names them; ``data_fetch`` and missing phases are ignored. Compute counted so far is split with the shares
        in force, then the new step's shares enter the running shares."""
        sample = [phases.get(name, 0.0) for name in COMPUTE]
        total = sum(sample)
        if not (total > 0 and math.isfinite(total) and min(sample) >= 0):
            return
        new = [value / total for value in sample]
        if self._sampled:
            new = [old + PHASE_SAMPLE_WEIGHT * (value - old) for old, value in zip(self._shares, new)]
        version = self._version + 1
        self._version = version
        self._fold()
        self._shares = (new[0], new[1], new[2])
        self._sampled = True
        self._version = version + 1

    def _fold(self) -> None:
        seconds, (forward, backward, _) = self._seconds, self._shares
        pending = seconds[_STEP]
        seconds[_FORWARD] += pending * forward
        seconds[_BACKWARD] += pending * backward
        seconds[_OPTIMIZER] += pending - pending * forward - pending * backward
        seconds[_STEP] = 0.0

    # ------------------------------------------------------------------------------------------ resumed runs
    def add_lost_progress(self, seconds: float) -> None:
        """Count a previous attempt's time after its last checkpoint (see :func:`lost_seconds`) as
        ``lost_progress``; the wall time grows by as much."""
        lost = _seconds_arg("seconds", seconds)
        version = self._version + 1
        self._version = version
        self._seconds[_LOST] += lost
        self._start -= lost
        self._version = version + 1

    def state_dict(self, now: Optional[float] = None) -> dict[str, Any]:
        """What a checkpoint keeps: the totals at ``now`` (by default the current time)."""
        return {"version": 1, "seconds": self.totals(now)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Carry on from a checkpoint's :meth:`state_dict`: its totals are added to this ledger's (replacing what
        an earlier load added), and the wall time grows by their sum."""
        carried = state.get("seconds") if isinstance(state, Mapping) else None
        if not isinstance(carried, Mapping) or set(carried) - set(CATEGORIES):
            raise ValueError(f"state must be a TimeLedger.state_dict() with 'seconds' per category, got {state!r}")
        new = {name: _seconds_arg(f"state['seconds'][{name!r}]", value) for name, value in carried.items()}
        version = self._version + 1
        self._version = version
        for name in CATEGORIES:
            delta = new.get(name, 0.0) - self._carried.get(name, 0.0)
            self._seconds[_INDEX[name]] += delta
            self._start -= delta
        self._carried = new
        self._version = version + 1

    # ------------------------------------------------------------------------------------------ reads
    @property
    def start(self) -> float:
        """The time the totals count from (``perf_counter``): the start, earlier by the carried and lost seconds."""
        return self._start

    @property
    def category(self) -> str:
        """The category the run is in now (``compute`` during a step's compute)."""
        return _NAMES.get(self._category, CATEGORIES[self._category])

    def _snapshot(self, now: float) -> _Snapshot:
        """A consistent copy of the ledger, after publishing ``now`` as the floor of later transitions."""
        with self._reading:
            for _ in range(_READ_TRIES):
                if self._floor < now:
                    self._floor = now  # before the copy: a transition that starts after it sees the floor
                version = self._version
                if not version & 1:
                    read = (self._seconds.copy(), self._category, self._since, self._stall_from, self._shares)
                    if self._version == version:
                        self._last_read = read
                        return (read[0].copy(), *read[1:])
                time.sleep(0)  # let the writer finish
            last = self._last_read
        if last is None:
            raise RuntimeError("the ledger's writer stopped in the middle of a write")
        return (last[0].copy(), *last[1:])  # the last copy as if nothing happened since: consistent, only late

    def totals(self, now: Optional[float] = None) -> dict[str, float]:
        """Seconds per category (all of :data:`CATEGORIES`) up to ``now`` (by default the current time), the open
        interval included; they sum to ``now - start`` (to the last transition's time, if that is later). Safe
        from any thread; later transitions count as no earlier than ``now``, so never pass a time ahead of the
        training thread's clock."""
        if now is None:
            now = time.perf_counter()
        seconds, category, since, stall_from, shares = self._snapshot(now)
        if now > stall_from:
            stall_from = self._stall_begins(stall_from)
        if now > since:
            if now > stall_from:
                if stall_from > since:
                    seconds[category] += stall_from - since
                    since = stall_from
                seconds[_STALL] += now - since
            else:
                seconds[category] += now - since
        pending = seconds[_STEP]
        seconds[_FORWARD] += pending * shares[0]
        seconds[_BACKWARD] += pending * shares[1]
        seconds[_OPTIMIZER] += pending - pending * shares[0] - pending * shares[1]
        return dict(zip(CATEGORIES, seconds))

    def goodput_ratio(self, now: Optional[float] = None) -> float:
        """The share of the wall time (since :attr:`start`) spent in the steps' compute; 0 before any time."""
        totals = self.totals(now)
        wall = sum(totals.values())
        return sum(totals[name] for name in COMPUTE) / wall if wall > 0 else 0.0


def lost_seconds(checkpoint: Mapping[str, Any], last: Mapping[str, Any]) -> float:
    """The time a previous attempt ran after the checkpoint a run resumes from: the wall time of its last
    :meth:`~TimeLedger.state_dict` (``last``, e.g. written next to the stack dumps while it ran) minus the
    checkpoint's; 0 when ``last`` is not later (a side file older than the checkpoint).

    Example::

        ledger.load_state_dict(checkpoint_state)
        ledger.add_lost_progress(lost_seconds(checkpoint_state, side_file_state))
    """

    def wall(state: Mapping[str, Any], name: str) -> float:
        seconds = state.get("seconds") if isinstance(state, Mapping) else None
        if not isinstance(seconds, Mapping):
            raise ValueError(f"{name} must be a TimeLedger.state_dict(), got {state!r}")
        return sum(_seconds_arg(f"{name}['seconds'][{key!r}]", value) for key, value in seconds.items())

    return max(0.0, wall(last, "last") - wall(checkpoint, "checkpoint"))


def write_side_file(path: Union[str, os.PathLike], state: Mapping[str, Any]) -> None:
    """Write a :meth:`~TimeLedger.state_dict` to ``path`` (JSON, replaced whole: a reader never sees half of it),
    the side file from which a resumed run learns how long its previous attempt ran after its last checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(dict(state)))
    os.replace(partial, path)


def read_side_file(path: Union[str, os.PathLike, None]) -> Optional[dict[str, Any]]:
    """The state :func:`write_side_file` wrote to ``path``; ``None`` when there is none or it cannot be read."""
    if not path:
        return None
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None
