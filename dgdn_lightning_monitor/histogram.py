"""A histogram kept as plain Python numbers and turned into a Prometheus family only when scraped.

``prometheus_client.Histogram.observe`` takes a lock and walks its buckets on every call; on the training step we
only bisect and bump one list slot, and build the cumulative buckets when ``/metrics`` is read.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import Optional

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.samples import Exemplar


def _bounds(text: str) -> tuple[float, ...]:
    return tuple(float(bound) for bound in text.split())


#: Training batch wall time, seconds.
BATCH_SECONDS_BUCKETS = _bounds("0.0005 0.001 0.0025 0.005 0.01 0.025 0.05 0.1 0.25 0.5 1 2.5 5 10 30")
#: Per-sample inference latency, seconds.
INFERENCE_SECONDS_BUCKETS = _bounds(
    "1e-06 5e-06 1e-05 5e-05 0.0001 0.00025 0.0005 0.001 0.0025 0.005 0.01 0.025 0.05 0.1 0.25 0.5 1"
)
#: One phase of a training step (data fetch, forward, backward, optimizer step), seconds.
PHASE_SECONDS_BUCKETS = _bounds(
    "1e-05 5e-05 0.0001 0.00025 0.0005 0.001 0.0025 0.005 0.01 0.025 0.05 0.1 0.25 0.5 1 2.5 5 10"
)


class FastHistogram:
    """Bucket counts, sum and one exemplar per bucket.

    Args:
        bounds: finite upper bounds, ascending (one of the tables above); ``+Inf`` is added.

    Example::

        h = FastHistogram((0.1, 1.0))
        h.observe(0.5, trace_id="4bf92f3577b34da6a3ce929d0e0e4736")
    """

    __slots__ = ("bounds", "_labels", "counts", "sum", "exemplars")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds: tuple[float, ...] = tuple(bounds)
        self._labels = tuple(repr(b) for b in self.bounds) + ("+Inf",)
        self.counts: list[int] = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.exemplars: list[Optional[Exemplar]] = [None] * (len(self.bounds) + 1)

    def observe(self, value: float, trace_id: Optional[str] = None) -> None:
        index = bisect_left(self.bounds, value)  # first bound >= value: Prometheus buckets are "less or equal"
        self.counts[index] += 1
        self.sum += value
        if trace_id is not None:
            self.exemplars[index] = Exemplar({"trace_id": trace_id}, value, time.time())

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add_to(self, family: HistogramMetricFamily, labels: Sequence[str]) -> None:
        """Append this histogram's cumulative buckets to ``family`` under ``labels``."""
        counts = list(self.counts)  # one snapshot, so +Inf always equals the sum of the buckets
        exemplars = list(self.exemplars)
        buckets = []
        running = 0
        for label, count, exemplar in zip(self._labels, counts, exemplars):
            running += count
            buckets.append((label, running, exemplar) if exemplar is not None else (label, running))
        family.add_metric(list(labels), buckets, self.sum)
