"""Tests of :class:`dgdn_lightning_monitor.gpu.GPUMonitor` on CPU, with the NVML stand-in ``fake_pynvml``."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import fake_pynvml
from conftest import require_tool
from dgdn_lightning_monitor import gpu as gpu_module
from dgdn_lightning_monitor.gpu import LOGGER_NAME, THREAD_NAME, GPUMonitor
from fake_pynvml import FakeDevice, FakeNVML

LABELS = {"rank": "0", "local_rank": "0", "node_rank": "0", "world_size": "1"}
NVML_FAMILIES = (
    "dgdn_gpu_utilization_ratio",
    "dgdn_gpu_memory_used_bytes",
    "dgdn_gpu_memory_total_bytes",
    "dgdn_gpu_temperature_celsius",
    "dgdn_gpu_power_watts",
)
ALLOCATOR_FAMILIES = (
    "dgdn_gpu_memory_allocated_bytes",
    "dgdn_gpu_memory_reserved_bytes",
    "dgdn_gpu_max_memory_allocated_bytes",
)
UP = "dgdn_gpu_monitoring_up"


# ----------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _no_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def make_monitor() -> Iterator[Callable[..., GPUMonitor]]:
    """Build monitors that are stopped at the end of the test whatever happens."""
    created: list[GPUMonitor] = []

    def make(**kwargs: Any) -> GPUMonitor:
        kwargs.setdefault("poll_interval_s", 0.02)
        monitor = GPUMonitor(**kwargs)
        created.append(monitor)
        return monitor

    yield make
    for monitor in created:
        monitor.stop()


@pytest.fixture
def gpu_warnings(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The warning messages logged on the GPU monitor's logger so far."""
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    return lambda: [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME and r.levelno >= logging.WARNING]


@pytest.fixture
def fake_allocator(monkeypatch: pytest.MonkeyPatch) -> dict[int, dict[str, int]]:
    """Pretend CUDA is initialised with allocator statistics from the returned dict (device -> stats)."""
    stats: dict[int, dict[str, int]] = {}

    def memory_stats(device: int) -> dict[str, int]:
        return stats.get(device, {})

    def no_properties(device: int) -> Any:
        raise RuntimeError("no CUDA device properties in this test")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_stats", memory_stats)
    monkeypatch.setattr(torch.cuda, "get_device_properties", no_properties)
    return stats


def exposition(monitor: GPUMonitor) -> str:
    registry = CollectorRegistry()
    registry.register(monitor)
    return generate_latest(registry).decode()


def scrape(monitor: GPUMonitor) -> dict[str, list[Any]]:
    """Family name -> parsed samples, through a registry and the text exposition format."""
    return {family.name: family.samples for family in text_string_to_metric_families(exposition(monitor))}


def by_gpu(samples: list[Any]) -> dict[str, float]:
    return {sample.labels["gpu"]: sample.value for sample in samples}


def up_value(monitor: GPUMonitor) -> float | None:
    samples = scrape(monitor).get(UP)
    return None if not samples else samples[0].value


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.005)
    raise AssertionError("condition not met in time")


def wait_rounds(nvml: FakeNVML, rounds: int = 3) -> None:
    """Wait until the sampler made ``rounds`` more sampling rounds (counted by temperature queries)."""
    start = len(nvml.calls_to("nvmlDeviceGetTemperature"))
    wait_until(lambda: len(nvml.calls_to("nvmlDeviceGetTemperature")) >= start + rounds)


def sampler_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


def two_gpus() -> FakeNVML:
    return FakeNVML(
        [
            FakeDevice(
                uuid="GPU-11111111-2222-3333-4444-555555555555",
                name="NVIDIA H100 80GB HBM3",
                utilization=42,
                memory_used=3 * 1024**3,
                memory_total=80 * 1024**3,
                temperature=51,
                power_mw=123_456,
            ),
            FakeDevice(
                uuid="GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
                name="NVIDIA A100-SXM4-40GB",
                utilization=100,
                memory_used=0,
                memory_total=40 * 1024**3,
                temperature=30,
                power_mw=60_000,
            ),
        ]
    )


# ----------------------------------------------------------------------------------------- values
def test_nvml_values_are_exported_exactly(make_monitor: Callable[..., GPUMonitor]) -> None:
    nvml = two_gpus()
    monitor = make_monitor(devices=[0, 1], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    families = scrape(monitor)

    assert [s.value for s in families[UP]] == [1.0]
    assert families[UP][0].labels == LABELS
    assert by_gpu(families["dgdn_gpu_utilization_ratio"]) == {"0": 0.42, "1": 1.0}
    assert by_gpu(families["dgdn_gpu_memory_used_bytes"]) == {"0": 3 * 1024**3, "1": 0.0}
    assert by_gpu(families["dgdn_gpu_memory_total_bytes"]) == {"0": 80 * 1024**3, "1": 40 * 1024**3}
    assert by_gpu(families["dgdn_gpu_temperature_celsius"]) == {"0": 51.0, "1": 30.0}
    assert by_gpu(families["dgdn_gpu_power_watts"]) == {"0": 123.456, "1": 60.0}
    first = families["dgdn_gpu_power_watts"][0].labels
    assert first == {
        **LABELS,
        "gpu": "0",
        "uuid": "GPU-11111111-2222-3333-4444-555555555555",
        "name": "NVIDIA H100 80GB HBM3",
    }
    assert not any(name in families for name in ALLOCATOR_FAMILIES)  # CUDA is not initialised here


def test_label_names_keep_a_stable_order(make_monitor: Callable[..., GPUMonitor], fake_allocator: dict) -> None:
    fake_allocator[0] = {
        "allocated_bytes.all.current": 1,
        "reserved_bytes.all.current": 2,
        "allocated_bytes.all.peak": 3,
    }
    labels = {"world_size": "2", "rank": "1", "node_rank": "0", "local_rank": "1"}  # not alphabetical on purpose
    monitor = make_monitor(devices="auto", nvml=FakeNVML(1))
    monitor.start(cuda_devices=[0], labels=labels)
    families = {family.name: family for family in monitor.collect()}
    assert set(families) == {UP, *NVML_FAMILIES, *ALLOCATOR_FAMILIES}
    assert list(families[UP].samples[0].labels) == list(labels)
    for name in NVML_FAMILIES:
        assert list(families[name].samples[0].labels) == [*labels, "gpu", "uuid", "name"]
    for name in ALLOCATOR_FAMILIES:
        assert list(families[name].samples[0].labels) == [*labels, "gpu"]


def test_values_follow_the_device_at_the_next_poll(make_monitor: Callable[..., GPUMonitor]) -> None:
    nvml = two_gpus()
    monitor = make_monitor(devices=[0], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    nvml.set_values(0, utilization=7, temperature=88)
    wait_until(lambda: by_gpu(scrape(monitor)["dgdn_gpu_utilization_ratio"]) == {"0": 0.07})
    assert by_gpu(scrape(monitor)["dgdn_gpu_temperature_celsius"]) == {"0": 88.0}


def test_unsupported_figure_is_left_out_quietly(
    make_monitor: Callable[..., GPUMonitor], gpu_warnings: Callable
) -> None:
    nvml = FakeNVML([FakeDevice(power_mw=None), FakeDevice(power_mw=5_000)])
    monitor = make_monitor(devices=[0, 1], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    wait_rounds(nvml)
    families = scrape(monitor)
    assert by_gpu(families["dgdn_gpu_power_watts"]) == {"1": 5.0}
    assert set(by_gpu(families["dgdn_gpu_temperature_celsius"])) == {"0", "1"}
    assert families[UP][0].value == 1.0
    assert gpu_warnings() == []
    power_calls_gpu0 = [c for c in nvml.calls_to("nvmlDeviceGetPowerUsage") if c.args[0].index == 0]
    assert len(power_calls_gpu0) == 1  # not asked again once NVML said "not supported"


def test_handles_are_looked_up_once(make_monitor: Callable[..., GPUMonitor]) -> None:
    nvml = two_gpus()
    monitor = make_monitor(devices=[0, 1], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    wait_rounds(nvml, 5)
    assert len(nvml.calls_to("nvmlDeviceGetHandleByIndex")) == 2
    assert len(nvml.calls_to("nvmlDeviceGetUUID")) == 2
    assert len(nvml.calls_to("nvmlDeviceGetName")) == 2
    assert len(nvml.calls_to("nvmlInit")) == 1


def test_register_and_describe_do_not_sample(make_monitor: Callable[..., GPUMonitor]) -> None:
    nvml = FakeNVML(1)
    monitor = make_monitor(devices=[0], nvml=nvml)
    assert {family.name for family in monitor.describe()} == {f"dgdn_{suffix}" for suffix in gpu_module._HELP}
    assert all(not family.samples for family in monitor.describe())
    CollectorRegistry().register(monitor)
    assert nvml.calls == []
    assert list(monitor.collect()) == []  # not started


def test_promtool_accepts_the_exposition(make_monitor: Callable[..., GPUMonitor], fake_allocator: dict) -> None:
    promtool = require_tool("promtool")
    fake_allocator[0] = {
        "allocated_bytes.all.current": 10,
        "reserved_bytes.all.current": 20,
        "allocated_bytes.all.peak": 15,
    }
    fake_allocator[1] = {
        "allocated_bytes.all.current": 0,
        "reserved_bytes.all.current": 0,
        "allocated_bytes.all.peak": 0,
    }
    nvml = two_gpus()
    nvml.set_values(1, power_mw=None)
    monitor = make_monitor(devices="auto", nvml=nvml)
    monitor.start(cuda_devices=[0, 1], labels=LABELS)
    text = exposition(monitor)
    assert all(name in text for name in (UP, *NVML_FAMILIES, *ALLOCATOR_FAMILIES))
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


# ----------------------------------------------------------------------------------------- threads
def test_no_nvml_call_from_the_training_thread(make_monitor: Callable[..., GPUMonitor]) -> None:
    nvml = two_gpus()
    monitor = make_monitor(devices=[0, 1], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    for _ in range(20):
        scrape(monitor)
    wait_rounds(nvml)
    monitor.stop()
    assert nvml.calls, "the sampler made no call at all"
    assert threading.get_ident() not in nvml.call_threads()
    assert {call.thread_name for call in nvml.calls} == {THREAD_NAME}
    assert nvml.calls[0].function == "nvmlInit"


def test_collect_only_reads_the_last_sample(make_monitor: Callable[..., GPUMonitor]) -> None:
    nvml = two_gpus()
    monitor = make_monitor(devices=[0, 1], nvml=nvml, poll_interval_s=60)
    monitor.start(cuda_devices=[], labels=LABELS)  # returns after the first round
    calls = len(nvml.calls)
    for _ in range(10):
        assert by_gpu(scrape(monitor)["dgdn_gpu_utilization_ratio"]) == {"0": 0.42, "1": 1.0}
    assert len(nvml.calls) == calls


def test_one_sampler_thread_that_stops_promptly(make_monitor: Callable[..., GPUMonitor]) -> None:
    nvml = two_gpus()
    monitor = make_monitor(devices=[0, 1], nvml=nvml, poll_interval_s=60)
    monitor.start(cuda_devices=[], labels=LABELS)
    threads = sampler_threads()
    assert len(threads) == 1 and threads[0].daemon
    started = time.monotonic()
    monitor.stop()
    assert time.monotonic() - started < 1.0  # woken from its 60 s wait, not slept through
    assert not threads[0].is_alive()
    assert sampler_threads() == []
    assert nvml.calls[-1].function == "nvmlShutdown"
    assert not nvml.initialized and nvml.init_count == 1
    calls = len(nvml.calls)
    time.sleep(0.2)
    assert len(nvml.calls) == calls
    assert list(monitor.collect()) == []


def test_no_nvml_call_after_stop_while_sampling_fast(make_monitor: Callable[..., GPUMonitor]) -> None:
    nvml = two_gpus()
    nvml.delay("nvmlDeviceGetMemoryInfo", 0.005)
    monitor = make_monitor(devices=[0, 1], nvml=nvml, poll_interval_s=0.001)
    for _ in range(5):
        monitor.start(cuda_devices=[], labels=LABELS)
        time.sleep(0.03)
        monitor.stop()
        calls = len(nvml.calls)
        assert nvml.calls[-1].function == "nvmlShutdown"
        assert not nvml.initialized
        time.sleep(0.05)
        assert len(nvml.calls) == calls
    assert not any(call.function == "nvmlDeviceGetCount" for call in nvml.calls)
    assert nvml.init_count == 5


def test_stop_is_idempotent_and_safe_without_start(make_monitor: Callable[..., GPUMonitor]) -> None:
    nvml = FakeNVML(1)
    monitor = make_monitor(devices=[0], nvml=nvml)
    monitor.stop()
    monitor.start(cuda_devices=[], labels=LABELS)
    monitor.stop()
    monitor.stop()
    assert [c.function for c in nvml.calls].count("nvmlShutdown") == 1
    assert not monitor.running


def test_second_run_after_stop(make_monitor: Callable[..., GPUMonitor]) -> None:
    nvml = two_gpus()
    monitor = make_monitor(devices=[0], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    assert up_value(monitor) == 1.0
    monitor.stop()
    nvml.set_values(0, utilization=5)
    monitor.start(cuda_devices=[], labels={**LABELS, "rank": "3"})
    families = scrape(monitor)
    assert by_gpu(families["dgdn_gpu_utilization_ratio"]) == {"0": 0.05}
    assert families[UP][0].labels["rank"] == "3"
    monitor.stop()
    assert nvml.init_count == 2 and not nvml.initialized
    assert sampler_threads() == []


def test_start_while_running_replaces_the_run(make_monitor: Callable[..., GPUMonitor]) -> None:
    nvml = two_gpus()
    monitor = make_monitor(devices=[0], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    monitor.start(cuda_devices=[], labels=LABELS)
    assert len(sampler_threads()) == 1
    monitor.stop()
    assert nvml.init_count == 2 and not nvml.initialized


def test_stop_does_not_hang_on_a_hanging_nvml_call(
    make_monitor: Callable[..., GPUMonitor], gpu_warnings: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(GPUMonitor, "STOP_TIMEOUT_S", 0.1)
    nvml = two_gpus()
    monitor = make_monitor(devices=[0], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    nvml.delay("nvmlDeviceGetUtilizationRates", 0.8)
    calls = len(nvml.calls)
    wait_until(lambda: any(c.function == "nvmlDeviceGetUtilizationRates" for c in nvml.calls[calls:]))
    thread = sampler_threads()[0]
    started = time.monotonic()
    monitor.stop()
    assert time.monotonic() - started < 0.5
    assert any("did not finish" in message for message in gpu_warnings())
    thread.join(5)
    assert not thread.is_alive()
    hanging = max(i for i, c in enumerate(nvml.calls) if c.function == "nvmlDeviceGetUtilizationRates")
    assert [c.function for c in nvml.calls[hanging + 1 :]] == ["nvmlShutdown"]  # it made no further query
    assert not nvml.initialized


# ----------------------------------------------------------------------------------------- failures
def test_gpu_lost_mid_run(make_monitor: Callable[..., GPUMonitor], gpu_warnings: Callable) -> None:
    nvml = two_gpus()
    monitor = make_monitor(devices=[0, 1], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    assert up_value(monitor) == 1.0

    nvml.lose(1)
    wait_until(lambda: up_value(monitor) == 0.0)
    wait_rounds(nvml, 5)
    families = scrape(monitor)
    for name in NVML_FAMILIES:
        assert set(by_gpu(families[name])) == {"0"}, name  # the lost GPU's series disappear, GPU 0 goes on
    nvml.set_values(0, utilization=9)
    wait_until(lambda: by_gpu(scrape(monitor)["dgdn_gpu_utilization_ratio"]) == {"0": 0.09})
    messages = gpu_warnings()
    assert len(messages) == 1 and "GPU 1" in messages[0] and "GpuIsLost" in messages[0]

    nvml.lose(1, False)  # sampling works again: up returns to 1 and GPU 1 is back
    wait_until(lambda: up_value(monitor) == 1.0)
    wait_until(lambda: set(by_gpu(scrape(monitor)["dgdn_gpu_power_watts"])) == {"0", "1"})
    assert len(gpu_warnings()) == 1


def test_injected_error_in_one_query(make_monitor: Callable[..., GPUMonitor], gpu_warnings: Callable) -> None:
    nvml = two_gpus()
    monitor = make_monitor(devices=[0, 1], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    nvml.fail("nvmlDeviceGetTemperature", fake_pynvml.NVMLError_Unknown(), device=0)
    wait_until(lambda: up_value(monitor) == 0.0)
    wait_rounds(nvml, 3)
    assert set(by_gpu(scrape(monitor)["dgdn_gpu_memory_used_bytes"])) == {"1"}
    nvml.fail("nvmlDeviceGetMemoryInfo", fake_pynvml.NVMLError_Timeout(), device=1)
    wait_until(lambda: "dgdn_gpu_memory_used_bytes" not in scrape(monitor))
    assert scrape(monitor)[UP][0].value == 0.0
    assert len(gpu_warnings()) == 1  # one warning per failure kind


def test_unexpected_exception_in_the_sampler_is_contained(
    make_monitor: Callable[..., GPUMonitor], gpu_warnings: Callable
) -> None:
    nvml = two_gpus()
    monitor = make_monitor(devices=[0], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    nvml.set_values(0, memory_used="not a number")  # a malformed answer: float() raises ValueError
    wait_until(lambda: up_value(monitor) == 0.0)
    assert len(sampler_threads()) == 1
    assert len(gpu_warnings()) == 1


@pytest.mark.parametrize(
    ("nvml", "expected"),
    [
        (lambda: FakeNVML(1, library_missing=True), "NVML library was not found"),
        (lambda: FakeNVML(1, init_error=fake_pynvml.NVMLError_DriverNotLoaded()), "nvmlInit failed"),
        (lambda: FakeNVML(1, init_error=fake_pynvml.NVMLError_Unknown()), "nvmlInit failed"),
    ],
    ids=["library-missing", "driver-not-loaded", "unknown"],
)
def test_init_failure(
    make_monitor: Callable[..., GPUMonitor], gpu_warnings: Callable, nvml: Callable[[], FakeNVML], expected: str
) -> None:
    fake = nvml()
    monitor = make_monitor(devices=[0], nvml=fake)
    monitor.start(cuda_devices=[0], labels=LABELS)
    wait_until(lambda: sampler_threads() == [])  # the thread gave up on its own
    families = scrape(monitor)
    assert list(families) == [UP] and families[UP][0].value == 0.0
    assert [c.function for c in fake.calls] == ["nvmlInit"]  # no shutdown without a successful init
    messages = gpu_warnings()
    assert len(messages) == 1 and expected in messages[0]
    monitor.stop()
    monitor.start(cuda_devices=[0], labels=LABELS)  # a second run warns no more
    assert up_value(monitor) == 0.0
    assert len(gpu_warnings()) == 1


def test_pynvml_not_installed(
    make_monitor: Callable[..., GPUMonitor], gpu_warnings: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    monitor = make_monitor(devices=[0])
    monitor.start(cuda_devices=[0], labels=LABELS)
    assert up_value(monitor) == 0.0
    assert sampler_threads() == []
    messages = gpu_warnings()
    assert len(messages) == 1 and "pynvml" in messages[0]
    monitor.stop()
    assert list(monitor.collect()) == []


def test_real_pynvml_without_a_driver(make_monitor: Callable[..., GPUMonitor], gpu_warnings: Callable) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        pass
    except pynvml.NVMLError:
        pytest.skip("NVML is installed but does not initialise here")
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    monitor = make_monitor(devices=[0])  # imports the real pynvml in start()
    monitor.start(cuda_devices=[0], labels=LABELS)
    wait_until(lambda: sampler_threads() == [])
    assert up_value(monitor) == 0.0
    messages = gpu_warnings()
    assert len(messages) == 1 and "NVML library was not found" in messages[0]


def test_missing_gpu_is_reported_once(make_monitor: Callable[..., GPUMonitor], gpu_warnings: Callable) -> None:
    nvml = two_gpus()
    monitor = make_monitor(devices=[0, 5], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    wait_rounds(nvml, 3)
    families = scrape(monitor)
    assert families[UP][0].value == 0.0
    assert set(by_gpu(families["dgdn_gpu_utilization_ratio"])) == {"0"}
    messages = gpu_warnings()
    assert len(messages) == 1 and "cannot find GPU 5" in messages[0]


# ----------------------------------------------------------------------------------------- devices
def test_auto_on_cpu_does_nothing(make_monitor: Callable[..., GPUMonitor]) -> None:
    nvml = FakeNVML(2)
    monitor = make_monitor(devices="auto", nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    assert nvml.calls == []
    assert sampler_threads() == []
    assert list(monitor.collect()) == []
    assert not monitor.running


@pytest.mark.parametrize("devices", [None, []])
def test_disabled_monitoring_does_nothing(
    make_monitor: Callable[..., GPUMonitor], fake_allocator: dict, devices: Any
) -> None:
    fake_allocator[0] = {"allocated_bytes.all.current": 1}
    nvml = FakeNVML(2)
    monitor = make_monitor(devices=devices, nvml=nvml)
    assert monitor.devices is None
    monitor.start(cuda_devices=[0], labels=LABELS)
    assert nvml.calls == [] and sampler_threads() == []
    assert list(monitor.collect()) == []


def test_auto_watches_the_cuda_devices_of_the_rank(make_monitor: Callable[..., GPUMonitor]) -> None:
    nvml = two_gpus()
    monitor = make_monitor(nvml=nvml)  # devices="auto" is the default
    monitor.start(cuda_devices=[1], labels=LABELS)
    families = scrape(monitor)
    assert by_gpu(families["dgdn_gpu_utilization_ratio"]) == {"1": 1.0}
    assert families["dgdn_gpu_utilization_ratio"][0].labels["uuid"] == nvml.devices[1].uuid


def test_explicit_devices_on_cpu_do_not_initialise_cuda(
    make_monitor: Callable[..., GPUMonitor], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: asked.append(device))
    nvml = two_gpus()
    monitor = make_monitor(devices=[1, 0], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    assert asked == []  # CUDA is not initialised in this process, so PyTorch is not asked
    assert by_gpu(scrape(monitor)["dgdn_gpu_temperature_celsius"]) == {"1": 30.0, "0": 51.0}


class _TorchUUID:
    """Looks like PyTorch's ``_CUuuid``: str() gives the dashed hex UUID without a prefix."""

    def __init__(self, text: str) -> None:
        self._text = text

    def __str__(self) -> str:
        return self._text


def _cuda_with(monkeypatch: pytest.MonkeyPatch, properties: dict[int, Any]) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties[device])


def test_cuda_index_is_mapped_to_nvml_by_uuid(
    make_monitor: Callable[..., GPUMonitor], monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = two_gpus()
    # CUDA device 0 is NVML device 1 (as with CUDA_VISIBLE_DEVICES=1,0) and vice versa.
    _cuda_with(
        monkeypatch,
        {
            0: SimpleNamespace(uuid=_TorchUUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")),
            1: SimpleNamespace(uuid=_TorchUUID("11111111222233334444555555555555")),  # no dashes works too
        },
    )
    monitor = make_monitor(nvml=nvml)
    monitor.start(cuda_devices=[0, 1], labels=LABELS)
    samples = scrape(monitor)["dgdn_gpu_power_watts"]
    assert {s.labels["gpu"]: (s.labels["uuid"], s.value) for s in samples} == {
        "0": ("GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", 60.0),
        "1": ("GPU-11111111-2222-3333-4444-555555555555", 123.456),
    }
    assert nvml.calls_to("nvmlDeviceGetHandleByIndex") == []


def test_mig_uuid_and_pci_fallback(make_monitor: Callable[..., GPUMonitor], monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNVML(
        [
            FakeDevice(uuid="GPU-00000000-0000-0000-0000-000000000001", pci_bus_id="00000000:3B:00.0", temperature=60),
            FakeDevice(uuid="MIG-12345678-9abc-def0-1234-56789abcdef0", temperature=70),
        ]
    )
    _cuda_with(
        monkeypatch,
        {
            # No UUID known to PyTorch: found by PCI bus id.
            0: SimpleNamespace(uuid=None, pci_bus_id=0x3B, pci_device_id=0, pci_domain_id=0),
            # A MIG instance: found as MIG-<uuid> after GPU-<uuid> failed.
            1: SimpleNamespace(uuid=_TorchUUID("12345678-9abc-def0-1234-56789abcdef0")),
        },
    )
    monitor = make_monitor(nvml=nvml)
    monitor.start(cuda_devices=[0, 1], labels=LABELS)
    assert by_gpu(scrape(monitor)["dgdn_gpu_temperature_celsius"]) == {"0": 60.0, "1": 70.0}


def test_known_identity_is_not_replaced_by_an_index_guess(
    make_monitor: Callable[..., GPUMonitor], monkeypatch: pytest.MonkeyPatch, gpu_warnings: Callable
) -> None:
    nvml = two_gpus()
    _cuda_with(monkeypatch, {0: SimpleNamespace(uuid=_TorchUUID("99999999-9999-9999-9999-999999999999"))})
    monitor = make_monitor(nvml=nvml)
    monitor.start(cuda_devices=[0], labels=LABELS)
    families = scrape(monitor)
    assert families[UP][0].value == 0.0
    assert not any(name in families for name in NVML_FAMILIES)
    assert nvml.calls_to("nvmlDeviceGetHandleByIndex") == []
    assert len(gpu_warnings()) == 1


@pytest.mark.parametrize(
    ("visible", "cuda_index", "nvml_index"),
    [
        ("1,0", 0, 1),
        ("1,0", 1, 0),
        ("GPU-11111111-2222-3333-4444-555555555555", 0, 0),
        ("GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee,0", 0, 1),
    ],
)
def test_cuda_visible_devices_when_torch_cannot_tell(
    make_monitor: Callable[..., GPUMonitor],
    monkeypatch: pytest.MonkeyPatch,
    visible: str,
    cuda_index: int,
    nvml_index: int,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    nvml = two_gpus()
    monitor = make_monitor(devices=[cuda_index], nvml=nvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    samples = scrape(monitor)["dgdn_gpu_utilization_ratio"]
    assert [(s.labels["gpu"], s.labels["uuid"]) for s in samples] == [(str(cuda_index), nvml.devices[nvml_index].uuid)]


# ----------------------------------------------------------------------------------------- allocator
def test_allocator_figures_are_read_at_scrape_time(
    make_monitor: Callable[..., GPUMonitor], fake_allocator: dict
) -> None:
    fake_allocator[0] = {
        "allocated_bytes.all.current": 1000,
        "reserved_bytes.all.current": 4096,
        "allocated_bytes.all.peak": 3000,
    }
    fake_allocator[1] = {
        "allocated_bytes.all.current": 7,
        "reserved_bytes.all.current": 8,
        "allocated_bytes.all.peak": 9,
    }
    nvml = two_gpus()
    monitor = make_monitor(nvml=nvml, poll_interval_s=60)
    monitor.start(cuda_devices=[0, 1], labels=LABELS)
    families = scrape(monitor)
    assert by_gpu(families["dgdn_gpu_memory_allocated_bytes"]) == {"0": 1000.0, "1": 7.0}
    assert by_gpu(families["dgdn_gpu_memory_reserved_bytes"]) == {"0": 4096.0, "1": 8.0}
    assert by_gpu(families["dgdn_gpu_max_memory_allocated_bytes"]) == {"0": 3000.0, "1": 9.0}
    assert families["dgdn_gpu_memory_allocated_bytes"][0].labels == {**LABELS, "gpu": "0"}
    fake_allocator[0]["allocated_bytes.all.current"] = 2000  # no poll needed: read when scraped
    assert by_gpu(scrape(monitor)["dgdn_gpu_memory_allocated_bytes"]) == {"0": 2000.0, "1": 7.0}


def test_allocator_figures_do_not_need_nvml(
    make_monitor: Callable[..., GPUMonitor], fake_allocator: dict, gpu_warnings: Callable
) -> None:
    fake_allocator[0] = {
        "allocated_bytes.all.current": 1,
        "reserved_bytes.all.current": 2,
        "allocated_bytes.all.peak": 3,
    }
    monitor = make_monitor(nvml=FakeNVML(1, library_missing=True))
    monitor.start(cuda_devices=[0], labels=LABELS)
    families = scrape(monitor)
    assert families[UP][0].value == 0.0
    assert by_gpu(families["dgdn_gpu_memory_reserved_bytes"]) == {"0": 2.0}


def test_no_allocator_series_without_cuda(make_monitor: Callable[..., GPUMonitor], gpu_warnings: Callable) -> None:
    assert not torch.cuda.is_initialized()
    monitor = make_monitor(nvml=FakeNVML(1))
    monitor.start(cuda_devices=[0], labels=LABELS)
    families = scrape(monitor)
    assert not any(name in families for name in ALLOCATOR_FAMILIES)
    assert families[UP][0].value == 1.0
    assert gpu_warnings() == []


def test_allocator_error_is_contained(
    make_monitor: Callable[..., GPUMonitor],
    fake_allocator: dict,
    gpu_warnings: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(device: int) -> dict:
        raise RuntimeError("allocator statistics unavailable")

    monkeypatch.setattr(torch.cuda, "memory_stats", broken)
    monitor = make_monitor(nvml=FakeNVML(1))
    monitor.start(cuda_devices=[0], labels=LABELS)
    for _ in range(3):
        families = scrape(monitor)
        assert not any(name in families for name in ALLOCATOR_FAMILIES)
        assert "dgdn_gpu_utilization_ratio" in families
    messages = gpu_warnings()
    assert len(messages) == 1 and "allocator" in messages[0]


def test_module_itself_works_as_the_stand_in(make_monitor: Callable[..., GPUMonitor]) -> None:
    default = fake_pynvml.reset([FakeDevice(temperature=77)])
    monitor = make_monitor(devices=[0], nvml=fake_pynvml)
    monitor.start(cuda_devices=[], labels=LABELS)
    assert by_gpu(scrape(monitor)["dgdn_gpu_temperature_celsius"]) == {"0": 77.0}
    monitor.stop()
    assert default.calls[-1].function == "nvmlShutdown"


def test_namespace_prefixes_every_name(make_monitor: Callable[..., GPUMonitor]) -> None:
    monitor = make_monitor(namespace="gnn_train", devices=[0], nvml=FakeNVML(1))
    monitor.start(cuda_devices=[], labels={})
    names = set(scrape(monitor))
    assert names == {name.replace("dgdn_", "gnn_train_", 1) for name in (UP, *NVML_FAMILIES)}


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("interval", [0, -1, 0.0, float("nan"), float("inf"), "5", None, True, [5]])
def test_bad_poll_interval(interval: Any) -> None:
    with pytest.raises(ValueError, match="gpu_poll_interval_s"):
        GPUMonitor(poll_interval_s=interval, nvml=FakeNVML(1))


@pytest.mark.parametrize("interval", [1, 0.25, 5.0])
def test_good_poll_interval(interval: float) -> None:
    assert GPUMonitor(poll_interval_s=interval).poll_interval_s == float(interval)


@pytest.mark.parametrize("devices", ["all", "0", 0, 1.5, [-1], [0.0], [True], ["0"], [0, 0], [None], {0: 1}])
def test_bad_devices(devices: Any) -> None:
    with pytest.raises(ValueError, match="gpu_devices"):
        GPUMonitor(devices=devices, nvml=FakeNVML(1))


def test_good_devices() -> None:
    assert GPUMonitor(devices=[2, 0]).devices == (2, 0)
    assert GPUMonitor(devices=(1,)).devices == (1,)
    assert GPUMonitor().devices == "auto"


@pytest.mark.parametrize("namespace", ["", "1abc", "a-b", "a b", None, "a:b"])
def test_bad_namespace(namespace: Any) -> None:
    with pytest.raises(ValueError, match="namespace"):
        GPUMonitor(namespace=namespace)


def test_bad_nvml_module() -> None:
    with pytest.raises(ValueError, match="nvml"):
        GPUMonitor(nvml=SimpleNamespace())


@pytest.mark.parametrize(
    ("cuda_devices", "labels", "argument"),
    [
        ([-1], LABELS, "cuda_devices"),
        ("0", LABELS, "cuda_devices"),
        ([0, 0], LABELS, "cuda_devices"),
        ([0], {"gpu": "0"}, "labels"),
        ([0], {"uuid": "x"}, "labels"),
        ([0], {"bad-name": "x"}, "labels"),
        ([0], {"__reserved": "x"}, "labels"),
        ([0], [("rank", "0")], "labels"),
    ],
)
def test_bad_start_arguments(cuda_devices: Any, labels: Any, argument: str) -> None:
    nvml = FakeNVML(1)
    monitor = GPUMonitor(nvml=nvml)
    with pytest.raises(ValueError, match=argument):
        monitor.start(cuda_devices=cuda_devices, labels=labels)
    assert nvml.calls == [] and not monitor.running


def test_docstring_examples() -> None:
    import doctest

    for module in (gpu_module, fake_pynvml):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_pickled_monitor_keeps_its_configuration_only(make_monitor: Callable[..., GPUMonitor]) -> None:
    import pickle

    monitor = make_monitor(namespace="x", devices=[1, 0], poll_interval_s=0.5)
    copy = pickle.loads(pickle.dumps(monitor))
    assert (copy.devices, copy.poll_interval_s, copy.running) == ((1, 0), 0.5, False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "pynvml", None)
        copy.start(cuda_devices=[], labels={})  # works on its own lock and run
        assert [family.name for family in copy.collect()] == ["x_gpu_monitoring_up"]
        copy.stop()
