"""Logged values (loss, accuracy) equal ``trainer.callback_metrics`` after every epoch and every validation, in the
ways people log, with and without a logger; the user's Trainer is left as it was."""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchmetrics

from dgdn_lightning_monitor import MonitoringCallback
from exposition import exposition, value
from lit_models import quiet_trainer, tensor_loader

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
