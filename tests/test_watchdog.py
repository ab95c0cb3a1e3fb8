"""The stall watchdog in real Lightning runs: a step that blocks leaves a stack dump naming the blocking frame, once
per stall; a run that keeps progressing, also through a long validation, leaves none."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.graph_size import UNKNOWN
from dgdn_lightning_monitor.guards import MonitorErrors
from dgdn_lightning_monitor.metrics import TrainingMetrics
from dgdn_lightning_monitor.watchdog import THREAD_NAME, StallWatchdog, format_stacks
from exposition import exposition, value
from lit_models import GraphClassifier, graph_loaders, quiet_trainer

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
    assert on._watchdog is not None and on._watchdog.after_s == 600.0  # on by default


@pytest.mark.parametrize("bad", [0, -1, True, "10", float("inf"), float("nan")])
def test_bad_threshold_raises_at_construction(bad):
    with pytest.raises(ValueError, match="stall_dump_after_s"):
        MonitoringCallback(stall_dump_after_s=bad)


def test_poll_interval_scales_with_the_threshold():
    metrics = TrainingMetrics()
    assert StallWatchdog(600.0, metrics).poll_s == 30.0
    assert StallWatchdog(60.0, metrics).poll_s == 6.0
    assert StallWatchdog(1.0, metrics).poll_s == pytest.approx(0.1)


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
