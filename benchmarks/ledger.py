"""What the time ledger adds to a training step: its four per-step calls (``fetch_started``, ``fetch_ended``,
``batch_started``, ``step_ended``) in a tight loop of synthetic steps, against the same loop without them and with
four calls of an empty method (the floor of any per-call API, to scale the figures to another machine); also with
a thread reading the totals every 10 ms (a scrape far more frequent than any real one), which the writer only
meets as contention for the GIL. Run: ``python -m benchmarks.ledger`` (a few seconds). Figures are the median over
7 loops of the mean ns per step.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from dgdn_lightning_monitor.time_ledger import TimeLedger

STEPS = 200_000
LOOPS = 7


def _loop(ledger: Any, steps: int) -> float:
    """ns per step of ``steps`` synthetic steps; ``ledger`` ``None`` runs the same loop without the calls."""
    # The callback's timestamps, taken anyway; ahead of the clock, so that a reader's time (its floor for later
    # transitions) never reaches them and every transition takes the common path.
    base = time.perf_counter() + 1e6
    times = [base + i * 1e-3 for i in range(4 * steps)]
    clock = time.perf_counter_ns
    if ledger is None:
        start = clock()
        for i in range(0, 4 * steps, 4):
            times[i], times[i + 1], times[i + 2], times[i + 3]
        return (clock() - start) / steps
    fetch_started, fetch_ended = ledger.fetch_started, ledger.fetch_ended
    batch_started, step_ended = ledger.batch_started, ledger.step_ended
    start = clock()
    for i in range(0, 4 * steps, 4):
        fetch_started(times[i])
        fetch_ended(times[i + 1])
        batch_started(times[i + 2])
        step_ended(times[i + 3])
    return (clock() - start) / steps


class _Nothing:
    """The floor of any method-call API: four calls that do nothing."""

    def fetch_started(self, now: float) -> None:
        pass

    fetch_ended = batch_started = step_ended = fetch_started


def _with_reader(steps: int) -> float:
    ledger = TimeLedger(600.0, now=time.perf_counter() + 1e6)
    stop = threading.Event()
    reads = [0]

    def read() -> None:
        while not stop.wait(0.01):
            ledger.totals()
            reads[0] += 1

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        return _loop(ledger, steps)
    finally:
        stop.set()
        reader.join()


def main() -> dict[str, float]:
    base, calls, plain, read = [], [], [], []
    for _ in range(LOOPS):  # interleaved, so that drift of the machine hits every case alike
        base.append(_loop(None, STEPS))
        calls.append(_loop(_Nothing(), STEPS))
        plain.append(_loop(TimeLedger(600.0, now=time.perf_counter() + 1e6), STEPS))
        read.append(_with_reader(STEPS))
    ledger = TimeLedger(600.0, now=time.perf_counter() + 1e6)
    clock = time.perf_counter_ns
    start = clock()
    for _ in range(10_000):
        ledger.totals()
    results = {
        "loop_ns_per_step": statistics.median(base),
        "empty_calls_ns_per_step": statistics.median(calls) - statistics.median(base),
        "ledger_ns_per_step": statistics.median(plain) - statistics.median(base),
        "ledger_with_reader_ns_per_step": statistics.median(read) - statistics.median(base),
        "totals_read_ns": (clock() - start) / 10_000,
    }
    for name, value in results.items():
        print(f"{name:32s} {value:8.0f}")
    return results


if __name__ == "__main__":
    main()
