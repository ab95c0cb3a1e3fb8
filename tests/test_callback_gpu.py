"""The callback with GPU monitoring on, in a real CPU Trainer run, NVML played by the stand-in module."""

from __future__ import annotations

import sys
import threading

import lightning.pytorch as pl
import pytest

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.gpu import THREAD_NAME
from exposition import scrape, value
from fake_pynvml import FakeDevice, FakeNVML
from lit_models import GraphClassifier, graph_loaders, quiet_trainer


@pytest.fixture
def fake_nvml(monkeypatch):
    nvml = FakeNVML([FakeDevice(uuid="GPU-11111111-2222-3333-4444-555555555555", name="NVIDIA H100 80GB HBM3",
                                utilization=37, memory_used=5 << 30, memory_total=80 << 30, temperature=48,
                                power_mw=250_500)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # the monitor imports pynvml when a run starts
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return nvml


def test_watched_gpu_figures_are_served_during_training_and_the_sampler_stops_after(fake_nvml):
    callback = MonitoringCallback(port=0, addr="127.0.0.1", gpu_devices=[0], gpu_poll_interval_s=0.05)
    texts: list[str] = []
    training_thread = threading.get_ident()

    class ScrapeMidRun(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            texts.append(scrape(callback.metrics_url))

    train, val, *_ = graph_loaders()
    quiet_trainer(max_epochs=1, callbacks=[callback, ScrapeMidRun()]).fit(GraphClassifier(), train, val)

    text = texts[0]
    gpu = {"gpu": "0", "uuid": "GPU-11111111-2222-3333-4444-555555555555", "name": "NVIDIA H100 80GB HBM3",
           "rank": "0", "world_size": "1"}
    assert value(text, "dgdn_gpu_utilization_ratio", **gpu) == 0.37
    assert value(text, "dgdn_gpu_memory_used_bytes", **gpu) == 5 << 30
    assert value(text, "dgdn_gpu_memory_total_bytes", **gpu) == 80 << 30
    assert value(text, "dgdn_gpu_temperature_celsius", **gpu) == 48
    assert value(text, "dgdn_gpu_power_watts", **gpu) == 250.5
    assert value(text, "dgdn_gpu_monitoring_up", rank="0") == 1
    assert value(text, "dgdn_samples_processed_total") == 36
    # Every NVML call came from the sampler thread, none from training; the thread is gone after fit.
    assert fake_nvml.calls and all(call.thread_id != training_thread for call in fake_nvml.calls)
    assert not [t for t in threading.enumerate() if t.name == THREAD_NAME]
    assert fake_nvml.calls[-1].function == "nvmlShutdown"


def test_nvml_missing_degrades_to_up_zero_and_training_goes_on(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(library_missing=True))
    callback = MonitoringCallback(port=0, gpu_devices=[0], gpu_poll_interval_s=0.05)
    texts: list[str] = []

    class ScrapeMidRun(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            texts.append(scrape(callback.metrics_url))

    train, val, *_ = graph_loaders()
    with caplog.at_level("WARNING", logger="dgdn_lightning_monitor"):
        trainer = quiet_trainer(max_epochs=2, callbacks=[callback, ScrapeMidRun()])
        trainer.fit(GraphClassifier(), train, val)
    assert trainer.global_step == 10
    assert value(texts[-1], "dgdn_gpu_monitoring_up") == 0
    assert value(texts[-1], "dgdn_gpu_utilization_ratio") is None
    assert len([r for r in caplog.records if r.name.startswith("dgdn_lightning_monitor.gpu")]) == 1


def test_cpu_run_with_auto_devices_has_no_gpu_series(fake_nvml):
    callback = MonitoringCallback(port=0)  # gpu_devices="auto" and a CPU run: nothing to watch
    texts: list[str] = []

    class ScrapeMidRun(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            texts.append(scrape(callback.metrics_url))

    train, val, *_ = graph_loaders()
    quiet_trainer(max_epochs=1, callbacks=[callback, ScrapeMidRun()]).fit(GraphClassifier(), train, val)
    assert "dgdn_gpu_" not in texts[0]
    assert fake_nvml.calls == []
