"""How a run ended, from real Lightning runs: ``dgdn_run_outcome`` says running while the run trains (scraped
from its endpoint) and completed, failed (with the exception's class), interrupted or terminated in the final push
to a real Pushgateway."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl
import pytest
from conftest import free_port, require_tool
from exposition import samples, scrape
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lit_models import GraphClassifier, graph_loaders, quiet_trainer
from prom_helpers import Pushgateway, http_get

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.outcome import OUTCOMES, RUNNING, classify


def test_classify_names_the_outcome_and_the_exception_class() -> None:
    assert classify(None) == ("completed", "")
    assert classify(KeyboardInterrupt()) == ("interrupted", "KeyboardInterrupt")
    assert classify(SIGTERMException()) == ("terminated", "SIGTERMException")
    assert classify(ValueError("x")) == ("failed", "ValueError")
    assert classify(SystemExit(1)) == ("failed", "SystemExit")

    class Custom(SIGTERMException):  # a subclass still says SIGTERM
        pass

    assert classify(Custom()) == ("terminated", "Custom")
    assert RUNNING[0] == OUTCOMES[0] and {classify(e)[0] for e in (None, KeyboardInterrupt(), ValueError())} < set(
        OUTCOMES
    )


class _Act(pl.Callback):
    """At the third training batch: scrape the endpoint, then do ``action`` (raise, signal, nothing)."""

    def __init__(self, monitor: MonitoringCallback, action: Any) -> None:
        self.monitor, self.action, self.seen = monitor, action, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 3 and self.seen is None:
            self.seen = samples(scrape(self.monitor.metrics_url)).get("dgdn_run_outcome")
            self.action()


def _raise(error: BaseException) -> Any:
    def act() -> None:
        raise error

    return act


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # Lightning's signal connector notes it; the loop raises at the next batch


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Any:
    server = Pushgateway(require_tool("pushgateway"), tmp_path_factory.mktemp("pushgateway"), free_port())
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("action", "raised", "expected"),
    [
        (lambda: None, None, ("completed", "")),
        (_raise(ValueError("bad batch")), ValueError, ("failed", "ValueError")),
        (_raise(KeyboardInterrupt()), SystemExit, ("interrupted", "KeyboardInterrupt")),  # Lightning exits(1)
        (_sigterm, SystemExit, ("terminated", "SIGTERMException")),
    ],
    ids=["completed", "failed", "interrupted", "terminated"],
)
def test_the_outcome_is_running_while_training_and_pushed_at_the_end(gateway, action, raised, expected) -> None:
    sigint = signal.getsignal(signal.SIGINT)
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, gpu_devices=None,
                                 pushgateway_url=gateway.url)
    act = _Act(monitor, action)
    train, val, *_ = graph_loaders()
    trainer = quiet_trainer(max_epochs=2, callbacks=[act, monitor], num_sanity_val_steps=0)
    try:
        if raised is None:
            trainer.fit(GraphClassifier(), train, val)
        else:
            with pytest.raises(raised):
                trainer.fit(GraphClassifier(), train, val)
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl-C after a KeyboardInterrupt
    # While training: every outcome, 1 for running.
    assert {(labels["outcome"], labels["exception"], v) for labels, v in act.seen} == {
        ("running", "", 1.0), *((name, "", 0.0) for name in OUTCOMES[1:])
    }
    # At the end: the object says it, and the run's Pushgateway group carries it.
    assert monitor.metrics.outcome == expected
    pushed = samples(http_get(gateway.url + "/metrics").decode())["dgdn_run_outcome"]
    mine = [(labels["outcome"], labels["exception"]) for labels, v in pushed if labels["run_id"] == monitor.run_id and v]
    assert mine == [expected]
    assert sum(1 for labels, _ in pushed if labels["run_id"] == monitor.run_id) == len(OUTCOMES)
    # The endpoint serves on after the run, saying the same.
    served = samples(http_get(str(monitor.metrics_url)).decode())["dgdn_run_outcome"]
    assert [(labels["outcome"], labels["exception"]) for labels, v in served if v] == [expected]
