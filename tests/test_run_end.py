"""The end of a run, with real Trainers and real scrapers (threads of HTTP GETs, connections held open, processes
that run ``fit`` and exit): every stage returns within a second of its last batch whatever the scrapers do; the
endpoint serves on, so the next stage of a Trainer serves on the same port and a new callback takes over the port of a
finished one; and the exit of a process waits until a scrape has read how its run ended, only when something
scraped it regularly, and not with ``wait_for_final_scrape=False``."""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
from conftest import free_port
from exposition import samples, scrape
from lit_models import GraphClassifier, graph_loaders, quiet_trainer

from dgdn_lightning_monitor import MonitoringCallback, server
from dgdn_testing import scrapers
from dgdn_testing.scrapers import held_connections

pytestmark = pytest.mark.slow

#: What a stage may take from the end of its last batch until the Trainer's call returns.
RETURN_BUDGET_S = 1.0
#: A regular scraper's interval: long enough that waiting for its next scrape would break the budget.
SCRAPE_EVERY_S = 2.0
#: What exiting takes without a wait (the other exit handlers, a loaded machine).
QUICK_EXIT_S = 1.0
CHILD = Path(__file__).with_name("run_end_child.py")
START_TIMEOUT_S = 120.0


def outcome(text: str) -> Optional[str]:
    """The outcome ``dgdn_run_outcome`` says (the one at 1)."""
    return next((labels["outcome"] for labels, v in samples(text).get("dgdn_run_outcome", []) if v == 1), None)


class Scraper(scrapers.Scraper):
    """A regular scraper whose answers are ``(when the request began, the outcome the answer said)``, and whose wait
    for answers fails the test when they do not come."""

    def __init__(self, url: str, every_s: float = SCRAPE_EVERY_S) -> None:
        super().__init__(url, every_s, read=outcome, name="test-scraper")

    def wait_for_answers(self, count: int, timeout_s: float = 30.0) -> bool:
        assert super().wait_for_answers(count, timeout_s), f"{count} answered scrapes of {self.url} in {timeout_s} s"
        return True


class StageClock(pl.Callback):
    """Placed last: notes when a batch of any stage last ended. At the first stage's start, once the endpoint
    serves, opens the held connections and waits until the scraper has answered twice (a regular scraper); at every
    stage's end, pauses the scraper when it is one that stops."""

    def __init__(self, scraper: Scraper, hold: Callable[[], list[socket.socket]], stops: bool) -> None:
        self.scraper, self.hold, self.stops = scraper, hold, stops
        self.held: Optional[list[socket.socket]] = None
        self.last_batch = 0.0

    def _started(self, *args: Any) -> None:
        if self.held is None:
            self.held = self.hold()
            self.scraper.wait_for_answers(2)

    def _batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.last_batch = time.perf_counter()

    def _ended(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.stops and (trainer.state.fn != "fit" or not trainer.validating):
            self.scraper.pause()

    on_train_start = on_validation_start = on_test_start = on_predict_start = _started
    on_train_batch_end = on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _batch_end
    on_train_end = on_test_end = on_predict_end = _ended

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._ended(trainer)


@pytest.mark.parametrize("kind", ["regular", "slow", "idle", "stops"])
def test_every_stage_returns_within_a_second_of_its_last_batch_and_the_next_serves_on_the_same_port(kind: str):
    """fit, validate, test and predict on one Trainer and one port, a scraper every second (alone, next to a
    request trickled byte by byte and one never read, next to an idle connection, or stopping at each stage's end):
    each call returns within a second of its last batch, and the endpoint serves on with the outcome of the stage."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    monitor = MonitoringCallback(port=port, addr="127.0.0.1", tracing=False, gpu_devices=None)
    scraper = Scraper(url)
    clock = StageClock(scraper, lambda: held_connections(kind, port), stops=kind == "stops")
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor, clock], num_sanity_val_steps=0)
    model, (train, val, *_) = GraphClassifier(), graph_loaders()
    stages: dict[str, Callable[[], Any]] = {
        "fit": lambda: trainer.fit(model, train, val),
        "validate": lambda: trainer.validate(model, val, verbose=False),
        "test": lambda: trainer.test(model, val, verbose=False),
        "predict": lambda: trainer.predict(model, val),
    }
    took: dict[str, float] = {}
    try:
        for stage, call in stages.items():
            scraper.resume()
            call()
            took[stage] = time.perf_counter() - clock.last_batch
            assert monitor.metrics_url == url, stage  # serves on, on the same port
            assert outcome(scrape(url)) == "completed", stage
        assert len([answer for answer in scraper.answers if answer[1] == "running"]) >= 2  # scraped regularly
        assert max(took.values()) < RETURN_BUDGET_S, took
    finally:
        scraper.close()
        for connection in clock.held or []:
            connection.close()


@pytest.mark.parametrize("given", [True, False], ids=["same_port", "default_port"])
def test_a_new_callback_takes_over_the_port_of_a_finished_run_in_the_same_process(given: bool, monkeypatch):
    """A notebook cell run again: a new callback with the same fixed port (or the default port) while the previous
    run's endpoint serves on, its end not yet read by the scraper: the new run serves on that port, not a free one,
    and its scrapes show the new run."""
    port = free_port()
    if not given:
        monkeypatch.setattr(server, "DEFAULT_PORT", port)
    url = f"http://127.0.0.1:{port}/metrics"
    options = dict(port=port if given else None, addr="127.0.0.1", tracing=False, gpu_devices=None)
    scraper = Scraper(url, every_s=3.0)  # its next scrape mostly comes after the second run started
    seen: list[str] = []

    class Watch(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not seen:
                scraper.wait_for_answers(2)
            seen.append(samples(scrape(url))["dgdn_training_info"][0][0]["run_id"])

    try:
        train, val, *_ = graph_loaders()
        first = MonitoringCallback(**options)
        quiet_trainer(max_epochs=1, callbacks=[first, Watch()]).fit(GraphClassifier(), train, val)
        assert first.metrics_url == url  # serving on
        second = MonitoringCallback(**options)
        quiet_trainer(max_epochs=1, callbacks=[second, Watch()]).fit(GraphClassifier(), train, val)
        assert seen == [first.run_id, second.run_id] and first.run_id != second.run_id
        assert second.metrics_url == url and first.metrics_url is None
        assert samples(scrape(url))["dgdn_training_info"][0][0]["run_id"] == second.run_id
    finally:
        scraper.close()


def test_wait_for_final_scrape_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="wait_for_final_scrape must be True or False"):
        MonitoringCallback(wait_for_final_scrape="no")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ the exit
class Child:
    """``tests/run_end_child.py`` on ``port``: its lines, each as it comes."""

    def __init__(self, port: int, go: Path, *args: str) -> None:
        self.go_file = go
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD), "--port", str(port), "--go", str(go), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, name="test-child-lines", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def expect(self, word: str) -> float:
        """Wait for the line starting with ``word``; its time, if it carries one."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.process.poll() is None, f"the child exited ({self.process.returncode}) before {word!r}"
                continue
            if line.startswith(word):
                return float(line.split()[1]) if " " in line else 0.0
        raise TimeoutError(f"no {word!r} from the child")

    def go(self) -> None:
        self.go_file.touch()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def _run_child(
    tmp_path: Path, *args: str, scraped: bool, ranks: int = 1
) -> tuple[float, float, list[list[tuple[float, Optional[str]]]]]:
    """Run the child with or without a scraper every second on each rank's port, which pauses for a second when
    ``fit`` has returned.

    Returns:
        When fit returned, when the child's exit handlers were done, and each rank's scraper's answers.
    """
    port = free_port_pair() if ranks == 2 else free_port()
    child = Child(port, tmp_path / "go", *args)
    scrapers: list[Scraper] = []
    try:
        child.expect("serving")
        if scraped:
            scrapers = [Scraper(f"http://127.0.0.1:{port + rank}/metrics") for rank in range(ranks)]
            for scraper in scrapers:
                scraper.wait_for_answers(2)
        child.go()
        returned = child.expect("returned")
        for scraper in scrapers:
            scraper.pause()
        if scrapers:
            time.sleep(1.0)  # the scraper's own pause: a process that does not wait is gone when it resumes
        for scraper in scrapers:
            scraper.resume()
        exited = child.expect("exited")
        assert child.process.wait(30) == 0
        return returned, exited, [list(scraper.answers) for scraper in scrapers]
    finally:
        for scraper in scrapers:
            scraper.close()
        child.close()


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free on loopback (rank 0 and rank 1)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def test_a_process_with_a_regular_scraper_exits_once_a_scrape_has_read_how_its_run_ended(tmp_path: Path):
    returned, exited, [answers] = _run_child(tmp_path, scraped=True)
    completed = [began for began, said in answers if said == "completed"]
    assert completed, f"no scrape read the end: {answers}"
    assert completed[0] < exited  # the process still served when that scrape came
    assert exited - returned < 2 * SCRAPE_EVERY_S + 1 + QUICK_EXIT_S  # bounded: the scraper's deadline


def test_a_process_nobody_scrapes_exits_at_once(tmp_path: Path):
    returned, exited, _ = _run_child(tmp_path, scraped=False)
    assert exited - returned < QUICK_EXIT_S


def test_wait_for_final_scrape_false_exits_at_once_even_with_a_regular_scraper(tmp_path: Path):
    returned, exited, _ = _run_child(tmp_path, "--no-wait", scraped=True)
    assert exited - returned < QUICK_EXIT_S


def test_forked_ddp_workers_end_once_a_scrape_has_read_how_their_run_ended(tmp_path: Path):
    """strategy="ddp_fork" (as ddp_notebook): each rank is a process forked by multiprocessing, which ends without
    atexit; each still serves until a scrape has read its end, before fit returns in the parent, and nothing hangs."""
    returned, exited, answers = _run_child(tmp_path, "--strategy", "ddp_fork", "--devices", "2", scraped=True, ranks=2)
    for rank, seen in enumerate(answers):
        completed = [began for began, said in seen if said == "completed"]
        assert completed and completed[0] < returned, f"rank {rank}: no scrape read its end before fit returned"
    assert exited - returned < QUICK_EXIT_S  # the parent's own endpoint served no run: nothing to wait for
