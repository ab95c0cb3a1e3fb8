"""``dgdn_progress_ratio`` and ``dgdn_eta_seconds`` against real Lightning runs bounded each way (``max_epochs``,
``max_steps``, ``max_time``, nothing), scraped over HTTP from inside the run: the ratio against the steps the test
counts itself, the ETA against the time the run really took to end."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from exposition import scrape, value
from lit_models import TensorRegressor, quiet_trainer, tensor_loader

from dgdn_lightning_monitor import MonitoringCallback


class PacedRegressor(TensorRegressor):
    """A regressor whose training and validation batches take a steady, known time (sleep-paced)."""

    def __init__(self, step_s: float = 0.0, val_s: float = 0.0) -> None:
        super().__init__()
        self.step_s, self.val_s = step_s, val_s

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        time.sleep(self.step_s)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        time.sleep(self.val_s)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0])


class Probe(pl.Callback):
    """Counts optimizer steps and batches itself, and scrapes the monitor's endpoint after chosen training batches
    (put after the MonitoringCallback: its hooks ran by then)."""

    def __init__(
        self,
        monitor: MonitoringCallback,
        at: set[int] = frozenset(),
        stop_after: Optional[int] = None,
        validation_at: set[int] = frozenset(),
    ):
        self.monitor, self.at, self.stop_after, self.validation_at = monitor, at, stop_after, validation_at
        self.validation_batches = 0
        self.batches = self.optimizer_steps = self.eval_batches = 0
        self.started = 0.0
        # (batches, optimizer steps, perf_counter before and after the scrape, the scrape)
        self.seen: list[tuple[int, int, float, float, str]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.optimizer_steps += 1

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.batches += 1
        if self.batches in self.at:
            self.scrape(self.batches, self.optimizer_steps)
        if self.stop_after is not None and self.batches >= self.stop_after:
            trainer.should_stop = True

    def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        if not trainer.sanity_checking:
            self.validation_batches += 1
            if self.validation_batches in self.validation_at:
                self.scrape(self.batches, self.optimizer_steps)

    def on_predict_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        self.eval_batches += 1
        self.scrape(self.eval_batches, 0)

    def scrape(self, batches: int, steps: int) -> None:
        before = time.perf_counter()
        text = scrape(self.monitor.metrics_url)
        self.seen.append((batches, steps, before, time.perf_counter(), text))


def monitor() -> MonitoringCallback:
    return MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, gpu_devices=None, stall_dump_after_s=None)


def test_max_epochs_with_accumulation_counts_optimizer_steps():
    mon = monitor()
    probe = Probe(mon, at={1, 2, 5, 9, 12})
    loader = tensor_loader(rows=48, batch_size=8)  # 6 batches an epoch, 3 optimizer steps with accumulation 2
    trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[mon, probe])
    trainer.fit(PacedRegressor(), loader)

    total = 2 * len(loader) // 2
    assert probe.optimizer_steps == total and [seen[0] for seen in probe.seen] == [1, 2, 5, 9, 12]
    for batches, steps, _, _, text in probe.seen:
        assert value(text, "dgdn_progress_ratio", stage="train") == pytest.approx(steps / total)
        if batches > 1:  # two batches give a rate
            assert value(text, "dgdn_eta_seconds", stage="train") >= 0
    after = scrape(mon.metrics_url)
    assert value(after, "dgdn_progress_ratio", stage="train") == 1.0  # the last value stays
    assert value(after, "dgdn_eta_seconds") is None  # nothing left to estimate
    summary = mon.summary()
    assert summary["progress_ratio"] == 1.0 and summary["eta_seconds"] is None


def test_max_steps_bounds_an_endless_epoch_count():
    mon = monitor()
    probe = Probe(mon, at={1, 3, 7})
    trainer = quiet_trainer(max_epochs=-1, max_steps=7, callbacks=[mon, probe])
    trainer.fit(PacedRegressor(), tensor_loader(rows=40, batch_size=8))  # 5 batches an epoch: 7 steps end mid-epoch

    assert probe.optimizer_steps == 7
    for _, steps, _, _, text in probe.seen:
        assert value(text, "dgdn_progress_ratio", stage="train") == pytest.approx(steps / 7)
    assert value(scrape(mon.metrics_url), "dgdn_progress_ratio", stage="train") == 1.0


def test_max_time_bounds_the_fit_by_the_clock():
    mon = monitor()
    limit = 2.0
    probe = Probe(mon, at={3, 10})
    trainer = quiet_trainer(max_time=timedelta(seconds=limit), callbacks=[mon, probe])  # max_epochs: unbounded
    trainer.fit(PacedRegressor(step_s=0.05), tensor_loader(rows=80, batch_size=8))

    assert len(probe.seen) == 2, "the run ended before the probe's batches"
    for _, _, before, after, text in probe.seen:
        # The Timer starts in the same on_train_start as the probe's clock; the scrape read it in between.
        earliest, latest = before - probe.started, after - probe.started
        ratio, eta = value(text, "dgdn_progress_ratio", stage="train"), value(text, "dgdn_eta_seconds", stage="train")
        assert earliest / limit - 0.01 <= ratio <= latest / limit + 0.01
        assert limit - latest - 0.02 <= eta <= limit - earliest + 0.02
    assert value(scrape(mon.metrics_url), "dgdn_progress_ratio", stage="train") == pytest.approx(1.0, abs=0.05)


def test_unbounded_fit_exports_neither_family():
    mon = monitor()
    probe = Probe(mon, at={3}, stop_after=6)
    trainer = quiet_trainer(max_epochs=-1, callbacks=[mon, probe])  # neither max_steps nor max_time
    trainer.fit(PacedRegressor(), tensor_loader())

    assert probe.batches == 6 and len(probe.seen) == 1
    for text in (probe.seen[0][-1], scrape(mon.metrics_url)):
        assert value(text, "dgdn_progress_total", stage="train") is not None  # the scrape holds the run's families
        assert "dgdn_progress_ratio" not in text and "dgdn_eta_seconds" not in text
    assert mon.summary()["progress_ratio"] is None and mon.summary()["eta_seconds"] is None


def test_evaluation_run_counts_its_own_batches():
    mon = monitor()
    probe = Probe(mon)
    trainer = quiet_trainer(callbacks=[mon, probe])
    loader = tensor_loader(rows=40, batch_size=8)
    trainer.predict(PacedRegressor(), loader)

    assert probe.eval_batches == len(loader) == 5
    for batches, _, _, _, text in probe.seen:
        assert value(text, "dgdn_progress_ratio", stage="predict") == pytest.approx(batches / 5)
        assert value(text, "dgdn_progress_ratio", stage="train") is None


def test_eta_of_a_steady_run_matches_the_time_it_really_took():
    """After the first epoch (and its validation pass), and at the end of the second pass, the ETA is within 10% of
    the time the fit still took."""
    mon = monitor()
    epochs, batches = 3, 12
    # The second epoch's first batch (one epoch and one validation pass measured) and the second pass's last batch.
    probe = Probe(mon, at={batches + 1}, validation_at={8})
    train = tensor_loader(rows=8 * batches, batch_size=8)
    trainer = quiet_trainer(max_epochs=epochs, num_sanity_val_steps=0, callbacks=[mon, probe])
    trainer.fit(PacedRegressor(step_s=0.12, val_s=0.08), train, tensor_loader(rows=32, batch_size=8, seed=1))
    ended = time.perf_counter()

    assert [seen[0] for seen in probe.seen] == [batches + 1, 2 * batches]  # 4 validation batches a pass
    for _, _, _, moment, text in probe.seen:
        eta, remaining = value(text, "dgdn_eta_seconds", stage="train"), ended - moment
        print(f"ETA {eta:.3f} s against {remaining:.3f} s remaining ({(eta - remaining) / remaining:+.1%})")
        assert eta == pytest.approx(remaining, rel=0.10), f"ETA {eta:.3f} s, really {remaining:.3f} s"
