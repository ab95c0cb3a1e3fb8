"""Housekeeping of finished runs, with the real parts: Pushgateway groups past their retention are deleted by the
next run (series stay bounded over 20 real runs), and discovery files that stopped being refreshed expire while
hand-written and fresh files stay; a run listed on the quick-start port under a host the stack cannot merge says
so."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from conftest import free_port, require_tool
from exposition import samples
from lit_models import GraphClassifier, graph_loaders, quiet_trainer
from prom_helpers import Pushgateway, http_get

from dgdn_lightning_monitor import MonitoringCallback, distributed, pushgateway
from dgdn_lightning_monitor.distributed import FileSDTargets, remove_expired_targets
from dgdn_lightning_monitor.server import DEFAULT_PORT


@pytest.fixture
def gateway(tmp_path) -> Any:
    server = Pushgateway(require_tool("pushgateway"), tmp_path, free_port())
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _series(gateway: Pushgateway) -> dict[str, int]:
    """Series the Pushgateway serves per run id (its own families left out)."""
    counts: dict[str, int] = {}
    for name, entries in samples(http_get(gateway.url + "/metrics").decode()).items():
        for labels, _ in entries:
            if name.startswith("dgdn_") or name == "push_time_seconds":
                counts[labels.get("run_id", "")] = counts.get(labels.get("run_id", ""), 0) + 1
    return counts


def _run(gateway: Pushgateway) -> str:
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, gpu_devices=None,
                                 pushgateway_url=gateway.url)
    train, val, *_ = graph_loaders(num_graphs=16)
    quiet_trainer(max_epochs=1, callbacks=[monitor], num_sanity_val_steps=0).fit(GraphClassifier(), train, val)
    return monitor.run_id


def test_series_stay_bounded_over_20_runs_and_grow_without_retention(gateway, monkeypatch) -> None:
    """Measured: with a retention shorter than a run, the Pushgateway holds the last run's series however many runs
    pushed (the next run deletes the earlier groups at its set-up); with the default retention of an hour every
    run's group stays."""
    first = _run(gateway)
    per_run = _series(gateway)[first]
    assert per_run > 20
    _run(gateway)
    assert len(_series(gateway)) == 2  # the default retention (1 h) keeps both

    monkeypatch.setattr(pushgateway, "PUSH_RETENTION_S", 0.0)
    counts = []
    for _ in range(20):
        last = _run(gateway)
        counts.append(sum(_series(gateway).values()))
    assert list(_series(gateway)) == [last]
    assert max(counts) == counts[-1] == _series(gateway)[last] == per_run  # bounded: one run's series


def test_expired_discovery_files_go_and_others_stay(tmp_path) -> None:
    ours = FileSDTargets(tmp_path, "dgdn-training", 0, "live", hostname="node")
    ours.write(["node:1"], {"job": "dgdn-training"})
    old = time.time() - distributed.EXPIRE_S - 5
    expired = tmp_path / "dgdn-training-node2-node0-dead.json"
    expired.write_text("[]")
    os.utime(expired, (old, old))
    hand_written = tmp_path / "ranks.json"
    hand_written.write_text("[]")
    os.utime(hand_written, (old, old))
    os.utime(ours.path, (old, old))
    ours.refresh()  # the heartbeat: fresh again
    assert remove_expired_targets(tmp_path) == [expired]
    assert ours.path.exists() and hand_written.exists() and not expired.exists()
    content = ours.path.read_text()
    ours.path.unlink()  # swept by a node whose clock runs ahead
    ours.refresh()
    assert ours.path.read_text() == content
    ours.remove()


def test_a_running_discovery_file_is_refreshed(tmp_path, monkeypatch) -> None:
    """The heartbeat thread of a real run rewrites the file's time and sweeps expired files of the directory."""
    monkeypatch.setattr(distributed, "REFRESH_S", 0.2)
    expired = tmp_path / "dgdn-training-gone-node0-dead.json"
    expired.write_text("[]")
    old = time.time() - distributed.EXPIRE_S - 5
    seen: dict[str, Any] = {}

    class Watch(__import__("lightning.pytorch", fromlist=["Callback"]).Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 0:
                (path,) = [p for p in tmp_path.glob("*.json") if p != expired]
                os.utime(path, (old, old))
                os.utime(expired, (old, old))
                seen["path"] = path
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and (path.stat().st_mtime < old + 60 or expired.exists()):
                    time.sleep(0.05)
                seen["fresh"] = path.stat().st_mtime > time.time() - 30
                seen["expired_left"] = expired.exists()

    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, gpu_devices=None, targets_dir=tmp_path)
    train, val, *_ = graph_loaders(num_graphs=16)
    quiet_trainer(max_epochs=1, callbacks=[Watch(), monitor], num_sanity_val_steps=0).fit(GraphClassifier(), train, val)
    assert seen["fresh"] and not seen["expired_left"]
    assert not seen["path"].exists()  # removed at the end


def test_the_quick_start_port_with_discovery_under_another_name_warns(tmp_path, caplog) -> None:
    """port=8000 with targets_dir and a host the stack cannot merge with its static target: said once at start."""
    from dgdn_lightning_monitor.labels import RankLabels

    run = distributed.DistributedRun(targets_dir=tmp_path, targets_host="gpu-node-3")
    run.exchange(RankLabels(), "0.0.0.0", DEFAULT_PORT, False)
    with caplog.at_level("WARNING", logger="dgdn_lightning_monitor.distributed"):
        run.publish(RankLabels(), "r1")
    assert ["scrape this rank twice" in r.getMessage() for r in caplog.records] == [True]
    run.finish(None, RankLabels(), "r1")  # type: ignore[arg-type]  # no Pushgateway: the registry is not used
    caplog.clear()
    merged = distributed.DistributedRun(targets_dir=tmp_path, targets_host="host.docker.internal")
    merged.exchange(RankLabels(), "0.0.0.0", DEFAULT_PORT, False)
    with caplog.at_level("WARNING", logger="dgdn_lightning_monitor.distributed"):
        merged.publish(RankLabels(), "r2")
    assert not caplog.records
    merged.finish(None, RankLabels(), "r2")  # type: ignore[arg-type]
