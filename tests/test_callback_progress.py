"""The stage-aware progress signal against what a real Lightning run did: training steps, evaluation batches of
every stage, sanity-check batches and checkpoint saves each count once, and the current stage is exported."""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
import pytest
from exposition import exposition, value
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import GraphClassifier, graph_loaders, quiet_trainer

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.metrics import TrainingMetrics
from dgdn_lightning_monitor.vocabulary import STAGES


class StageProbe(pl.Callback):
    """Records the monitor's current stage inside each hook kind (put after the MonitoringCallback)."""

    def __init__(self, monitor: MonitoringCallback) -> None:
        self.monitor, self.seen = monitor, set()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.seen.add(("train_batch", self.monitor.metrics.stage))

    def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        kind = "sanity_batch" if trainer.sanity_checking else "validation_batch"
        self.seen.add((kind, self.monitor.metrics.stage))

    def on_test_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        self.seen.add(("test_batch", self.monitor.metrics.stage))


def test_progress_counts_every_stage_of_fit_then_test(tmp_path):
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False)
    probe = StageProbe(monitor)
    saves = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    train, val, train_set, val_set = graph_loaders()
    trainer = quiet_trainer(
        max_epochs=2,
        callbacks=[monitor, probe, saves],
        enable_checkpointing=True,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
    )
    before = time.time()
    trainer.fit(GraphClassifier(), train, val)
    fitted = exposition(monitor.registry)
    trainer.test(trainer.lightning_module, val, verbose=False)
    tested = exposition(monitor.registry)

    train_batches, val_batches = math.ceil(len(train_set) / 8), math.ceil(len(val_set) / 8)
    assert value(fitted, "dgdn_progress_total", stage="train") == 2 * train_batches
    assert value(fitted, "dgdn_progress_total", stage="validate") == 2 * val_batches
    assert value(fitted, "dgdn_progress_total", stage="sanity_check") == 1
    assert value(fitted, "dgdn_progress_total", stage="checkpoint") == len(list(tmp_path.glob("*.ckpt"))) == 2
    assert value(fitted, "dgdn_progress_total", stage="test") == 0
    assert value(tested, "dgdn_progress_total", stage="test") == val_batches
    assert value(tested, "dgdn_progress_total", stage="train") == 2 * train_batches  # counters keep counting
    # The last progress of the test run is its last test batch; the run start is the test's set-up.
    assert (
        before <= value(fitted, "dgdn_run_start_timestamp_seconds") <= value(tested, "dgdn_run_start_timestamp_seconds")
    )
    assert value(tested, "dgdn_run_start_timestamp_seconds") <= value(tested, "dgdn_last_progress_timestamp_seconds")
    assert value(tested, "dgdn_last_progress_timestamp_seconds") <= time.time()
    assert value(fitted, "dgdn_last_progress_timestamp_seconds") >= value(fitted, "dgdn_last_step_timestamp_seconds")
    # Each hook ran in its stage; after the run the stage is idle.
    assert probe.seen == {
        ("train_batch", "train"),
        ("sanity_batch", "sanity_check"),
        ("validation_batch", "validate"),
        ("test_batch", "test"),
    }
    for name in STAGES:
        assert value(tested, "dgdn_stage", stage=name) == (1.0 if name == "idle" else 0.0)
    train_seconds = value(tested, "dgdn_stage_seconds_total", stage="train")
    assert 0 < train_seconds and value(tested, "dgdn_stage_seconds_total", stage="test") > 0
    assert value(tested, "dgdn_stage_seconds_total", stage="predict") == 0
    assert value(fitted, "dgdn_stage_seconds_total", stage="train") == train_seconds  # idle since fit ended


def test_eval_only_run_progresses_without_training():
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False)
    _, val, _, val_set = graph_loaders()
    trainer = quiet_trainer(callbacks=[monitor])
    trainer.validate(GraphClassifier(), val, verbose=False)
    trainer.predict(GraphClassifier(), val)
    text = exposition(monitor.registry)
    batches = math.ceil(len(val_set) / 8)
    assert value(text, "dgdn_progress_total", stage="validate") == batches
    assert value(text, "dgdn_progress_total", stage="predict") == batches
    assert value(text, "dgdn_progress_total", stage="train") == 0
    assert value(text, "dgdn_last_progress_timestamp_seconds") > 0
    assert "dgdn_last_step_timestamp_seconds" not in text


def test_stage_seconds_follow_the_stage_changes():
    metrics = TrainingMetrics("dgdn")
    assert metrics.stage is None and metrics.last_progress_perf is None
    metrics.enter_stage("idle", 0.0)
    metrics.enter_stage("train", 1.0)
    metrics.mark_progress("train", 3.0)
    metrics.enter_stage("validate", 4.0)
    metrics.enter_stage("train", 6.5)
    assert metrics.stage_seconds == {"idle": 1.0, "train": 3.0, "validate": 2.5}
    assert metrics.last_progress_perf == 3.0 and {k: v for k, v in metrics.progress_counts.items() if v} == {"train": 1}


class ScriptedValidation(GraphClassifier):
    """Logs a scripted validation loss per evaluation, and a training loss shifted by ``offsets[step]``."""

    def __init__(self, val_losses, **kwargs) -> None:
        super().__init__(**kwargs)
        self.val_losses, self.evaluation = val_losses, 0

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val_loss", float(self.val_losses[self.evaluation]), batch_size=batch.num_graphs)

    def on_validation_epoch_end(self) -> None:
        self.evaluation += 1


def test_loss_history_follows_the_run():
    """The streak of non-finite losses, the run's loss range and the validation evaluations since the best one, as
    the run produced them."""
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False)
    train, val, train_set, _ = graph_loaders()
    batches = math.ceil(len(train_set) / 8)
    seen: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(outputs["loss"]))

    nan_after = 2 * batches + 1  # the last epoch: one finite step, then NaN
    model = ScriptedValidation([3.0, 2.0, 2.5, 2.1], nan_after=nan_after, loss_offset=5.0)
    trainer = quiet_trainer(max_epochs=3, callbacks=[Losses(), monitor], log_every_n_steps=1, num_sanity_val_steps=0)
    trainer.fit(model, train, val)
    text = exposition(monitor.registry)
    assert len(seen) == 3 * batches and sum(math.isnan(v) for v in seen) == batches - 1
    assert value(text, "dgdn_nonfinite_loss_total") == batches - 1
    assert value(text, "dgdn_nonfinite_loss_streak") == batches - 1
    finite = [v for v in seen if math.isfinite(v)]
    # The gauges follow the logged values (read every step here): the run's extremes of them.
    assert min(finite) == pytest.approx(value(text, "dgdn_training_loss_min"), rel=1e-6)
    assert max(finite) == pytest.approx(value(text, "dgdn_training_loss_max"), rel=1e-6)
    # Evaluations 3.0, 2.0 (best), 2.5: one since the best.
    assert value(text, "dgdn_validation_evaluations_since_best") == 1
    # A new run starts a new history.
    trainer = quiet_trainer(max_epochs=1, callbacks=[monitor], log_every_n_steps=1)
    trainer.fit(ScriptedValidation([1.0, 1.0]), train, val)
    text = exposition(monitor.registry)
    assert value(text, "dgdn_validation_evaluations_since_best") == 0
    assert value(text, "dgdn_nonfinite_loss_streak") == 0
    assert value(text, "dgdn_training_loss_max") < 5.0
