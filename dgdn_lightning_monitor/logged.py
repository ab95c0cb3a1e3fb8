"""Logged values (loss, accuracy) taken from Lightning's own logging, as the Python numbers it already made.

At its logging steps (``log_every_n_steps``), at epoch ends and at the end of validation, Lightning turns what the
module logged into Python numbers and hands them to every logger. :class:`LoggedValues` is a logger that only
forwards those numbers: reading them costs the training step nothing and adds no device synchronisation. It is
attached only when the Trainer already has a logger; without one, Lightning makes no such numbers, and the
callback reads the logged tensors itself at the same points (see ``MonitoringCallback``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

from lightning.pytorch.loggers import Logger

Sink = Callable[[Mapping[str, float]], None]


def pick(logged: Mapping[str, Any], key: str) -> Any:
    """The value logged as ``key``; ``self.log(..., on_step=True, on_epoch=True)`` logs ``key_step`` and
    ``key_epoch`` instead."""
    for name in (key, f"{key}_step", f"{key}_epoch"):
        value = logged.get(name)
        if value is not None:
            return value
    return None


class LoggedValues(Logger):
    """A Lightning logger that forwards every logged dict of numbers to ``sink``.

    Args:
        sink: called with the metrics dict Lightning logs (plain floats).

    Example::

        trainer.loggers = [*trainer.loggers, LoggedValues(print)]
    """

    def __init__(self, sink: Sink) -> None:
        super().__init__()
        self._sink = sink

    @property
    def name(self) -> str:
        return "dgdn_lightning_monitor"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> Optional[str]:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        self._sink(metrics)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass
