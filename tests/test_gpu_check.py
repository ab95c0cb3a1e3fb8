"""Tests of ``scripts/gpu_check.py`` that run without a GPU: its exit on CPU and its verdict logic."""

from __future__ import annotations

import doctest
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from dgdn_lightning_monitor.gpu import GPUMonitor
from fake_pynvml import FakeDevice, FakeNVML

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
TOTAL = 80 * 1024**3
UUID = "11111111-2222-3333-4444-555555555555"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing must not run the check
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the script would run the real check")
def test_script_exits_2_with_a_message_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "CUDA is not available" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "cannot_run" and "CUDA" in summary["reason"]
    assert json.loads(out.read_text()) == summary


def test_script_help() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--poll-interval" in result.stdout


def test_script_doctests(gpu_check: ModuleType) -> None:
    result = doctest.testmod(gpu_check)
    assert result.attempted > 0 and result.failed == 0


def _exposition(monkeypatch: pytest.MonkeyPatch, nvml: FakeNVML, allocated: int = 5000) -> str:
    """What the callback would serve mid-epoch: GPU figures from the monitor with the NVML stand-in."""
    stats = {
        "allocated_bytes.all.current": allocated,
        "reserved_bytes.all.current": 8192,
        "allocated_bytes.all.peak": 6000,
    }
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: stats)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"uuid": UUID})())
    monitor = GPUMonitor(nvml=nvml, poll_interval_s=60)
    registry = CollectorRegistry()
    registry.register(monitor)
    try:
        monitor.start(cuda_devices=[0], labels={"rank": "0", "local_rank": "0", "node_rank": "0", "world_size": "1"})
        return generate_latest(registry).decode()
    finally:
        monitor.stop()


def _device(**overrides: Any) -> FakeDevice:
    values: dict[str, Any] = {
        "uuid": f"GPU-{UUID}",
        "utilization": 87,
        "memory_used": 3 * 1024**3,
        "memory_total": TOTAL,
        "temperature": 45,
        "power_mw": 250_000,
    }
    values.update(overrides)
    return FakeDevice(**values)


def test_plausible_figures_pass(gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _exposition(monkeypatch, FakeNVML([_device()]))
    seen, failures = gpu_check.evaluate_figures(
        gpu_check.gpu_figures(text), gpu="0", total_memory=int(TOTAL * 0.99), torch_uuid=UUID
    )
    assert failures == []
    assert seen["up"] == 1.0 and seen["gpu_power_watts"] == 250.0 and seen["gpu_memory_allocated_bytes"] == 5000.0


@pytest.mark.parametrize(
    ("device", "torch_uuid", "allocated", "expected"),
    [
        ({"memory_total": TOTAL // 2}, UUID, 5000, "total memory"),
        ({"uuid": "GPU-99999999-2222-3333-4444-555555555555"}, UUID, 5000, "not found"),
        ({}, "99999999-2222-3333-4444-555555555555", 5000, "uuid label"),
        ({"power_mw": None}, UUID, 5000, "gpu_power_watts missing"),
        ({"temperature": 0}, UUID, 5000, "gpu_temperature_celsius"),
        ({}, UUID, 0, "gpu_memory_allocated_bytes = 0.0"),
    ],
    ids=["memory-total", "gpu-not-found", "uuid-mismatch", "power-missing", "temperature", "allocator-zero"],
)
def test_implausible_figures_fail(
    gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch, device: dict, torch_uuid: str, allocated: int, expected: str
) -> None:
    text = _exposition(monkeypatch, FakeNVML([_device(**device)]), allocated)
    figures = gpu_check.gpu_figures(text)
    _, failures = gpu_check.evaluate_figures(figures, gpu="0", total_memory=TOTAL, torch_uuid=torch_uuid)
    if expected == "not found":  # the GPU could not be looked up: up is 0 and the NVML figures are missing
        assert "gpu_monitoring_up is 0.0, expected 1" in failures
        assert "gpu_utilization_ratio missing for gpu 0" in failures
    else:
        assert any(expected in failure for failure in failures), failures


def test_sync_counting(gpu_check: ModuleType) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert sum(gpu_check.sync_locations(caught).values()) == 3
    assert gpu_check.sync_verdict([10, 12], 12) == (0, [])
    added, failures = gpu_check.sync_verdict([10, 10], 13)
    assert added == 3 and "added 3" in failures[0]


def test_phase_device_times_are_compared_with_hand_timed_events(gpu_check: ModuleType) -> None:
    # The exposition of a real callback registry whose phase histogram saw two steps of known device time.
    from dgdn_lightning_monitor.metrics import TrainingMetrics

    metrics = TrainingMetrics("dgdn")
    for forward_s in (0.002, 0.004):
        metrics.phase_seconds["forward"].observe(forward_s)
    registry = CollectorRegistry()
    registry.register(metrics)
    exported = gpu_check.phase_histogram(generate_latest(registry).decode())
    assert exported["forward"] == pytest.approx((0.006, 2.0))
    table, failures = gpu_check.phase_verdict({"forward": [2.1, 3.95]}, exported)
    assert failures == [] and table["forward"]["exported_ms"] == pytest.approx(3.0)
    assert gpu_check.phase_verdict({"forward": [4.0, 4.0]}, exported)[1]  # 3 ms exported against 4 ms by hand
    assert gpu_check.phase_verdict({"forward": [2.0, 4.0, 3.0]}, exported)[1]  # a traced step without a value
