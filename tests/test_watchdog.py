"""The stall watchdog in real Lightning runs: a step that blocks leaves a stack dump naming the blocking frame, once
per stall, at its threshold; a run that keeps progressing, also through a long validation, leaves none. With the
default ``"auto"`` the threshold is learned from the run's own step intervals and scraped as
``dgdn_stall_threshold_seconds``; a stage's first unit (a validation batch, an epoch's first step) gets the
default."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from exposition import exposition, samples, scrape, value
from lightning.pytorch import Callback
from lit_models import GraphClassifier, graph_loaders, quiet_trainer

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.graph_size import UNKNOWN
from dgdn_lightning_monitor.guards import MonitorErrors
from dgdn_lightning_monitor.metrics import TrainingMetrics
from dgdn_lightning_monitor.watchdog import THREAD_NAME, StallWatchdog, format_stacks

AFTER_S = 1.0  # threshold of these tests; blocking steps last several times longer


def sleep_in_the_step(seconds: float) -> None:
    time.sleep(seconds)


def wait_for_the_lock(lock: threading.Lock) -> None:
    lock.acquire()
    lock.release()


class Blocking(GraphClassifier):
    """Blocks in the training steps of ``at`` via ``block()``."""

    def __init__(self, at: set[int], block) -> None:
        super().__init__()
        self.at, self.block = at, block

    def training_step(self, batch, batch_idx):
        if self.current_epoch == 0 and batch_idx in self.at:
            self.block()
        return super().training_step(batch, batch_idx)


def fit(callback: MonitoringCallback, model, tmp_path: Path, epochs: int = 1, val: bool = False, **kwargs):
    train, val_loader, _, _ = graph_loaders()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[callback], default_root_dir=str(tmp_path),
                            num_sanity_val_steps=0, **kwargs)
    trainer.fit(model, train, val_loader if val else None)
    return trainer


def dumps(tmp_path: Path, showing: str = "") -> list[Path]:
    """The stall dumps written, those with the frame ``showing`` when given (on a loaded machine a slow first step
    may make one more, which shows no such frame)."""
    found = sorted((tmp_path / "dgdn-dumps").glob("stall-*.txt"))
    return [path for path in found if f"in {showing}\n" in path.read_text()] if showing else found


def test_a_sleeping_step_is_dumped_once_with_its_frame(tmp_path, caplog):
    callback = MonitoringCallback(port=0, gpu_devices=None, tracing=False, stall_dump_after_s=AFTER_S)
    with caplog.at_level(logging.WARNING, logger="dgdn_lightning_monitor.watchdog"):
        fit(callback, Blocking({2}, lambda: sleep_in_the_step(5 * AFTER_S)), tmp_path)
    [dump] = dumps(tmp_path, "sleep_in_the_step")  # one stall lasting many thresholds: one dump
    text = dump.read_text()
    assert "no progress in any stage" in text and 'Thread "MainThread"' in text
    assert "in sleep_in_the_step" in text and "time.sleep(seconds)" in text
    assert "in training_step" in text
    assert THREAD_NAME not in text  # the watchdog leaves itself out
    written = dumps(tmp_path)
    assert callback.summary()["stall_dumps"] == [str(path) for path in written]
    assert value(exposition(callback.registry), "dgdn_stall_dumps_total") == len(written)
    assert value(exposition(callback.registry), "dgdn_stall_threshold_seconds", stage="train") == AFTER_S  # fixed
    assert [r for r in caplog.records if str(dump) in r.getMessage() and "No progress for" in r.getMessage()]
    assert not [t for t in threading.enumerate() if t.name == THREAD_NAME]  # gone with the run


def test_a_lock_never_released_is_dumped_where_the_step_waits(tmp_path):
    lock = threading.Lock()
    lock.acquire()  # held by nobody who will release it on their own: the test lets go once the dump is written

    def release_after_the_dump():
        deadline = time.monotonic() + 60
        while not dumps(tmp_path, "wait_for_the_lock") and time.monotonic() < deadline:
            time.sleep(0.05)
        lock.release()

    releaser = threading.Thread(target=release_after_the_dump, daemon=True)
    releaser.start()
    callback = MonitoringCallback(port=0, gpu_devices=None, tracing=False, stall_dump_after_s=AFTER_S)
    fit(callback, Blocking({1}, lambda: wait_for_the_lock(lock)), tmp_path)
    releaser.join(timeout=5)
    [dump] = dumps(tmp_path, "wait_for_the_lock")
    assert "lock.acquire()" in dump.read_text()


def test_a_new_stall_after_progress_is_dumped_again(tmp_path):
    callback = MonitoringCallback(port=0, gpu_devices=None, tracing=False, stall_dump_after_s=AFTER_S)
    fit(callback, Blocking({1, 3}, lambda: sleep_in_the_step(3 * AFTER_S)), tmp_path)
    assert len(dumps(tmp_path, "sleep_in_the_step")) == 2
    assert callback.metrics.stall_dumps == len(callback.summary()["stall_dumps"]) == len(dumps(tmp_path))


class SlowValidation(GraphClassifier):
    def validation_step(self, batch, batch_idx):
        time.sleep(0.5)  # each batch well under the threshold, the whole validation over twice the threshold
        return super().validation_step(batch, batch_idx)


def test_a_long_validation_that_progresses_is_not_a_stall(tmp_path):
    train, val, _, _ = graph_loaders(num_graphs=120, val_fraction=0.75)  # 12 validation batches: 6 s
    after_s = 2.5
    callback = MonitoringCallback(port=0, gpu_devices=None, tracing=False, stall_dump_after_s=after_s)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path),
                            num_sanity_val_steps=0, limit_train_batches=2)
    started = time.perf_counter()
    trainer.fit(SlowValidation(), train, val)
    assert time.perf_counter() - started > 2 * after_s
    assert dumps(tmp_path) == [] and callback.metrics.stall_dumps == 0
    assert value(exposition(callback.registry), "dgdn_stall_dumps_total") == 0.0


def test_none_turns_the_watchdog_off(tmp_path):
    seen = []

    class Look(GraphClassifier):
        def training_step(self, batch, batch_idx):
            seen.append([t.name for t in threading.enumerate()])
            return super().training_step(batch, batch_idx)

    callback = MonitoringCallback(port=0, gpu_devices=None, tracing=False, stall_dump_after_s=None)
    fit(callback, Look(), tmp_path)
    assert seen and not any(THREAD_NAME in names for names in seen)
    on = MonitoringCallback(port=0, gpu_devices=None, tracing=False)
    assert on._watchdog is not None and on._watchdog.after_s == "auto"  # on by default, learning its threshold
    assert value(exposition(callback.registry), "dgdn_stall_threshold_seconds", stage="train") is None


@pytest.mark.parametrize("bad", [0, -1, True, "10", "AUTO", "", float("inf"), float("nan")])
def test_bad_threshold_raises_at_construction(bad):
    with pytest.raises(ValueError, match="stall_dump_after_s"):
        MonitoringCallback(stall_dump_after_s=bad)


def test_a_fixed_threshold_dumps_at_its_deadline(tmp_path):
    """The watchdog sleeps until the deadline instead of polling: the dump's own idle time is the threshold, not up
    to a polling interval more."""
    metrics = TrainingMetrics()
    watchdog = StallWatchdog(3, metrics)
    watchdog.start(tmp_path, rank=0)
    try:
        metrics.mark_progress("validate", time.perf_counter())
        deadline = time.monotonic() + 30
        while metrics.stall_dumps == 0 and time.monotonic() < deadline:  # waits for the dump
            time.sleep(0.05)
    finally:
        watchdog.stop()
    [dump] = watchdog.dumps
    said = re.search(r"no progress in any stage for ([0-9.]+) s \(stall_dump_after_s=3\)", Path(dump).read_text())
    assert said is not None and 3.0 <= float(said[1]) <= 3.1


def test_the_watchdog_waits_for_the_first_progress_from_its_start(tmp_path):
    """Before any progress (a hang in the first batch or a start-up collective) the time since start counts; a
    progress time from an earlier run does not."""
    metrics = TrainingMetrics()
    metrics.observe_train_batch(0.01, time.perf_counter() - 1000.0, UNKNOWN)  # progress of an earlier run
    watchdog = StallWatchdog(0.3, metrics)
    watchdog.start(tmp_path, rank=3)
    try:
        time.sleep(0.15)
        assert metrics.stall_dumps == 0  # the old progress time is ignored
        deadline = time.monotonic() + 10
        while metrics.stall_dumps == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watchdog.stop()
    assert metrics.stall_dumps == 1
    assert Path(watchdog.dumps[0]).name.endswith("-rank3.txt")


def test_format_stacks_names_every_thread():
    ready, done = threading.Event(), threading.Event()

    def parked_helper():
        ready.set()
        done.wait(10)

    thread = threading.Thread(target=parked_helper, name="parked-helper", daemon=True)
    thread.start()
    ready.wait(5)
    try:
        text = format_stacks()
    finally:
        done.set()
        thread.join(5)
    assert 'Thread "MainThread"' in text and 'Thread "parked-helper"' in text and "in parked_helper" in text


def test_a_dump_that_cannot_be_written_is_counted_and_the_watch_goes_on(tmp_path):
    """A dump directory that cannot be created (a file stands there) is a monitoring error of part "watchdog":
    counted once per failed dump, warned once, and the watchdog keeps watching."""
    metrics, errors = TrainingMetrics(), MonitorErrors(logging.getLogger("dgdn_lightning_monitor"))
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the dumps would go")
    watchdog = StallWatchdog(0.2, metrics, errors)
    watchdog.start(blocked, rank=0)
    try:
        deadline = time.monotonic() + 10
        while errors.counts["watchdog"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watchdog._thread is not None and watchdog._thread.is_alive()
    finally:
        watchdog.stop()
    assert errors.counts["watchdog"] == 1 and metrics.stall_dumps == 0 and watchdog.dumps == []


# ---------------------------------------------------------------------------------------------- "auto"
# The rule as docs/troubleshooting.md states it, written out here to check the callback against: a stage's unit is
# dumped 3 x the 99th percentile (nearest rank) of its last 200 intervals after its last progress, between 10 s and
# 600 s, once 50 intervals are known (600 s before).
def learned_threshold(ends: list[tuple[int, float]]) -> float:
    """From the (epoch, end time) of consecutive training steps: the intervals within an epoch."""
    intervals = [b - a for (epoch_a, a), (epoch_b, b) in zip(ends, ends[1:]) if epoch_a == epoch_b][-200:]
    if len(intervals) < 50:
        return 600.0
    p99 = float(np.percentile(intervals, 99, method="inverted_cdf"))
    return min(600.0, max(10.0, 3 * p99))


class StepEnds(Callback):
    """Records when each training step ended (after the monitor, which comes first), and runs ``at[step]()`` then:
    on the training thread, so that nothing progresses while it runs."""

    def __init__(self, at: Optional[dict[int, Callable[[], None]]] = None) -> None:
        self.ends: list[tuple[int, float]] = []
        self.at = at or {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append((trainer.current_epoch, time.perf_counter()))
        action = self.at.get(len(self.ends))
        if action is not None:
            action()


def scraped_thresholds(callback: MonitoringCallback) -> dict[str, float]:
    """``dgdn_stall_threshold_seconds`` by stage, scraped over HTTP from the callback's endpoint."""
    assert callback.metrics_url is not None
    found = samples(scrape(callback.metrics_url)).get("dgdn_stall_threshold_seconds", [])
    return {labels["stage"]: seconds for labels, seconds in found}


def auto_fit(tmp_path: Path, model, steps: StepEnds, num_graphs: int, val: bool = False, epochs: int = 1):
    """``fit`` with the default threshold on batches of one graph (fast steps)."""
    train, val_loader, _, _ = graph_loaders(num_graphs=num_graphs, batch_size=1, val_fraction=0.05)
    callback = MonitoringCallback(port=0, addr="127.0.0.1", gpu_devices=None, tracing=False)  # "auto"
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[callback, steps], default_root_dir=str(tmp_path),
                            num_sanity_val_steps=0, limit_val_batches=1 if val else 0)
    trainer.fit(model, train, val_loader if val else None)
    return callback


def test_auto_exports_the_threshold_it_learned_from_the_steps(tmp_path):
    """Before 50 step intervals the default holds; after, 3 x their 99th percentile: one slow (4 s) step among
    fast ones sets it above the floor. The gauge, scraped over HTTP mid-run, says so for the stage."""
    seen: dict[int, dict[str, float]] = {}

    def look(step: int) -> Callable[[], None]:
        return lambda: seen.setdefault(step, scraped_thresholds(callback_of[0]))

    steps = StepEnds({30: look(30), 40: lambda: time.sleep(4.0), 65: look(65)})
    callback_of: list[MonitoringCallback] = []

    class Remember(GraphClassifier):
        def on_fit_start(self):
            callback_of.extend(c for c in self.trainer.callbacks if isinstance(c, MonitoringCallback))

    auto_fit(tmp_path, Remember(), steps, num_graphs=72)
    before, after = seen[30], seen[65]
    assert before["train"] == 600.0  # 29 intervals: not learned yet
    expected = learned_threshold(steps.ends[:65])
    assert expected > 12.0  # the slow step, not the floor, sets it
    assert after["train"] == pytest.approx(expected, abs=0.05)
    assert after["validate"] == after["test"] == after["checkpoint"] == 600.0  # nothing learned there
    assert dumps(tmp_path) == []  # a slow step under the default is no stall


def test_auto_dumps_a_hang_after_learning_within_its_threshold(tmp_path):
    """60 fast steps, then a step that hangs (until its dump is written): dumped at the learned threshold after
    the last step, which is within max(3 x p99 step interval, 10 s)."""
    hang_at = 61

    def hang() -> None:
        deadline = time.monotonic() + 120
        while not dumps(tmp_path) and time.monotonic() < deadline:  # waits for the dump
            time.sleep(0.02)
        time.sleep(1.5)  # and hangs on a while: time the ledger counts as stall

    steps = StepEnds()

    class Hanging(GraphClassifier):
        def training_step(self, batch, batch_idx):
            if batch_idx == hang_at:
                hang()
            return super().training_step(batch, batch_idx)

    callback = auto_fit(tmp_path, Hanging(), steps, num_graphs=68)
    [dump] = dumps(tmp_path)
    text = dump.read_text()
    last_end = steps.ends[hang_at - 1][1]  # the step before the hang (batch_idx hang_at - 1)
    target = learned_threshold(steps.ends[:hang_at])
    assert target < 600.0  # learned
    said = re.search(r"for ([0-9.]+) s \(stall_dump_after_s='auto': ([0-9.]+) s for train from 3 x the 99th", text)
    assert said is not None and float(said[2]) == pytest.approx(target, abs=0.05)
    assert target - 0.1 <= float(said[1]) <= target + 0.2  # at the deadline, not a polling interval late
    written = dump.stat().st_mtime - (time.time() - time.perf_counter()) - last_end
    assert written <= target + 1.0
    assert "in hang" in text and callback.metrics.stall_dumps == 1
    # The time ledger's stall is the gap past the same learned threshold: from the deadline to the hung step's end.
    stall = callback.summary()["time_seconds"]["stall"]
    assert stall == pytest.approx(steps.ends[hang_at][1] - last_end - target, abs=0.25)
    assert stall > 1.4


def test_auto_gives_a_long_validation_batch_and_an_epochs_first_step_their_own_allowance(tmp_path):
    """With the training threshold learned (the 10 s floor), a validation batch and the next epoch's first step
    that each take longer than it are no stall: a stage's first unit gets the default."""
    slow_s = 10.5
    seen: list[dict[str, float]] = []

    class SlowOutsideSteps(GraphClassifier):
        def validation_step(self, batch, batch_idx):
            if self.current_epoch == 0:
                seen.append(scraped_thresholds(callback_of[0]))
                time.sleep(slow_s)
            return super().validation_step(batch, batch_idx)

        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1 and batch_idx == 0:
                time.sleep(slow_s)
            return super().training_step(batch, batch_idx)

        def on_fit_start(self):
            callback_of.extend(c for c in self.trainer.callbacks if isinstance(c, MonitoringCallback))

    callback_of: list[MonitoringCallback] = []
    steps = StepEnds()
    callback = auto_fit(tmp_path, SlowOutsideSteps(), steps, num_graphs=64, val=True, epochs=2)
    first_epoch = [end for end in steps.ends if end[0] == 0]
    assert len(first_epoch) > 51 and len(steps.ends) == 2 * len(first_epoch)
    during_validation = seen[0]
    learned = learned_threshold(first_epoch)
    assert during_validation["train"] == pytest.approx(learned, abs=0.05)
    assert learned < slow_s  # a validation batch or a first step judged by it would be dumped
    assert during_validation["validate"] == 600.0  # the threshold in force in the validation
    assert dumps(tmp_path) == [] and callback.metrics.stall_dumps == 0
