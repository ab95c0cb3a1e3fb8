"""The span builder keeps its queue bounded when traced batches arrive faster than spans can be built."""

from __future__ import annotations

import logging
import threading
import time

from dgdn_lightning_monitor.graph_size import GraphSize
from dgdn_lightning_monitor.tracing import BatchRecord
from dgdn_lightning_monitor.tracing.tracer import SpanBuilder


def record(index: int) -> BatchRecord:
    r = BatchRecord("train", 0, index, index, GraphSize(1, 2, 3))
    r.mark("batch_start")
    r.mark("batch_end")
    return r


def test_queue_is_bounded_and_the_drop_is_reported_once(caplog):
    release = threading.Event()
    built: list[int] = []

    def slow_emit(r: BatchRecord) -> None:
        release.wait(5)  # a builder that cannot keep up
        built.append(r.batch_idx)

    builder = SpanBuilder(slow_emit, interval_s=0.5, max_queued=10)  # first look after the burst
    with caplog.at_level(logging.WARNING, logger="dgdn_lightning_monitor"):
        for index in range(100):
            builder.submit(record(index))
    time.sleep(0.05)
    dropped = builder.errors.counts["tracing"]
    assert dropped == 100 - 10  # each one counted
    assert sum("faster than their spans can be built" in r.getMessage() for r in caplog.records) == 1
    release.set()
    builder.close()
    assert len(built) == 100 - dropped  # everything queued was built, nothing else
