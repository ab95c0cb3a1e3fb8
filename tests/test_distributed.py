"""The multi-process helpers in one process: discovery files, Pushgateway pushes, span-context sharing, pickling
for ``ddp_spawn`` and the per-local-rank port. Real multi-process runs are in test_distributed_ddp.py."""

from __future__ import annotations

import hashlib
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
from prometheus_client import CollectorRegistry, generate_latest
from torch.utils.data import DataLoader, TensorDataset

from conftest import free_port
from dgdn_lightning_monitor import MonitoringCallback, PortInUseError
from dgdn_lightning_monitor.distributed import DistributedRun, Endpoint, FileSDTargets
from dgdn_lightning_monitor.labels import RankLabels
from dgdn_lightning_monitor.pushgateway import push_final_metrics
from dgdn_lightning_monitor.server import MetricsServer, reachable_host
from dgdn_lightning_monitor.tracing import TracingSetup, TrainingTracer
from dgdn_lightning_monitor.tracing.provider import GivenIds
from dgdn_lightning_monitor.tracing.tracer import epoch_ids


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
    assert reachable_host("0.0.0.0", local=False) == reachable_host("::", local=False) == socket.gethostname()
    assert reachable_host("10.0.0.5", local=False) == "10.0.0.5"
    assert Endpoint(0, 0, 0, "::1", 8000).target == "[::1]:8000"
    assert Endpoint(0, 0, 0, "node-1", 8001).target == "node-1:8001"
    # The endpoint's own URL and the discovery files read the same wildcard table: loopback from here.
    assert (reachable_host("0.0.0.0"), reachable_host("::"), reachable_host("10.0.0.5")) == ("localhost", "::1", "10.0.0.5")
    server = MetricsServer(CollectorRegistry(), "0.0.0.0", 0)
    server.start()
    try:
        assert server.url == f"http://localhost:{server.bound_port}/metrics"
    finally:
        server.stop()
    assert Endpoint(0, 0, 0, "node-1", None).target is None


def test_single_process_writes_one_file_listing_its_endpoint(tmp_path: Path) -> None:
    run = DistributedRun(targets_dir=tmp_path, targets_host="127.0.0.1")
    labels = RankLabels()
    assert run.exchange(labels, "0.0.0.0", 9000, "r1") == "r1"
    assert run.trace_key is None  # nothing to share with
    run.publish(labels, "r1")
    (path,) = tmp_path.glob("*.json")
    assert json.loads(path.read_text())[0]["targets"] == ["127.0.0.1:9000"]
    run.finish(CollectorRegistry(), labels, "r1")
    assert not list(tmp_path.glob("*.json"))


def test_only_local_rank_zero_writes_the_node_file(tmp_path: Path) -> None:
    run = DistributedRun(targets_dir=tmp_path)
    labels = RankLabels(rank=3, local_rank=1, node_rank=1, world_size=4)
    run.exchange(labels, "0.0.0.0", 9001, "r1")
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


def _node_of_two(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, peer_port: int) -> DistributedRun:
    """Local rank 0 of a node whose local rank 1 serves on ``peer_port``, after a real exchange and publish."""
    gathering(monkeypatch, [("run", "key", Endpoint(1, 1, 0, "127.0.0.1", peer_port))])
    run = DistributedRun(targets_dir=tmp_path)
    labels = RankLabels(world_size=2)
    run.publish(labels, run.exchange(labels, "127.0.0.1", free_port(), "run"))
    return run


def test_the_node_file_lists_a_later_rank_until_its_endpoint_closes(monkeypatch, tmp_path: Path) -> None:
    # Local rank 1 ends after local rank 0: its process exits (closing its endpoint) only once a scrape has read
    # its end, so rank 0's removal waits for that, not for rank 0's own end alone.
    with socket.create_server(("127.0.0.1", 0)) as peer:
        run = _node_of_two(monkeypatch, tmp_path, peer.getsockname()[1])
        (path,) = tmp_path.glob("*.json")
        run.finish(CollectorRegistry(), RankLabels(world_size=2), "run")
        time.sleep(0.5)  # several polls of the peer
        assert path.exists(), "removed while the node's other rank still serves"
    deadline = time.monotonic() + 10
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not path.exists(), "not removed once the node's other rank closed its endpoint"


def test_a_rank_that_serves_on_past_the_limit_keeps_the_node_file_for_expiry(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr("dgdn_lightning_monitor.distributed.FINAL_SCRAPE_LIMIT_S", 0.5)
    with socket.create_server(("127.0.0.1", 0)) as peer:
        run = _node_of_two(monkeypatch, tmp_path, peer.getsockname()[1])
        (path,) = tmp_path.glob("*.json")
        sd = run._sd
        run.finish(CollectorRegistry(), RankLabels(world_size=2), "run")
        deadline = time.monotonic() + 10
        while sd is not None and sd._written and time.monotonic() < deadline:
            time.sleep(0.05)
        # A hung rank killed later pages as down: its target stays listed, and not even the exit removes it.
        assert path.exists() and sd is not None and sd.remove() is False and path.exists()


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
def gathering(monkeypatch: pytest.MonkeyPatch, others: list[Any]) -> list[Any]:
    """A two-or-more-rank process group in this process: this rank's all-gather payload is recorded, the other
    ranks' payloads are ``others`` (pickled copies, as the collective delivers them)."""
    sent: list[Any] = []

    def all_gather_object(gathered: list[Any], payload: Any) -> None:
        sent.append(pickle.loads(pickle.dumps(payload)))
        gathered[:] = [sent[-1], *(pickle.loads(pickle.dumps(other)) for other in others)]

    monkeypatch.setattr("dgdn_lightning_monitor.distributed.dist.is_initialized", lambda: True)
    monkeypatch.setattr("dgdn_lightning_monitor.distributed.dist.get_world_size", lambda: 1 + len(others))
    monkeypatch.setattr("dgdn_lightning_monitor.distributed.dist.get_rank", lambda: 0)
    monkeypatch.setattr("dgdn_lightning_monitor.distributed.dist.all_gather_object", all_gather_object)
    return sent


def test_one_all_gather_gives_every_rank_the_endpoints_run_id_and_trace_key(monkeypatch: pytest.MonkeyPatch) -> None:
    peer = ("rank-1-id", "key-of-rank-1", Endpoint(1, 1, 0, "node-0", 8001))
    sent = gathering(monkeypatch, [peer])
    run = DistributedRun()
    assert run.exchange(RankLabels(world_size=2), "127.0.0.1", 8000, "rank-0-id") == "rank-0-id"
    (payload,) = sent
    assert payload[0] == "rank-0-id" and payload[2] == Endpoint(0, 0, 0, "127.0.0.1", 8000)
    assert run.trace_key == payload[1] and [p.target for p in run.peers] == ["127.0.0.1:8000", "node-0:8001"]


def test_a_rank_whose_part_fails_still_enters_the_exchange_and_all_decide_alike(
    monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    # This rank's part raises before the collective: it still enters it, with the cause in place of its endpoint,
    # and adopts the run id and trace key of the lowest rank that took part, as every other rank does.
    def broken(addr: str, local: bool = True) -> str:
        raise OSError("no host name")

    monkeypatch.setattr("dgdn_lightning_monitor.distributed.reachable_host", broken)
    peer = ("rank-1-id", "key-of-rank-1", Endpoint(1, 1, 0, "node-0", 8001))
    sent = gathering(monkeypatch, [peer])
    run = DistributedRun()
    with caplog.at_level(logging.WARNING, logger="dgdn_lightning_monitor"):
        assert run.exchange(RankLabels(world_size=2), "0.0.0.0", 8000, "rank-0-id") == "rank-1-id"
    assert sent == ["OSError: no host name"]
    assert run.trace_key == "key-of-rank-1" and [p.rank for p in run.peers] == [1]
    assert run.errors.counts["exchange"] == 1
    assert sum("no host name" in r.getMessage() for r in caplog.records) == 1
    # The other side: a peer's failure marker is counted, its endpoint left out, this rank's id kept.
    monkeypatch.undo()
    gathering(monkeypatch, ["RuntimeError: injected"])
    other = DistributedRun()
    assert other.exchange(RankLabels(world_size=2), "127.0.0.1", 8000, "rank-0-id") == "rank-0-id"
    assert [p.rank for p in other.peers] == [0] and other.errors.counts["exchange"] == 1


def test_without_a_process_group_there_is_no_trace_key() -> None:
    run = DistributedRun()
    run.exchange(RankLabels(), "0.0.0.0", 1, "r")
    assert run.trace_key is None


def test_epoch_spans_of_every_rank_join_one_trace_derived_from_the_key() -> None:
    exporter = InMemorySpanExporter()
    tracers = []
    for rank in (0, 1):
        tracer = TrainingTracer(enabled=True)
        provider = TracerProvider(id_generator=GivenIds())
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer.setup = TracingSetup(provider.get_tracer("test"), "in memory", ids=provider.id_generator)
        tracer._attributes, tracer._share = {"training.rank": rank}, "shared-key"
        tracers.append(tracer)
    for tracer in tracers:
        tracer.start_epoch("train", 3)
        tracer.start_epoch("validation", 3)  # a local parent: the rank's own train_epoch
        tracer.end_epoch("validation")
        tracer.end_epoch("train")
    spans = exporter.get_finished_spans()
    epochs = {s.attributes["training.rank"]: s for s in spans if s.name == "train_epoch"}
    digest = hashlib.sha256(b"shared-key/train/3").digest()  # the documented derivation, computed here
    trace_id, span_id = int.from_bytes(digest[:16], "big"), int.from_bytes(digest[16:24], "big")
    assert epoch_ids("shared-key", 3) == (trace_id, span_id)
    assert epochs[0].parent is None and (epochs[0].context.trace_id, epochs[0].context.span_id) == (trace_id, span_id)
    assert epochs[1].parent.span_id == span_id and epochs[1].context.trace_id == trace_id
    assert epochs[1].context.span_id != span_id
    validations = {s.attributes["training.rank"]: s for s in spans if s.name == "validation_epoch"}
    for rank in (0, 1):
        assert validations[rank].parent.span_id == epochs[rank].context.span_id
    # With a provider that is not ours rank 0 cannot take given ids: every rank joins as a child of them.
    borrowed = TrainingTracer(enabled=True)
    plain = TracerProvider()
    plain.add_span_processor(SimpleSpanProcessor(exporter))
    borrowed.setup = TracingSetup(plain.get_tracer("test"), "borrowed")
    borrowed._attributes, borrowed._share = {"training.rank": 0}, "shared-key"
    borrowed.start_epoch("train", 3)
    borrowed.end_epoch("train")
    last = exporter.get_finished_spans()[-1]
    assert last.context.trace_id == trace_id and last.parent.span_id == span_id


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
    # One error count for every part of the copy, as in the original (the failed push was counted there).
    assert copy.metrics.errors is copy._dist.errors is copy.gpu.errors is copy.tracer.errors
    assert callback.metrics.errors.counts["push"] == 1 and copy.metrics.errors.counts["push"] == 0
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
    url = f"http://127.0.0.1:{base + 1 if per_local_rank else base}/metrics"
    try:
        assert callback.metrics_url == url
    finally:
        callback.teardown(fake_trainer(1), Regressor(), "fit")
    assert callback.metrics_url == url  # serves on after the run


def test_taken_port_of_a_local_rank_fails_its_setup_naming_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        callback = monitor(port=port - 1)
        with pytest.raises(PortInUseError, match=str(port)):
            callback.setup(fake_trainer(1), Regressor(), "fit")
        assert callback.metrics_url is None and callback.tracer.setup is None


def test_port_above_the_range_after_the_offset_fails_naming_the_port() -> None:
    callback = monitor(port=65535)
    with pytest.raises(ValueError, match="port 65535"):
        callback.setup(fake_trainer(1), Regressor(), "fit")
