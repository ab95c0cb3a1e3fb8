"""A histogram kept as plain Python numbers and turned into a Prometheus family only when scraped.

``prometheus_client.Histogram.observe`` takes a lock and walks its buckets on every call; on the training step we
only bisect and bump one list slot, and build the cumulative buckets when ``/metrics`` is read.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import Optional

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

#: Training batch wall time, seconds.
BATCH_SECONDS_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
#: Per-sample inference latency, seconds.
INFERENCE_SECONDS_BUCKETS: tuple[float, ...] = (
    1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)


def _format_bound(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def format_count(count: int) -> str:
    """``floatToGoString(count)`` for a sample value, without the float round trip for the usual small counts."""
    if type(count) is int and 0 <= count < 1_000_000:  # below 1e6 floatToGoString writes "<n>.0"
        return f"{count}.0"
    return floatToGoString(count)


def escape_label_value(value: str) -> str:
    """A label value as the exposition formats quote it: backslash, newline and double quote escaped."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_exemplar(exemplar: Exemplar) -> str:
    """The OpenMetrics exemplar suffix of a bucket line: `` # {labels} value [timestamp]``."""
    labels = ",".join(f'{name}="{escape_label_value(value)}"' for name, value in sorted(exemplar.labels.items()))
    if exemplar.timestamp is None:
        return f" # {{{labels}}} {floatToGoString(exemplar.value)}"
    return f" # {{{labels}}} {floatToGoString(exemplar.value)} {exemplar.timestamp}"


class HistogramLines:
    """The unchanging start of each line of one histogram series, for :meth:`FastHistogram.render`.

    Args:
        buckets: per bucket (``+Inf`` last), the sample name and labels up to the value, e.g.
            ``'dgdn_batch_processing_seconds_bucket{le="0.1",rank="0"} '``.
        count: the same for the ``_count`` sample; None when the series has no count and sum (a histogram whose
            first bucket bound is negative).
        sum: the same for the ``_sum`` sample.
    """

    __slots__ = ("buckets", "count", "sum")

    def __init__(self, buckets: Sequence[str], count: Optional[str], sum: Optional[str]) -> None:  # noqa: A002
        self.buckets = tuple(buckets)
        self.count = count
        self.sum = sum


class FastHistogram:
    """Bucket counts, sum and one exemplar per bucket.

    Args:
        bounds: finite upper bounds, ascending; ``+Inf`` is added.

    Example::

        h = FastHistogram((0.1, 1.0))
        h.observe(0.5, trace_id="4bf92f3577b34da6a3ce929d0e0e4736")
    """

    __slots__ = ("bounds", "_labels", "counts", "sum", "exemplars")

    def __init__(self, bounds: Sequence[float]) -> None:
        finite = sorted(float(b) for b in bounds if not math.isinf(b))
        if not finite:
            raise ValueError("bounds must hold at least one finite bucket bound")
        self.bounds: tuple[float, ...] = tuple(finite)
        self._labels = tuple(_format_bound(b) for b in self.bounds) + ("+Inf",)
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

    @property
    def bucket_labels(self) -> tuple[str, ...]:
        """The ``le`` label value of each bucket, ``+Inf`` last."""
        return self._labels

    def render(self, lines: HistogramLines, exemplars: bool) -> str:
        """This histogram's sample lines (cumulative buckets, count, sum), as the exposition formats write them.

        Args:
            lines: the pre-rendered line starts for this series, one per bucket.
            exemplars: append each bucket's exemplar (OpenMetrics); the Prometheus text format has none.
        """
        counts = list(self.counts)  # one snapshot, so +Inf always equals the sum of the buckets
        slots = list(self.exemplars) if exemplars else [None] * len(counts)
        out = []
        running = 0
        for start, count, exemplar in zip(lines.buckets, counts, slots):
            running += count
            if exemplar is None:
                out.append(f"{start}{format_count(running)}\n")
            else:
                out.append(f"{start}{format_count(running)}{format_exemplar(exemplar)}\n")
        if lines.count is not None:
            out.append(f"{lines.count}{format_count(running)}\n{lines.sum}{floatToGoString(self.sum)}\n")
        return "".join(out)

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
