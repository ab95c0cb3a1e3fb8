"""The shipped alert rules, time-compressed (``prom_helpers.scaled_rules``), on real Lightning runs scraped by a real
Prometheus: quiet through every stage of a healthy run (a slow first step, long validation, fit then test, an
eval-only run, a large-scale loss, a single NaN, a memory spike the allocator gives back, a training job of another
name), loud for the real faults (a hang in any stage, a diverging loss, persisting NaN, validation that stopped
improving, a throughput drop, memory that keeps reaching the limit).

The rules are the shipped expressions with every duration (range windows, offsets, ``for:``) and every
``time() - ... > N`` budget divided by ``SCALE``, so that a 15-minute budget is 6 s here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import deploy_training as dt
import lightning.pytorch as pl
import pytest
import torch
import yaml
from conftest import free_port, require_tool
from prom_helpers import STACK_RULES_FILE, Prometheus, rules_evaluated_after, scaled_rules, wait_until

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.gpu import GPUMonitor
from dgdn_lightning_monitor.server import MetricsServer
from dgdn_testing.fake_pynvml import FakeDevice, FakeNVML

pytestmark = pytest.mark.slow

#: Every duration of the shipped rules is divided by this: 15 minutes -> 6 s, 5 minutes -> 2 s.
SCALE = 150


def prometheus_for(workdir: Path, targets: dict[str, list[str]], rule_files: list[Path]) -> Prometheus:
    """A Prometheus scraping ``targets`` (job -> host:port) twice a second with ``rule_files``, ready."""
    config = {
        "global": {"scrape_interval": "500ms", "scrape_timeout": "500ms", "evaluation_interval": "500ms"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": addresses}]} for job, addresses in targets.items()
        ],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    prometheus = Prometheus(require_tool("prometheus"), path, workdir, free_port())
    prometheus.wait_ready()
    return prometheus


def firing(prometheus: Prometheus, alertname: str, since: float = 0.0) -> list[dict[str, Any]]:
    """The labels of each firing ``alertname`` alert that became active after unix time ``since``."""
    expr = (
        f'ALERTS{{alertname="{alertname}", alertstate="firing"}}'
        f' and ignoring (alertstate) (ALERTS_FOR_STATE{{alertname="{alertname}"}} > {since})'
    )
    return [result["metric"] for result in prometheus.query(expr)]


def ever_fired(prometheus: Prometheus, pattern: str) -> set[str]:
    """Alert names matching ``pattern`` that fired at any time in the last 10 minutes."""
    results = prometheus.query(f'count_over_time(ALERTS{{alertname=~"{pattern}", alertstate="firing"}}[10m])')
    return {result["metric"]["alertname"] for result in results}


def seen(prometheus: Prometheus, expr: str) -> bool:
    return bool(prometheus.query(expr))


LIVENESS = "DGDNRunNotStarted|DGDNTrainingStalled"


def test_healthy_stages_stay_silent(tmp_path):
    """A first step longer than the stall budget (within the start-up budget), a validation and a test longer than
    the stall budget, then a validate-only run: no liveness alert, although no training step ends for longer than
    the budget several times."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    prometheus = prometheus_for(tmp_path, {"dgdn-training": [target]}, [scaled_rules(tmp_path, SCALE)])
    stall_s, start_s = 900 / SCALE, 1800 / SCALE
    try:
        monitor = MonitoringCallback(port=port, addr="127.0.0.1", tracing=False)
        train, val = dt.loaders(train_graphs=16, val_graphs=16)  # 4 batches each
        model = dt.Paced(first_step_s=stall_s + 2, eval_batch_s=stall_s / 3)
        started = time.monotonic()
        trainer = dt.trainer([monitor], max_epochs=1)
        trainer.fit(model, train, val)
        trainer.test(model, val, verbose=False)
        dt.trainer([monitor], max_epochs=1).validate(model, val, verbose=False)
        assert time.monotonic() - started > 3 * stall_s + start_s - 2  # the stages really were that long

        assert not ever_fired(prometheus, LIVENESS)
        # Prometheus saw each stage and the long gaps between training steps that a step-based rule would flag.
        for stage in ("train", "validate", "test"):
            assert seen(prometheus, f'max_over_time(dgdn_stage{{stage="{stage}"}}[10m]) == 1'), stage
        assert seen(prometheus, f"max_over_time((time() - dgdn_last_step_timestamp_seconds)[10m:500ms]) > {stall_s}")
        assert seen(prometheus, 'max_over_time(dgdn_progress_total{stage="validate"}[10m]) >= 6')
    finally:
        prometheus.stop()


class Hangs(pl.Callback):
    """Blocks the training thread at chosen points until ``until()`` returns something (a hang that lasts until
    the alert fires), and records what it returned."""

    def __init__(self, until) -> None:
        self.until = until
        self.found: dict[str, Any] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.found["start"] = self.until("DGDNRunNotStarted", None)
        elif trainer.global_step == 3:
            self.found["train"] = self.until("DGDNTrainingStalled", "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 1 and "validate" not in self.found:
            self.found["validate"] = self.until("DGDNTrainingStalled", "validate")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 1:
            self.found["test"] = self.until("DGDNTrainingStalled", "test")


def test_a_hang_in_any_stage_fires(tmp_path):
    """The training thread blocks before its first step, then in training, validation and test: each fires,
    naming the rank and, for a stall, the stage it hangs in."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    prometheus = prometheus_for(tmp_path, {"dgdn-training": [target]}, [scaled_rules(tmp_path, SCALE)])

    def until(alertname: str, stage: Optional[str]) -> dict[str, Any]:
        hang = time.time()
        alert = wait_until(lambda: firing(prometheus, alertname, hang), 60, what=f"{alertname} during the hang")[0]
        assert alert.get("stage") == stage  # the stall alert names the stage it hangs in
        return alert

    try:
        hangs = Hangs(until)
        monitor = MonitoringCallback(port=port, addr="127.0.0.1", tracing=False)
        train, val = dt.loaders(train_graphs=16, val_graphs=16)
        model = dt.Paced()
        trainer = dt.trainer([hangs, monitor], max_epochs=1)
        trainer.fit(model, train, val)
        trainer.test(model, val, verbose=False)
        assert set(hangs.found) == {"start", "train", "validate", "test"}
        for alert in hangs.found.values():
            assert alert["instance"] == target and alert["rank"] == "0" and alert["severity"] == "warning"
    finally:
        prometheus.stop()


def test_loss_alerts_follow_the_runs_own_history(tmp_path):
    """A loss far above 10 that decreases and one NaN step stay silent; the loss climbing back up fires
    DGDNHighTrainingLoss, NaN in every step fires DGDNTrainingLossNotFinite."""
    port = free_port()
    prometheus = prometheus_for(tmp_path, {"dgdn-training": [f"127.0.0.1:{port}"]}, [scaled_rules(tmp_path, SCALE)])
    batches = 8  # per epoch: the non-finite count is folded at each epoch end
    state: dict[str, Any] = {}

    class Phases(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step == 12 * batches:  # decreasing from 1000, one NaN at step 40: nothing fired
                state["quiet"] = ever_fired(prometheus, "DGDNHighTrainingLoss|DGDNTrainingLossNotFinite")
            elif step == 20 * batches:  # the loss went back up at step 12 * batches
                state["high"] = wait_until(lambda: firing(prometheus, "DGDNHighTrainingLoss"), 60, what="high loss")
                state["nan_quiet"] = ever_fired(prometheus, "DGDNTrainingLossNotFinite")

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 21:  # NaN since step 20 * batches, counted at epoch ends
                state["nan"] = wait_until(
                    lambda: firing(prometheus, "DGDNTrainingLossNotFinite"), 60, what="persisting NaN"
                )

    try:
        monitor = MonitoringCallback(port=port, addr="127.0.0.1", tracing=False)
        train, val = dt.loaders()
        decreasing = [1000.0 - 5 * step for step in range(12 * batches)]
        model = dt.Paced(
            offsets=decreasing + [1000.0] * (100 * batches),
            nan_steps=frozenset({40, *range(20 * batches, 30 * batches)}),
            step_sleep_s=0.03,
        )
        dt.trainer([Phases(), monitor], max_epochs=22, limit_val_batches=0).fit(model, train, val)
        assert state["quiet"] == set() and state["nan_quiet"] == set()
        assert state["high"][0]["severity"] == "warning" and state["nan"][0]["severity"] == "critical"
    finally:
        prometheus.stop()


def test_throughput_drop_fires_on_slower_training_not_on_a_long_validation(tmp_path):
    """Steady training, a validation three short windows long (silent: only seconds of training count), then
    steps several times slower: DGDNThroughputDrop fires."""
    port = free_port()
    prometheus = prometheus_for(tmp_path, {"dgdn-training": [f"127.0.0.1:{port}"]}, [scaled_rules(tmp_path, SCALE)])
    window_s = 5 * 60 / SCALE
    baseline_s = 35 * 60 / SCALE + 1  # the run must be older than the alert's look-back
    state: dict[str, Any] = {}

    class Pace(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            state["start"] = time.monotonic()

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            pl_module.eval_batch_s = 0.0
            if "validated" not in state and time.monotonic() - state["start"] > baseline_s:
                pl_module.eval_batch_s = 3 * window_s / 4  # 4 batches
                state["validated"] = time.monotonic()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.monotonic()
            if "validated" not in state or now - state.get("polled", 0.0) < 0.5:
                return
            state["polled"] = now
            if "slowed" not in state and now - state["validated"] > 5 * window_s:  # validation, then 2 windows
                state["quiet"] = ever_fired(prometheus, "DGDNThroughputDrop")
                pl_module.step_sleep_s = 1.0  # several times the whole step before (on any machine load)
                state["slowed"] = now
            elif "slowed" in state:
                state["drop"] = firing(prometheus, "DGDNThroughputDrop")
                assert now - state["slowed"] < 60, "no throughput drop alert within 60 s"
                trainer.should_stop = bool(state["drop"])

    try:
        monitor = MonitoringCallback(port=port, addr="127.0.0.1", tracing=False)
        train, val = dt.loaders(train_graphs=64, val_graphs=16)
        model = dt.Paced(step_sleep_s=0.03)
        dt.trainer([Pace(), monitor], max_epochs=1000).fit(model, train, val)
        assert state["quiet"] == set()
        assert state["drop"][0]["rank"] == "0" and state["drop"][0]["severity"] == "warning"
    finally:
        prometheus.stop()


def test_gpu_memory_spike_given_back_stays_silent_memory_kept_near_the_limit_fires(tmp_path, monkeypatch):
    """GPU figures from the NVML stand-in and the allocator's current figure, scraped by Prometheus: one scrape at
    99% stays silent (the lifetime peak stays at 99% meanwhile), 95% held fires the warning, 99% held also the
    critical alert."""
    total = 80 * 2**30
    allocator = {"current": 0.5 * total, "peak": 0.5 * total, "spikes": 0}

    def memory_stats(device: int) -> dict[str, float]:
        current = allocator["current"]
        if allocator["spikes"]:  # one scrape sees the spike: the allocator gives it back before the next
            allocator["spikes"] -= 1
            current = 0.99 * total
        allocator["peak"] = max(allocator["peak"], current)
        return {"allocated_bytes.all.current": current, "allocated_bytes.all.peak": allocator["peak"]}

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_stats", memory_stats)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: (_ for _ in ()).throw(RuntimeError()))
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import InfoMetricFamily

    class RunInfo:
        """What the callback exports beside the GPU figures from its set-up on: the run's dgdn_training_info."""

        def collect(self) -> Any:
            info = InfoMetricFamily("dgdn_training", "Versions of this training run.", labels=["rank"])
            info.add_metric(["0"], {"run_id": "gpu-run", "strategy": "SingleDeviceStrategy"})
            yield info

    registry = CollectorRegistry()
    monitor = GPUMonitor("dgdn", devices=[0], poll_interval_s=0.2, nvml=FakeNVML([FakeDevice(memory_total=total)]))
    registry.register(monitor)
    registry.register(RunInfo())
    monitor.start([0], {"rank": "0"})
    server = MetricsServer(registry, "127.0.0.1", 0)
    server.start()
    prometheus = prometheus_for(
        tmp_path, {"dgdn-training": [f"127.0.0.1:{server.bound_port}"]}, [scaled_rules(tmp_path, SCALE)]
    )
    try:
        wait_until(lambda: prometheus.query("dgdn_gpu_memory_total_bytes"), 30, what="the GPU series")
        allocator["spikes"] = 1
        wait_until(
            lambda: seen(prometheus, f"max_over_time(dgdn_gpu_memory_allocated_bytes[1m]) > {0.98 * total}"),
            30,
            what="the spike scraped",
        )
        rules_evaluated_after(prometheus, time.time() + 2 * 600 / SCALE)  # twice the warning's for:
        assert not ever_fired(prometheus, "DGDNGPUMemoryHigh")
        assert seen(prometheus, f"dgdn_gpu_max_memory_allocated_bytes > {0.98 * total}")  # the lifetime peak stays

        allocator["current"] = 0.95 * total
        warning = wait_until(lambda: firing(prometheus, "DGDNGPUMemoryHigh"), 60, what="the warning")
        assert [alert["severity"] for alert in warning] == ["warning"] and warning[0]["gpu"] == "0"
        assert warning[0]["run_id"] == "gpu-run"  # the run, from its dgdn_training_info
        allocator["current"] = 0.99 * total
        wait_until(
            lambda: {a["severity"] for a in firing(prometheus, "DGDNGPUMemoryHigh")} == {"warning", "critical"},
            60,
            what="the critical alert",
        )
    finally:
        prometheus.stop()
        server.stop()
        monitor.stop()


def test_training_job_of_another_name_is_watched_and_never_a_stack_outage(tmp_path):
    """A run scraped under job "train-gnn" hangs: DGDNTrainingStalled fires for it; when it ends its target is
    down, and DGDNMonitoringTargetDown names only the stack component that is down (an Alertmanager job whose port
    answers nothing)."""
    port, dead = free_port(), free_port()
    prometheus = prometheus_for(
        tmp_path,
        {"train-gnn": [f"127.0.0.1:{port}"], "alertmanager": [f"127.0.0.1:{dead}"]},
        [scaled_rules(tmp_path, SCALE), scaled_rules(tmp_path, SCALE, STACK_RULES_FILE)],
    )
    state: dict[str, Any] = {}

    class Hang(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 3:
                hang = time.time()
                state["stalled"] = wait_until(
                    lambda: firing(prometheus, "DGDNTrainingStalled", hang), 60, what="the stall"
                )

    try:
        monitor = MonitoringCallback(port=port, addr="127.0.0.1", tracing=False, job="train-gnn")
        train, val = dt.loaders()
        dt.trainer([Hang(), monitor], max_epochs=1).fit(dt.Paced(), train, val)
        assert state["stalled"][0]["job"] == "train-gnn"
        monitor._server.stop()  # the endpoint serves on after the run until its process exits: it goes here
        wait_until(lambda: prometheus.query('up{job="train-gnn"} == 0'), 30, what="the ended run's target down")
        down = wait_until(lambda: firing(prometheus, "DGDNMonitoringTargetDown"), 30, what="the stack alert")
        time.sleep(2 * 120 / SCALE + 1)  # the ended run's target has been down longer than the alert's for:
        down = firing(prometheus, "DGDNMonitoringTargetDown")
        assert [alert["job"] for alert in down] == ["alertmanager"]
        assert "DGDNMonitoringTargetDown" in ever_fired(prometheus, "DGDNMonitoringTargetDown")
        assert not [r for r in prometheus.query('ALERTS{alertname="DGDNMonitoringTargetDown", job="train-gnn"}')]
    finally:
        prometheus.stop()


def test_stagnation_is_counted_in_validation_evaluations(tmp_path):
    """Validation that keeps improving stays silent however long it takes; ten evaluations without a new best fire
    DGDNTrainingStagnation (no `for:`: the count itself is the patience)."""
    port = free_port()
    prometheus = prometheus_for(tmp_path, {"dgdn-training": [f"127.0.0.1:{port}"]}, [scaled_rules(tmp_path, SCALE)])
    improving, flat = [1.0 - 0.05 * i for i in range(8)], [0.9] * 12
    state: dict[str, Any] = {}

    class Scripted(dt.Paced):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            evaluation = self.trainer.current_epoch
            self.log("val_loss", improving[evaluation] if evaluation < 8 else flat[evaluation - 8], batch_size=4)

    class Check(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 8:  # eight improving evaluations, scraped
                wait_until(lambda: seen(prometheus, "dgdn_validation_evaluations_since_best == 0"), 30, what="scrape")
                time.sleep(1)
                state["quiet"] = ever_fired(prometheus, "DGDNTrainingStagnation")

        def on_train_end(self, trainer, pl_module) -> None:
            state["fired"] = wait_until(lambda: firing(prometheus, "DGDNTrainingStagnation"), 30, what="stagnation")

    try:
        monitor = MonitoringCallback(port=port, addr="127.0.0.1", tracing=False)
        train, val = dt.loaders()
        dt.trainer([Check(), monitor], max_epochs=20).fit(Scripted(step_sleep_s=0.0), train, val)
        assert state["quiet"] == set()
        assert state["fired"][0]["severity"] == "info"
        assert seen(prometheus, "dgdn_validation_evaluations_since_best >= 10")
    finally:
        prometheus.stop()
