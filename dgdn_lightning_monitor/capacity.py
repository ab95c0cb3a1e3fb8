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
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import numpy as np

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
