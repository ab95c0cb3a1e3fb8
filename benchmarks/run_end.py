"""Run end: from the end of the last training batch until ``Trainer.fit`` returns, and from there until the process
has exited.

The first span covers Lightning's own end of training and MonitoringCallback's teardown: reading the last values,
flushing spans, stopping the GPU sampler, telling the endpoint the run ended. Spans go to (i) a live OTLP receiver,
(ii) a port nothing listens on (the collector is down), (iii) a receiver that accepts connections and never answers;
with spans to the live receiver, the endpoint is also scraped every second by (iv) a live scraper, (v) the same next
to a request trickled byte by byte and one whose answer is never read, (vi) a scraper that stops at the last batch.
A fit without the callback gives Lightning's part. The teardown's own parts are timed by wrapping them on the instance.

The second span is the exit of a process that ran one fit (``python -m benchmarks.run_end --exit-child``): from
``fit`` returning to its last exit handler, with nothing scraping it, a live scraper every second, and a scraper that
stopped when ``fit`` returned (the exit waits at most until that scraper is overdue).
"""

from __future__ import annotations

import atexit
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Optional

from lightning.pytorch import Callback

from benchmarks.common import (
    ROOT,
    Receiver,
    make_trainer,
    monitoring_callback,
    otlp_env,
    rotations,
    summarize,
)
from dgdn_testing.models import TensorRegressor, tiny_loader
from dgdn_testing.scrapers import Scraper, held_connections

#: Seconds between two scrapes of the scraper cases.
SCRAPE_EVERY_S = 1.0
CASES = ("no_callback", "live", "closed", "hang", "scraper_live", "scraper_slow", "scraper_stopped")
EXIT_CASES = ("exit_unscraped", "exit_scraper_live", "exit_scraper_stopped")
DESCRIPTIONS = {
    "no_callback": "no MonitoringCallback (Lightning's own end of training)",
    "live": "spans to a live OTLP receiver",
    "closed": "spans to a closed port (collector down)",
    "hang": "spans to a receiver that accepts and never answers",
    "scraper_live": "scraped every second (live scraper)",
    "scraper_slow": "scraped every second, next to a request trickled byte by byte and an answer never read",
    "scraper_stopped": "scraped every second until the last batch (scraper stopped)",
    "exit_unscraped": "process exit after fit, nothing scraping",
    "exit_scraper_live": "process exit after fit, scraped every second (waits for the scrape of the end)",
    "exit_scraper_stopped": "process exit after fit, scraper stopped at fit's return (waits until it is overdue)",
}
TARGETS_S: dict[str, Optional[float]] = {
    "no_callback": None,
    "live": 2.0,
    "closed": 2.0,
    "hang": 2.0,
    "scraper_live": 1.0,
    "scraper_slow": 1.0,
    "scraper_stopped": 1.0,
    "exit_unscraped": 0.5,
    "exit_scraper_live": SCRAPE_EVERY_S + 1.0,  # the next scrape
    "exit_scraper_stopped": 2 * SCRAPE_EVERY_S + 1.0 + 0.5,  # overdue: twice its interval and a second
}


class _Scraped(Callback):
    """Once the endpoint serves, scrapes it (and holds the slow connections) and waits for two answers: a regular
    scraper; the stopping one stops at the end of training."""

    def __init__(self, callback: Any, kind: str) -> None:
        self.callback, self.kind = callback, kind
        self.scraper: Optional[Scraper] = None
        self.held: list[socket.socket] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        url = str(self.callback.metrics_url)
        self.scraper = Scraper(url, SCRAPE_EVERY_S)
        if self.kind == "scraper_slow":
            self.held = held_connections("slow", int(url.rsplit(":", 1)[1].split("/")[0]))
        self.scraper.wait_for_answers(2)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.kind == "scraper_stopped" and self.scraper is not None:
            self.scraper.pause()

    def close(self) -> None:
        if self.scraper is not None:
            self.scraper.close()
        for connection in self.held:
            connection.close()


class _LastBatch(Callback):
    """Placed last: the time at which the last callback finished with the last batch."""

    def __init__(self) -> None:
        self.at = 0.0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.at = time.perf_counter()


def _timed(parts: dict[str, float], key: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            parts[key] += time.perf_counter() - start

    return timed


class _WrapTeardownParts(Callback):
    """Placed first: once the run has set up, wraps the parts of the callback's teardown to time them."""

    def __init__(self, callback: Any, parts: dict[str, float]) -> None:
        self.callback = callback
        self.parts = parts

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        cb = self.callback
        cb.teardown = _timed(self.parts, "teardown_total", cb.teardown)
        cb.tracer.finish = _timed(self.parts, "tracer_finish", cb.tracer.finish)
        cb.gpu.stop = _timed(self.parts, "gpu_stop", cb.gpu.stop)
        dist = getattr(cb, "_dist", None)
        if dist is not None and hasattr(dist, "finish"):
            dist.finish = _timed(self.parts, "distributed_finish", dist.finish)


def fit_once(case: str, endpoint: Optional[str], steps: int, trace_every: int) -> dict[str, Any]:
    last = _LastBatch()
    parts: dict[str, float] = defaultdict(float)
    callbacks: list[Any] = []
    scraped: Optional[_Scraped] = None
    if case != "no_callback":
        callback = monitoring_callback(trace_every_n_steps=trace_every, tracing=True)
        callbacks = [_WrapTeardownParts(callback, parts), callback]
        if case.startswith("scraper_"):
            scraped = _Scraped(callback, case)
            callbacks.append(scraped)
    try:
        with otlp_env(endpoint):
            trainer = make_trainer(callbacks + [last], max_epochs=1)
            trainer.fit(TensorRegressor(features=8, lr=0.01), train_dataloaders=tiny_loader(steps))
            returned = time.perf_counter()
    finally:
        if scraped is not None:
            scraped.close()
    return {"seconds": returned - last.at, "parts": dict(parts)}


# ---------------------------------------------------------------------------------------------- process exit
class _Hold(Callback):
    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        print(f"serving {self.callback.metrics_url}", flush=True)
        sys.stdin.readline()


def exit_child(steps: int) -> None:
    """The child of the exit cases: one fit (held at its start until the parent's scraper is regular), then exit;
    prints when fit returned and, from its first-registered (so last-run) exit handler, when the exit was done."""
    from benchmarks.common import quiet, set_threads

    atexit.register(lambda: print(f"exited {time.perf_counter():.6f}", flush=True))
    quiet()
    set_threads()
    callback = monitoring_callback(tracing=False)
    trainer = make_trainer([callback, _Hold(callback)], max_epochs=1)
    trainer.fit(TensorRegressor(features=8, lr=0.01), train_dataloaders=tiny_loader(steps))
    print(f"returned {time.perf_counter():.6f}", flush=True)


def exit_once(case: str, steps: int) -> dict[str, Any]:
    """The seconds from ``fit`` returning to the end of the exit handlers in a fresh process."""
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run_end", "--exit-child", str(steps)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    scraper: Optional[Scraper] = None
    said: dict[str, float] = {}
    try:
        for line in child.stdout:
            word, _, rest = line.strip().partition(" ")
            if word == "serving":
                if case != "exit_unscraped":
                    scraper = Scraper(rest, SCRAPE_EVERY_S)
                    scraper.wait_for_answers(2)
                child.stdin.write("go\n")
                child.stdin.flush()
            elif word in ("returned", "exited"):
                said[word] = float(rest)
                if word == "returned" and case == "exit_scraper_stopped" and scraper is not None:
                    scraper.pause()
        child.wait(60)
    finally:
        if scraper is not None:
            scraper.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0 or len(said) != 2:
        raise RuntimeError(f"the exit child ended with {child.returncode} after saying {said}")
    return {"seconds": said["exited"] - said["returned"], "parts": {}}


def run(quick: bool = False, reps: Optional[int] = None, steps: int = 300, trace_every: int = 10) -> dict[str, Any]:
    reps = reps if reps is not None else (1 if quick else 3)
    samples: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES + EXIT_CASES}
    with Receiver("live") as live, Receiver("hang") as hang, Receiver("closed") as closed:
        endpoints = {"no_callback": None, "live": live.endpoint, "closed": closed.endpoint, "hang": hang.endpoint}
        fit_once("live", live.endpoint, 20, trace_every)  # warm-up
        for _, case in rotations(CASES, reps):
            samples[case].append(fit_once(case, endpoints.get(case, live.endpoint), steps, trace_every))
    for _, case in rotations(EXIT_CASES, reps):
        samples[case].append(exit_once(case, steps))
    cases = {}
    for case in CASES + EXIT_CASES:
        runs = samples[case]
        seconds = [run["seconds"] for run in runs]
        names = sorted({name for run in runs for name in run["parts"]})
        target = TARGETS_S[case]
        cases[case] = {
            "description": DESCRIPTIONS[case],
            "seconds": summarize(seconds),
            "parts_seconds": {
                name: summarize([run["parts"].get(name, 0.0) for run in runs])["median"] for name in names
            },
            "target_s": target,
            "met": max(seconds) <= target if target is not None else None,
        }
    return {
        "name": "run_end",
        "what": "seconds from the end of the last batch to Trainer.fit returning, and from fit returning to the "
        "end of the process's exit handlers",
        "config": {
            "reps": reps,
            "steps": steps,
            "trace_every_n_steps": trace_every,
            "scrape_every_s": SCRAPE_EVERY_S,
            "verdict": "the slowest repetition against the target",
        },
        "cases": cases,
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--exit-child":
        exit_child(int(sys.argv[2]))
