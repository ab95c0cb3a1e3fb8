"""The multi-process helpers in one process: discovery files, Pushgateway pushes, span-context sharing, pickling
for ``ddp_spawn`` and the per-local-rank port. Real multi-process runs are in test_distributed_ddp.py."""

from __future__ import annotations

import json
import logging
import pickle
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import prometheus_client
import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags
from prometheus_client import CollectorRegistry, generate_latest
from torch.utils.data import DataLoader, TensorDataset

from conftest import free_port
from dgdn_lightning_monitor import MonitoringCallback, PortInUseError
from dgdn_lightning_monitor.distributed import (
    DistributedRun,
    Endpoint,
    FileSDTargets,
    advertised_host,
    push_final_metrics,
)
from dgdn_lightning_monitor.labels import RankLabels
from dgdn_lightning_monitor.tracing import TracingSetup, TrainingTracer


class Regressor(pl.LightningModule):
    def __init__(self, fail_at_step: int = -1) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.fail_at_step = fail_at_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.fail_at_step:
            raise RuntimeError("boom")
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(rows: int = 32) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(rows, 4), torch.randn(rows, 1)), batch_size=8)


def trainer(*callbacks: pl.Callback, epochs: int = 2) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, callbacks=list(callbacks), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def monitor(**kwargs: Any) -> MonitoringCallback:
    kwargs.setdefault("port", 0)
    kwargs.setdefault("addr", "127.0.0.1")
    return MonitoringCallback(tracing=False, gpu_devices=None, **kwargs)


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs, argument", [
    ({"targets_dir": 3}, "targets_dir"),
    ({"targets_dir": ""}, "targets_dir"),
    ({"targets_host": "http://node-1"}, "targets_host"),
    ({"targets_host": "node 1"}, "targets_host"),
    ({"targets_host": ""}, "targets_host"),
    ({"pushgateway_url": "ftp://gateway:9091"}, "pushgateway_url"),
    ({"pushgateway_url": "http://"}, "pushgateway_url"),
    ({"pushgateway_url": "gateway:port"}, "pushgateway_url"),
    ({"pushgateway_url": ""}, "pushgateway_url"),
    ({"pushgateway_url": 9091}, "pushgateway_url"),
    ({"job": ""}, "job"),
    ({"job": "a/b"}, "job"),
    ({"port_per_local_rank": "yes"}, "port_per_local_rank"),
])
def test_bad_distributed_arguments_raise_naming_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        MonitoringCallback(**kwargs)


def test_targets_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ValueError, match="targets_dir"):
        MonitoringCallback(targets_dir=path)


def test_good_distributed_arguments_are_accepted(tmp_path: Path) -> None:
    MonitoringCallback(targets_dir=tmp_path / "new", targets_host="host.docker.internal",
                       pushgateway_url="localhost:9091", job="gnn.train", port_per_local_rank=False)
    MonitoringCallback(targets_host="::1", pushgateway_url="https://gateway.example/prefix")


# ---------------------------------------------------------------------------------------------- file SD
def test_file_sd_file_is_written_atomically_replaced_and_removed(tmp_path: Path) -> None:
    directory = tmp_path / "targets"  # created on first write
    sd = FileSDTargets(directory, "dgdn-training", 1, "abc123", hostname="gpu node/7")
    assert sd.path.name == "dgdn-training-gpu_node_7-node1-abc123.json"
    sd.write(["gpu-7:8000"], {"job": "dgdn-training", "run_id": "abc123"})
    sd.write(["gpu-7:8000", "gpu-7:8001"], {"job": "dgdn-training", "run_id": "abc123"})
    assert json.loads(sd.path.read_text()) == [
        {"targets": ["gpu-7:8000", "gpu-7:8001"], "labels": {"job": "dgdn-training", "run_id": "abc123"}}
    ]
    assert [p.name for p in directory.iterdir()] == [sd.path.name], "no temporary file is left behind"
    assert sd.remove() is True
    assert not sd.path.exists()
    assert sd.remove() is False  # twice is fine


def test_file_sd_remove_leaves_files_it_did_not_write(tmp_path: Path) -> None:
    other = FileSDTargets(tmp_path, "dgdn-training", 0, "run")
    other.path.write_text("[]")
    assert FileSDTargets(tmp_path, "dgdn-training", 0, "run").remove() is False
    assert other.path.exists()


def test_first_write_removes_files_of_killed_runs_listing_the_same_endpoint(tmp_path: Path) -> None:
    # A run killed with SIGKILL leaves its file behind; a new run on the same host and port replaces it, while
    # files of other endpoints (another node, another port) and non-discovery files stay.
    killed = tmp_path / "dgdn-training-host-node0-old.json"
    killed.write_text(json.dumps([{"targets": ["host:8000", "host:8001"], "labels": {"run_id": "old"}}]))
    other = tmp_path / "dgdn-training-other-node0-live.json"
    other.write_text(json.dumps([{"targets": ["other:8000"], "labels": {"run_id": "live"}}]))
    notes = tmp_path / "notes.json"
    notes.write_text('{"not": "a target list"}')
    sd = FileSDTargets(tmp_path, "dgdn-training", 0, "new", hostname="host")
    sd.write(["host:8001"], {"run_id": "new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([sd.path.name, other.name, notes.name])
    killed.write_text(json.dumps([{"targets": ["host:8001"], "labels": {"run_id": "later"}}]))
    sd.write(["host:8001"], {"run_id": "new"})  # only the first write looks: a rewrite never races a new run
    assert killed.exists()


def test_advertised_host_and_target_format() -> None:
    assert advertised_host("0.0.0.0") == socket.gethostname()
    assert advertised_host("::") == socket.gethostname()
    assert advertised_host("10.0.0.5") == "10.0.0.5"
    assert advertised_host("0.0.0.0", "host.docker.internal") == "host.docker.internal"
    assert Endpoint(0, 0, 0, "::1", 8000).target == "[::1]:8000"
    assert Endpoint(0, 0, 0, "node-1", 8001).target == "node-1:8001"
    assert Endpoint(0, 0, 0, "node-1", None).target is None


def test_single_process_writes_one_file_listing_its_endpoint(tmp_path: Path) -> None:
    run = DistributedRun(targets_dir=tmp_path, targets_host="127.0.0.1")
    labels = RankLabels()
    assert run.agree_run_id("r1") == "r1"
    run.exchange(labels, "0.0.0.0", 9000, tracing=True)
    assert run.share_traces is False  # nothing to share with
    run.publish(labels, "r1")
    (path,) = tmp_path.glob("*.json")
    assert json.loads(path.read_text())[0]["targets"] == ["127.0.0.1:9000"]
    run.finish(CollectorRegistry(), labels, "r1")
    assert not list(tmp_path.glob("*.json"))


def test_only_local_rank_zero_writes_the_node_file(tmp_path: Path) -> None:
    run = DistributedRun(targets_dir=tmp_path)
    labels = RankLabels(rank=3, local_rank=1, node_rank=1, world_size=4)
    run.exchange(labels, "0.0.0.0", 9001, tracing=False)
    run.publish(labels, "r1")
    assert not list(tmp_path.iterdir())


def test_unwritable_targets_dir_warns_once_and_training_goes_on(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    callback = monitor(targets_dir=tmp_path / "targets")
    callback._dist.targets_dir = blocker / "sub"  # became unusable after construction
    with caplog.at_level(logging.WARNING, logger="dgdn_lightning_monitor"):
        trainer(callback).fit(Regressor(), loader())
    warnings = [r for r in caplog.records if "discovery file" in r.getMessage()]
    assert len(warnings) == 1
    assert callback.metrics.samples_total == 64


class FileWatcher(pl.Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: list[list[dict[str, Any]]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen += [json.loads(p.read_text()) for p in self.directory.glob("*.json")]


def test_fit_keeps_the_discovery_file_while_running_and_removes_it_after(tmp_path: Path) -> None:
    callback = monitor(targets_dir=tmp_path, run_id="run-a")
    watcher = FileWatcher(tmp_path)
    trainer(callback, watcher, epochs=1).fit(Regressor(), loader())
    assert len(watcher.seen) == 1
    (group,) = watcher.seen[0]
    assert group["labels"] == {"job": "dgdn-training", "run_id": "run-a"}
    (target,) = group["targets"]
    assert target.startswith("127.0.0.1:")  # the bound address when it is a specific one
    assert list(tmp_path.iterdir()) == []


def test_discovery_file_is_removed_when_training_fails(tmp_path: Path) -> None:
    callback = monitor(targets_dir=tmp_path)
    watcher = FileWatcher(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(callback, watcher).fit(Regressor(fail_at_step=5), loader())
    assert len(watcher.seen) == 1
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- pushgateway
def test_push_to_a_closed_port_reports_a_reason_quickly() -> None:
    start = time.monotonic()
    reason = push_final_metrics(f"http://127.0.0.1:{free_port()}", "dgdn-training", CollectorRegistry(),
                                {"rank": "0"}, timeout_s=1.0)
    assert reason is not None and "URLError" in reason
    assert time.monotonic() - start < 1.5


def test_push_to_a_gateway_that_never_answers_is_bounded() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        start = time.monotonic()
        reason = push_final_metrics(f"127.0.0.1:{silent.getsockname()[1]}", "dgdn-training", CollectorRegistry(),
                                    {"rank": "0"}, timeout_s=0.3)
        assert reason is not None
        assert time.monotonic() - start < 1.5


def test_failed_push_warns_once_and_training_completes(caplog) -> None:
    callback = monitor(pushgateway_url=f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="dgdn_lightning_monitor"):
        for _ in range(2):  # two fits with the same callback: still one warning
            trainer(callback, epochs=1).fit(Regressor(), loader())
    warnings = [r for r in caplog.records if "Pushgateway" in r.getMessage()]
    assert len(warnings) == 1
    assert callback.metrics.samples_total == 64


# ---------------------------------------------------------------------------------------------- traces
def test_span_context_travels_as_a_small_tuple_of_ints(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[Any] = []

    def broadcast(payload: list[Any], src: int) -> None:  # rank 0's call records, rank 1's receives a pickled copy
        assert src == 0
        if payload[0] is not None or not sent:
            sent[:] = payload
        else:
            payload[:] = pickle.loads(pickle.dumps(sent))

    monkeypatch.setattr("dgdn_lightning_monitor.distributed.dist.broadcast_object_list", broadcast)
    leader, follower = DistributedRun(), DistributedRun()
    leader.share_traces = follower.share_traces = True
    follower.rank = 1
    context = SpanContext(trace_id=0xABC, span_id=0x123, is_remote=False, trace_flags=TraceFlags(1))
    assert leader.share_span_context(context) is None
    assert sent == [(0xABC, 0x123, 1)]
    remote = follower.share_span_context(None)
    assert remote is not None and remote.is_remote
    assert (remote.trace_id, remote.span_id, remote.trace_flags.sampled) == (0xABC, 0x123, True)
    sent.clear()
    assert leader.share_span_context(SpanContext(0, 0, is_remote=False)) is None  # an invalid context: nothing
    assert sent == [None]
    assert follower.share_span_context(None) is None


def test_without_a_process_group_no_context_is_shared() -> None:
    run = DistributedRun()
    run.agree_run_id("r")
    run.exchange(RankLabels(), "0.0.0.0", 1, tracing=True)
    context = SpanContext(trace_id=1, span_id=2, is_remote=False)
    assert run.share_span_context(context) is None


def test_remote_parent_makes_the_epoch_span_join_rank_zeros_trace() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = TrainingTracer(enabled=True)
    tracer.setup = TracingSetup(provider.get_tracer("test"), "in memory")
    tracer._attributes = {"training.rank": 1}
    remote = SpanContext(trace_id=0x1234, span_id=0x5678, is_remote=True, trace_flags=TraceFlags(1))
    tracer.start_epoch("train", 0, {}, remote_parent=remote)
    own = tracer.span_context("train")
    assert own is not None and own.trace_id == 0x1234
    tracer.start_epoch("validation", 0, {}, remote_parent=remote)  # a local parent wins
    tracer.end_epoch("validation")
    tracer.end_epoch("train")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["train_epoch"].parent.span_id == 0x5678
    assert spans["train_epoch"].context.trace_id == 0x1234
    assert spans["validation_epoch"].parent.span_id == own.span_id
    assert tracer.span_context("train") is None


# ---------------------------------------------------------------------------------------------- ddp_spawn
def test_callback_survives_pickling_with_its_settings_and_counters(tmp_path: Path) -> None:
    callback = monitor(run_id="abc", targets_dir=tmp_path, pushgateway_url="localhost:9091",
                       port_per_local_rank=False, trace_every_n_steps=3)
    trainer(callback, epochs=1).fit(Regressor(), loader())
    copy = pickle.loads(pickle.dumps(callback))
    assert (copy.run_id, copy.port_per_local_rank, copy.trace_every_n_steps) == ("abc", False, 3)
    assert copy._dist.targets_dir == tmp_path and copy._dist.pushgateway_url == "localhost:9091"
    assert copy.metrics.samples_total == 32
    assert copy.registry is not callback.registry
    text = generate_latest(copy.registry).decode()
    assert 'dgdn_samples_processed_total{local_rank="0",node_rank="0",rank="0",world_size="1"} 32.0' in text
    trainer(copy, epochs=1).fit(Regressor(), loader())  # a working callback: threads and server rebuilt
    assert copy.metrics.samples_total == 64


def test_pickled_callback_with_the_global_registry_stays_private_in_the_same_process() -> None:
    callback = monitor(registry=prometheus_client.REGISTRY)
    try:
        copy = pickle.loads(pickle.dumps(callback))
        assert copy.registry is not prometheus_client.REGISTRY  # the original is registered there already
        assert "dgdn_samples_processed_total" in generate_latest(copy.registry).decode()
    finally:
        prometheus_client.REGISTRY.unregister(callback.metrics)
        prometheus_client.REGISTRY.unregister(callback.gpu)


def test_pickling_does_not_carry_a_running_server_or_thread() -> None:
    callback = monitor()
    started = threading.Event()

    class Probe(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            copy = pickle.loads(pickle.dumps(callback))  # mid-run
            assert copy.metrics_url is None and copy._run is None
            assert copy.metrics._trainer is None
            started.set()

    trainer(callback, Probe(), epochs=1).fit(Regressor(), loader())
    assert started.is_set()


# ---------------------------------------------------------------------------------------------- ports
def fake_trainer(local_rank: int) -> Any:
    return SimpleNamespace(global_rank=local_rank, local_rank=local_rank, node_rank=0, world_size=2,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")), current_epoch=0,
                           global_step=0, optimizers=[])


@pytest.mark.parametrize("per_local_rank", [True, False])
def test_port_offset_by_local_rank_is_configurable(per_local_rank: bool) -> None:
    base = free_port()
    callback = monitor(port=base, port_per_local_rank=per_local_rank)
    callback.setup(fake_trainer(1), Regressor(), "fit")
    try:
        assert callback.metrics_url == f"http://127.0.0.1:{base + 1 if per_local_rank else base}/metrics"
    finally:
        callback.teardown(fake_trainer(1), Regressor(), "fit")
    assert callback.metrics_url is None


def test_taken_port_of_a_local_rank_fails_its_setup_naming_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        callback = monitor(port=port - 1)
        with pytest.raises(PortInUseError, match=str(port)):
            callback.setup(fake_trainer(1), Regressor(), "fit")
        assert callback.metrics_url is None and not callback.tracer.active


def test_port_above_the_range_after_the_offset_fails_naming_the_port() -> None:
    callback = monitor(port=65535)
    with pytest.raises(ValueError, match="port 65535"):
        callback.setup(fake_trainer(1), Regressor(), "fit")
