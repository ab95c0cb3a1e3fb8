"""What the training step leaves behind for tracing: timestamps (and CUDA events) at the hook boundaries.

Only sampled steps get a record. Marking is one ``perf_counter_ns`` call and a list append; spans are built from
the record later, with explicit start and end times, so the step never enters or leaves a span context.
"""

from __future__ import annotations

import time
from typing import Any, Optional, TypeVar

import torch

from dgdn_lightning_monitor.graph_size import GraphSize
from dgdn_lightning_monitor.vocabulary import PHASES

T = TypeVar("T")


class BatchRecord:
    """Hook-boundary timestamps of one sampled batch.

    Args:
        stage: ``train``, ``validation``, ``test`` or ``predict``.
        epoch: current epoch.
        batch_idx: index of the batch in its epoch.
        global_step: optimizer steps so far.
        size: samples, nodes and edges of the batch.
        cuda: also record a CUDA event at every mark, to measure device time without synchronising.
        parent: the epoch span its spans go under, whenever they are built.

    Example::

        record = BatchRecord("train", 0, 3, 3, GraphSize(32, 600, 2400))
        record.mark("batch_start"); ...; record.mark("batch_end")
        record.phases()  # [("forward", start_ns, end_ns)]
    """

    __slots__ = ("stage", "epoch", "batch_idx", "global_step", "size", "marks", "events", "parent")

    def __init__(
        self,
        stage: str,
        epoch: int,
        batch_idx: int,
        global_step: int,
        size: GraphSize,
        cuda: bool = False,
        parent: Any = None,
    ) -> None:
        self.stage, self.epoch, self.batch_idx, self.global_step, self.size = stage, epoch, batch_idx, global_step, size
        self.marks: dict[str, int] = {}
        self.events: Optional[dict[str, torch.cuda.Event]] = {} if cuda else None
        self.parent = parent

    def mark(self, name: str, ns: Optional[int] = None) -> None:
        """Note that boundary ``name`` was reached now (or at ``ns``, a past ``perf_counter_ns``).

        A start mark keeps its first time and an end mark its last, so repeated hooks (several backward calls
        under manual optimization) widen the phase instead of splitting it.
        """
        if name.endswith("_start") and name in self.marks:
            return
        self.marks[name] = time.perf_counter_ns() if ns is None else ns
        if self.events is not None and ns is None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events[name] = event

    @property
    def start_ns(self) -> int:
        return self.marks.get("fetch_start", self.marks.get("batch_start", 0))

    @property
    def end_ns(self) -> int:
        return self.marks.get("batch_end", self.start_ns)

    def phases(self) -> list[tuple[str, int, int]]:
        """``(phase, start_ns, end_ns)`` for each phase whose boundaries were marked."""
        return _bounds(self.marks)

    def device_ready(self) -> bool:
        """True when every recorded CUDA event has completed (never blocks)."""
        if not self.events:
            return True
        last = self.events.get("batch_end")
        return last.query() if last is not None else all(e.query() for e in self.events.values())

    def device_milliseconds(self) -> dict[str, float]:
        """Device time of each phase (and of the whole ``batch``) whose boundary events both exist; call once
        :meth:`device_ready`."""
        bounds = _bounds(self.events or {}, {"batch": ("batch_start", ("batch_end",))})
        return {name: begin.elapsed_time(end) for name, begin, end in bounds}


def _bounds(
    marks: dict[str, T], extra: Optional[dict[str, tuple[str, tuple[str, ...]]]] = None
) -> list[tuple[str, T, T]]:
    """``(phase, start, end)`` of each phase of :data:`~dgdn_lightning_monitor.metrics.PHASES` (and ``extra``) whose
    start and one of whose ends are in ``marks``."""
    found = []
    for name, (start, ends) in {**PHASES, **(extra or {})}.items():
        end = next((marks[e] for e in ends if e in marks), None)
        if start in marks and end is not None:
            found.append((name, marks[start], end))
    return found
