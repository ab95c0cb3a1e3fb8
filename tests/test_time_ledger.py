"""TimeLedger: drawn sequences of hook events against a reference that works from the timeline itself (the
intervals each event opens and the gaps between progress events), the exact partition of the wall time, the
compute split by sampled phases, checkpoints of the ledger, and reads racing the training thread."""

from __future__ import annotations

import math
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgdn_lightning_monitor.time_ledger import CATEGORIES, COMPUTE, TimeLedger, lost_seconds

# What each event opens, as the hooks call them; "progress" keeps the category.
_OPENS = {
    "fetch_started": "data_wait",
    "fetch_ended": "compute",
    "step_ended": "between_steps",
    "sanity_check": "sanity_check",
    "validation": "validation",
    "checkpoint": "checkpoint",
    "setup": "setup",
    "progress": None,
}
_PROGRESS = {"step_ended", "progress"}

events = st.lists(
    st.tuples(
        st.sampled_from(sorted(_OPENS)),
        st.one_of(st.just(0.0), st.floats(0.0, 5.0, allow_nan=False)),
    ),
    max_size=60,
)


def _apply(ledger: TimeLedger, kind: str, now: float) -> None:
    if kind in ("fetch_started", "fetch_ended", "step_ended", "progress"):
        getattr(ledger, kind)(now)
    else:
        ledger.enter(kind, now)


def _reference(start: float, timeline: list[tuple[str, float]], now: float, threshold: float) -> dict[str, float]:
    """Seconds per category computed from the timeline: the intervals between events, and the stall zones
    ``[progress + threshold, next progress)``, each interval's overlap with them counted as stall."""
    intervals, progress, category, since = [], [start], "setup", start
    for kind, at in timeline:
        intervals.append((category, since, at))
        category, since = _OPENS[kind] or category, at
        if kind in _PROGRESS:
            progress.append(at)
    intervals.append((category, since, now))
    zones = [(p + threshold, q) for p, q in zip(progress, progress[1:] + [now])]
    totals = dict.fromkeys([*CATEGORIES, "compute"], 0.0)
    for name, a, b in intervals:
        stalled = sum(max(0.0, min(b, z1) - max(a, z0)) for z0, z1 in zones)
        totals[name] += (b - a) - stalled
        totals["stall"] += stalled
    return totals


@settings(max_examples=300, deadline=None)
@given(
    start=st.floats(0.0, 1e6, allow_nan=False),
    threshold=st.one_of(st.none(), st.floats(0.5, 8.0)),
    timeline=events,
    tail=st.floats(0.0, 20.0),
)
def test_partition_matches_the_timeline(start, threshold, timeline, tail):
    """At every event and at a read after the last, the totals are the timeline's (stall included, also the
    ongoing excess of a read during a stall) and sum to now - start; no category ever goes down."""
    ledger, at, seen = TimeLedger(threshold, now=start), start, []
    previous = ledger.totals(start)
    for kind, dt in timeline:
        at += dt
        _apply(ledger, kind, at)
        seen.append((kind, at))
        totals = ledger.totals(at)
        wall = at - start
        assert math.isclose(sum(totals.values()), wall, rel_tol=1e-9, abs_tol=1e-12)
        assert all(totals[name] >= previous[name] - 1e-9 * max(wall, 1.0) for name in CATEGORIES)
        previous = totals
    now = at + tail
    totals = ledger.totals(now)
    expected = _reference(start, seen, now, math.inf if threshold is None else threshold)
    tolerance = 1e-9 * max(now - start, 1.0)
    assert math.isclose(sum(totals.values()), now - start, rel_tol=1e-9, abs_tol=1e-12)
    for name in CATEGORIES:
        if name not in COMPUTE:
            assert totals[name] == pytest.approx(expected[name], abs=tolerance), name
    # Never sampled: all compute is forward (see the module's docstring).
    assert totals["forward"] == pytest.approx(expected["compute"], abs=tolerance)
    assert totals["backward"] == totals["optimizer_step"] == 0.0
    assert ledger.goodput_ratio(now) == pytest.approx(expected["compute"] / (now - start) if now > start else 0.0)


def test_a_stall_moves_only_the_excess_and_shows_while_it_lasts():
    """A loader stuck for 700 s with a 600 s threshold: the gap from the last progress (the start) to the step's
    end is 702 s, its first 600 s stay where they were spent, the rest (the step's own compute included) is stall;
    a read during the wait shows the excess so far; the step's end is progress, and the stall stops growing."""
    ledger = TimeLedger(600.0, now=0.0)
    ledger.fetch_started(1.0)  # 1 s of setup
    assert ledger.totals(650.0)["stall"] == pytest.approx(50.0)  # from 600 s after the start (its last progress)
    ledger.fetch_ended(701.0)
    ledger.step_ended(702.0)
    totals = ledger.totals(703.0)
    assert (totals["setup"], totals["data_wait"], totals["stall"]) == pytest.approx((1.0, 599.0, 102.0))
    assert totals["forward"] == 0.0 and totals["between_steps"] == pytest.approx(1.0)
    ledger.fetch_started(703.0)
    ledger.fetch_ended(704.0)
    ledger.step_ended(706.0)
    totals = ledger.totals(706.0)
    assert (totals["data_wait"], totals["forward"], totals["stall"]) == pytest.approx((600.0, 2.0, 102.0))
    ledger.enter("validation", 706.0)
    for batch_end in range(710, 3000, 10):  # validation batches are progress: no stall however long it runs
        ledger.progress(float(batch_end))
    assert ledger.totals(3000.0)["stall"] == pytest.approx(102.0)


def test_compute_is_split_by_the_sampled_shares_and_never_goes_down():
    """Before the first sample the step's compute is forward; each sample folds what was counted with the shares in
    force and moves the running shares by PHASE_SAMPLE_WEIGHT towards its own."""
    ledger, now = TimeLedger(None, now=0.0), 0.0

    def steps(count: int) -> None:
        nonlocal now
        for _ in range(count):
            ledger.fetch_started(now)
            ledger.fetch_ended(now + 0.25)
            ledger.step_ended(now + 1.25)  # 1 s of compute per step
            now += 1.5

    steps(4)
    assert ledger.totals(now)["forward"] == pytest.approx(4.0)
    ledger.phase_sample({"data_fetch": 9.0, "forward": 0.2, "backward": 0.6, "optimizer_step": 0.2})
    steps(10)
    totals = ledger.totals(now)
    assert [totals[name] for name in COMPUTE] == pytest.approx([4.0 + 2.0, 6.0, 2.0])
    before = totals
    ledger.phase_sample({"forward": 1.0, "backward": 0.0, "optimizer_step": 0.0})  # shares -> (0.4, 0.45, 0.15)
    after = ledger.totals(now)
    assert all(after[name] >= before[name] for name in COMPUTE)
    steps(20)
    totals = ledger.totals(now)
    assert [totals[name] for name in COMPUTE] == pytest.approx([6.0 + 8.0, 6.0 + 9.0, 2.0 + 3.0])
    assert sum(totals[name] for name in COMPUTE) == pytest.approx(34.0)
    assert ledger.goodput_ratio(now) == pytest.approx(34.0 / now)
    for bad in ({"forward": 0.0}, {"forward": float("nan")}, {"forward": 1.0, "backward": -1.0}):
        ledger.phase_sample(bad)  # ignored
    assert ledger.totals(now) == totals


def test_checkpointed_totals_carry_on_and_lost_progress_counts():
    """A requeued run: the checkpoint's totals carry on, the time the previous attempt ran after that checkpoint
    (its last side-file state minus the checkpoint's) is lost progress, and the totals still sum to now - start."""
    first = TimeLedger(600.0, now=100.0)
    first.fetch_started(110.0)
    first.fetch_ended(112.0)
    first.step_ended(115.0)
    checkpoint = first.state_dict(120.0)
    side_file = first.state_dict(150.0)  # the attempt ran 30 s more, then was killed
    assert lost_seconds(checkpoint, side_file) == pytest.approx(30.0)
    assert lost_seconds(side_file, checkpoint) == 0.0

    second = TimeLedger(600.0, now=5.0)
    second.load_state_dict(checkpoint)
    second.add_lost_progress(lost_seconds(checkpoint, side_file))
    second.fetch_started(8.0)
    totals = second.totals(10.0)
    assert sum(totals.values()) == pytest.approx(20.0 + 30.0 + 5.0)
    assert sum(totals.values()) == pytest.approx(10.0 - second.start)
    assert totals["lost_progress"] == pytest.approx(30.0)
    assert totals["setup"] == pytest.approx(10.0 + 3.0)
    assert totals["data_wait"] == pytest.approx(2.0 + 2.0)
    assert totals["between_steps"] == pytest.approx(5.0)
    second.load_state_dict(checkpoint)  # loading again replaces, never adds twice
    assert second.totals(10.0) == pytest.approx(totals)


def test_checkpoint_save_returns_to_the_category_it_interrupted():
    ledger = TimeLedger(None, now=0.0)
    ledger.step_ended(1.0)
    previous = ledger.enter("checkpoint", 2.0)
    ledger.progress(2.0)
    ledger.enter(previous, 7.0)
    assert ledger.category == "between_steps"
    assert ledger.totals(8.0)["checkpoint"] == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: TimeLedger(0.0), "stall_after_s"),
        (lambda: TimeLedger(-1.0), "stall_after_s"),
        (lambda: TimeLedger(None).enter("stall", 1.0), "category"),
        (lambda: TimeLedger(None).add_lost_progress(float("inf")), "seconds"),
        (lambda: TimeLedger(None).load_state_dict({"seconds": {"naps": 1.0}}), "state"),
        (lambda: TimeLedger(None).load_state_dict({"seconds": {"stall": -1.0}}), "stall"),
        (lambda: lost_seconds({}, {"seconds": {}}), "checkpoint"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_reads_racing_the_training_thread_stay_consistent():
    """A scrape thread reading while the training thread runs transitions as fast as it can, the interpreter
    switching threads every microsecond: every read sums to its time minus the start, and no category goes down
    from one read to the next (a torn read would count an interval twice or not at all)."""
    ledger = TimeLedger(0.002, now=time.perf_counter())  # a tiny threshold: the stall path runs too
    stop = threading.Event()

    def train() -> None:
        clock = time.perf_counter
        while not stop.is_set():
            ledger.fetch_started(clock())
            ledger.fetch_ended(clock())
            ledger.step_ended(clock())
            ledger.progress(clock())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    writer = threading.Thread(target=train, daemon=True)
    writer.start()
    try:
        previous, reads = ledger.totals(), 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            now = time.perf_counter()
            totals = ledger.totals(now)
            wall, after = sum(totals.values()), time.perf_counter()
            # now - start, or the last transition's time minus start when the writer was past ``now`` already
            assert now - ledger.start - 1e-9 <= wall <= after - ledger.start + 1e-9
            for name in CATEGORIES:
                assert totals[name] >= previous[name] - 1e-9, (name, previous[name], totals[name])
            previous, reads = totals, reads + 1
    finally:
        stop.set()
        writer.join()
        sys.setswitchinterval(interval)
    assert reads > 100 and previous["data_wait"] > 0 and previous["stall"] >= 0


def test_a_learned_threshold_counts_stall_from_the_mark_of_the_current_gap_only():
    """With a learned threshold the ledger cannot know the deadline: the watchdog marks it (``stalled``). A gap
    past the floor without a mark stays where it was spent; a mark of an earlier gap is not this gap's."""
    ledger = TimeLedger(10.0, now=0.0, learned=True)
    ledger.fetch_started(1.0)
    ledger.fetch_ended(2.0)
    ledger.step_ended(30.0)  # a 28 s step, past the 10 s floor, never marked: compute
    assert ledger.totals(30.0)["stall"] == 0.0
    ledger.stalled(25.0)  # a late mark of the gap that already ended
    ledger.fetch_started(31.0)
    ledger.fetch_ended(32.0)
    ledger.stalled(52.0)  # this gap's deadline (its progress at 30 s, a learned 22 s)
    assert ledger.totals(50.0)["stall"] == 0.0  # before the mark
    assert ledger.totals(60.0)["stall"] == pytest.approx(8.0)
    ledger.step_ended(70.0)
    totals = ledger.totals(70.0)
    assert totals["stall"] == pytest.approx(18.0)
    assert sum(totals.values()) == pytest.approx(70.0)
    ledger.fetch_started(71.0)
    ledger.fetch_ended(72.0)
    ledger.step_ended(90.0)  # the next gap: the old mark does not apply
    assert ledger.totals(90.0)["stall"] == pytest.approx(18.0)


def test_a_mark_never_moves_time_a_read_already_counted():
    """A mark before the latest read is taken at that read: counters never go back."""
    ledger = TimeLedger(10.0, now=0.0, learned=True)
    ledger.step_ended(1.0)
    first = ledger.totals(20.0)
    ledger.stalled(15.0)
    second = ledger.totals(25.0)
    assert all(second[name] >= first[name] for name in first)
    assert second["stall"] == pytest.approx(5.0)
