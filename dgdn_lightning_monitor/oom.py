"""Out-of-memory forensics: what ran out of memory, and where the memory went.

The callback holds the batch in flight (from its batch-start hook to its batch-end hook, so that no batch outlives
its step because of monitoring) and the metrics keep the largest training batch that completed. When a step raises
``torch.OutOfMemoryError`` or ``MemoryError``, Lightning calls the callback's ``on_exception`` before the exception
goes on; :meth:`OOMForensics.on_exception` then sizes the failing batch (host-side shapes only) and logs one line
with the stage, the step, that batch's samples, nodes and edges, the largest batch that fit so far and, on CUDA,
the caching allocator's figures; ``<namespace>_oom_total`` counts it. With ``memory_snapshot=True`` the allocator's
history is recorded during the run (:func:`~dgdn_lightning_monitor.compat.record_memory_history`) and written at the
OOM (:func:`~dgdn_lightning_monitor.compat.dump_memory_snapshot`) to ``oom-<time>-rank<R>.pickle``, which
https://pytorch.org/memory_viz opens.

The peak memory of sampled steps against their batch's size, and the largest batch estimated to fit, are
:mod:`~dgdn_lightning_monitor.capacity`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from dgdn_lightning_monitor.compat import dump_memory_snapshot, record_memory_history
from dgdn_lightning_monitor.graph_size import UNKNOWN, GraphSize
from dgdn_lightning_monitor.guards import MonitorErrors, WarnOnce, check
from dgdn_lightning_monitor.guards import describe as describe_error
from dgdn_lightning_monitor.metrics import TrainingMetrics
from dgdn_lightning_monitor.vocabulary import lightning_stage

log = logging.getLogger(__name__)

#: Allocation events the CUDA memory history keeps with ``memory_snapshot=True``.
HISTORY_ENTRIES = 100_000
#: The errors that count as running out of memory, CUDA's and the host's.
OOM_ERRORS: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
    MemoryError,
)

_GIB = float(1 << 30)


class OOMForensics:
    """The out-of-memory record of one callback: the failing batch, the largest that fit, the allocator's figures and,
    with ``memory_snapshot``, CUDA's allocation history up to the OOM.

    Args:
        metrics: where ``oom_total`` is counted and errors are reported (as ``memory``); holds the largest batch
            that fit.
        sizer: ``batch -> GraphSize`` (the callback's sizer).
        memory_snapshot: record CUDA's allocation history and dump it at an OOM.
        allocator_figures: the CUDA allocator's figures at the OOM (``None`` off CUDA), e.g.
            :meth:`~dgdn_lightning_monitor.capacity.CapacitySampler.allocator_figures`.
        errors: where memory figures that could not be read are counted (as ``memory``); by default a new one.

    Example::

        forensics = OOMForensics(metrics, GraphSizer().size, allocator_figures=sampler.allocator_figures)
        forensics.start(torch.device("cuda", 0), Path("lightning_logs/dgdn-dumps"), rank=0)
        forensics.on_exception(error, trainer, batch, batch_idx)  # from Callback.on_exception
    """

    def __init__(
        self,
        metrics: TrainingMetrics,
        sizer: Callable[[Any], GraphSize],
        memory_snapshot: bool = False,
        allocator_figures: Callable[[], Optional[dict[str, int]]] = lambda: None,
        errors: Optional[MonitorErrors] = None,
    ) -> None:
        self.metrics, self.sizer, self.allocator_figures = metrics, sizer, allocator_figures
        self.errors = errors if errors is not None else MonitorErrors(log)
        self.memory_snapshot = check(
            "memory_snapshot", memory_snapshot, isinstance(memory_snapshot, bool), "True or False"
        )
        self.last_oom: Optional[dict[str, Any]] = None
        self.directory = Path(".")
        self.rank = 0
        self.recording = False
        self._warn = WarnOnce(log)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "recording": False}

    # ------------------------------------------------------------------------------------------ run
    def start(self, device: torch.device, directory: Path, rank: int) -> None:
        self.directory, self.rank = Path(directory), rank
        if not self.memory_snapshot:
            return
        if device.type != "cuda":
            self._warn("snapshot", "memory_snapshot=True needs a CUDA device; this run has none, none is taken")
            return
        try:
            # Python stacks only: C++ stacks make every allocation and the dump at the OOM much slower.
            record_memory_history(stacks="python", max_entries=HISTORY_ENTRIES)
            self.recording = True
        except Exception as error:
            self.errors.report("memory", "CUDA memory figures unavailable (%s)", describe_error(error))

    def stop(self) -> None:
        if self.recording:
            self.recording = False
            try:
                record_memory_history(enabled=None)
            except Exception as error:
                self.errors.report("memory", "Could not stop the CUDA memory history (%s)", describe_error(error))

    # ------------------------------------------------------------------------------------------ the OOM
    def on_exception(
        self, exception: BaseException, trainer: Any, batch: Any = None, batch_idx: int = -1
    ) -> Optional[dict[str, Any]]:
        """Record an out-of-memory error raised while ``batch`` (the batch in flight, if any) ran; anything else is
        left alone; never raises."""
        if not isinstance(exception, OOM_ERRORS):
            return None
        try:
            return self._record(exception, trainer, batch, batch_idx)
        except Exception as error:
            self.errors.report("memory", "Could not record the out-of-memory error (%s)", describe_error(error))
            return None

    def _record(self, exception: BaseException, trainer: Any, batch: Any, batch_idx: int) -> dict[str, Any]:
        self.metrics.count_oom()
        stage = lightning_stage(trainer, "unknown")
        size = self.sizer(batch) if batch is not None else UNKNOWN
        largest = self.metrics.largest_batch  # None: no training batch of a told size completed
        allocator = self.allocator_figures()
        snapshot = None
        if self.recording:
            self.directory.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            snapshot = str(self.directory / f"oom-{stamp}-rank{self.rank}.pickle")
            dump_memory_snapshot(snapshot)
        record = {
            "error": type(exception).__name__,
            "stage": stage,
            "global_step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "batch_idx": batch_idx if batch is not None else None,
            "batch": size._asdict(),
            "largest_fit": (largest or UNKNOWN)._asdict(),
            "allocator": allocator,
            "snapshot": snapshot,
        }
        self.last_oom = record
        log.error("%s", describe(record, self.rank))
        return record


def describe(record: dict[str, Any], rank: int = 0) -> str:
    """The one log line of an OOM record."""

    def sizes(figures: dict[str, Any]) -> str:
        return ", ".join(f"{figures[k] if figures[k] is not None else '?'} {k}" for k in ("samples", "nodes", "edges"))

    where = f"batch {record['batch_idx']}" if record["batch_idx"] is not None else "outside a batch"
    line = (
        f"{record['error']} on rank {rank} in stage {record['stage']}, global step {record['global_step']} "
        f"(epoch {record['epoch']}, {where}): the failing batch held {sizes(record['batch'])}; "
    )
    fit = record["largest_fit"]
    if any(value is not None for value in fit.values()):
        line += f"the largest training batch that fit held {sizes(fit)}"
    else:
        line += "no training batch had completed yet"
    allocator = record["allocator"]
    if allocator is not None:
        line += (
            f"; CUDA allocator: {allocator['allocated_bytes'] / _GIB:.2f} GiB allocated, "
            f"{allocator['reserved_bytes'] / _GIB:.2f} GiB reserved, peak {allocator['max_allocated_bytes'] / _GIB:.2f}"
            f" GiB of {allocator['total_bytes'] / _GIB:.2f} GiB"
        )
    if record["snapshot"] is not None:
        line += f"; memory snapshot: {record['snapshot']}"
    return line
