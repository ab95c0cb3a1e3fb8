"""The run's vocabulary, and the narrow API through which the parts tell TrainingMetrics what happened."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from lightning.pytorch.trainer.states import RunningStage
from prometheus_client import CollectorRegistry, generate_latest

from dgdn_lightning_monitor.guards import MonitorErrors, WarnOnce, describe
from dgdn_lightning_monitor.metrics import METRICS, TrainingMetrics
from dgdn_lightning_monitor.model_info import count_model
from dgdn_lightning_monitor.vocabulary import (
    LOGGED_GAUGES,
    PROGRESS_UNITS,
    SPAN_STAGES,
    STAGES,
    TRAIN_GAUGES,
    VALIDATION_GAUGES,
    lightning_stage,
    span_stage,
)


def trainer_in(stage):
    return SimpleNamespace(state=SimpleNamespace(stage=stage))


def test_stages_follow_lightnings_running_stages():
    assert set(STAGES) - {"idle"} == {stage.value for stage in RunningStage}
    assert set(SPAN_STAGES) <= set(STAGES) and SPAN_STAGES["validate"] == "validation"
    assert PROGRESS_UNITS == (*[stage for stage in STAGES if stage != "idle"], "checkpoint")
    assert set(LOGGED_GAUGES) <= set(METRICS) and set(TRAIN_GAUGES) | set(VALIDATION_GAUGES) == set(LOGGED_GAUGES)


def test_the_running_stage_and_its_span_name():
    assert lightning_stage(trainer_in(RunningStage.TESTING), "validate") == "test"
    assert lightning_stage(trainer_in(None), "validate") == "validate"
    assert lightning_stage(object(), "unknown") == "unknown"  # a stand-in without a state
    assert span_stage(trainer_in(RunningStage.VALIDATING)) == "validation"
    assert span_stage(trainer_in(RunningStage.SANITY_CHECKING)) == "sanity_check"


def test_the_parts_tell_the_metrics_through_methods():
    errors = MonitorErrors(logging.getLogger("test"))
    metrics = TrainingMetrics("t", errors=errors)
    assert metrics.errors is errors  # exported, owned by whoever created it
    metrics.record_nonfinite(2)
    metrics.record_nonfinite_streak(folded=3, trailing=3)
    metrics.record_nonfinite_streak(folded=2, trailing=2)  # the whole fold: the streak grows
    assert (metrics.nonfinite_losses, metrics.nonfinite_streak) == (2, 5)
    metrics.record_nonfinite_streak(folded=4, trailing=1)  # a finite loss inside the fold: it starts again
    assert metrics.nonfinite_streak == 1
    metrics.count_oom()
    metrics.count_stall_dump()
    metrics.epoch_ended(1.5)
    metrics.set_batch_capacity(lambda: (100.0, 400.0))
    figures, final = count_model(torch.nn.Linear(3, 2))
    metrics.set_model_figures(figures)
    metrics.set_run_info({"run_id": "abc"})
    metrics.observe_device_phases({"forward": 4.0, "data_fetch": 9.0, "batch": 5.0})
    registry = CollectorRegistry()
    registry.register(metrics)
    text = generate_latest(registry).decode()
    assert final and figures == (8, 8, 32)
    for line in (
        "t_oom_total{",
        "t_stall_dumps_total{",
        't_training_info{local_rank="0",node_rank="0",rank="0",run_id="abc"',
    ):
        assert line in text
    assert metrics.epoch_duration == 1.5 and metrics.capacity() == (100.0, 400.0)
    # Device times go to their phase; data_fetch keeps its host time and "batch" is no phase.
    assert metrics.phase_seconds["forward"].sum == 0.004 and metrics.phase_seconds["data_fetch"].count == 0


def test_one_say_once_mechanism(caplog):
    warn = WarnOnce(logging.getLogger("test.once"))
    with caplog.at_level(logging.WARNING, logger="test.once"):
        assert warn("kind", None) is True  # claimed without a word
        assert warn("kind", "said?") is False
        assert warn("other", "said (%s)", describe(ValueError("bad"))) is True
        errors = MonitorErrors(logging.getLogger("test.once"))
        errors.report("push")  # counted; its part says it in its own words
        errors.report("push", "not said: the part's first error was")
        errors.report("gpu", "first %s", "gpu error")
        errors.report("gpu", "second")
    assert [r.getMessage() for r in caplog.records] == ["said (ValueError: bad)", "first gpu error"]
    assert errors.counts["push"] == 2 and errors.counts["gpu"] == 2
    assert describe(KeyboardInterrupt()) == "KeyboardInterrupt"
