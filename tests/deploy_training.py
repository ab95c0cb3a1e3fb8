"""A small real GNN training run for the live deploy tests, with hooks that let a test drive a real Prometheus
while the run's metrics endpoint is up."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import yaml
from lit_models import GraphClassifier
from prom_helpers import Prometheus, wait_until
from torch_geometric.datasets import FakeDataset
from torch_geometric.loader import DataLoader

JOB = "dgdn-training"


class LiveGCN(GraphClassifier):
    """The tests' GCN graph classifier, sleeping in every step so that a run spans several scrapes.

    Args:
        loss_offset: added to the training loss, to drive it above an alert threshold.
        nan_after_step: from this training step on (0-based) the loss is NaN.
        step_sleep_s: sleep in every training step.
    """

    def __init__(
        self, loss_offset: float = 0.0, nan_after_step: Optional[int] = None, step_sleep_s: float = 0.02
    ) -> None:
        super().__init__(nan_after=nan_after_step, step_sleep_s=step_sleep_s, loss_offset=loss_offset)


class Paced(GraphClassifier):
    """The tests' GCN with a slow first training step and slow evaluation batches.

    Args:
        first_step_s: extra seconds in the first training step (a compile, a warm-up).
        eval_batch_s: seconds of every validation/test/predict batch.
        offsets: training step -> loss offset (a constant offset leaves gradients alone); the last one holds on.
        nan_steps: training steps whose loss is NaN: logged, and the step skipped (the module returns no loss), as
            fp16 loss scaling skips a step whose gradients overflowed.
    """

    def __init__(
        self,
        first_step_s: float = 0.0,
        eval_batch_s: float = 0.0,
        offsets: Optional[list[float]] = None,
        nan_steps: frozenset[int] = frozenset(),
        step_sleep_s: float = 0.02,
    ) -> None:
        super().__init__(step_sleep_s=step_sleep_s)
        self.first_step_s, self.eval_batch_s = first_step_s, eval_batch_s
        self.offsets, self.nan_steps = offsets, nan_steps

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.steps == 0:
            time.sleep(self.first_step_s)
        if self.offsets:
            self.loss_offset = self.offsets[min(self.steps, len(self.offsets) - 1)]
        if self.steps in self.nan_steps:
            self.steps += 1
            self.log("train_loss", torch.tensor(float("nan")), batch_size=batch.num_graphs)
            return None  # type: ignore[return-value]  # Lightning skips the optimizer step
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        time.sleep(self.eval_batch_s)
        super().validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        time.sleep(self.eval_batch_s)
        super().test_step(batch, batch_idx)


def loaders(train_graphs: int = 32, val_graphs: int = 8) -> tuple[DataLoader, DataLoader]:
    torch.manual_seed(0)
    data = FakeDataset(
        num_graphs=train_graphs + val_graphs, avg_num_nodes=16, avg_degree=3, num_channels=8, num_classes=2
    )
    return (DataLoader(data[:train_graphs], batch_size=4, shuffle=True), DataLoader(data[train_graphs:], batch_size=4))


class Hooks(pl.Callback):
    """Calls ``start(trainer)`` once the metrics endpoint serves, ``batch(trainer)`` after every training batch and
    ``end(trainer)`` before the run ends (while the endpoint still serves). Put it before MonitoringCallback."""

    def __init__(
        self,
        start: Callable[[pl.Trainer], None],
        batch: Callable[[pl.Trainer], None],
        end: Callable[[pl.Trainer], None],
    ) -> None:
        self._start, self._batch, self._end = start, batch, end

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer)


def trainer(callbacks: list[pl.Callback], max_epochs: int = 200, **options: Any) -> pl.Trainer:
    """A quiet CPU Trainer that logs every step; ``options`` override or add Trainer arguments."""
    settings: dict[str, Any] = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(callbacks=callbacks, **{**settings, **options})


def host_port(metrics_url: str) -> str:
    """``host:port`` of a ``http://host:port/metrics`` URL."""
    return metrics_url.split("//", 1)[1].split("/", 1)[0]


def write_prometheus_config(
    path: Path, target: str, *, rule_file: Optional[Path] = None, alertmanager: Optional[str] = None
) -> Path:
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


def native_stack_module() -> Any:
    """``scripts/native_stack.py`` as a module."""
    import importlib.util
    import sys

    from prom_helpers import ROOT

    if "native_stack" not in sys.modules:
        spec = importlib.util.spec_from_file_location("native_stack", ROOT / "scripts" / "native_stack.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["native_stack"] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules["native_stack"]


def shipped_training_config(
    path: Path,
    static_target: str,
    targets_dir: Path,
    *,
    rule_files: list[Path] = (),
    alertmanager: Optional[str] = None,
) -> Path:
    """The shipped ``dgdn-training`` scrape job as ``make stack-native`` derives it (static quick-start target,
    file SD, the derived relabelling), its quick-start port replaced by ``static_target``'s (a loopback address) and
    1 s intervals, so that a test never needs port 8000."""
    from prom_helpers import PROMETHEUS_CONFIG, ROOT

    native_stack = native_stack_module()
    port = int(static_target.rsplit(":", 1)[1])
    shipped = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = next(job for job in shipped["scrape_configs"] if job["job_name"] == JOB)
    assert job["static_configs"][0]["targets"] == ["host.docker.internal:8000"]
    assert job["relabel_configs"] == [native_stack.quick_start_relabel(["host.docker.internal:8000"])]
    job["static_configs"][0]["targets"] = [f"host.docker.internal:{port}"]  # the shipped file, another port
    job["relabel_configs"] = [native_stack.quick_start_relabel([f"host.docker.internal:{port}"])]
    copy = path.with_name(path.stem + "-shipped.yml")
    copy.write_text(yaml.safe_dump(shipped, sort_keys=False))
    ports = {"prometheus": 1, "alertmanager": 2, "pushgateway": 3}  # the other jobs are dropped below
    rewriter = native_stack.Rewriter(ports, native_stack.compose_services(ROOT / "deploy" / "docker-compose.yml"))
    derived = native_stack.prometheus_config(copy, rewriter, targets_dir)
    job = next(job for job in derived["scrape_configs"] if job["job_name"] == JOB)
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{port}"]
    for file_sd in job["file_sd_configs"]:
        file_sd["refresh_interval"] = "1s"
    job.update(scrape_interval="1s", scrape_timeout="1s")
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [job],
    }
    if rule_files:
        config["rule_files"] = [str(rule) for rule in rule_files]
    if alertmanager is not None:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main(argv: Optional[list[str]] = None) -> None:
    """Trains (until killed, or ``--epochs``); prints the metrics URL and run id once it serves, and the samples it
    trained on once it has ended normally. With ``--hold`` it prints ``holding`` after its last step and waits for a
    line on stdin before its run ends (a test lets Prometheus scrape it meanwhile).

    Used by the live tests as a process to kill or to let end: ``python tests/deploy_training.py --targets-dir DIR``.
    ``default`` for ``--port``, ``--addr`` or ``--targets-host`` leaves the callback's default; ``--default-port``
    moves the callback's default port (8000) to a free one for a test.
    """
    import argparse

    from dgdn_lightning_monitor import MonitoringCallback, server

    def option(value: str) -> Any:
        return None if value == "default" else value

    parser = argparse.ArgumentParser()
    parser.add_argument("--targets-dir", default="default")
    parser.add_argument("--port", default="0")
    parser.add_argument("--addr", default="127.0.0.1")
    parser.add_argument("--targets-host", default="127.0.0.1")
    parser.add_argument("--default-port", type=int)
    parser.add_argument("--epochs", type=int, default=100_000)
    parser.add_argument("--step-sleep", type=float, default=0.05)
    parser.add_argument("--run-id", help="the run id (by default the callback draws one)")
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args(argv)
    if args.default_port is not None:
        server.DEFAULT_PORT = args.default_port
    port = option(args.port)
    monitor = MonitoringCallback(
        port=None if port is None else int(port),
        addr=option(args.addr) or "0.0.0.0",
        targets_dir=option(args.targets_dir),
        targets_host=option(args.targets_host),
        run_id=args.run_id,
        tracing=False,
    )

    def start(trainer: pl.Trainer) -> None:
        print(f"serving {monitor.run_id} {monitor.metrics_url}", flush=True)

    def end(trainer: pl.Trainer) -> None:
        if args.hold:
            print("holding", flush=True)
            sys.stdin.readline()

    train, val = loaders()
    trainer([Hooks(start, lambda t: None, end), monitor], max_epochs=args.epochs).fit(
        LiveGCN(step_sleep_s=args.step_sleep), train, val
    )
    print(f"done {monitor.run_id} samples={monitor.metrics.samples_total}", flush=True)


if __name__ == "__main__":
    main()
