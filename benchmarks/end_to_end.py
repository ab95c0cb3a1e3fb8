"""End-to-end training step time with and without MonitoringCallback: a small PyG GCN and DGDN.

The clock covers the training loop only: it starts in ``on_train_epoch_start`` of a timing callback placed
before every other callback and stops in ``on_train_epoch_end`` of one placed after them, so set-up, teardown and
the first (warm-up) epoch of every fit are left out. Cases alternate fit by fit (A B, B A, ...); the ratio is taken
per adjacent pair, which cancels slow drifts of a shared machine, and its median is the reported figure. The time
spent inside MonitoringCallback's own hooks in the same fits is reported too, as a share of the step: a
noise-free view of the direct part of the cost.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

from lightning.pytorch import Callback

from benchmarks.common import HookClock, Receiver, make_trainer, monitoring_callback, otlp_env, summarize

TARGET_RATIO = 1.01


class _EpochStart(Callback):
    """Placed first: notes the time (and the hook clock) when an epoch starts, before any other callback."""

    def __init__(self, clock: HookClock) -> None:
        self.clock = clock
        self.starts: list[float] = []
        self.hook_ns: list[int] = []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.hook_ns.append(self.clock.total_ns)
        self.starts.append(time.perf_counter())


class _EpochEnd(Callback):
    """Placed last: notes the time (and the hook clock) when an epoch ends, after every other callback."""

    def __init__(self, clock: HookClock) -> None:
        self.clock = clock
        self.ends: list[float] = []
        self.hook_ns: list[int] = []
        self.batches: list[int] = []
        self._count = 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._count += 1

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.ends.append(time.perf_counter())
        self.hook_ns.append(self.clock.total_ns)
        self.batches.append(self._count)
        self._count = 0


@dataclass
class Workload:
    """A model and its data; ``fit_kwargs()`` returns fresh ``Trainer.fit`` arguments (loaders and all)."""

    name: str
    description: str
    make_module: Callable[[], Any]
    fit_kwargs: Callable[[], dict[str, Any]]
    epochs: int
    limit_train_batches: Optional[int] = None
    accelerator: str = "cpu"


def gcn_workload(quick: bool) -> Workload:
    from benchmarks.models import GCNModule, gcn_loader

    loader = gcn_loader(num_graphs=512 if quick else 1024)
    return Workload(
        "pyg_gcn", "2-layer GCN, FakeDataset graphs (~40 nodes, ~200 edges), 32 graphs per batch, Adam",
        GCNModule, lambda: {"train_dataloaders": loader}, epochs=3,
    )


def dgdn_workload(quick: bool) -> Optional[Workload]:
    """The DGDN example (link prediction on a synthetic temporal graph), or None while it is not importable."""
    try:
        from dgdn_lightning_monitor.dgdn.data import SyntheticTemporalGraph
        from dgdn_lightning_monitor.dgdn.module import DGDNLinkPredictor, TemporalGraphDataModule
    except ImportError:
        return None
    graph = SyntheticTemporalGraph(num_nodes=500, num_events=6000, seed=0)
    return Workload(
        "dgdn", "DGDNLinkPredictor (hidden 64), SyntheticTemporalGraph 500 nodes / 6000 events, 200 events per batch",
        lambda: DGDNLinkPredictor.from_graph(graph, hidden_dim=64),
        lambda: {"datamodule": TemporalGraphDataModule(graph, batch_size=200)},
        epochs=3, limit_train_batches=6 if quick else 12,
    )


def _fit(workload: Workload, monitored: bool, trace_every: int) -> dict[str, Any]:
    clock = HookClock()
    first, last = _EpochStart(clock), _EpochEnd(clock)
    middle: list[Any] = []
    if monitored:
        callback = monitoring_callback(trace_every_n_steps=trace_every, tracing=True)
        clock.attach(callback)
        middle.append(callback)
    trainer = make_trainer([first, *middle, last], max_epochs=workload.epochs,
                           limit_train_batches=workload.limit_train_batches, accelerator=workload.accelerator)
    trainer.fit(workload.make_module(), **workload.fit_kwargs())
    # Epoch 0 warms up (allocator, lazy modules, loader history); the rest is timed.
    seconds = sum(end - start for start, end in zip(first.starts[1:], last.ends[1:]))
    steps = sum(last.batches[1:])
    hook_ns = sum(end - start for start, end in zip(first.hook_ns[1:], last.hook_ns[1:]))
    return {"step_ms": seconds / steps * 1e3, "steps": steps, "hook_ms": hook_ns / 1e6}


def run_workload(workload: Workload, reps: int, trace_every: int) -> dict[str, Any]:
    _fit(workload, False, trace_every)  # warm-up of both paths, untimed
    _fit(workload, True, trace_every)
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    for rep in range(reps):
        order = ("without", "with") if rep % 2 == 0 else ("with", "without")
        for case in order:
            runs[case].append(_fit(workload, case == "with", trace_every))
    without = [r["step_ms"] for r in runs["without"]]
    with_cb = [r["step_ms"] for r in runs["with"]]
    paired = [b / a for a, b in zip(without, with_cb)]
    hook_share = [r["hook_ms"] / (r["step_ms"] * r["steps"]) for r in runs["with"]]
    ratio = summarize(paired)["median"]
    return {
        "description": workload.description,
        "timed_steps_per_fit": runs["with"][0]["steps"],
        "step_ms_without": summarize(without),
        "step_ms_with": summarize(with_cb),
        "paired_ratio": summarize(paired),
        "ratio_of_medians": summarize(with_cb)["median"] / summarize(without)["median"],
        "ratio": ratio,
        "callback_hook_share_of_step": summarize(hook_share),
        "callback_hook_us_per_step": summarize([r["hook_ms"] * 1e3 / r["steps"] for r in runs["with"]]),
    }


def run(quick: bool = False, reps: Optional[int] = None, workloads: Sequence[str] = ("pyg_gcn", "dgdn"),
        trace_every: int = 10) -> dict[str, Any]:
    results: dict[str, Any] = {}
    notes: list[str] = []
    with Receiver("live") as receiver, otlp_env(receiver.endpoint):
        for name in workloads:
            if name == "pyg_gcn":
                workload: Optional[Workload] = gcn_workload(quick)
                count = reps if reps is not None else (3 if quick else 10)
            elif name == "dgdn":
                workload = dgdn_workload(quick)
                count = reps if reps is not None else (2 if quick else 10)
            else:
                raise ValueError(f"unknown workload {name!r}")
            if workload is None:
                notes.append(f"{name}: not available yet (dgdn_lightning_monitor.dgdn has no LightningModule)")
                continue
            result = run_workload(workload, count, trace_every)
            result["target"] = TARGET_RATIO if name == "dgdn" else None
            result["met"] = result["ratio"] <= TARGET_RATIO if name == "dgdn" else None
            results[name] = result
    return {
        "name": "end_to_end",
        "what": "training step time with / without MonitoringCallback (all features on, tracing every "
                f"{trace_every}th step to a live OTLP receiver)",
        "config": {"trace_every_n_steps": trace_every, "reps_quick": 3, "validation": "off",
                   "timed": "epochs 2..n of each fit, first callback's epoch start to last callback's epoch end"},
        "workloads": results,
        "notes": notes,
    }
