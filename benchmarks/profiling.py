"""cProfile restricted to the inside of chosen hooks: where the time of a callback's hooks goes."""

from __future__ import annotations

import cProfile
import io
import pstats
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.common import PER_STEP_HOOKS, overridden_hooks


class HookProfiler:
    """Enables one ``cProfile.Profile`` for the duration of each wrapped hook call only."""

    def __init__(self) -> None:
        self.profile = cProfile.Profile()

    def attach(self, callback: Any, hooks: Sequence[str] = PER_STEP_HOOKS, prefix: str = "") -> None:
        for name in overridden_hooks(callback, hooks):
            setattr(callback, name, self._wrap(getattr(callback, name)))

    def _wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        profile = self.profile

        def profiled(*args: Any, **kwargs: Any) -> Any:
            profile.enable()
            try:
                return function(*args, **kwargs)
            finally:
                profile.disable()

        return profiled

    def top(self, steps: int, limit: int = 25, sort: str = "tottime", save: Optional[Path] = None) -> list[dict]:
        """The ``limit`` most expensive functions, with µs per training step (own and cumulative)."""
        stats = pstats.Stats(self.profile)
        if save is not None:
            save.parent.mkdir(parents=True, exist_ok=True)
            text = io.StringIO()
            pstats.Stats(self.profile, stream=text).sort_stats(sort).print_stats(60)
            save.write_text(text.getvalue())
        rows = []
        for (filename, line, function), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
            rows.append({
                "function": f"{_short(filename)}:{line}({function})",
                "calls_per_step": calls / steps,
                "own_us_per_step": tottime * 1e6 / steps,
                "cumulative_us_per_step": cumtime * 1e6 / steps,
            })
        key = "own_us_per_step" if sort == "tottime" else "cumulative_us_per_step"
        rows.sort(key=lambda row: row[key], reverse=True)
        return rows[:limit]


def _short(filename: str) -> str:
    for marker in ("site-packages/", "dgdn_lightning_monitor/", "benchmarks/"):
        if marker in filename:
            prefix = "" if marker == "site-packages/" else marker
            return prefix + filename.split(marker, 1)[1]
    return filename
