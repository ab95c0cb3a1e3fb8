"""The words of a run every part shares: its stages, the phases of a training step and the gauges fed from what
the module logs.

Lightning names a running stage ``train``, ``sanity_check``, ``validate``, ``test`` or ``predict``
(``trainer.state.stage``); the metrics label series with those names (``stage="validate"``), the spans and batch
records of an evaluation stage carry the noun (``validation_epoch``, ``validation_batch``).

Example::

    lightning_stage(trainer, default="validate")  # "validate" in a validation hook
    SPAN_STAGES["validate"]                         # "validation"
"""

from __future__ import annotations

from typing import Any

#: The stages of ``<namespace>_stage`` and ``..._stage_seconds_total``: Lightning's running stages, and ``idle``
#: before the first and after the last.
STAGES: tuple[str, ...] = ("idle", "sanity_check", "train", "validate", "test", "predict")

#: What ``<namespace>_progress_total`` counts, by ``stage``: every stage but ``idle``, and checkpoint saves.
PROGRESS_UNITS: tuple[str, ...] = (*STAGES[1:], "checkpoint")

#: Lightning's running stage -> the name its spans and batch records carry (``train_epoch``, ``validation_batch``).
SPAN_STAGES: dict[str, str] = {"train": "train", "validate": "validation", "test": "test", "predict": "predict"}

#: The phases of a training step, in order, as phase -> (the hook mark that starts it, the marks that may end it,
#: the first one present wins). Metrics, spans, step statistics and the CLI all follow this table.
PHASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "data_fetch": ("fetch_start", ("fetch_end", "batch_start")),
    "forward": ("batch_start", ("backward_start", "optimizer_start", "batch_end")),
    "backward": ("backward_start", ("backward_end",)),
    "optimizer_step": ("optimizer_start", ("batch_end",)),
}

#: Gauges fed from what the LightningModule logs -> the ``MonitoringCallback`` argument naming the logged key.
LOGGED_GAUGES: dict[str, str] = {
    "training_loss": "train_loss_key",
    "validation_loss": "val_loss_key",
    "training_accuracy": "train_acc_key",
    "validation_accuracy": "val_acc_key",
}
#: The logged gauges read during training, and those read at the end of a validation.
TRAIN_GAUGES: tuple[str, ...] = tuple(gauge for gauge in LOGGED_GAUGES if gauge.startswith("training_"))
VALIDATION_GAUGES: tuple[str, ...] = tuple(gauge for gauge in LOGGED_GAUGES if gauge.startswith("validation_"))


def lightning_stage(trainer: Any, default: str) -> str:
    """Lightning's running stage (``trainer.state.stage``), or ``default`` when none is running (or the Trainer
    does not say)."""
    stage = getattr(getattr(trainer, "state", None), "stage", None)
    return getattr(stage, "value", None) or default


def span_stage(trainer: Any) -> str:
    """The name the spans and batch records of Lightning's running evaluation stage carry (``validation``)."""
    stage = lightning_stage(trainer, "validate")
    return SPAN_STAGES.get(stage, stage)
