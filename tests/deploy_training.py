"""A small real GNN training run for the live deploy tests, with hooks that let a test drive a real Prometheus
while the run's metrics endpoint is up."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import yaml
from torch_geometric.datasets import FakeDataset
from torch_geometric.loader import DataLoader

from lit_models import GraphClassifier
from prom_helpers import Prometheus, wait_until

JOB = "dgdn-training"


class LiveGCN(GraphClassifier):
    """The tests' GCN graph classifier, sleeping in every step so that a run spans several scrapes.

    Args:
        loss_offset: added to the training loss, to drive it above an alert threshold.
        nan_after_step: from this training step on (0-based) the loss is NaN.
        step_sleep_s: sleep in every training step.
    """

    def __init__(self, loss_offset: float = 0.0, nan_after_step: Optional[int] = None,
                 step_sleep_s: float = 0.02) -> None:
        super().__init__(nan_after=nan_after_step, step_sleep_s=step_sleep_s, loss_offset=loss_offset)


def loaders(train_graphs: int = 32, val_graphs: int = 8) -> tuple[DataLoader, DataLoader]:
    torch.manual_seed(0)
    data = FakeDataset(num_graphs=train_graphs + val_graphs, avg_num_nodes=16, avg_degree=3, num_channels=8,
                       num_classes=2)
    return (DataLoader(data[:train_graphs], batch_size=4, shuffle=True),
            DataLoader(data[train_graphs:], batch_size=4))


class Hooks(pl.Callback):
    """Calls ``start(trainer)`` once the metrics endpoint serves, ``batch(trainer)`` after every training batch and
    ``end(trainer)`` before the run ends (while the endpoint still serves). Put it before MonitoringCallback."""

    def __init__(self, start: Callable[[pl.Trainer], None], batch: Callable[[pl.Trainer], None],
                 end: Callable[[pl.Trainer], None]) -> None:
        self._start, self._batch, self._end = start, batch, end

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer)


def trainer(callbacks: list[pl.Callback], max_epochs: int = 200) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, log_every_n_steps=1, callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def host_port(metrics_url: str) -> str:
    """``host:port`` of a ``http://host:port/metrics`` URL."""
    return metrics_url.split("//", 1)[1].split("/", 1)[0]


def write_prometheus_config(path: Path, target: str, *, rule_file: Optional[Path] = None,
                            alertmanager: Optional[str] = None) -> Path:
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }
    if rule_file is not None:
        config["rule_files"] = [str(rule_file)]
    if alertmanager is not None:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def wait_for_target_up(prometheus: Prometheus, timeout: float = 30.0) -> None:
    wait_until(lambda: prometheus.query(f'up{{job="{JOB}"}} == 1'), timeout, what="the first successful scrape")


def successful_scrapes(prometheus: Prometheus) -> int:
    result = prometheus.query(f'sum_over_time(up{{job="{JOB}"}}[10m])')
    return int(float(result[0]["value"][1])) if result else 0
