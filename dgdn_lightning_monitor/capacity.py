"""How large a batch fits the device: a linear model of peak memory against graph size, fitted on recent steps.

Each observation is one training step's peak allocated bytes (the CUDA caching allocator's host-side counter,
reset at the step's start) with its batch's nodes and edges. The model is a least-squares fit

    peak_bytes ~= base + a * nodes + b * edges

over the last :data:`WINDOW` observations. The capacity is where that line, followed along the recent
edges-per-node ratio, reaches the device's memory: ``nodes* = (budget - base) / (a + b * r)`` and
``edges* = r * nodes*``. It is an estimate. It assumes that memory grows linearly with nodes and edges (true of
message passing with fixed feature widths; not of models whose memory grows with squared sizes, e.g. dense
attention), that future batches keep the recent edge/node ratio, that the allocator can use the whole budget
(fragmentation and the CUDA context take a few percent), and it is extrapolated: batches far larger than those
seen widen its error.

On CUDA, :class:`CapacitySampler` takes those observations on the training steps whose phases are timed (one in
``trace_every_n_steps``): it resets the allocator's peak counter at their start and reads it at their end
(host-side counters: no device synchronisation), and keeps the peak each reset cleared in a
:class:`PeaksBeforeReset` that the GPU collector and the OOM report read, so that
``<namespace>_gpu_max_memory_allocated_bytes`` still reads the process's peak.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Optional

import numpy as np
import torch

from dgdn_lightning_monitor.graph_size import GraphSize
from dgdn_lightning_monitor.guards import MonitorErrors, describe
from dgdn_lightning_monitor.metrics import TrainingMetrics

log = logging.getLogger(__name__)

#: Observations the fit uses (the most recent).
WINDOW = 256
#: Observations needed before an estimate is given.
MIN_OBSERVATIONS = 4


class CapacityEstimator:
    """Largest batch (nodes, edges) whose predicted peak memory fits ``budget_bytes``.

    The training thread only appends observations (:meth:`add`); :meth:`estimate` fits when asked (at scrape
    time).

    Args:
        budget_bytes: memory the batches may use, e.g. the device's total memory; ``None`` until known.

    Example::

        estimator = CapacityEstimator(budget_bytes=80e9)
        estimator.add(peak_bytes, nodes, edges)  # on sampled steps
        estimator.estimate()  # (nodes, edges) or None
    """

    def __init__(self, budget_bytes: Optional[float] = None) -> None:
        self.budget_bytes = budget_bytes
        self.observations: deque[tuple[float, int, int]] = deque(maxlen=WINDOW)

    def add(self, peak_bytes: float, nodes: int, edges: int) -> None:
        self.observations.append((peak_bytes, nodes, edges))

    def estimate(self) -> Optional[tuple[float, float]]:
        """``(nodes, edges)`` of the largest batch predicted to fit, or ``None`` when the observations do not tell
        (too few, no spread in size, memory not growing with size, or no budget)."""
        rows = tuple(self.observations)
        if self.budget_bytes is None or len(rows) < MIN_OBSERVATIONS:
            return None
        data = np.asarray(rows, dtype=np.float64)
        peak, nodes, edges = data[:, 0], data[:, 1], data[:, 2]
        if np.ptp(nodes) == 0 and np.ptp(edges) == 0:
            return None  # every batch alike: no slope to extrapolate along
        scale = np.array([1.0, max(nodes.max(), 1.0), max(edges.max(), 1.0)])  # columns of similar magnitude
        design = np.column_stack([np.ones_like(nodes), nodes, edges]) / scale
        # Minimum-norm solution: when edges are a fixed multiple of nodes the split between a and b is not
        # determined, but the prediction along that ratio (all that is used below) still is.
        coefficients = np.linalg.lstsq(design, peak, rcond=None)[0] / scale
        base, per_node, per_edge = (float(c) for c in coefficients)
        ratio = float(edges.sum() / nodes.sum()) if nodes.sum() > 0 else 0.0
        slope = per_node + per_edge * ratio  # bytes per node along the recent edge/node ratio
        if slope <= 0 or self.budget_bytes <= base:
            return None
        capacity_nodes = (self.budget_bytes - base) / slope
        return capacity_nodes, capacity_nodes * ratio


class PeaksBeforeReset:
    """The CUDA allocator's peak of each device before the capacity sampling last reset it: written by
    :class:`CapacitySampler`, read by the GPU collector's peak gauge and the OOM report, which it is handed to.

    Example::

        peaks = PeaksBeforeReset()
        peaks.keep(0, 5_000)
        peaks.peak(0, 100)  # 5000: the peak the reset cleared
    """

    def __init__(self) -> None:
        self.before_reset: dict[int, int] = {}

    def keep(self, index: int, peak: int) -> None:
        """Keep ``peak``, the peak counter of CUDA device ``index`` just before a reset."""
        self.before_reset[index] = max(self.before_reset.get(index, 0), peak)

    def peak(self, index: int, current: int) -> int:
        """The peak of device ``index`` since the process started, given its counter's ``current`` reading."""
        return max(current, self.before_reset.get(index, 0))


class CudaAllocator:
    """The host-side counters of PyTorch's CUDA caching allocator for one device (no device synchronisation)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def total(self) -> int:
        return int(torch.cuda.get_device_properties(self.device).total_memory)

    def reset_peak(self) -> int:
        """Reset the peak counter; returns the peak it held."""
        peak = self.peak()
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def figures(self) -> dict[str, int]:
        return {
            "allocated_bytes": int(torch.cuda.memory_allocated(self.device)),
            "reserved_bytes": int(torch.cuda.memory_reserved(self.device)),
            "max_allocated_bytes": self.peak(),
            "total_bytes": self.total(),
        }


def allocator_for(device: torch.device) -> Optional[CudaAllocator]:
    """The allocator counters of ``device``, or ``None`` off CUDA."""
    return CudaAllocator(device) if device.type == "cuda" else None


class CapacitySampler:
    """The peak memory of sampled training steps against their batch's size, fitted by a :class:`CapacityEstimator`
    whose estimate ``metrics`` exports (CUDA only; elsewhere every call does nothing).

    Args:
        metrics: where the estimate is exported.
        errors: where memory figures that could not be read are counted (as ``memory``); by default a new one.

    Example::

        sampler = CapacitySampler(metrics)
        sampler.start(torch.device("cuda", 0))
        sampler.sample_start()  # at the start of a sampled training step
        sampler.sample_end(size)  # at its end, with its batch's GraphSize
    """

    def __init__(self, metrics: TrainingMetrics, errors: Optional[MonitorErrors] = None) -> None:
        self.metrics = metrics
        self.errors = errors if errors is not None else MonitorErrors(log)
        self.capacity = CapacityEstimator()
        metrics.set_batch_capacity(self.capacity.estimate)
        self.peaks = PeaksBeforeReset()
        self.allocator: Optional[CudaAllocator] = None
        self.index = 0
        self.sampling = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "allocator": None}

    def start(self, device: torch.device) -> None:
        """A run starts on ``device``: its memory is the budget of the estimate."""
        self.allocator, self.index, self.sampling = allocator_for(device), device.index or 0, False
        if self.allocator is None:
            return
        try:
            self.capacity.budget_bytes = float(self.allocator.total())
        except Exception as error:
            self.errors.report("memory", "CUDA memory figures unavailable (%s)", describe(error))

    def sample_start(self) -> None:
        """At the start of a sampled training step, on CUDA: reset the allocator's peak, read at the step's end by
        :meth:`sample_end`."""
        if self.allocator is not None:
            try:
                # Host-side: the step's peak is read at its end.
                self.peaks.keep(self.index, self.allocator.reset_peak())
                self.sampling = True
            except Exception as error:  # never into training: the estimate goes without this step
                self.errors.report("memory", "Could not reset the CUDA peak memory (%s)", describe(error))

    def sample_end(self, size: GraphSize) -> None:
        """At the end of a sampled training step: its peak memory against its batch's size (CUDA only)."""
        if not self.sampling:
            return
        self.sampling = False
        _, nodes, edges = size
        if nodes is not None and edges is not None and self.allocator is not None:
            self.capacity.add(self.allocator.peak(), nodes, edges)

    def allocator_figures(self) -> Optional[dict[str, int]]:
        """The allocator's figures now (its peak since the process started), or ``None`` off CUDA."""
        if self.allocator is None:
            return None
        figures = self.allocator.figures()
        figures["max_allocated_bytes"] = self.peaks.peak(self.index, figures["max_allocated_bytes"])
        return figures
