"""Stall watchdog: when a run makes no progress for too long, write down where every thread of this rank waits.

A daemon thread, :data:`THREAD_NAME`, sleeps until the deadline of the last progress (a ``time.perf_counter()``
value the training thread stores anyway) plus the threshold in force, and reads the progress again then. When
nothing progressed by the deadline it writes the Python stack of every thread of this process to
``stall-<time>-<N>-rank<R>.txt`` in its directory (N counts the dumps of this rank), once per stall: a new dump
needs progress first. A hang inside a collective, a data-loader wait, a lock or a sleep shows as the frame the
thread waits in; native code that released the GIL (a gloo or NCCL collective) shows the Python call that entered
it.

The threshold is ``stall_dump_after_s`` seconds, or, with ``"auto"`` (the default), learned from the run per
progress unit (training steps, the batches of each evaluation stage, checkpoint saves; see
:class:`ProgressIntervals` and :meth:`StallWatchdog.threshold`): ``min(CAP_S, max(FLOOR_S, K * p99))`` of the last
:data:`WINDOW` intervals that followed the unit's progress, once :data:`LEARN_AFTER` were seen, :data:`CAP_S`
before, and :data:`CAP_S` for the first unit after a stage began (loader start-up, ``torch.compile``).

With ``torch.distributed`` initialised and PyTorch's flight recorder switched on by the user
(``TORCH_NCCL_TRACE_BUFFER_SIZE`` for NCCL, ``TORCH_FR_BUFFER_SIZE`` for any backend, set above 0 before the
process group is created), it also writes the recorder's trace of recent collectives (NCCL's own recorder when the
default group uses NCCL) to ``flight-recorder-<N>/rank_<R>``, the layout
``python -m torch.distributed.flight_recorder.fr_trace`` reads.

Nothing here touches the training thread: a dump that fails is said once and the watchdog keeps going.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional, Union

from dgdn_lightning_monitor.compat import current_frames, flight_recorder_dump
from dgdn_lightning_monitor.guards import MonitorErrors, check, describe
from dgdn_lightning_monitor.vocabulary import PROGRESS_UNITS, STAGES

log = logging.getLogger(__name__)

#: Name of the watchdog thread.
THREAD_NAME = "dgdn-stall-watchdog"
#: Environment variables that switch PyTorch's flight recorder on (entries kept per process group).
FLIGHT_RECORDER_VARIABLES = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")

# "auto": a hang is dumped K times the 99th percentile of the unit's recent intervals after its last progress, so
# within max(3 x p99, 10 s) once learned. The floor keeps a fast run's hiccups (a garbage collection, a slow batch
# from a data-loader worker, the next stage's loaders starting) from reading as hangs; the cap keeps an unusually
# slow unit from making a real hang wait longer than the fixed default would.
#: Seconds without progress before a dump when nothing was learned (also the cap of a learned threshold).
CAP_S = 600.0
#: The lowest learned threshold, seconds.
FLOOR_S = 10.0
#: A learned threshold is K times the 99th percentile of the unit's recent intervals.
K = 3.0
#: Intervals kept per progress unit; their 99th percentile sets the unit's threshold.
WINDOW = 200
#: Intervals of a unit needed before its threshold is learned (the fixed default until then); fifty give a 99th
#: percentile that is their largest, a conservative estimate that sharpens as the window fills.
LEARN_AFTER = 50
#: The stages of ``<namespace>_stall_threshold_seconds``: every stage of ``<namespace>_stage``, and checkpoint saves.
THRESHOLD_STAGES: tuple[str, ...] = tuple(dict.fromkeys((*STAGES, *PROGRESS_UNITS)))


def check_after_s(value: Any) -> Union[float, Literal["auto"], None]:
    """``stall_dump_after_s``: ``"auto"``, ``None`` (off) or a positive number of seconds."""
    if isinstance(value, str) and value == "auto":
        return "auto"
    valid = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)
    valid = valid and (value is None or value < float("inf"))
    check("stall_dump_after_s", value, valid, '"auto", seconds > 0 or None')
    return None if value is None else float(value)


class ProgressIntervals:
    """The last :data:`WINDOW` intervals that followed a progress event of one unit (a training step, an evaluation
    batch, a checkpoint save) within a stage, up to the next event: appended by the training thread
    (:class:`~dgdn_lightning_monitor.metrics.TrainingMetrics` appends to ``ring``, nothing more per step), read by
    the watchdog thread, which copies the ring (one copy in C, atomic under the GIL).

    Args:
        unit: the unit (one of :data:`~dgdn_lightning_monitor.vocabulary.PROGRESS_UNITS`).
    """

    __slots__ = ("unit", "ring")

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.ring: deque[float] = deque(maxlen=WINDOW)

    @property
    def count(self) -> int:
        """Intervals held (at most :data:`WINDOW`)."""
        return len(self.ring)

    def add(self, seconds: float) -> None:
        """Store one interval (the training thread appends to ``ring`` itself on its step path)."""
        self.ring.append(seconds)

    def p99(self) -> Optional[float]:
        """The 99th percentile (nearest rank) of the intervals held, or ``None`` before :data:`LEARN_AFTER`."""
        held = sorted(self.ring)
        if len(held) < LEARN_AFTER:
            return None
        return held[math.ceil(0.99 * len(held)) - 1]

    def threshold(self) -> float:
        """The unit's learned threshold: ``min(CAP_S, max(FLOOR_S, K * p99))``, :data:`CAP_S` before it learned."""
        p99 = self.p99()
        return CAP_S if p99 is None else min(CAP_S, max(FLOOR_S, K * p99))


def format_stacks(skip: Optional[int] = None) -> str:
    """The Python stack of every thread of this process, most recent call last, named as ``threading`` knows them.

    Args:
        skip: a thread ident to leave out (the caller's own thread).
    """
    names = {thread.ident: thread for thread in threading.enumerate()}
    parts = []
    for ident, frame in sorted(current_frames().items(), key=lambda item: item[0] != threading.main_thread().ident):
        if ident == skip:
            continue
        thread = names.get(ident)
        name = thread.name if thread is not None else "unknown"
        daemon = " daemon" if thread is not None and thread.daemon else ""
        parts.append(f'Thread "{name}" (ident {ident}{daemon}), most recent call last:\n')
        parts.extend(traceback.format_stack(frame))
        parts.append("\n")
    return "".join(parts)


def flight_recorder_trace() -> Optional[bytes]:
    """PyTorch's flight-recorder trace (pickled) when a process group is initialised and the recorder is on."""
    if not any(_positive(os.environ.get(name)) for name in FLIGHT_RECORDER_VARIABLES):
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    # NCCL keeps its own recorder (CUDA builds); the other backends' (gloo) is PyTorch's generic one.
    dump = flight_recorder_dump(nccl="nccl" in str(dist.get_backend()).lower())
    return dump() if dump is not None else None


def dump_directory(trainer: Any) -> Path:
    """Where a run's dumps go: ``dgdn-dumps`` in the Trainer's ``log_dir`` (its first logger's directory, else
    ``default_root_dir``; the working directory for a Trainer stand-in with neither)."""
    try:
        base = trainer.log_dir
    except Exception:  # a logger without a directory
        base = None
    return Path(base or getattr(trainer, "default_root_dir", None) or os.getcwd()) / "dgdn-dumps"


def _positive(value: Optional[str]) -> bool:
    try:
        return value is not None and int(value) > 0
    except ValueError:
        return False


class StallWatchdog:
    """Dump every thread's stack when ``metrics.last_progress_perf`` has not moved for the threshold in force.

    Args:
        after_s: ``"auto"``: a threshold per progress unit learned from the run (see the module's documentation);
            a number: that many seconds whatever the stage; ``None`` turns the watchdog off.
        metrics: the run's :class:`~dgdn_lightning_monitor.metrics.TrainingMetrics`: its ``last_progress_perf``
            is the ``time.perf_counter()`` of the last progress in any stage (``None`` before the first: then the
            time since :meth:`start` counts), its ``intervals`` and ``last_unit`` what "auto" learns from; it counts
            each dump (``count_stall_dump``) and exports :meth:`thresholds`.
        errors: where a dump that could not be written is counted (as ``watchdog``); by default a new one.

    Example::

        watchdog = StallWatchdog("auto", metrics, errors)
        watchdog.start(dump_directory(trainer), rank=0)
        ...
        watchdog.stop()
    """

    def __init__(self, after_s: Any, metrics: Any, errors: Optional[MonitorErrors] = None) -> None:
        self.after_s = after_s = check_after_s(after_s)  # None: off, start() does nothing
        self.metrics = metrics
        self.errors = errors if errors is not None else MonitorErrors(log)
        self.dumps: list[str] = []  # every dump written, across runs
        self.poll_s = 0.0  # how late a dump may come after its deadline: the thread sleeps until the deadline
        # A learned threshold changes with the run (and drops once learned): read it again at least this often.
        self.refresh_s = 1.0 if after_s == "auto" else math.inf
        #: Called from the watch thread with the ``perf_counter`` time a stall began (its deadline), before its dump.
        self.on_stall: Optional[Callable[[float], None]] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        if after_s is not None and metrics is not None:
            metrics.set_stall_thresholds(self.thresholds)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_thread": None, "_stop": None, "on_stall": None}  # another process starts idle

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stop = threading.Event()

    def threshold(self) -> float:
        """Seconds without progress before a dump, now: the fixed threshold, or with ``"auto"`` the learned one of
        the unit whose progress came last in the current stage (:data:`CAP_S` before the stage's first unit)."""
        if self.after_s != "auto":
            return float(self.after_s or math.inf)
        unit = self.metrics.last_unit
        return CAP_S if unit is None else unit.threshold()

    def thresholds(self) -> dict[str, float]:
        """The threshold in force for each stage and for checkpoint saves: for the current stage :meth:`threshold`
        (a checkpoint save's or the first unit's allowance while it lasts), for the others their learned one."""
        if self.after_s != "auto":
            return dict.fromkeys(THRESHOLD_STAGES, self.threshold())
        intervals = self.metrics.intervals
        found = {stage: intervals[stage].threshold() if stage in intervals else CAP_S for stage in THRESHOLD_STAGES}
        current = self.metrics.stage
        if current in found:
            found[current] = self.threshold()
        return found

    def start(self, directory: Path, rank: int) -> None:
        """Watch from now on, writing dumps into ``directory`` (created on the first dump); nothing when off."""
        self.stop()
        if self.after_s is None:
            return
        self.directory, self.rank = Path(directory), rank
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(self._stop,), name=THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=5.0)

    def _watch(self, stop: threading.Event) -> None:
        started = time.perf_counter()
        dumped_for: Optional[float] = None  # the progress time of the stall already dumped
        while True:
            try:  # before the progress time: a step in between only shortens the idle time
                threshold = self.threshold()
            except Exception:  # a run being set up or torn down: the default, and look again soon
                threshold = CAP_S
            last = self.metrics.last_progress_perf
            since = started if last is None or last < started else last  # progress of an earlier run: not this one's
            idle = time.perf_counter() - since
            if idle < threshold:
                wait = threshold - idle  # until the deadline: the dump comes on time, not a polling interval late
            else:
                if dumped_for != since:
                    dumped_for = since
                    on_stall = self.on_stall
                    if on_stall is not None:
                        on_stall(since + threshold)
                    try:
                        self._dump(idle, threshold)
                    except Exception as error:  # a full disk must not end the watch
                        self.errors.report("watchdog", "Could not write a stall dump (%s)", describe(error))
                wait = threshold  # a new stall needs progress first, and then a whole threshold
            if stop.wait(min(wait, self.refresh_s)):
                return

    def _explain(self, threshold: float) -> str:
        """How the threshold in force came about, for the dump's header."""
        if self.after_s != "auto":
            return f"stall_dump_after_s={threshold:g}"
        unit = self.metrics.last_unit
        if unit is None:
            return f"stall_dump_after_s='auto': {CAP_S:g} s for the first unit of stage {self.metrics.stage}"
        if unit.count < LEARN_AFTER:
            return f"stall_dump_after_s='auto': {CAP_S:g} s until {LEARN_AFTER} intervals of {unit.unit} are known"
        return (
            f"stall_dump_after_s='auto': {threshold:g} s for {unit.unit} from {K:g} x the 99th percentile of its last "
            f"{unit.count} intervals, between {FLOOR_S:g} s and {CAP_S:g} s"
        )

    def _dump(self, idle: float, threshold: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        now = datetime.now(timezone.utc)
        path = self.directory / f"stall-{now.strftime('%Y%m%dT%H%M%S')}-{len(self.dumps) + 1}-rank{self.rank}.txt"
        header = (
            f"Stall dump of rank {self.rank} (pid {os.getpid()}) at {now.isoformat(timespec='seconds')}: "
            f"no progress in any stage for {idle:.1f} s ({self._explain(threshold)}).\n\n"
        )
        path.write_text(header + format_stacks(skip=threading.get_ident()))
        self.dumps.append(str(path))
        written = [str(path)]
        try:
            trace = flight_recorder_trace()
        except Exception as error:
            self.errors.report("watchdog", "Could not dump the flight recorder (%s)", describe(error))
            trace = None
        if trace is not None:
            folder = self.directory / f"flight-recorder-{len(self.dumps)}"
            folder.mkdir(exist_ok=True)
            (folder / f"rank_{self.rank}").write_bytes(trace)
            written.append(str(folder / f"rank_{self.rank}"))
        log.warning(
            "No progress for %.0f s on rank %d: wrote the stack of every thread to %s",
            idle,
            self.rank,
            " and the flight recorder's trace to ".join(written),
        )
        self.metrics.count_stall_dump()
