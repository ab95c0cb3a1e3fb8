"""GPU checks, on a CUDA machine only: synchronisations MonitoringCallback adds, and the step-time ratio.

* Added synchronisations: the callback's hooks run with ``torch.cuda.set_sync_debug_mode("warn")`` switched on
  for their duration only, in a fit of the GCN on the GPU with every feature on (tracing every step, so that
  CUDA events and deferred reads are exercised on every step); every warning raised is a synchronisation inside
  a hook. Must be 0. A whole-fit count with and without the callback is reported beside it.
* Step time with / without the callback on the GPU (same method as :mod:`benchmarks.end_to_end`).

Without CUDA the benchmark returns ``skipped`` with a note.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Optional

from benchmarks.common import (
    PER_STEP_HOOKS,
    Receiver,
    make_trainer,
    monitoring_callback,
    otlp_env,
    overridden_hooks,
)

ALL_HOOKS = PER_STEP_HOOKS + ("on_validation_batch_start", "on_validation_batch_end", "on_train_start",
                              "on_train_end", "on_validation_epoch_start", "on_validation_epoch_end")


def _sync_debug(function: Callable[..., Any], counter: list[int]) -> Callable[..., Any]:
    import torch

    def checked(*args: Any, **kwargs: Any) -> Any:
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return function(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            counter[0] += sum("synchroniz" in str(w.message).lower() for w in caught)

    return checked


def hook_synchronisations(epochs: int = 2) -> dict[str, Any]:
    """Synchronising calls made inside the callback's hooks during a GPU fit."""
    from benchmarks.end_to_end import gcn_workload

    workload = gcn_workload(True)
    counter = [0]
    callback = monitoring_callback(trace_every_n_steps=1, tracing=True)
    for name in overridden_hooks(callback, ALL_HOOKS):
        setattr(callback, name, _sync_debug(getattr(callback, name), counter))
    trainer = make_trainer([callback], max_epochs=epochs, accelerator="cuda")
    trainer.fit(workload.make_module(), **workload.fit_kwargs())
    return {"synchronisations_in_hooks": counter[0], "steps": int(trainer.global_step)}


def whole_fit_synchronisations(monitored: bool, epochs: int = 2) -> int:
    """Synchronisation warnings over a whole GPU fit (Lightning's own included)."""
    import torch

    from benchmarks.end_to_end import gcn_workload

    workload = gcn_workload(True)
    callbacks = [monitoring_callback(trace_every_n_steps=1, tracing=True)] if monitored else []
    trainer = make_trainer(callbacks, max_epochs=epochs, accelerator="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit(workload.make_module(), **workload.fit_kwargs())
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def run(quick: bool = False, reps: Optional[int] = None) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"name": "gpu", "skipped": True,
                "note": "no CUDA device on this machine: synchronisation count and GPU step-time ratio not measured"}
    from benchmarks.end_to_end import gcn_workload, run_workload

    with Receiver("live") as receiver, otlp_env(receiver.endpoint):
        hooks = hook_synchronisations()
        whole = {"without": whole_fit_synchronisations(False), "with": whole_fit_synchronisations(True)}
        workload = dataclasses.replace(gcn_workload(quick), accelerator="cuda")
        timing = run_workload(workload, reps if reps is not None else (3 if quick else 10), trace_every=10,
                              cases=("without", "with"))
    return {
        "name": "gpu",
        "skipped": False,
        "device": torch.cuda.get_device_name(0),
        "what": "synchronisations inside the callback's hooks (must be 0) and GPU step-time ratio",
        "synchronisations_in_hooks": hooks["synchronisations_in_hooks"],
        "steps_checked": hooks["steps"],
        "whole_fit_synchronisation_warnings": whole,
        "step_time": timing,
        "met": hooks["synchronisations_in_hooks"] == 0,
    }
