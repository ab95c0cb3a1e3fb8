#!/usr/bin/env python
"""Device check: GPU figures are plausible and the monitoring callback adds no device synchronisation.

Run on a machine with an NVIDIA GPU (takes well under two minutes on an H100)::

    python scripts/gpu_check.py            # prints a JSON summary
    python scripts/gpu_check.py --json out.json

It trains a small two-layer GCN (PyTorch Geometric) on random graphs for one epoch, five times on
``cuda:0``:

1. warm-up, without the callback (not counted: first-use costs such as kernel loading);
2. baseline, without the callback;
3. with ``MonitoringCallback(port=0, gpu_devices="auto")``, while a background thread scrapes
   ``cb.metrics_url`` the way Prometheus would, and a probe scrapes once in the middle of the epoch;
4. baseline again (shows whether the synchronisation count is stable);
5. with ``MonitoringCallback(trace_every_n_steps=1)`` followed by a callback that records its own CUDA events
   at the same hooks: the ``dgdn_step_phase_seconds`` device times of ``forward``, ``backward`` and
   ``optimizer_step`` must match those hand-timed events (one observation per step, means within 10 %);
6. out of memory on purpose: with ``MonitoringCallback(memory_snapshot=True)``, one random graph per step, each
   ``--oom-growth`` times larger than the one before (``--degree`` edges per node, a GCN ``--oom-hidden`` wide),
   until a step raises ``torch.OutOfMemoryError``. The error must reach the caller unchanged, the callback's
   record must name the failing batch's nodes and edges (as the loader made them), ``dgdn_oom_total`` must be 1,
   the memory snapshot must be a readable allocator snapshot, and the capacity estimate
   (``dgdn_batch_capacity_nodes``) must lie within 20 % of the nodes of the batch that ran out of memory.

Runs 2-4 are made under ``torch.cuda.set_sync_debug_mode("warn")``; every "synchronizing CUDA
operation" warning (from any thread) is counted. The check passes when run 3 has no more of them
than the larger baseline, and when the mid-epoch scrape shows: ``<ns>_gpu_monitoring_up`` = 1; NVML
total memory within 5 % of ``torch.cuda.get_device_properties(0).total_memory``; NVML used memory,
utilisation, temperature and power in plausible ranges; the NVML ``uuid`` label equal to PyTorch's
UUID of ``cuda:0``; allocator figures above zero. It also wraps every ``pynvml`` function to check that
all NVML calls came from the GPU sampling thread, and that this thread is gone after ``fit``.

Exit status: 0 all checks passed, 1 a check failed, 2 the check cannot run here (no CUDA, a package
missing); the reason is printed on stderr.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import sys
import threading
import time
import traceback
import urllib.request
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CANNOT_RUN = 2

SYNC_MESSAGE = "synchronizing CUDA operation"
SAMPLER_THREAD = "dgdn-gpu-monitor"  # dgdn_lightning_monitor.gpu.THREAD_NAME
NVML_SUFFIXES = (
    "gpu_utilization_ratio",
    "gpu_memory_used_bytes",
    "gpu_memory_total_bytes",
    "gpu_temperature_celsius",
    "gpu_power_watts",
)
ALLOCATOR_SUFFIXES = ("gpu_memory_allocated_bytes", "gpu_memory_reserved_bytes", "gpu_max_memory_allocated_bytes")
UP_SUFFIX = "gpu_monitoring_up"
MEMORY_TOLERANCE = 0.05


class CannotRun(Exception):
    """The check cannot run on this machine (exit status 2)."""


# --------------------------------------------------------------------------------------------- pure helpers
def gpu_figures(exposition: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The GPU series of a Prometheus text exposition, by name suffix (``gpu_power_watts`` etc.).

    Args:
        exposition: Text as served on ``/metrics``.

    Example:
        >>> text = 'x_gpu_monitoring_up{rank="0"} 1.0\\n'
        >>> gpu_figures(text)["gpu_monitoring_up"]
        [({'rank': '0'}, 1.0)]
    """
    from prometheus_client.parser import text_string_to_metric_families

    figures: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(exposition):
        for suffix in (UP_SUFFIX, *NVML_SUFFIXES, *ALLOCATOR_SUFFIXES):
            if family.name.endswith("_" + suffix):
                figures.setdefault(suffix, []).extend((dict(s.labels), float(s.value)) for s in family.samples)
    return figures


def _one(
    figures: dict[str, list[tuple[dict[str, str], float]]], suffix: str, gpu: str | None
) -> tuple[dict[str, str], float] | None:
    for labels, value in figures.get(suffix, []):
        if gpu is None or labels.get("gpu") == gpu:
            return labels, value
    return None


def evaluate_figures(
    figures: dict[str, list[tuple[dict[str, str], float]]],
    *,
    gpu: str,
    total_memory: int,
    torch_uuid: str | None,
) -> tuple[dict[str, Any], list[str]]:
    """Check the mid-epoch GPU figures; returns (what was seen, failures).

    Args:
        figures: Output of :func:`gpu_figures`.
        gpu: Value of the ``gpu`` label to check (the CUDA index, ``"0"``).
        total_memory: ``torch.cuda.get_device_properties(gpu).total_memory``.
        torch_uuid: ``str(torch.cuda.get_device_properties(gpu).uuid)`` or None when PyTorch has none.

    Example:
        >>> seen, failures = evaluate_figures({}, gpu="0", total_memory=1, torch_uuid=None)
        >>> failures[0]
        'gpu_monitoring_up missing'
    """
    failures: list[str] = []
    seen: dict[str, Any] = {}

    up = _one(figures, UP_SUFFIX, None)
    seen["up"] = None if up is None else up[1]
    if up is None:
        failures.append("gpu_monitoring_up missing")
    elif up[1] != 1.0:
        failures.append(f"gpu_monitoring_up is {up[1]}, expected 1")

    ranges = {
        "gpu_utilization_ratio": (0.0, 1.0),
        "gpu_memory_used_bytes": (1.0, float(total_memory) * (1 + MEMORY_TOLERANCE)),
        "gpu_temperature_celsius": (1.0, 120.0),
        "gpu_power_watts": (1.0, 2000.0),
    }
    labels_seen: dict[str, str] | None = None
    for suffix in NVML_SUFFIXES:
        found = _one(figures, suffix, gpu)
        seen[suffix] = None if found is None else found[1]
        if found is None:
            failures.append(f"{suffix} missing for gpu {gpu}")
            continue
        labels_seen = labels_seen or found[0]
        if suffix in ranges:
            low, high = ranges[suffix]
            if not (math.isfinite(found[1]) and low <= found[1] <= high):
                failures.append(f"{suffix} = {found[1]} outside [{low}, {high}]")

    nvml_total = seen.get("gpu_memory_total_bytes")
    if nvml_total is not None:
        deviation = abs(nvml_total - total_memory) / max(total_memory, 1)
        seen["memory_total_deviation"] = round(deviation, 5)
        if deviation > MEMORY_TOLERANCE:
            failures.append(f"NVML total memory {nvml_total:.0f} B is {deviation:.1%} off PyTorch's {total_memory} B")

    if labels_seen is not None:
        seen["uuid"] = labels_seen.get("uuid")
        seen["name"] = labels_seen.get("name")
        if torch_uuid:
            expected = torch_uuid.lower().removeprefix("gpu-").removeprefix("mig-")
            got = (labels_seen.get("uuid") or "").lower().removeprefix("gpu-").removeprefix("mig-")
            if got != expected:
                failures.append(
                    f"uuid label {labels_seen.get('uuid')!r} is not PyTorch's {torch_uuid!r} for cuda:{gpu}"
                )

    for suffix in ALLOCATOR_SUFFIXES:
        found = _one(figures, suffix, gpu)
        seen[suffix] = None if found is None else found[1]
        if found is None:
            failures.append(f"{suffix} missing for gpu {gpu}")
        elif not found[1] > 0:
            failures.append(f"{suffix} = {found[1]}, expected > 0")
    allocated, reserved = seen.get("gpu_memory_allocated_bytes"), seen.get("gpu_memory_reserved_bytes")
    if allocated is not None and reserved is not None and reserved < allocated:
        failures.append(f"reserved {reserved} < allocated {allocated}")
    return seen, failures


def sync_locations(records: Iterable[Any]) -> Counter[str]:
    """Count the sync-debug warnings among caught warnings, by ``file:line`` of the Python caller.

    Example:
        >>> import warnings
        >>> w = warnings.WarningMessage("called a synchronizing CUDA operation", UserWarning, "m.py", 3)
        >>> sync_locations([w])
        Counter({'m.py:3': 1})
    """
    return Counter(f"{r.filename}:{r.lineno}" for r in records if SYNC_MESSAGE in str(r.message))


def sync_verdict(baselines: Sequence[int], with_callback: int) -> tuple[int, list[str]]:
    """Synchronisations the callback added (against the larger baseline) and the failures that follow.

    Example:
        >>> sync_verdict([40, 40], 40)
        (0, [])
        >>> sync_verdict([40, 40], 41)[0]
        1
    """
    added = with_callback - max(baselines)
    failures = (
        [
            f"the callback added {added} device synchronisation(s) "
            f"(baselines {list(baselines)}, with callback {with_callback})"
        ]
        if added > 0
        else []
    )
    return added, failures


# The device phases and the CUDA-event boundaries that delimit them, as the callback defines them.
DEVICE_PHASES = {
    "forward": ("batch_start", "backward_start"),
    "backward": ("backward_start", "backward_end"),
    "optimizer_step": ("optimizer_start", "batch_end"),
}


def phase_histogram(exposition: str) -> dict[str, tuple[float, float]]:
    r"""``phase -> (sum seconds, count)`` of ``dgdn_step_phase_seconds`` in a text exposition.

    Example:
        >>> phase_histogram('dgdn_step_phase_seconds_sum{phase="forward",rank="0"} 0.5\n'
        ...                 'dgdn_step_phase_seconds_count{phase="forward",rank="0"} 4.0\n')
        {'forward': (0.5, 4.0)}
    """
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name in ("dgdn_step_phase_seconds_sum", "dgdn_step_phase_seconds_count"):
                slot = 0 if sample.name.endswith("_sum") else 1
                found.setdefault(sample.labels["phase"], [0.0, 0.0])[slot] = sample.value
    return {phase: (total, count) for phase, (total, count) in found.items()}


def phase_verdict(
    hand_ms: dict[str, list[float]], exported: dict[str, tuple[float, float]], tolerance: float = 0.1
) -> tuple[dict[str, Any], list[str]]:
    """Compare the exported device time of each phase with CUDA events timed by hand at the same hooks.

    Every step is traced in this fit, so the histogram must hold one observation per step and phase, and its mean
    must match the hand-timed mean within ``tolerance`` (relative) or 0.05 ms, whichever is larger.

    Example:
        >>> table, failures = phase_verdict({"forward": [2.0, 2.2]}, {"forward": (0.0042, 2.0)})
        >>> table["forward"], failures
        ({'hand_ms': 2.1, 'exported_ms': 2.1, 'steps': 2, 'observed': 2}, [])
        >>> phase_verdict({"forward": [2.0, 2.2]}, {"forward": (0.008, 2.0)})[1]
        ['forward: exported 4.000 ms per step, CUDA events timed by hand 2.100 ms']
    """
    table: dict[str, Any] = {}
    failures: list[str] = []
    for phase, values in hand_ms.items():
        total_s, count = exported.get(phase, (0.0, 0.0))
        hand = sum(values) / len(values) if values else float("nan")
        mine = 1000 * total_s / count if count else float("nan")
        table[phase] = {"hand_ms": round(hand, 4), "exported_ms": round(mine, 4), "steps": len(values),
                        "observed": int(count)}  # fmt: skip
        if int(count) != len(values):
            failures.append(f"{phase}: {int(count)} device observations for {len(values)} traced steps")
        elif not abs(mine - hand) <= max(tolerance * hand, 0.05):
            failures.append(f"{phase}: exported {mine:.3f} ms per step, CUDA events timed by hand {hand:.3f} ms")
    return table, failures


def capacity_verdict(capacity_nodes: float | None, oom_nodes: int, tolerance: float = 0.2) -> list[str]:
    """Compare the capacity estimate with the nodes of the batch that ran out of memory.

    Example:
        >>> capacity_verdict(1.1e6, 1_000_000)
        []
        >>> capacity_verdict(1.5e6, 1_000_000)
        ['capacity estimate 1500000 nodes is 50.0 % off the 1000000 nodes of the batch that ran out of memory']
        >>> capacity_verdict(None, 1_000_000)
        ['no capacity estimate before the out-of-memory error']
    """
    if capacity_nodes is None:
        return ["no capacity estimate before the out-of-memory error"]
    off = abs(capacity_nodes - oom_nodes) / oom_nodes
    if off > tolerance:
        return [
            f"capacity estimate {capacity_nodes:.0f} nodes is {100 * off:.1f} % off the {oom_nodes} nodes of the "
            "batch that ran out of memory"
        ]
    return []


# --------------------------------------------------------------------------------------------- the run
def _require() -> dict[str, Any]:
    """Import what the check needs, or raise CannotRun with the reason."""
    try:
        import torch
    except ImportError as exc:
        raise CannotRun(f"torch is not installed ({exc})") from exc
    if not torch.cuda.is_available():
        raise CannotRun(
            f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "this check needs an NVIDIA GPU and a CUDA build of torch"
        )
    modules: dict[str, Any] = {"torch": torch}
    try:
        import lightning.pytorch as pl
        import pynvml
        import torch_geometric  # noqa: F401
        from torch_geometric.data import Data
        from torch_geometric.loader import DataLoader
        from torch_geometric.nn import GCNConv
    except ImportError as exc:
        raise CannotRun(f"a package the check needs is missing: {exc}") from exc
    try:
        from dgdn_lightning_monitor import MonitoringCallback
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        try:
            from dgdn_lightning_monitor import MonitoringCallback
        except ImportError as exc:
            raise CannotRun(f"dgdn_lightning_monitor cannot be imported: {exc}") from exc
    modules.update(
        pl=pl, pynvml=pynvml, Data=Data, DataLoader=DataLoader, GCNConv=GCNConv, MonitoringCallback=MonitoringCallback
    )
    return modules


def _make_model_class(m: dict[str, Any]) -> type:
    torch, pl, gcn_conv = m["torch"], m["pl"], m["GCNConv"]

    class GCN(pl.LightningModule):
        """Two GCN layers for node classification."""

        def __init__(self, features: int, hidden: int, classes: int) -> None:
            super().__init__()
            self.conv1 = gcn_conv(features, hidden)
            self.conv2 = gcn_conv(hidden, classes)

        def forward(self, x: Any, edge_index: Any) -> Any:
            return self.conv2(torch.relu(self.conv1(x, edge_index)), edge_index)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = torch.nn.functional.cross_entropy(self(batch.x, batch.edge_index), batch.y)
            self.log("train_loss", loss, batch_size=batch.num_graphs)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    return GCN


def _make_graphs(m: dict[str, Any], args: argparse.Namespace) -> list[Any]:
    torch, data_class = m["torch"], m["Data"]
    generator = torch.Generator().manual_seed(0)
    graphs = []
    for _ in range(args.graphs):
        n = args.nodes
        graphs.append(
            data_class(
                x=torch.randn(n, args.features, generator=generator),
                edge_index=torch.randint(0, n, (2, n * args.degree), generator=generator),
                y=torch.randint(0, args.classes, (n,), generator=generator),
            )
        )
    return graphs


class _Scraper:
    """Scrapes the callback's endpoint from its own thread while training runs, as Prometheus would."""

    def __init__(self, callback: Any, interval: float) -> None:
        self._callback = callback
        self._interval = interval
        self._stop = threading.Event()
        self.ok = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._loop, name="gpu-check-scraper", daemon=True)

    def __enter__(self) -> _Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            url = self._callback.metrics_url
            if not url:
                continue
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    response.read()
                self.ok += 1
            except Exception as exc:  # the endpoint may close between reading the URL and the request
                if self._callback.metrics_url:
                    self.errors.append(repr(exc))


class _NVMLCallLog:
    """Wraps every ``nvml*`` function of the pynvml module to record the calling thread's name."""

    def __init__(self, pynvml: Any) -> None:
        self._module = pynvml
        self._originals: dict[str, Any] = {}
        self.threads: Counter[str] = Counter()

    def __enter__(self) -> _NVMLCallLog:
        for name in dir(self._module):
            function = getattr(self._module, name)
            if name.startswith("nvml") and callable(function):
                self._originals[name] = function
                setattr(self._module, name, self._wrap(function))
        return self

    def _wrap(self, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.threads[threading.current_thread().name] += 1
            return function(*args, **kwargs)

        return wrapper

    def __exit__(self, *exc: Any) -> None:
        for name, function in self._originals.items():
            setattr(self._module, name, function)


def _fit(
    m: dict[str, Any], args: argparse.Namespace, graphs: list[Any], callbacks: list[Any], count_syncs: bool
) -> dict[str, Any]:
    """One epoch on cuda:0; returns wall time and the sync warnings by location."""
    torch, pl = m["torch"], m["pl"]
    torch.manual_seed(0)
    model = _make_model_class(m)(args.features, args.hidden, args.classes)
    loader = m["DataLoader"](graphs, batch_size=args.batch_size, shuffle=False)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if count_syncs:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit(model, loader)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    locations = sync_locations(caught)
    return {"wall_s": round(time.perf_counter() - started, 3), "syncs": sum(locations.values()), "locations": locations}


def run_check(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Do the whole check; returns the JSON summary and the failures."""
    m = _require()
    torch, pl = m["torch"], m["pl"]
    props = torch.cuda.get_device_properties(0)
    torch_uuid = str(props.uuid) if getattr(props, "uuid", None) is not None else None
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torch_total_memory_bytes": props.total_memory,
        "torch_uuid": torch_uuid,
    }
    failures: list[str] = []
    graphs = _make_graphs(m, args)

    _fit(m, args, graphs, [], count_syncs=False)
    baseline = _fit(m, args, graphs, [], count_syncs=True)

    callback = m["MonitoringCallback"](
        port=0, addr="127.0.0.1", gpu_devices="auto", gpu_poll_interval_s=args.poll_interval
    )
    probe: dict[str, Any] = {}

    class Probe(pl.Callback):
        """Scrapes the endpoint once, from the training thread, in the middle of the epoch."""

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx != max(len(graphs) // args.batch_size // 2, 0) or probe:
                return
            url = callback.metrics_url
            probe["url"] = url
            probe["sampler_threads"] = sum(t.name == SAMPLER_THREAD for t in threading.enumerate())
            try:
                if url is None:
                    raise RuntimeError("metrics_url is None while training runs")
                with urllib.request.urlopen(url, timeout=10) as response:
                    probe["text"] = response.read().decode()
            except Exception as exc:
                probe["error"] = repr(exc)

    with _NVMLCallLog(m["pynvml"]) as nvml_log, _Scraper(callback, args.scrape_interval) as scraper:
        with_callback = _fit(m, args, graphs, [callback, Probe()], count_syncs=True)
    baseline_again = _fit(m, args, graphs, [], count_syncs=True)

    # Figures seen in the middle of the epoch.
    if "text" in probe:
        seen, figure_failures = evaluate_figures(
            gpu_figures(probe["text"]), gpu="0", total_memory=props.total_memory, torch_uuid=torch_uuid
        )
        summary["figures"] = seen
        failures += figure_failures
    else:
        failures.append(f"no mid-epoch scrape: {probe.get('error', 'the probe did not run')}")
    summary["sampler_threads_during_fit"] = probe.get("sampler_threads")
    if probe.get("sampler_threads") != 1:
        failures.append(f"{probe.get('sampler_threads')} GPU sampling threads during fit, expected 1")
    leftover = [t.name for t in threading.enumerate() if t.name == SAMPLER_THREAD]
    summary["sampler_threads_after_fit"] = len(leftover)
    if leftover:
        failures.append("the GPU sampling thread is still alive after fit")

    # Who called NVML.
    summary["nvml_calls_by_thread"] = dict(nvml_log.threads)
    strangers = {name: n for name, n in nvml_log.threads.items() if name != SAMPLER_THREAD}
    if strangers:
        failures.append(f"NVML calls from threads other than {SAMPLER_THREAD}: {strangers}")
    if not nvml_log.threads:
        failures.append("no NVML call at all during the monitored fit")

    # Background scrapes.
    summary["background_scrapes"] = {"ok": scraper.ok, "errors": scraper.errors[:5]}
    if scraper.ok == 0:
        failures.append("no background scrape succeeded during the monitored fit")

    # Synchronisations.
    added, sync_failures = sync_verdict([baseline["syncs"], baseline_again["syncs"]], with_callback["syncs"])
    failures += sync_failures
    extra = with_callback["locations"] - baseline["locations"]
    summary["syncs"] = {
        "baseline": baseline["syncs"],
        "with_callback": with_callback["syncs"],
        "baseline_again": baseline_again["syncs"],
        "added_by_callback": added,
        "baseline_stable": baseline["syncs"] == baseline_again["syncs"],
        "extra_locations": dict(extra.most_common(10)),
    }
    summary["epoch_wall_s"] = {
        "baseline": baseline["wall_s"],
        "with_callback": with_callback["wall_s"],
        "baseline_again": baseline_again["wall_s"],
    }

    # Phase device times: every step traced, the same hook boundaries timed by hand with CUDA events.
    phased = m["MonitoringCallback"](port=0, addr="127.0.0.1", gpu_devices=None, tracing=False, trace_every_n_steps=1)
    marks: list[dict[str, Any]] = []

    def mark(name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks[-1][name] = event

    class HandTimer(pl.Callback):
        """CUDA events at the hooks where the callback records its own (it runs right after the callback)."""

        def on_train_batch_start(self, *args: Any) -> None:
            marks.append({})
            mark("batch_start")

        def on_before_backward(self, *args: Any) -> None:
            mark("backward_start")

        def on_after_backward(self, *args: Any) -> None:
            mark("backward_end")

        def on_before_optimizer_step(self, *args: Any) -> None:
            mark("optimizer_start")

        def on_train_batch_end(self, *args: Any) -> None:
            mark("batch_end")

    _fit(m, args, graphs, [phased, HandTimer()], count_syncs=False)
    torch.cuda.synchronize()  # after the fit: the hand-timed events are read here, never during training
    hand_ms = {
        phase: [step[start].elapsed_time(step[end]) for step in marks if start in step and end in step]
        for phase, (start, end) in DEVICE_PHASES.items()
    }
    from prometheus_client import generate_latest

    exported = phase_histogram(generate_latest(phased.registry).decode())
    summary["phase_device_ms"], phase_failures = phase_verdict(hand_ms, exported)
    failures += phase_failures

    summary["out_of_memory"], oom_failures = _oom_check(m, args)
    failures += oom_failures
    return summary, failures


def _oom_check(m: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Grow the batch until a step runs out of memory; check the record, the snapshot and the capacity estimate."""
    import pickle
    import tempfile

    torch, pl, data_class = m["torch"], m["pl"], m["Data"]
    from prometheus_client import generate_latest

    made: list[dict[str, int]] = []  # every batch the loader made, in order

    class Growing(torch.utils.data.IterableDataset):
        """One random graph per step, each ``--oom-growth`` times larger; made on the fly (host memory)."""

        def __iter__(self) -> Any:
            generator = torch.Generator().manual_seed(0)
            nodes = float(args.oom_start_nodes)
            while True:
                n = int(nodes)
                made.append({"nodes": n, "edges": n * args.degree})
                yield data_class(
                    x=torch.randn(n, args.features, generator=generator),
                    edge_index=torch.randint(0, n, (2, n * args.degree), generator=generator),
                    y=torch.randint(0, args.classes, (n,), generator=generator),
                )
                nodes *= args.oom_growth

    torch.cuda.empty_cache()
    dumps = Path(tempfile.mkdtemp(prefix="gpu-check-oom-"))
    callback = m["MonitoringCallback"](port=0, addr="127.0.0.1", gpu_devices=None, tracing=False, memory_snapshot=True)
    model = _make_model_class(m)(args.features, args.oom_hidden, args.classes)
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, max_epochs=1, max_steps=args.oom_max_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[callback], default_root_dir=str(dumps),
    )  # fmt: skip
    loader = m["DataLoader"](Growing(), batch_size=1)  # one graph per step, as a Batch
    raised: BaseException | None = None
    try:
        trainer.fit(model, loader)
    except torch.OutOfMemoryError as exc:
        raised = exc
    finally:
        del trainer, model
        torch.cuda.empty_cache()
    failures: list[str] = []
    record = callback.summary()["out_of_memory"]
    capacity_nodes, capacity_edges = callback.summary()["batch_capacity"]
    seen: dict[str, Any] = {"steps": callback.summary()["steps"], "record": record,
                            "capacity": {"nodes": capacity_nodes, "edges": capacity_edges}}  # fmt: skip
    if raised is None or type(raised) is not torch.OutOfMemoryError:
        return seen, [f"no torch.OutOfMemoryError reached the caller within {args.oom_max_steps} steps"]
    if record is None:
        return seen, ["the callback recorded no out-of-memory error"]
    failing = made[record["batch_idx"]] if record["batch_idx"] is not None else None
    seen["failing_batch"] = failing
    if failing is None or (record["batch"]["nodes"], record["batch"]["edges"]) != (failing["nodes"], failing["edges"]):
        failures.append(f"the record names batch {record['batch']}, the loader made {failing}")
    oom_total = [
        line for line in generate_latest(callback.registry).decode().splitlines() if line.startswith("dgdn_oom_total{")
    ]
    seen["oom_total"] = oom_total
    if len(oom_total) != 1 or float(oom_total[0].rsplit(" ", 1)[1]) != 1.0:
        failures.append(f"dgdn_oom_total is not 1: {oom_total}")
    snapshot = record.get("snapshot")
    try:
        with open(snapshot, "rb") as handle:
            segments = len(pickle.load(handle)["segments"])
        seen["snapshot"] = {"path": snapshot, "bytes": Path(snapshot).stat().st_size, "segments": segments}
    except Exception as exc:
        failures.append(f"memory snapshot {snapshot!r} unreadable: {exc!r}")
    if failing is not None:
        failures += capacity_verdict(capacity_nodes, failing["nodes"])
        if capacity_nodes is not None:
            seen["capacity_vs_oom_nodes"] = round(capacity_nodes / failing["nodes"], 3)
    return seen, failures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=256, help="random graphs in the training set")
    parser.add_argument("--nodes", type=int, default=2000, help="nodes per graph")
    parser.add_argument("--degree", type=int, default=8, help="edges per node")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--poll-interval", type=float, default=0.2, help="gpu_poll_interval_s of the callback")
    parser.add_argument("--scrape-interval", type=float, default=0.1, help="seconds between background scrapes")
    parser.add_argument("--oom-start-nodes", type=int, default=50_000, help="nodes of the first growing batch")
    parser.add_argument("--oom-growth", type=float, default=1.05, help="each growing batch this many times larger")
    parser.add_argument("--oom-hidden", type=int, default=1024, help="GCN width of the out-of-memory run")
    parser.add_argument("--oom-max-steps", type=int, default=400, help="give up growing after this many steps")
    parser.add_argument("--max-seconds", type=float, default=420, help="abort (with tracebacks) after this long")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; print the JSON summary; return the exit status (0 ok, 1 failed, 2 cannot run)."""
    args = parse_args(argv)
    faulthandler.dump_traceback_later(args.max_seconds, exit=True)
    try:
        try:
            summary, failures = run_check(args)
        except CannotRun as exc:
            print(f"gpu_check: cannot run: {exc}", file=sys.stderr)
            summary, failures, status = {"status": "cannot_run", "reason": str(exc)}, [str(exc)], EXIT_CANNOT_RUN
        except Exception as exc:
            summary, failures, status = (
                {"status": "error", "traceback": traceback.format_exc()},
                [repr(exc)],
                EXIT_FAILED,
            )
        else:
            status = EXIT_FAILED if failures else EXIT_OK
            summary["status"] = "failed" if failures else "ok"
    finally:
        faulthandler.cancel_dump_traceback_later()
    summary["failures"] = failures
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    if status == EXIT_FAILED:
        print("gpu_check: FAILED: " + "; ".join(failures), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
