"""The collectors behind ``/metrics``: every family answers a ``name[]`` filtered scrape, and a scrape reads
consistent values while the training thread adds keys."""

from __future__ import annotations

import sys
import threading
import time
import urllib.parse

import lightning.pytorch as pl
from fake_pynvml import FakeDevice, FakeNVML
from prometheus_client import CollectorRegistry, generate_latest

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.gpu import GPUMonitor
from dgdn_lightning_monitor.guards import ERROR_PARTS
from dgdn_lightning_monitor.metrics import TrainingMetrics
from dgdn_lightning_monitor.server import MetricsServer
from exposition import samples, scrape, value
from lit_models import GraphClassifier, graph_loaders, quiet_trainer


def filtered(url: str, names: list[str]) -> str:
    return scrape(url + "?" + urllib.parse.urlencode([("name[]", name) for name in names]))


def test_name_filter_answers_for_the_families_of_every_collector():
    train, val, train_set, _ = graph_loaders()
    callback = MonitoringCallback(port=0, addr="127.0.0.1")
    pages = {}

    class Probe(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            pages["one"] = filtered(callback.metrics_url, ["dgdn_samples_processed_total"])
            pages["two"] = filtered(callback.metrics_url, ["dgdn_training_info", "dgdn_batch_processing_seconds_count"])
            pages["errors"] = filtered(callback.metrics_url, ["dgdn_monitor_errors_total"])

    quiet_trainer(max_epochs=1, callbacks=[callback, Probe()]).fit(GraphClassifier(), train, val)
    assert set(samples(pages["one"])) == {"dgdn_samples_processed_total"}
    assert value(pages["one"], "dgdn_samples_processed_total") == len(train_set)
    assert set(samples(pages["two"])) == {"dgdn_training_info", "dgdn_batch_processing_seconds_count"}
    assert [labels["part"] for labels, _ in samples(pages["errors"])["dgdn_monitor_errors_total"]] == list(ERROR_PARTS)

    nvml = FakeNVML([FakeDevice(utilization=42)])
    monitor = GPUMonitor("dgdn", devices=[0], poll_interval_s=0.05, nvml=nvml)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(monitor)
    monitor.start([], {"rank": "0"})
    server = MetricsServer(registry, "127.0.0.1", 0)
    server.start()
    try:
        page = filtered(str(server.url), ["dgdn_gpu_utilization_ratio", "dgdn_gpu_monitoring_up"])
    finally:
        server.stop()
        monitor.stop()
    assert set(samples(page)) == {"dgdn_gpu_utilization_ratio", "dgdn_gpu_monitoring_up"}
    assert value(page, "dgdn_gpu_monitoring_up") == 1.0
    assert value(page, "dgdn_gpu_utilization_ratio", gpu="0") == 0.42


def test_scrapes_while_the_training_thread_adds_keys():
    metrics = TrainingMetrics("dgdn")
    registry = CollectorRegistry(auto_describe=True)
    registry.register(metrics)
    errors: list[BaseException] = []
    done = threading.Event()
    pages = [0]

    def scrape_loop() -> None:
        while not done.is_set():
            try:
                generate_latest(registry)
                pages[0] += 1
            except BaseException as error:  # noqa: BLE001 - any failure of a scrape is what the test looks for
                errors.append(error)
                return

    scraper = threading.Thread(target=scrape_loop)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a race shows within the run
    scraper.start()
    try:
        for i in range(2000):  # many loaders and stages, each first seen while a scrape may iterate
            metrics.set_logged("validation_loss", float(i), dataloader=str(i))
            metrics.set_logged("validation_loss", float(i) + 0.5, dataloader=str(i))
            if i % 20 == 0:
                metrics.observe_inference(f"stage{i}", 0.01, 2)
            time.sleep(0.0002)  # a training step between two new keys
    finally:
        done.set()
        scraper.join()
        sys.setswitchinterval(interval)
    assert not errors and pages[0] > 0
    text = generate_latest(registry).decode()
    assert value(text, "dgdn_validation_loss", dataloader="1999") == 1999.5
    assert value(text, "dgdn_inference_time_seconds_count", stage="stage1980") == 1
