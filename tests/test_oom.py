"""Out-of-memory forensics and the batch capacity estimate, in real Lightning runs on PyG batches.

The CUDA allocator cannot exist here: where a test needs its counters, a stand-in replaces ``capacity.allocator_for``
(the one seam to the allocator) and answers from a known linear law of the batch in flight."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from dgdn_lightning_monitor import MonitoringCallback, capacity, gpu
from dgdn_lightning_monitor.capacity import MIN_OBSERVATIONS, CapacityEstimator
from dgdn_lightning_monitor.metrics import TrainingMetrics
from exposition import exposition, value
from fake_pynvml import FakeNVML
from lit_models import GraphClassifier, graph_loaders, quiet_trainer


def sizes(batch) -> dict[str, int]:
    """A PyG batch's samples, nodes and edges, read independently of the callback's sizing."""
    return {"samples": int(batch.num_graphs), "nodes": int(batch.x.size(0)), "edges": int(batch.edge_index.size(1))}


class RaisesAt(GraphClassifier):
    """Raises ``error`` in ``stage``'s step of batch ``at`` (first epoch), after checking the callback holds that
    very batch."""

    def __init__(self, error: BaseException, at: int, stage: str = "train", callback=None) -> None:
        super().__init__()
        self.error, self.at, self.stage, self.callback = error, at, stage, callback
        self.held: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.held.append(self.callback is None or self.callback._run.batch is batch)
        if self.stage == "train" and self.current_epoch == 0 and batch_idx == self.at:
            raise self.error
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        if self.stage == "validate" and batch_idx == self.at:
            raise self.error
        return super().validation_step(batch, batch_idx)


def run(callback, model, epochs: int = 1, loaders=None, **loader_kwargs):
    train, val, _, _ = loaders or graph_loaders(**loader_kwargs)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[callback], num_sanity_val_steps=0)
    trainer.fit(model, train, val)


def test_an_oom_in_the_training_step_names_the_batch_and_reaches_the_user_unchanged(caplog):
    callback = MonitoringCallback(port=0, gpu_devices=None, tracing=False)
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    model = RaisesAt(error, at=2, callback=callback)
    loaders = graph_loaders()  # the loader keeps its order (no shuffling): its batches are read again below
    with caplog.at_level(logging.ERROR, logger="dgdn_lightning_monitor.oom"):
        with pytest.raises(torch.OutOfMemoryError) as raised:
            run(callback, model, loaders=loaders)
    assert raised.value is error and type(raised.value) is torch.OutOfMemoryError  # the same object, unchanged
    assert all(model.held)  # the callback held the batch in flight, the very object the step got
    batches = [sizes(batch) for batch in loaders[0]]
    failing, fitted = batches[2], batches[:2]
    record = callback.summary()["out_of_memory"]
    assert record["error"] == "OutOfMemoryError" and record["stage"] == "train"
    assert (record["global_step"], record["epoch"], record["batch_idx"]) == (2, 0, 2)
    assert record["batch"] == failing
    assert record["largest_fit"] == max(fitted, key=lambda b: b["nodes"])  # one batch: the first with most nodes
    assert record["allocator"] is None and record["snapshot"] is None  # a CPU run
    assert value(exposition(callback.registry), "dgdn_oom_total") == 1.0
    [line] = [r.getMessage() for r in caplog.records if r.name == "dgdn_lightning_monitor.oom"]
    assert line == (
        f"OutOfMemoryError on rank 0 in stage train, global step 2 (epoch 0, batch 2): the failing batch held "
        f"{failing['samples']} samples, {failing['nodes']} nodes, {failing['edges']} edges; the largest training "
        f"batch that fit held {record['largest_fit']['samples']} samples, {record['largest_fit']['nodes']} nodes, "
        f"{record['largest_fit']['edges']} edges"
    )
    assert callback._run is None  # nothing kept alive after the run: the batch in flight went with it


def test_an_oom_in_the_first_step_says_no_batch_had_fit(caplog):
    callback = MonitoringCallback(port=0, gpu_devices=None, tracing=False)
    loaders = graph_loaders()
    with caplog.at_level(logging.ERROR, logger="dgdn_lightning_monitor.oom"):
        with pytest.raises(torch.OutOfMemoryError):
            run(callback, RaisesAt(torch.OutOfMemoryError("CUDA out of memory"), at=0), loaders=loaders)
    record = callback.summary()["out_of_memory"]
    assert record["largest_fit"] == {"samples": None, "nodes": None, "edges": None}
    first = sizes(next(iter(loaders[0])))
    [line] = [r.getMessage() for r in caplog.records if r.name == "dgdn_lightning_monitor.oom"]
    assert line.endswith(f"the failing batch held {first['samples']} samples, {first['nodes']} nodes, "
                         f"{first['edges']} edges; no training batch had completed yet")


def test_a_host_memory_error_in_validation_names_the_validation_batch():
    callback = MonitoringCallback(port=0, gpu_devices=None, tracing=False)
    error = MemoryError("host out of memory")
    loaders = graph_loaders()
    with pytest.raises(MemoryError) as raised:
        run(callback, RaisesAt(error, at=1, stage="validate"), loaders=loaders)
    assert raised.value is error
    val = loaders[1]
    record = callback.summary()["out_of_memory"]
    assert record["stage"] == "validate" and record["batch_idx"] == 1
    assert record["batch"] == sizes(list(val)[1])
    assert callback.metrics.ooms == 1


def test_other_errors_are_not_counted_as_oom():
    callback = MonitoringCallback(port=0, gpu_devices=None, tracing=False)
    with pytest.raises(RuntimeError, match="not memory"):
        run(callback, RaisesAt(RuntimeError("not memory"), at=1))
    assert callback.summary()["out_of_memory"] is None
    assert value(exposition(callback.registry), "dgdn_oom_total") == 0.0


def test_memory_snapshot_without_cuda_warns_once_and_writes_nothing(tmp_path, caplog):
    callback = MonitoringCallback(port=0, gpu_devices=None, tracing=False, memory_snapshot=True)
    with caplog.at_level(logging.WARNING, logger="dgdn_lightning_monitor.oom"):
        run(callback, GraphClassifier())
        run(callback, GraphClassifier())
    assert [r.getMessage() for r in caplog.records if "memory_snapshot" in r.getMessage()] == [
        "memory_snapshot=True needs a CUDA device; this run has none, none is taken"
    ]
    assert not list(tmp_path.rglob("*.pickle"))
    with pytest.raises(ValueError, match="memory_snapshot"):
        MonitoringCallback(memory_snapshot="yes")


# ---------------------------------------------------------------------------------------------- capacity
BASE, PER_NODE, PER_EDGE, BUDGET = 1.5e9, 3000.0, 800.0, 16 * 2.0**30


def law(nodes: float, edges: float) -> float:
    return BASE + PER_NODE * nodes + PER_EDGE * edges


def capacity_along(ratio: float) -> float:
    """Nodes n with law(n, ratio * n) == BUDGET: the ground truth the estimate must find."""
    return (BUDGET - BASE) / (PER_NODE + PER_EDGE * ratio)


def test_the_estimator_recovers_a_linear_law():
    rng = np.random.default_rng(0)
    estimator = CapacityEstimator(BUDGET)
    nodes = rng.integers(1_000, 50_000, size=200)
    edges = (nodes * rng.uniform(3, 7, size=200)).astype(int)
    for n, e in zip(nodes, edges):
        estimator.add(law(n, e), int(n), int(e))
    capacity_nodes, capacity_edges = estimator.estimate()
    ratio = edges.sum() / nodes.sum()
    assert capacity_nodes == pytest.approx(capacity_along(ratio), rel=1e-6)
    assert capacity_edges == pytest.approx(ratio * capacity_along(ratio), rel=1e-6)
    assert law(capacity_nodes, capacity_edges) == pytest.approx(BUDGET, rel=1e-6)


def test_the_estimator_extrapolates_when_edges_follow_nodes_exactly():
    estimator = CapacityEstimator(BUDGET)
    for n in range(1_000, 9_000, 1_000):  # edges = 4 * nodes: the split between a and b is not determined
        estimator.add(law(n, 4 * n), n, 4 * n)
    capacity_nodes, capacity_edges = estimator.estimate()
    assert capacity_nodes == pytest.approx(capacity_along(4.0), rel=1e-6) and capacity_edges == 4 * capacity_nodes


@pytest.mark.parametrize("observations, budget", [
    ([(law(1000, 4000), 1000, 4000)] * 10, BUDGET),  # every batch alike
    ([(law(n, 4 * n), n, 4 * n) for n in (1, 2, 3)][: MIN_OBSERVATIONS - 1], BUDGET),  # too few
    ([(5e9 - n, n, 4 * n) for n in range(100, 1100, 100)], BUDGET),  # memory not growing with size
    ([(law(n, 4 * n), n, 4 * n) for n in range(100, 1100, 100)], None),  # no budget
    ([(law(n, 4 * n), n, 4 * n) for n in range(100, 1100, 100)], BASE / 2),  # budget below the base
])
def test_the_estimator_says_nothing_when_the_observations_do_not_tell(observations, budget):
    estimator = CapacityEstimator(budget)
    for observation in observations:
        estimator.add(*observation)
    assert estimator.estimate() is None


class StandInAllocator:
    """The CUDA allocator's counters for a device that cannot exist here: a step's peak follows :func:`law` of the
    batch the model last saw; every reset and read is counted."""

    def __init__(self, device) -> None:
        self.device = device
        self.batch: dict[str, int] = {}
        self.resets = self.reads = 0
        self.sampled: list[dict[str, int]] = []  # the batches of the steps whose peak was reset and read

    def total(self) -> int:
        return int(BUDGET)

    def reset_peak(self) -> int:
        self.resets += 1
        return 0  # the peak it held: none that a test reads

    def peak(self) -> int:
        self.reads += 1
        self.sampled.append(self.batch)
        return int(law(self.batch["nodes"], self.batch["edges"]))

    def figures(self) -> dict[str, int]:
        peak = int(law(self.batch["nodes"], self.batch["edges"]))
        return {"allocated_bytes": peak // 2, "reserved_bytes": peak, "max_allocated_bytes": peak,
                "total_bytes": int(BUDGET)}


def test_capacity_gauges_from_a_real_run_follow_the_sampled_steps(monkeypatch):
    allocators: list[StandInAllocator] = []

    def stand_in(device):
        allocators.append(StandInAllocator(device))
        return allocators[-1]

    monkeypatch.setattr(capacity, "allocator_for", stand_in)

    class Tells(GraphClassifier):
        def training_step(self, batch, batch_idx):
            allocators[-1].batch = sizes(batch)
            return super().training_step(batch, batch_idx)

    callback = MonitoringCallback(port=0, gpu_devices=None, tracing=False, trace_every_n_steps=5)
    run(callback, Tells(), epochs=3, batch_size=2)  # 18 steps an epoch, 54 steps
    [allocator] = allocators
    steps = callback.summary()["steps"]
    assert steps == 54
    # The steps whose phases are timed, and nothing more: steps 0, 5, ..., 50.
    assert allocator.resets == allocator.reads == len(range(0, steps, 5))
    sampled = allocator.sampled
    assert len({b["nodes"] for b in sampled}) > 1
    ratio = sum(b["edges"] for b in sampled) / sum(b["nodes"] for b in sampled)
    text = exposition(callback.registry)
    assert value(text, "dgdn_batch_capacity_nodes") == pytest.approx(capacity_along(ratio), rel=1e-6)
    assert value(text, "dgdn_batch_capacity_edges") == pytest.approx(ratio * capacity_along(ratio), rel=1e-6)
    assert callback.summary()["batch_capacity"] == (
        value(text, "dgdn_batch_capacity_nodes"), value(text, "dgdn_batch_capacity_edges"))


def test_an_oom_on_cuda_reports_the_allocator_figures(monkeypatch, caplog):
    allocator = StandInAllocator(None)
    monkeypatch.setattr(capacity, "allocator_for", lambda device: allocator)

    class Tells(RaisesAt):
        def training_step(self, batch, batch_idx):
            allocator.batch = sizes(batch)
            return super().training_step(batch, batch_idx)

    callback = MonitoringCallback(port=0, gpu_devices=None, tracing=False)
    with caplog.at_level(logging.ERROR, logger="dgdn_lightning_monitor.oom"):
        with pytest.raises(torch.OutOfMemoryError):
            run(callback, Tells(torch.OutOfMemoryError("CUDA out of memory"), at=3))
    record = callback.summary()["out_of_memory"]
    assert record["allocator"] == allocator.figures()
    gib = 2.0**30
    expected = (f"; CUDA allocator: {allocator.figures()['allocated_bytes'] / gib:.2f} GiB allocated, "
                f"{allocator.figures()['reserved_bytes'] / gib:.2f} GiB reserved, peak "
                f"{allocator.figures()['max_allocated_bytes'] / gib:.2f} GiB of 16.00 GiB")
    assert [r.getMessage() for r in caplog.records if r.getMessage().endswith(expected)]


def test_the_peak_gauge_keeps_the_peak_the_capacity_sampling_reset(monkeypatch):
    """Resetting the allocator's peak for a step's figure must not lower the process's peak the GPU collector
    exports (the DGDNGPUMemoryHigh alert reads it)."""
    stats = {"allocated_bytes.all.current": 100, "reserved_bytes.all.current": 200, "allocated_bytes.all.peak": 5000}

    def reset(device=None):
        stats["allocated_bytes.all.peak"] = stats["allocated_bytes.all.current"]

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: dict(stats))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: stats["allocated_bytes.all.peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=BUDGET))
    sampler = capacity.CapacitySampler(TrainingMetrics())
    sampler.start(torch.device("cuda", 0))
    sampler.sample_start()
    assert stats["allocated_bytes.all.peak"] == 100 and sampler.peaks.before_reset == {0: 5000}
    nvml = FakeNVML(1, library_missing=True)
    monitor = gpu.GPUMonitor(devices=[0], nvml=nvml, poll_interval_s=60, peaks=sampler.peaks)
    monitor.start(cuda_devices=[0], labels={"rank": "0"})
    try:
        registry = CollectorRegistry()
        registry.register(monitor)
        assert value(exposition(registry), "dgdn_gpu_max_memory_allocated_bytes", gpu="0") == 5000.0
        stats["allocated_bytes.all.peak"] = 7000  # a higher peak after the reset wins
        assert value(exposition(registry), "dgdn_gpu_max_memory_allocated_bytes", gpu="0") == 7000.0
    finally:
        monitor.stop()
