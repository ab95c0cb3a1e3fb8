"""Stall watchdog: when a run makes no progress for too long, write down where every thread of this rank waits.

A daemon thread, :data:`THREAD_NAME`, reads the run's last progress time (a ``time.perf_counter()`` value the
training thread stores anyway) every ``after_s / 10`` seconds. When nothing progressed for ``after_s`` seconds it
writes the Python stack of every thread of this process to ``stall-<time>-<N>-rank<R>.txt`` in its directory (N
counts the dumps of this rank), once per stall: a new dump needs progress first. A hang inside a collective, a
data-loader wait, a lock or a sleep shows as the frame the thread waits in; native code that released the GIL (a
gloo or NCCL collective) shows the Python call that entered it.

With ``torch.distributed`` initialised and PyTorch's flight recorder switched on by the user
(``TORCH_NCCL_TRACE_BUFFER_SIZE`` for NCCL, ``TORCH_FR_BUFFER_SIZE`` for any backend, set above 0 before the
process group is created), it also writes the recorder's trace of recent collectives (NCCL's own recorder when the
default group uses NCCL) to ``flight-recorder-<N>/rank_<R>``, the layout
``python -m torch.distributed.flight_recorder.fr_trace`` reads.

Nothing here touches the training thread: a dump that fails is said once and the watchdog keeps going.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from dgdn_lightning_monitor.compat import current_frames, flight_recorder_dump
from dgdn_lightning_monitor.guards import MonitorErrors, check, describe

log = logging.getLogger(__name__)

#: Name of the watchdog thread.
THREAD_NAME = "dgdn-stall-watchdog"
#: Environment variables that switch PyTorch's flight recorder on (entries kept per process group).
FLIGHT_RECORDER_VARIABLES = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")


def check_after_s(value: Any) -> Optional[float]:
    """``stall_dump_after_s``: ``None`` (off) or a positive number of seconds."""
    valid = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)
    check("stall_dump_after_s", value, valid and (value is None or value < float("inf")), "seconds > 0 or None")
    return None if value is None else float(value)


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
    """Dump every thread's stack when ``metrics.last_progress_perf`` has not moved for ``after_s`` seconds.

    Args:
        after_s: seconds without progress before a dump; ``None`` turns the watchdog off.
        metrics: the run's :class:`~dgdn_lightning_monitor.metrics.TrainingMetrics`: its ``last_progress_perf``
            is the ``time.perf_counter()`` of the last progress in any stage (``None`` before the first: then the
            time since :meth:`start` counts), and it counts each dump (``count_stall_dump``).
        errors: where a dump that could not be written is counted (as ``watchdog``); by default a new one.

    Example::

        watchdog = StallWatchdog(600.0, metrics, errors)
        watchdog.start(dump_directory(trainer), rank=0)
        ...
        watchdog.stop()
    """

    def __init__(self, after_s: Optional[float], metrics: Any, errors: Optional[MonitorErrors] = None) -> None:
        self.after_s = after_s = check_after_s(after_s)  # None: off, start() does nothing
        self.metrics = metrics
        self.errors = errors if errors is not None else MonitorErrors(log)
        self.dumps: list[str] = []  # every dump written, across runs
        self.poll_s = min(max((after_s or 0.0) / 10.0, 0.05), 30.0)  # a tenth of the threshold: late by 10 % at most
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_thread": None, "_stop": None}  # a copy in another process starts idle

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stop = threading.Event()

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
        started, after_s = time.perf_counter(), self.after_s or float("inf")
        dumped_for: Optional[float] = None  # the progress time of the stall already dumped
        while not stop.wait(self.poll_s):
            last = self.metrics.last_progress_perf
            since = started if last is None or last < started else last  # progress of an earlier run: not this one's
            idle = time.perf_counter() - since
            if idle >= after_s and dumped_for != since:
                dumped_for = since
                try:
                    self._dump(idle)
                except Exception as error:  # a full disk must not end the watch
                    self.errors.report("watchdog", "Could not write a stall dump (%s)", describe(error))

    def _dump(self, idle: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        now = datetime.now(timezone.utc)
        path = self.directory / f"stall-{now.strftime('%Y%m%dT%H%M%S')}-{len(self.dumps) + 1}-rank{self.rank}.txt"
        header = (
            f"Stall dump of rank {self.rank} (pid {os.getpid()}) at {now.isoformat(timespec='seconds')}: "
            f"no progress in any stage for {idle:.1f} s (stall_dump_after_s={self.after_s:g}).\n\n"
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
