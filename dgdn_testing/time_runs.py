"""Real Trainer runs watched over HTTP for the time ledger and the bottleneck verdict: a thread scrapes the
endpoint while training runs, and training stops once the verdict named the expected cause (or at a step bound)."""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning.pytorch as pl
from prometheus_client.parser import text_string_to_metric_families

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.time_ledger import CATEGORIES
from dgdn_testing.scrapers import Scraper

#: The tests' judge window: 20 training steps (the judge's own gate), 1 s, evaluations at least 0.2 s apart; the
#: default (100 steps, 300 s, 5 s) suits a 15 s scrape interval, not a run of a few seconds.
TEST_WINDOW = (20, 1.0, 0.2)
#: A run expected to say ``compute`` stops after this many scrapes at this many steps or more (the judge's gate).
COMPUTE_PAST_GATE = (20, 12)


def read_time(text: str) -> dict[str, Any]:
    """What a scrape says about where the time goes: training steps, seconds per category, goodput, verdict."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    seconds = {labels["category"]: v for labels, v in found.get("dgdn_time_seconds_total", [])}
    causes = [labels["cause"] for labels, v in found.get("dgdn_bottleneck", []) if v == 1.0]
    steps = [v for labels, v in found.get("dgdn_progress_total", []) if labels.get("stage") == "train"]
    goodput = [v for _, v in found.get("dgdn_goodput_ratio", [])]
    return {
        "steps": int(steps[0]) if steps else 0,
        "seconds": seconds,
        "goodput": goodput[0] if goodput else None,
        "cause": causes[0] if len(causes) == 1 else None,
        "causes": len(causes),
    }


@dataclass
class Watched:
    """What a watched run showed."""

    wall_s: float  #: from before ``fit`` (so before set-up) to after it, measured here
    final: dict[str, Any]  #: :func:`read_time` of a scrape after the run
    named_at: Optional[tuple[float, int]]  #: (seconds since fit began, training steps) of the first scrape naming it
    scrapes: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ledger_sum(self) -> float:
        return sum(self.final["seconds"].values())


class _StopWhenNamed(pl.Callback):
    """Stops training a few steps after a scrape named ``cause`` (at once for a stall, which ends by itself)."""

    def __init__(self, scraper: Scraper, cause: str, then_steps: int) -> None:
        self.scraper, self.cause, self.then_steps = scraper, cause, then_steps
        self.left: Optional[int] = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.left is None and any(answer["cause"] == self.cause for _, answer in list(self.scraper.answers)):
            self.left = self.then_steps
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:
                trainer.should_stop = True


def watch_fit(
    monitor: MonitoringCallback,
    trainer_options: dict[str, Any],
    module: pl.LightningModule,
    train: Any,
    val: Any = None,
    expect: str = "compute",
    scrape_every_s: float = 0.1,
    then_steps: int = 3,
    stop_when_named: bool = True,
) -> Watched:
    """Fit ``module`` with ``monitor`` (``port=0`` on loopback) under a Trainer of ``trainer_options`` while a thread
    scrapes it; stop ``then_steps`` steps after the verdict said ``expect`` (``compute``: after
    :data:`COMPUTE_PAST_GATE` scrapes, or at the Trainer's own end). Without ``stop_when_named`` (DDP: every rank
    must stop at the same step) it runs to the Trainer's own end, and its wall time counts from the monitor's
    set-up (the processes' launch and rendezvous come before it)."""
    from dgdn_testing.models import quiet_trainer

    holder: dict[str, Scraper] = {}
    setup_at: list[float] = []

    class SetUp(pl.Callback):  # before the monitor's own setup: the time its ledger starts from, measured here
        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            setup_at.append(time.perf_counter())

    class StartScraping(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            holder["scraper"] = Scraper(str(monitor.metrics_url), scrape_every_s, read_time, name="time-scraper")

    class Stop(pl.Callback):
        inner: Optional[_StopWhenNamed] = None

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if "scraper" not in holder:
                return
            if expect == "compute":  # long enough past the judge's gate for a wrong verdict to show
                judged = [a for _, a in list(holder["scraper"].answers) if a["steps"] >= COMPUTE_PAST_GATE[0]]
                trainer.should_stop = trainer.should_stop or len(judged) >= COMPUTE_PAST_GATE[1]
                return
            if self.inner is None:
                self.inner = _StopWhenNamed(holder["scraper"], expect, then_steps)
            self.inner.on_train_batch_end(trainer, *args)

    stop = [Stop()] if stop_when_named else []
    callbacks = [SetUp(), monitor, StartScraping(), *stop, *trainer_options.pop("callbacks", [])]
    trainer = quiet_trainer(callbacks=callbacks, **trainer_options)
    began = time.perf_counter()
    try:
        trainer.fit(module, train, val)
    finally:
        ended = time.perf_counter()
        scraper = holder.get("scraper")
        if scraper is not None:
            scraper.close()
    with urllib.request.urlopen(str(monitor.metrics_url), timeout=10) as response:
        final = read_time(response.read().decode())
    answers = scraper.answers if scraper is not None else []
    if not stop_when_named:
        began = setup_at[0]
    unix_began = time.time() - (time.perf_counter() - began)
    named = next(((at - unix_began, a["steps"]) for at, a in answers if a["cause"] == expect), None)
    assert set(final["seconds"]) == set(CATEGORIES), final
    return Watched(ended - began, final, named, [a for _, a in answers], monitor.summary())
