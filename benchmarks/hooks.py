"""Hook time per training step: MonitoringCallback against Lightning's ThroughputMonitor, DeviceStatsMonitor and
LearningRateMonitor together, on a tiny model where Lightning's loop and the hooks are all there is.

Each fit of a case runs the same batches; only the wall time inside the callbacks' per-step hooks is counted (see
:data:`benchmarks.common.PER_STEP_HOOKS`), divided by the optimizer steps. The cases run interleaved, rotating
their order each repetition, in one process; traced cases export to a live OTLP receiver in a child process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import (
    HookClock,
    Receiver,
    make_trainer,
    monitoring_callback,
    otlp_env,
    rotations,
    summarize,
    timer_floor_ns,
)
from dgdn_testing.models import TensorRegressor, tiny_batch_size, tiny_loader

TARGET_RATIO = 0.25
LIGHTNING = "lightning_monitors"
CASES: dict[str, str] = {
    "monitoring_trace10": "MonitoringCallback, all features on, tracing every 10th step to a live OTLP receiver",
    "monitoring_trace50": "MonitoringCallback, defaults (tracing every 50th step) to a live OTLP receiver",
    "monitoring_trace1": "MonitoringCallback, tracing every step to a live OTLP receiver",
    "monitoring_notrace": "MonitoringCallback, tracing off",
    LIGHTNING: "ThroughputMonitor + DeviceStatsMonitor + LearningRateMonitor",
}


def make_callbacks(case: str) -> list[Any]:
    if case == "monitoring_trace10":
        return [monitoring_callback(trace_every_n_steps=10, tracing=True)]
    if case == "monitoring_trace50":
        return [monitoring_callback(tracing=True)]
    if case == "monitoring_trace1":
        return [monitoring_callback(trace_every_n_steps=1, tracing=True)]
    if case == "monitoring_notrace":
        return [monitoring_callback(tracing=False)]
    if case == LIGHTNING:
        from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor, ThroughputMonitor

        return [ThroughputMonitor(batch_size_fn=tiny_batch_size), DeviceStatsMonitor(), LearningRateMonitor()]
    raise ValueError(f"unknown case {case!r}")


def fit_once(case: str, steps_per_epoch: int, epochs: int, instrument: Any = None) -> dict[str, Any]:
    """One fit of ``case``; the hooks are wrapped by ``instrument`` (a fresh :class:`HookClock` by default)."""
    clock = instrument if instrument is not None else HookClock()
    callbacks = make_callbacks(case)
    for callback in callbacks:
        clock.attach(callback, prefix=f"{type(callback).__name__}." if len(callbacks) > 1 else "")
    markers = [clock.marker()] if isinstance(clock, HookClock) else []
    trainer = make_trainer(callbacks + markers, max_epochs=epochs)
    trainer.fit(TensorRegressor(features=8, lr=0.01), train_dataloaders=tiny_loader(steps_per_epoch))
    steps = int(trainer.global_step)
    if not isinstance(clock, HookClock):
        return {"steps": steps}
    ordered = sorted(clock.step_ns)
    return {
        "steps": steps,
        "hook_ns": clock.total_ns,
        "hook_calls": clock.total_calls,
        "per_hook_ns": dict(clock.ns),
        "step_median_ns": ordered[len(ordered) // 2],
        "step_p99_ns": ordered[min(int(len(ordered) * 0.99), len(ordered) - 1)],
    }


def run(quick: bool = False, reps: Optional[int] = None, steps_per_epoch: Optional[int] = None,
        epochs: int = 2, cases: Sequence[str] = tuple(CASES), profile: bool = True,
        raw_dir: Optional[Path] = None) -> dict[str, Any]:
    reps = reps if reps is not None else (3 if quick else 9)
    steps_per_epoch = steps_per_epoch if steps_per_epoch is not None else (150 if quick else 400)
    cases = list(cases)
    floor = timer_floor_ns()
    samples: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
    spans: dict[str, list[int]] = {case: [] for case in cases}
    with Receiver("live") as receiver, otlp_env(receiver.endpoint):
        for case in cases:  # warm-up: imports, first-call costs, allocator
            fit_once(case, 20, 1)
        for _, case in rotations(cases, reps):
            before = receiver.stats().get("spans", 0)
            samples[case].append(fit_once(case, steps_per_epoch, epochs))
            spans[case].append(receiver.stats().get("spans", 0) - before)
        profiles = _profile(cases, samples, floor, steps_per_epoch, epochs, raw_dir) if profile else {}

    result_cases: dict[str, Any] = {}
    for case in cases:
        runs = samples[case]
        per_step = [run["hook_ns"] / run["steps"] / 1e3 for run in runs]
        net = [(run["hook_ns"] - floor * run["hook_calls"]) / run["steps"] / 1e3 for run in runs]
        hooks = sorted({name for run in runs for name in run["per_hook_ns"]})
        result_cases[case] = {
            "description": CASES[case],
            "us_per_step": summarize(per_step),
            "net_us_per_step": summarize(net),
            "median_step_us": summarize([run["step_median_ns"] / 1e3 for run in runs]),
            "p99_step_us": summarize([run["step_p99_ns"] / 1e3 for run in runs]),
            "wrapped_hook_calls_per_step": runs[0]["hook_calls"] / runs[0]["steps"],
            "per_hook_us_per_step": {
                name: summarize([run["per_hook_ns"].get(name, 0) / run["steps"] / 1e3 for run in runs])["median"]
                for name in hooks
            },
            "steps_per_fit": runs[0]["steps"],
            "spans_received_per_fit": summarize(spans[case]) if case.startswith("monitoring_trace") else None,
        }
    ratios: dict[str, Any] = {}
    if LIGHTNING in samples:
        base = [run["hook_ns"] / run["steps"] for run in samples[LIGHTNING]]
        for case in cases:
            if case == LIGHTNING:
                continue
            mine = [run["hook_ns"] / run["steps"] for run in samples[case]]
            paired = [a / b for a, b in zip(mine, base)]  # same repetition: adjacent in time
            ratio = summarize(mine)["median"] / summarize(base)["median"]
            ratios[case] = {"ratio_of_medians": ratio, "paired_ratio": summarize(paired),
                            "target": TARGET_RATIO, "met": ratio <= TARGET_RATIO}
    return {
        "name": "hook_time",
        "what": "µs per training step spent inside the callbacks' per-step hooks (tiny Linear model)",
        "config": {"reps": reps, "steps_per_fit": steps_per_epoch * epochs, "epochs_per_fit": epochs,
                   "batch_size": 32, "log_every_n_steps": 50, "logger": "a logger that drops everything",
                   "timer_floor_ns_per_wrapped_call": floor},
        "cases": result_cases,
        "ratios": ratios,
        "profiles": profiles,
    }


def _profile(cases: Sequence[str], samples: dict[str, list[dict[str, Any]]], floor: float,
             steps_per_epoch: int, epochs: int, raw_dir: Optional[Path]) -> dict[str, Any]:
    """cProfile the inside of the hooks of every MonitoringCallback case that misses the target (and of the
    all-features case in any event), in one extra, untimed fit each."""
    from benchmarks.profiling import HookProfiler

    if LIGHTNING not in samples:
        return {}
    base = summarize([run["hook_ns"] / run["steps"] for run in samples[LIGHTNING]])["median"]
    chosen = [case for case in cases if case not in (LIGHTNING, "monitoring_trace50") and
              (case == "monitoring_trace10" or
               summarize([run["hook_ns"] / run["steps"] for run in samples[case]])["median"] > TARGET_RATIO * base)]
    out = {}
    for case in chosen + [LIGHTNING]:
        profiler = HookProfiler()
        steps = fit_once(case, steps_per_epoch, epochs, instrument=profiler)["steps"]
        save = raw_dir / f"profile_hooks_{case}.txt" if raw_dir is not None else None
        out[case] = profiler.top(steps, limit=20, save=save)
    return out
