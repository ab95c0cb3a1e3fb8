"""Run end: from the end of the last training batch until ``Trainer.fit`` returns.

That span covers Lightning's own end of training and MonitoringCallback's teardown: reading the last values,
flushing spans, stopping the GPU sampler and the metrics server. Spans go to (i) a live OTLP receiver, (ii) a port
nothing listens on (the collector is down), (iii) a receiver that accepts connections and never answers. A fit
without the callback gives Lightning's part. The teardown's own parts are timed by wrapping them on the instance.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable, Optional

from lightning.pytorch import Callback

from benchmarks.common import Receiver, make_trainer, monitoring_callback, otlp_env, rotations, summarize
from dgdn_testing.models import TensorRegressor, tiny_loader

TARGET_S = 2.0
CASES = ("no_callback", "live", "closed", "hang")
DESCRIPTIONS = {
    "no_callback": "no MonitoringCallback (Lightning's own end of training)",
    "live": "spans to a live OTLP receiver",
    "closed": "spans to a closed port (collector down)",
    "hang": "spans to a receiver that accepts and never answers",
}


class _LastBatch(Callback):
    """Placed last: the time at which the last callback finished with the last batch."""

    def __init__(self) -> None:
        self.at = 0.0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.at = time.perf_counter()


def _timed(parts: dict[str, float], key: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            parts[key] += time.perf_counter() - start

    return timed


class _WrapTeardownParts(Callback):
    """Placed first: once the run has set up, wraps the parts of the callback's teardown to time them."""

    def __init__(self, callback: Any, parts: dict[str, float]) -> None:
        self.callback = callback
        self.parts = parts

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        cb = self.callback
        cb.teardown = _timed(self.parts, "teardown_total", cb.teardown)
        cb.tracer.finish = _timed(self.parts, "tracer_finish", cb.tracer.finish)
        cb.gpu.stop = _timed(self.parts, "gpu_stop", cb.gpu.stop)
        run = getattr(cb, "_run", None)
        if run is not None:
            run.server.stop = _timed(self.parts, "metrics_server_stop", run.server.stop)
        dist = getattr(cb, "_dist", None)
        if dist is not None and hasattr(dist, "finish"):
            dist.finish = _timed(self.parts, "distributed_finish", dist.finish)


def fit_once(case: str, endpoint: Optional[str], steps: int, trace_every: int) -> dict[str, Any]:
    last = _LastBatch()
    parts: dict[str, float] = defaultdict(float)
    callbacks: list[Any] = []
    if case != "no_callback":
        callback = monitoring_callback(trace_every_n_steps=trace_every, tracing=True)
        callbacks = [_WrapTeardownParts(callback, parts), callback]
    with otlp_env(endpoint):
        trainer = make_trainer(callbacks + [last], max_epochs=1)
        trainer.fit(TensorRegressor(features=8, lr=0.01), train_dataloaders=tiny_loader(steps))
        returned = time.perf_counter()
    return {"seconds": returned - last.at, "parts": dict(parts)}


def run(quick: bool = False, reps: Optional[int] = None, steps: int = 300, trace_every: int = 10) -> dict[str, Any]:
    reps = reps if reps is not None else (1 if quick else 3)
    samples: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    with Receiver("live") as live, Receiver("hang") as hang, Receiver("closed") as closed:
        endpoints = {"no_callback": None, "live": live.endpoint, "closed": closed.endpoint, "hang": hang.endpoint}
        fit_once("live", live.endpoint, 20, trace_every)  # warm-up
        for _, case in rotations(CASES, reps):
            samples[case].append(fit_once(case, endpoints[case], steps, trace_every))
    cases = {}
    for case in CASES:
        runs = samples[case]
        seconds = [run["seconds"] for run in runs]
        names = sorted({name for run in runs for name in run["parts"]})
        cases[case] = {
            "description": DESCRIPTIONS[case],
            "seconds": summarize(seconds),
            "parts_seconds": {name: summarize([run["parts"].get(name, 0.0) for run in runs])["median"]
                              for name in names},
            "target_s": TARGET_S if case != "no_callback" else None,
            "met": max(seconds) <= TARGET_S if case != "no_callback" else None,
        }
    return {
        "name": "run_end",
        "what": "seconds from the end of the last batch to Trainer.fit returning",
        "config": {"reps": reps, "steps": steps, "trace_every_n_steps": trace_every,
                   "verdict": "the slowest repetition against the target"},
        "cases": cases,
    }
