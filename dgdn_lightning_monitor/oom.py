"""Out-of-memory forensics, and peak memory against graph size.

The callback holds the batch in flight (from its batch-start hook to its batch-end hook, so that no batch outlives
its step because of monitoring) and the metrics keep the largest training batch that completed. When a step raises
``torch.OutOfMemoryError`` or ``MemoryError``, Lightning calls the callback's ``on_exception`` before the exception
goes on; :meth:`MemoryWatch.on_exception` then sizes the failing batch (host-side shapes only) and logs one line
with the stage, the step, that batch's samples, nodes and edges, the largest batch that fit so far and, on CUDA,
the caching allocator's figures; ``<namespace>_oom_total`` counts it. With ``memory_snapshot=True`` the allocator's
history is recorded during the run (``torch.cuda.memory._record_memory_history``) and written at the OOM
(``torch.cuda.memory._dump_snapshot``) to ``oom-<time>-rank<R>.pickle``, which https://pytorch.org/memory_viz
opens.

On CUDA, the training steps whose phases are timed (one in ``trace_every_n_steps``) reset the allocator's peak
counter at their start and read it at their end (host-side counters: no device synchronisation); the peak with the
batch's nodes and edges feeds a :class:`~dgdn_lightning_monitor.capacity.CapacityEstimator`, whose estimate of the
largest batch that fits the device is exported as ``<namespace>_batch_capacity_nodes`` and ``..._edges``. The peak
before each reset is kept in :data:`PEAKS_BEFORE_RESET`, so ``<namespace>_gpu_max_memory_allocated_bytes`` still
reads the process's peak.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from dgdn_lightning_monitor.capacity import CapacityEstimator
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

#: CUDA device index -> the allocator's peak before the capacity sampling last reset it.
PEAKS_BEFORE_RESET: dict[int, int] = {}


class CudaAllocator:
    """The host-side counters of PyTorch's CUDA caching allocator for one device (no device synchronisation)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def total(self) -> int:
        return int(torch.cuda.get_device_properties(self.device).total_memory)

    def reset_peak(self) -> None:
        # The process-wide peak survives the reset in PEAKS_BEFORE_RESET, for the peak gauge of the GPU collector.
        index = self.device.index or 0
        PEAKS_BEFORE_RESET[index] = max(PEAKS_BEFORE_RESET.get(index, 0), self.peak())
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def figures(self) -> dict[str, int]:
        return {
            "allocated_bytes": int(torch.cuda.memory_allocated(self.device)),
            "reserved_bytes": int(torch.cuda.memory_reserved(self.device)),
            "max_allocated_bytes": max(self.peak(), PEAKS_BEFORE_RESET.get(self.device.index or 0, 0)),
            "total_bytes": self.total(),
        }


def allocator_for(device: torch.device) -> Optional[CudaAllocator]:
    """The allocator counters of ``device``, or ``None`` off CUDA."""
    return CudaAllocator(device) if device.type == "cuda" else None


class MemoryWatch:
    """The CUDA peak-memory samples, the capacity estimate and the OOM record of one callback.

    Args:
        metrics: where ``oom_total`` and the capacity estimate are exported; holds the largest batch that fit.
        sizer: ``batch -> GraphSize`` (the callback's sizer).
        memory_snapshot: record CUDA's allocation history and dump it at an OOM.
        errors: where memory figures that could not be read are counted (as ``memory``); by default a new one.

    Example::

        watch = MemoryWatch(metrics, extract_graph_size)
        watch.start(torch.device("cuda", 0), Path("lightning_logs/dgdn-dumps"), rank=0)
        watch.sample_start()  # at the start of a sampled training step; sample_end(size) at its end
        watch.on_exception(error, trainer, batch, batch_idx)  # from Callback.on_exception
    """

    def __init__(
        self,
        metrics: TrainingMetrics,
        sizer: Callable[[Any], GraphSize],
        memory_snapshot: bool = False,
        errors: Optional[MonitorErrors] = None,
    ) -> None:
        self.metrics, self.sizer = metrics, sizer
        self.errors = errors if errors is not None else MonitorErrors(log)
        self.memory_snapshot = check(
            "memory_snapshot", memory_snapshot, isinstance(memory_snapshot, bool), "True or False"
        )
        self.capacity = CapacityEstimator()
        metrics.set_batch_capacity(self.capacity.estimate)
        self.last_oom: Optional[dict[str, Any]] = None
        self.sampling = False
        self.allocator: Optional[CudaAllocator] = None
        self.directory = Path(".")
        self.rank = 0
        self.recording = False
        self._warn = WarnOnce(log)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "allocator": None, "recording": False}

    # ------------------------------------------------------------------------------------------ run
    def start(self, device: torch.device, directory: Path, rank: int) -> None:
        self.allocator, self.directory, self.rank = allocator_for(device), Path(directory), rank
        self.sampling = False
        if self.allocator is None:
            if self.memory_snapshot:
                self._warn("snapshot", "memory_snapshot=True needs a CUDA device; this run has none, none is taken")
            return
        try:
            self.capacity.budget_bytes = float(self.allocator.total())
            if self.memory_snapshot:
                # Python stacks only: C++ stacks make every allocation and the dump at the OOM much slower.
                torch.cuda.memory._record_memory_history(stacks="python", max_entries=HISTORY_ENTRIES)
                self.recording = True
        except Exception as error:
            self.errors.report("memory", "CUDA memory figures unavailable (%s)", describe_error(error))

    def stop(self) -> None:
        if self.recording:
            self.recording = False
            try:
                torch.cuda.memory._record_memory_history(enabled=None)
            except Exception as error:
                self.errors.report("memory", "Could not stop the CUDA memory history (%s)", describe_error(error))

    # ------------------------------------------------------------------------------------------ step path
    def sample_start(self) -> None:
        """At the start of a sampled training step, on CUDA: reset the allocator's peak, read at the step's end by
        :meth:`sample_end`."""
        if self.allocator is not None:
            try:
                self.allocator.reset_peak()  # host-side: the peak of this step is read at its end
                self.sampling = True
            except Exception as error:  # never into training: the estimate goes without this step
                self.errors.report("memory", "Could not reset the CUDA peak memory (%s)", describe_error(error))

    def sample_end(self, size: GraphSize) -> None:
        """At the end of a sampled training step: its peak memory against its batch's size (CUDA only)."""
        if not self.sampling:
            return
        self.sampling = False
        _, nodes, edges = size
        if nodes is not None and edges is not None and self.allocator is not None:
            self.capacity.add(self.allocator.peak(), nodes, edges)

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
        allocator = self.allocator.figures() if self.allocator is not None else None
        snapshot = None
        if self.recording:
            self.directory.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            snapshot = str(self.directory / f"oom-{stamp}-rank{self.rank}.pickle")
            torch.cuda.memory._dump_snapshot(snapshot)
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
