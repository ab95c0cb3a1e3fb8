"""MonitoringCallback against ground truth, in real Lightning Trainer runs on small PyG data."""

from __future__ import annotations

import math
import socket
import subprocess
import threading
import time
import urllib.error

import lightning.pytorch as pl
import pytest
import torch
from prometheus_client import CollectorRegistry

from conftest import free_port, require_tool
from dgdn_lightning_monitor import MonitoringCallback, PortInUseError
from exposition import exposition, samples, same, scrape, value
from lit_models import GraphClassifier, TensorRegressor, graph_loaders, quiet_trainer, tensor_loader


def fit(callback: MonitoringCallback, model=None, epochs: int = 2, extra=(), **trainer_kwargs):
    model = model or GraphClassifier()
    train, val, train_set, val_set = graph_loaders()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[callback, *extra], log_every_n_steps=1, **trainer_kwargs)
    trainer.fit(model, train, val)
    return trainer, model, train_set, val_set


def test_counters_and_gauges_match_ground_truth():
    callback = MonitoringCallback(port=0)
    trainer, model, train_set, val_set = fit(callback, epochs=2)
    text = exposition(callback.registry)

    graphs = list(train_set)
    nodes = sum(g.num_nodes for g in graphs)
    edges = sum(g.edge_index.size(1) for g in graphs)
    batches = math.ceil(len(graphs) / 8)
    assert value(text, "dgdn_samples_processed_total", rank="0") == 2 * len(graphs)
    assert value(text, "dgdn_nodes_processed_total") == 2 * nodes
    assert value(text, "dgdn_edges_processed_total") == 2 * edges
    last = graphs[(batches - 1) * 8:]
    assert value(text, "dgdn_graph_nodes") == sum(g.num_nodes for g in last)
    assert value(text, "dgdn_graph_edges") == sum(g.edge_index.size(1) for g in last)
    assert value(text, "dgdn_batch_processing_seconds_count") == 2 * batches
    assert value(text, "dgdn_batch_processing_seconds_sum") > 0
    val_batches = math.ceil(len(val_set) / 8)
    assert value(text, "dgdn_inference_time_seconds_count", stage="validate") == 2 * val_batches  # no sanity check
    assert value(text, "dgdn_epoch") == trainer.current_epoch
    assert value(text, "dgdn_global_step") == trainer.global_step == 2 * batches
    assert value(text, "dgdn_learning_rate", optimizer="Adam", param_group="0") == 0.01
    parameters = sum(p.numel() for p in model.parameters())
    assert value(text, "dgdn_model_parameters") == parameters
    assert value(text, "dgdn_model_trainable_parameters") == parameters
    assert value(text, "dgdn_model_memory_usage_bytes") == parameters * 4
    assert value(text, "dgdn_nonfinite_loss_total") == 0
    assert 0 < value(text, "dgdn_epoch_duration_seconds") < 60
    assert abs(value(text, "dgdn_last_step_timestamp_seconds") - time.time()) < 60
    assert value(text, "dgdn_samples_per_second") > 0
    info = samples(text)["dgdn_training_info"][0][0]
    assert info["model"] == "dgdn_testing.models.GraphClassifier"
    assert info["torch_version"] == torch.__version__
    assert info["lightning_version"] == pl.__version__
    assert info["run_id"] == callback.run_id
    for name, entries in samples(text).items():
        for labels, _ in entries:
            assert (labels["rank"], labels["local_rank"], labels["node_rank"], labels["world_size"]) == \
                ("0", "0", "0", "1"), name
    summary = callback.summary()
    assert summary["samples"] == 2 * len(graphs) and summary["steps"] == 2 * batches
    assert set(summary["phase_seconds"]) == {"data_fetch", "forward", "backward", "optimizer_step"}


def test_http_endpoint_serves_live_figures_during_training():
    callback = MonitoringCallback(port=0, addr="127.0.0.1")
    seen: list[tuple[int, str]] = []

    class ScrapeMidRun(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                seen.append((trainer.global_step, scrape(callback.metrics_url)))

    fit(callback, epochs=1, extra=[ScrapeMidRun()])
    step, text = seen[0]
    # The endpoint serves on after the run, saying how it ended.
    assert value(scrape(callback.metrics_url), "dgdn_run_outcome", outcome="completed") == 1
    assert value(text, "dgdn_samples_processed_total") == 3 * 8
    assert value(text, "dgdn_batch_processing_seconds_count") == 3
    assert value(text, "dgdn_global_step") == step


def test_scrape_from_another_thread_while_training_runs():
    callback = MonitoringCallback(port=0, addr="127.0.0.1")
    texts: list[str] = []
    stop = threading.Event()

    class Scraper(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            url = callback.metrics_url

            def loop() -> None:
                for _ in range(200):
                    if stop.is_set():
                        return
                    try:
                        texts.append(scrape(url, timeout=2))
                    except (urllib.error.URLError, ConnectionError):
                        return
                    time.sleep(0.005)

            threading.Thread(target=loop, daemon=True).start()

    try:
        fit(callback, model=GraphClassifier(step_sleep_s=0.01), epochs=2, extra=[Scraper()])
    finally:
        stop.set()
    assert len(texts) >= 3
    counts = [value(t, "dgdn_samples_processed_total") for t in texts]
    assert counts == sorted(counts)  # a counter never goes down
    for text in texts:
        count = value(text, "dgdn_batch_processing_seconds_count")
        buckets = [v for labels, v in samples(text)["dgdn_batch_processing_seconds_bucket"]]
        assert buckets == sorted(buckets) and buckets[-1] == count


def test_promtool_check_metrics_is_clean():
    promtool = require_tool("promtool")
    callback = MonitoringCallback(port=0)
    fit(callback, epochs=1)
    trainer = quiet_trainer()
    train, *_ = graph_loaders()
    trainer.test(GraphClassifier(), train, verbose=False)
    result = subprocess.run([promtool, "check", "metrics"], input=exposition(callback.registry),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr


def test_nonfinite_losses_are_counted_and_shown_as_nan():
    callback = MonitoringCallback(port=0)
    fit(callback, model=GraphClassifier(nan_after=4), epochs=1)  # 5 batches
    text = exposition(callback.registry)
    assert value(text, "dgdn_nonfinite_loss_total") == 5 - 4
    assert math.isnan(value(text, "dgdn_training_loss"))


def test_nonfinite_count_is_exact_across_several_folds():
    callback = MonitoringCallback(port=0)
    train, val, train_set, _ = graph_loaders(batch_size=1)  # 36 steps per epoch: folds every 50 steps and per epoch
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback], log_every_n_steps=1)
    trainer.fit(GraphClassifier(nan_after=40), train, val)
    assert trainer.global_step == 3 * len(train_set)
    assert value(exposition(callback.registry), "dgdn_nonfinite_loss_total") == 3 * len(train_set) - 40


def test_tensor_batches_count_rows_and_leave_graph_metrics_alone():
    callback = MonitoringCallback(port=0)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(TensorRegressor(), tensor_loader(rows=40, batch_size=8))
    text = exposition(callback.registry)
    assert value(text, "dgdn_samples_processed_total") == 40
    assert value(text, "dgdn_nodes_processed_total") == 0
    assert value(text, "dgdn_graph_nodes") is None
    assert value(text, "dgdn_training_accuracy") is None  # never logged, so never exported


def test_batch_size_and_graph_size_functions_override():
    callback = MonitoringCallback(port=0, batch_size_fn=lambda b: 1000, graph_size_fn=lambda b: (3, 5))
    fit(callback, epochs=1)
    text = exposition(callback.registry)
    assert value(text, "dgdn_samples_processed_total") == 5 * 1000  # 5 batches
    assert value(text, "dgdn_nodes_processed_total") == 5 * 3
    assert value(text, "dgdn_edges_processed_total") == 5 * 5


def test_failing_size_function_degrades_with_one_warning(caplog):
    def broken(batch):
        raise RuntimeError("no size here")

    callback = MonitoringCallback(port=0, batch_size_fn=broken)
    with caplog.at_level("WARNING", logger="dgdn_lightning_monitor"):
        fit(callback, epochs=1)
    assert sum("Could not size a batch" in r.message for r in caplog.records) == 1
    assert value(exposition(callback.registry), "dgdn_batch_processing_seconds_count") == 5
    assert value(exposition(callback.registry), "dgdn_monitor_errors_total", part="graph_size") == 5 + 2  # train, val


def test_test_and_predict_batches_feed_inference_latency():
    callback = MonitoringCallback(port=0)
    trainer = quiet_trainer(callbacks=[callback])
    _, val, _, val_set = graph_loaders()
    model = GraphClassifier()
    trainer.test(model, val, verbose=False)
    trainer.predict(model, val)
    text = exposition(callback.registry)
    batches = math.ceil(len(val_set) / 8)
    assert value(text, "dgdn_inference_time_seconds_count", stage="test") == batches
    assert value(text, "dgdn_inference_time_seconds_count", stage="predict") == batches
    assert value(text, "dgdn_samples_processed_total") == 0


def test_counters_keep_counting_across_fits_and_server_restarts():
    callback = MonitoringCallback(port=0)
    fit(callback, epochs=1)
    first = callback.summary()["samples"]
    fit(callback, epochs=1)
    assert callback.summary()["samples"] == 2 * first
    assert value(exposition(callback.registry), "dgdn_samples_processed_total") == 2 * first


def test_two_trainers_in_one_process_do_not_clash():
    a, b = MonitoringCallback(port=0), MonitoringCallback(port=0)
    fit(a, epochs=1)
    fit(b, epochs=1)
    assert value(exposition(a.registry), "dgdn_samples_processed_total") == \
        value(exposition(b.registry), "dgdn_samples_processed_total")


def test_shared_registry_and_namespace():
    registry = CollectorRegistry()
    callback = MonitoringCallback(port=0, registry=registry, namespace="gnn")
    fit(callback, epochs=1)
    text = exposition(registry)
    assert value(text, "gnn_samples_processed_total") == 36
    assert "dgdn_" not in text.replace("dgdn_testing", "")
    with pytest.raises(ValueError):
        MonitoringCallback(port=0, registry=registry, namespace="gnn")  # the same series twice


def test_port_in_use_fails_before_training_and_names_the_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        callback = MonitoringCallback(port=port, addr="127.0.0.1")
        model = GraphClassifier()
        logger = pl.loggers.CSVLogger(save_dir=str(pytest.importorskip("tempfile").mkdtemp()))
        train, val, *_ = graph_loaders()
        trainer = quiet_trainer(max_epochs=1, callbacks=[callback], logger=logger)
        with pytest.raises(PortInUseError) as error:
            trainer.fit(model, train, val)
    assert str(port) in str(error.value) and "port=0" in str(error.value)
    assert model.steps == 0
    assert trainer.loggers == [logger]


def test_fixed_port_serves_there():
    port = free_port()
    callback = MonitoringCallback(port=port, addr="127.0.0.1")
    urls: list[str] = []

    class Grab(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            urls.append(callback.metrics_url)
            scrape(callback.metrics_url)

    fit(callback, epochs=1, extra=[Grab()])
    assert urls == [f"http://127.0.0.1:{port}/metrics"]


def test_exception_in_training_ends_the_run_keeps_figures_and_serves_on_saying_it_failed():
    class Boom(GraphClassifier):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    callback = MonitoringCallback(port=0, addr="127.0.0.1")
    urls: list[str] = []

    class Grab(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            urls.append(callback.metrics_url)

    with pytest.raises(RuntimeError, match="boom"):
        fit(callback, model=Boom(), epochs=1, extra=[Grab()])
    assert callback.metrics_url == urls[0]
    text = scrape(urls[0], timeout=2)
    assert value(text, "dgdn_run_outcome", outcome="failed", exception="RuntimeError") == 1
    assert value(text, "dgdn_samples_processed_total") == 3 * 8
    # Only endpoints serve on: every other part of the run stopped.
    assert {t.name for t in threading.enumerate() if t.name.startswith("dgdn-")} <= {"dgdn-metrics-server"}


@pytest.mark.parametrize("kwargs, argument", [
    ({"port": -1}, "port"), ({"port": 65536}, "port"), ({"port": 80.5}, "port"), ({"port": "8000"}, "port"),
    ({"port": True}, "port"), ({"namespace": ""}, "namespace"), ({"namespace": "1abc"}, "namespace"),
    ({"namespace": "has-dash"}, "namespace"), ({"namespace": "trailing_"}, "namespace"), ({"addr": ""}, "addr"),
    ({"registry": object()}, "registry"), ({"train_loss_key": ""}, "train_loss_key"),
    ({"val_acc_key": None}, "val_acc_key"), ({"batch_size_fn": 3}, "batch_size_fn"),
    ({"graph_size_fn": "x"}, "graph_size_fn"), ({"throughput_window": 1}, "throughput_window"),
    ({"trace_every_n_steps": 0}, "trace_every_n_steps"), ({"trace_every_n_steps": 2.5}, "trace_every_n_steps"),
    ({"tracing": "yes"}, "tracing"), ({"run_id": ""}, "run_id"),
    ({"gpu_poll_interval_s": 0}, "gpu_poll_interval_s"), ({"gpu_devices": [-1]}, "gpu_devices"),
])
def test_bad_arguments_raise_at_construction_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        MonitoringCallback(**kwargs)


def test_a_fault_inside_monitoring_never_stops_training(caplog):
    callback = MonitoringCallback(port=0, trace_every_n_steps=1)

    def broken(record):
        raise RuntimeError("exporter exploded")

    callback.tracer.add_batch = broken
    with caplog.at_level("WARNING", logger="dgdn_lightning_monitor"):
        trainer, *_ = fit(callback, epochs=2)
    assert trainer.global_step == 10
    assert sum("training continues" in r.getMessage() for r in caplog.records) == 1
    assert value(exposition(callback.registry), "dgdn_samples_processed_total") == 72
    assert value(exposition(callback.registry), "dgdn_monitor_errors_total", part="tracing") == 10 + 4  # train, val


def test_lazy_layers_are_counted_once_initialised():
    class LazyRegressor(TensorRegressor):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.LazyLinear(1)

    callback = MonitoringCallback(port=0)
    quiet_trainer(max_epochs=2, callbacks=[callback]).fit(LazyRegressor(), tensor_loader(rows=16, batch_size=8))
    text = exposition(callback.registry)
    assert value(text, "dgdn_model_parameters") == 4 + 1
    assert value(text, "dgdn_model_memory_usage_bytes") == 5 * 4


class ScrapeAt(pl.Callback):
    """Scrapes the monitor's endpoint at the start and at the end of a stage (before the endpoint stops)."""

    def __init__(self, callback: MonitoringCallback) -> None:
        self.callback, self.texts = callback, {}

    def _scrape(self, when: str) -> None:
        self.texts[when] = scrape(self.callback.metrics_url)

    def on_train_start(self, trainer, pl_module):
        self._scrape("start")

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.stage == "validate":
            self._scrape("start")

    def on_train_end(self, trainer, pl_module):
        self._scrape("end")

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.stage == "validate":
            self._scrape("end")


def test_every_scrape_serves_the_state_at_its_arrival():
    # Scraped at the start and again at the end, a short stage's last scrape shows its exact final figures.
    callback = MonitoringCallback(port=0, addr="127.0.0.1")
    probe = ScrapeAt(callback)
    _, val, _, val_set = graph_loaders()
    quiet_trainer(callbacks=[callback, probe]).validate(GraphClassifier(), val, verbose=False)
    assert value(probe.texts["start"], "dgdn_inference_time_seconds_count", stage="validate") is None
    assert value(probe.texts["end"], "dgdn_inference_time_seconds_count", stage="validate") == math.ceil(
        len(val_set) / 8
    )

    train, _, train_set, _ = graph_loaders(num_graphs=200, val_fraction=0.2)  # 20 batches of 8 graphs
    callback = MonitoringCallback(port=free_port(), addr="127.0.0.1")
    probe = ScrapeAt(callback)
    quiet_trainer(max_epochs=1, callbacks=[callback, probe], limit_val_batches=0).fit(GraphClassifier(), train)
    assert value(probe.texts["start"], "dgdn_samples_processed_total") == 0
    assert value(probe.texts["end"], "dgdn_samples_processed_total") == len(train_set) == 160
    assert value(probe.texts["end"], "dgdn_batch_processing_seconds_count") == 20

    # A second Trainer on the same port serves its own figures, not the first one's.
    second = MonitoringCallback(port=callback.port, addr="127.0.0.1")
    probe = ScrapeAt(second)
    small, _, small_set, _ = graph_loaders(num_graphs=24)
    quiet_trainer(max_epochs=1, callbacks=[second, probe], limit_val_batches=0).fit(GraphClassifier(), small)
    assert value(probe.texts["end"], "dgdn_samples_processed_total") == len(small_set) == 18
    assert value(probe.texts["end"], "dgdn_training_info", run_id=second.run_id) == 1
