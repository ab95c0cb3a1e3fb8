"""DGDNOutOfMemory from a real run: a real Prometheus with the shipped rules scrapes a training process whose step
runs out of memory and which then retries with the same callback, on the same port (as a sweep or a notebook does).
"""

from __future__ import annotations

from typing import Any

import deploy_training as dt
import pytest
import torch
from conftest import free_port, require_tool
from prom_helpers import RULES_FILE, Prometheus, wait_until

from dgdn_lightning_monitor import MonitoringCallback

pytestmark = pytest.mark.slow


class RunsOutOfMemory(dt.LiveGCN):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().training_step(batch, batch_idx)


def test_an_oom_then_a_retry_in_the_same_process_fires_dgdn_out_of_memory(tmp_path):
    binary = require_tool("prometheus")
    port = free_port()
    target = f"127.0.0.1:{port}"
    callback = MonitoringCallback(port=port, addr="127.0.0.1", tracing=False, gpu_devices=None)
    config = dt.write_prometheus_config(tmp_path / "prometheus.yml", target, rule_file=RULES_FILE)
    prometheus = Prometheus(binary, config, tmp_path, free_port())
    firing: list[dict[str, Any]] = []
    noop = lambda trainer: None  # noqa: E731

    def alert_fires(trainer) -> None:
        if not firing:
            firing.extend(
                wait_until(
                    lambda: prometheus.query('ALERTS{alertname="DGDNOutOfMemory", alertstate="firing"}'),
                    60,
                    what="DGDNOutOfMemory firing",
                )
            )

    try:
        prometheus.wait_ready()
        train, val = dt.loaders()
        with pytest.raises(torch.OutOfMemoryError):
            start = lambda trainer: dt.wait_for_target_up(prometheus)  # noqa: E731
            dt.trainer([dt.Hooks(start, noop, noop), callback], max_epochs=1).fit(RunsOutOfMemory(), train, val)
        # Whether the failed run's last scrape read the error depends on how often it was scraped (a run scraped
        # fewer than twice is not waited for): the retry, serving the count from its first scrape, fires either way.
        dt.trainer([dt.Hooks(noop, alert_fires, noop), callback], max_epochs=1).fit(dt.LiveGCN(), train, val)
        [alert] = firing
        assert alert["metric"]["instance"] == target and alert["metric"]["rank"] == "0"
        assert alert["metric"]["run_id"] == callback.run_id  # a static target: the run from its dgdn_training_info
        assert alert["metric"]["severity"] == "critical"
        # The retry's scrapes read 1 (over a window: once the run ended, its endpoint's series are marked stale).
        assert prometheus.query(f'max_over_time(dgdn_oom_total{{instance="{target}"}}[1m]) == 1')
    finally:
        prometheus.stop()
