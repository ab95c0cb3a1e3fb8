"""Logged values (loss, accuracy) equal ``trainer.callback_metrics`` after every epoch and every validation, in the
ways people log, with and without a logger; the user's Trainer is left as it was."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from exposition import exposition, value
from lit_models import quiet_trainer, tensor_loader

from dgdn_lightning_monitor import MonitoringCallback

LogFn = Callable[[pl.LightningModule, str, torch.Tensor], None]


class Patterned(pl.LightningModule):
    """A tensor regressor that logs ``train_loss``/``val_loss`` (and accuracies) the way ``pattern`` says."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.pattern = pattern
        self.train_mean = torchmetrics.MeanMetric()
        self.val_mean = torchmetrics.MeanMetric()
        self.epoch_losses: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    def _log(self, key: str, loss: torch.Tensor, training: bool) -> None:
        acc = (loss < 1).float()
        p = self.pattern
        if p == "on_step":
            self.log(key, loss, on_step=True, on_epoch=not training)
        elif p == "on_epoch_only":
            self.log(key, loss, on_step=False, on_epoch=True)
        elif p == "on_step_and_on_epoch":
            self.log(key, loss, on_step=True, on_epoch=True)
        elif p == "log_dict":
            prefix = key.split("_")[0]
            self.log_dict({key: loss, f"{prefix}_acc": acc})
        elif p == "prog_bar":
            self.log(key, loss, prog_bar=True)
        elif p == "python_float":
            self.log(key, float(loss.detach()))
        elif p == "torchmetrics":
            metric = self.train_mean if training else self.val_mean
            metric.update(loss.detach())
            self.log(key, metric, on_step=False, on_epoch=True)
        elif p == "epoch_end_hook":
            self.epoch_losses[training].append(loss.detach())

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self._log("train_loss", loss, training=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._log("val_loss", self._loss(batch), training=False)

    def _log_epoch_mean(self, key: str, training: bool) -> None:
        losses = self.epoch_losses[training]
        if self.pattern == "epoch_end_hook" and losses:
            self.log(key, torch.stack(losses).mean() + self.current_epoch)
            losses.clear()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_mean("train_loss", training=True)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_mean("val_loss", training=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Check(pl.Callback):
    """Runs after the monitor: at every epoch start (the previous epoch is complete, including what the module
    logged in its own ``on_train_epoch_end``), at the end of training and after every validation, the gauges
    equal Lightning's ``callback_metrics``."""

    def __init__(self, monitor: MonitoringCallback) -> None:
        self.monitor = monitor
        self.checks: list[str] = []

    def _same(self, trainer: pl.Trainer, key: str, gauge: str, when: str) -> None:
        expected = trainer.callback_metrics.get(key)
        if expected is None:
            return
        assert self.monitor.metrics.logged[(gauge, None)] == float(expected), (when, key)
        self.checks.append(f"{when}:{key}")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self._same(trainer, "train_loss", "training_loss", f"epoch{trainer.current_epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._same(trainer, "train_loss", "training_loss", "end")
        self._same(trainer, "train_acc", "training_accuracy", "end")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._same(trainer, "val_loss", "validation_loss", f"val{trainer.current_epoch}")
            self._same(trainer, "val_acc", "validation_accuracy", f"val{trainer.current_epoch}")


PATTERNS = ["on_step", "on_epoch_only", "on_step_and_on_epoch", "log_dict", "prog_bar", "python_float",
            "torchmetrics", "epoch_end_hook"]


@pytest.mark.parametrize("with_logger", [True, False], ids=["logger", "no-logger"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_logged_values_equal_callback_metrics_at_every_epoch_end(pattern: str, with_logger: bool, tmp_path) -> None:
    monitor = MonitoringCallback(port=0, addr="127.0.0.1")
    check = Check(monitor)
    logger = pl.loggers.CSVLogger(save_dir=str(tmp_path)) if with_logger else False
    seen: list[Any] = []

    class Loggers(pl.Callback):  # what every other callback sees of the Trainer while the monitor runs
        def on_train_batch_end(self, trainer, *args: Any) -> None:
            seen.append((list(trainer.loggers), trainer.logger, trainer.log_dir))

    trainer = quiet_trainer(max_epochs=3, callbacks=[monitor, check, Loggers()], log_every_n_steps=2, logger=logger,
                            default_root_dir=str(tmp_path))
    trainer.fit(Patterned(pattern), tensor_loader(rows=40), tensor_loader(rows=16))
    # 3 epochs: two epoch starts and the end for training, three validations; accuracies where logged.
    assert sum(c.startswith(("epoch", "end:train_loss")) for c in check.checks) == 3, check.checks
    assert sum(c.startswith("val") and "val_loss" in c for c in check.checks) == 3, check.checks
    text = exposition(monitor.registry)
    assert value(text, "dgdn_training_loss") == float(trainer.callback_metrics["train_loss"])
    assert value(text, "dgdn_validation_loss") == float(trainer.callback_metrics["val_loss"])
    expected_loggers = [logger] if with_logger else []
    assert {(tuple(loggers), current) for loggers, current, _ in seen} == {
        (tuple(expected_loggers), logger if with_logger else None)}
    assert trainer.loggers == expected_loggers


class LogsOtherKeys(pl.LightningModule):
    """Logs its loss as ``loss`` and ``valid/loss``: none of the callback's default keys."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("valid/loss", F.mse_loss(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _never_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "has not logged" in r.getMessage()]


def test_a_key_never_logged_is_said_once_naming_what_was_logged_and_the_argument(caplog) -> None:
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False)
    trainer = quiet_trainer(max_epochs=3, callbacks=[monitor])
    with caplog.at_level("WARNING", logger="dgdn_lightning_monitor"):
        trainer.fit(LogsOtherKeys(), tensor_loader(rows=16), tensor_loader(rows=8, seed=1))
    messages = _never_logged(caplog)
    assert len(messages) == 2, messages  # one for training, one for validation, however many epochs
    train, val = sorted(messages, key=lambda m: "validation" in m)
    assert "'train_loss'" in train and "train_loss_key" in train and "'train_acc'" in train
    assert "first training epoch" in train and "loss" in train.split("it logged:")[1]
    assert "'val_loss'" in val and "val_loss_key" in val and "valid/loss" in val.split("it logged:")[1]
    assert "first validation" in val
    assert (None, None) == (monitor.metrics.logged.get(("training_loss", None)),
                            monitor.metrics.logged.get(("validation_loss", None)))

    # Pointed at the keys the module logs: the gauges follow, and only the never-logged accuracies are said.
    caplog.clear()
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, train_loss_key="loss",
                                 val_loss_key="valid/loss")
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor])
    with caplog.at_level("WARNING", logger="dgdn_lightning_monitor"):
        trainer.fit(LogsOtherKeys(), tensor_loader(rows=16), tensor_loader(rows=8, seed=1))
    messages = _never_logged(caplog)
    assert len(messages) == 2 and all("loss" not in m.split("it logged:")[0] for m in messages), messages
    assert monitor.metrics.logged[("training_loss", None)] == float(trainer.callback_metrics["loss"])
    assert monitor.metrics.logged[("validation_loss", None)] == float(trainer.callback_metrics["valid/loss"])


def test_keys_logged_only_in_the_epoch_end_hook_are_not_reported_missing(caplog) -> None:
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, train_acc_key="train_loss",
                                 val_acc_key="val_loss")
    with caplog.at_level("WARNING", logger="dgdn_lightning_monitor"):
        quiet_trainer(max_epochs=1, callbacks=[monitor]).fit(
            Patterned("epoch_end_hook"), tensor_loader(rows=16), tensor_loader(rows=8))
    assert _never_logged(caplog) == []


NAN_STEPS = {2, 5, 6, 11}


class ManualNaN(pl.LightningModule):
    """Manual optimisation, ``training_step`` returns nothing; the logged ``train_loss`` is NaN on NAN_STEPS (and
    the optimiser step is skipped there, as a careful manual loop would)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(4, 1)
        self.batches = 0

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        nan = self.batches in NAN_STEPS
        self.batches += 1
        self.log("train_loss", loss.detach() * float("nan") if nan else loss.detach())
        if not nan:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class AutoNaN(pl.LightningModule):
    """The same NaN steps with automatic optimisation: the loss is logged and returned."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.batches = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        if self.batches in NAN_STEPS:
            loss = loss * 0.0 + float("nan")  # NaN, with a zero gradient that leaves the weights finite
        self.batches += 1
        self.log("train_loss", loss)  # logged and returned: still one count per step
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("module", [ManualNaN, AutoNaN], ids=["manual", "automatic"])
def test_nonfinite_losses_are_counted_once_per_step_with_manual_and_automatic_optimisation(module) -> None:
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False)
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor], log_every_n_steps=1)
    trainer.fit(module(), tensor_loader(rows=64, batch_size=8))  # 8 steps per epoch, 16 in all
    assert trainer.fit_loop.total_batch_idx + 1 == 16
    assert value(exposition(monitor.registry), "dgdn_nonfinite_loss_total") == len(NAN_STEPS)
