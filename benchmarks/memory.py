"""Memory: growth of the resident set size over many training steps with MonitoringCallback.

The main figure drives the callback's hooks directly (:mod:`benchmarks.driver`) for 100k steps, all features on
and tracing every 10th step into a live OTLP receiver, after a warm-up: a real Trainer would need far longer for
that many steps. The same loop with a callback that does nothing gives the harness's own drift. As a cross-check a
real Trainer trains the tiny model for fewer steps with and without the callback, each in a fresh process, and
that growth is scaled to 100k steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any, Optional

from benchmarks.common import ROOT, Receiver, monitoring_callback, otlp_env, rss_bytes, settle_memory

TARGET_MIB_PER_100K = 1.0
MIB = 2**20


def _slope_per_step(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of RSS (bytes) against step."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0


def direct(steps: int = 100_000, warmup: int = 10_000, samples: int = 10, monitored: bool = True,
           trace_every: int = 10, drain_s: float = 1.5) -> dict[str, Any]:
    """RSS over ``steps`` hook-driven steps after ``warmup`` steps; the callback exports to a live receiver
    (``trace_every=0``: tracing off; ``monitored=False``: a callback that does nothing, the harness alone)."""
    from lightning.pytorch import Callback

    from benchmarks.driver import FakeTrainer, drive, graph_batches
    from dgdn_testing.models import TensorRegressor

    module = TensorRegressor(features=8, lr=0.01)
    trainer = FakeTrainer(module)
    batches = graph_batches()
    with Receiver("live") as receiver, otlp_env(receiver.endpoint):
        if not monitored:
            callback = Callback()
        elif trace_every:
            callback = monitoring_callback(trace_every_n_steps=trace_every, tracing=True)
        else:
            callback = monitoring_callback(tracing=False)
        callback.setup(trainer, module, "fit")
        try:
            drive(callback, trainer, warmup, batches)
            time.sleep(drain_s)  # let the exporter drain what the warm-up queued
            settle_memory()
            points = [(0, rss_bytes())]

            def sample(step: int) -> None:
                # A quiescent reading: the exporter has sent what was queued, so in-flight request buffers
                # (which come and go by a MiB or so) do not pass for growth.
                time.sleep(drain_s)
                settle_memory()
                points.append((step - warmup, rss_bytes()))

            started = time.perf_counter()
            drive(callback, trainer, steps, batches, start_step=warmup, every=sample,
                  every_n=max(steps // samples, 1))
            seconds = time.perf_counter() - started - drain_s * (len(points) - 1)
            if points[-1][0] != steps:
                sample(warmup + steps)
        finally:
            callback.teardown(trainer, module, "fit")
        spans = receiver.stats().get("spans")
    growth = points[-1][1] - points[0][1]
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "seconds": seconds,
        "us_per_step": seconds / steps * 1e6,
        "rss_start_mib": points[0][1] / MIB,
        "rss_end_mib": points[-1][1] / MIB,
        "growth_mib": growth / MIB,
        "growth_mib_per_100k": growth / MIB * 100_000 / steps,
        "slope_mib_per_100k": _slope_per_step(points) * 100_000 / MIB,
        "samples": [(step, round(rss / MIB, 2)) for step, rss in points],
        "spans_received": spans,
    }


def trainer_run(steps: int = 20_000, warmup: int = 2_000, monitored: bool = True,
                trace_every: int = 10, drain_s: float = 1.5) -> dict[str, Any]:
    """RSS growth of a real Trainer fit of the tiny model between step ``warmup`` and the last step."""
    from lightning.pytorch import Callback

    from benchmarks.common import make_trainer
    from dgdn_testing.models import TensorRegressor, tiny_loader

    points: list[tuple[int, int]] = []
    every = max((steps - warmup) // 10, 1)

    class Probe(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
            step = trainer.global_step
            if step >= warmup and ((step - warmup) % every == 0 or step == steps):
                time.sleep(drain_s)
                settle_memory()
                points.append((step - warmup, rss_bytes()))

    with Receiver("live") as receiver, otlp_env(receiver.endpoint):
        callbacks: list[Any] = [monitoring_callback(trace_every_n_steps=trace_every, tracing=True)] if monitored \
            else []
        steps_per_epoch = 1000
        trainer = make_trainer(callbacks + [Probe()], max_epochs=-1, max_steps=steps)
        started = time.perf_counter()
        trainer.fit(TensorRegressor(features=8, lr=0.01), train_dataloaders=tiny_loader(steps_per_epoch))
        seconds = time.perf_counter() - started
    growth = points[-1][1] - points[0][1]
    measured = points[-1][0] - points[0][0]
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "seconds": seconds,
        "growth_mib": growth / MIB,
        "growth_mib_per_100k": growth / MIB * 100_000 / measured,
        "slope_mib_per_100k": _slope_per_step(points) * 100_000 / MIB,
        "samples": [(step, round(rss / MIB, 2)) for step, rss in points],
    }


def _isolated(function: str, **kwargs: Any) -> dict[str, Any]:
    """Run ``function(**kwargs)`` of this module in a fresh interpreter (a clean heap) and return its result."""
    code = ("import json, sys; from benchmarks.common import quiet, set_threads; quiet(); set_threads(); "
            "from benchmarks import memory; "
            f"print('RESULT' + json.dumps(memory.{function}(**json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    raise RuntimeError(f"memory.{function} failed:\n{out.stderr[-3000:]}")


def run(quick: bool = False, steps: Optional[int] = None, trainer_steps: Optional[int] = None,
        isolated: bool = True, drain_s: float = 1.5) -> dict[str, Any]:
    steps = steps if steps is not None else (10_000 if quick else 100_000)
    # RSS climbs during the first few thousand steps (the exporter's buffers, allocator arenas), then stays flat:
    # the warm-up covers that climb, so that the figure is the steady growth.
    warmup = min(10_000, max(steps // 2, 100))
    trainer_steps = trainer_steps if trainer_steps is not None else (0 if quick else 15_000)
    call = _isolated if isolated else (lambda name, **kw: globals()[name](**kw))
    samples = 4 if quick else 10
    result: dict[str, Any] = {
        "name": "memory",
        "what": "RSS growth over training steps (hooks driven directly; a real Trainer as cross-check)",
        "config": {"trace_every_n_steps": 10, "tracing": "live OTLP receiver", "steps_per_epoch": 1000,
                   "batch": "PyG Batch of 32 graphs", "rss": "VmRSS after gc.collect() and malloc_trim(0)"},
        "direct": call("direct", steps=steps, warmup=warmup, samples=samples, drain_s=drain_s),
        "direct_baseline": call("direct", steps=steps, warmup=warmup, samples=samples, monitored=False,
                                drain_s=drain_s),
    }
    if not quick:
        result["direct_notrace"] = call("direct", steps=steps, warmup=warmup, samples=samples, trace_every=0,
                                        drain_s=drain_s)
    if trainer_steps:
        warm = min(5_000, trainer_steps // 3)
        result["trainer"] = call("trainer_run", steps=trainer_steps, warmup=warm, drain_s=drain_s)
        result["trainer_baseline"] = call("trainer_run", steps=trainer_steps, warmup=warm, monitored=False,
                                          drain_s=drain_s)
    growth = result["direct"]["growth_mib_per_100k"]
    result["target_mib_per_100k"] = TARGET_MIB_PER_100K
    result["met"] = growth <= TARGET_MIB_PER_100K
    return result
