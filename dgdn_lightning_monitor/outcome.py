"""How a run ended: ``running``, ``completed``, ``failed`` (with the exception's class), ``interrupted`` or
``terminated``.

A run starts as :data:`RUNNING` (``TrainingMetrics.start_run``) and ends as :func:`classify` of the exception
Lightning passed to ``on_exception`` (``None`` for a run that reached ``teardown`` without one).
:class:`~dgdn_lightning_monitor.metrics.TrainingMetrics` exports it as ``<namespace>_run_outcome``: one series of
value 1 whose ``outcome`` and ``exception`` labels say it. A run killed with SIGKILL cannot say anything: its last
scrape (or the absence of a final push) shows ``running``, and the crash alert comes from its endpoint's silence.

Example::

    classify(None)                  # ("completed", "")
    classify(KeyboardInterrupt())   # ("interrupted", "KeyboardInterrupt")
    classify(ValueError("bad"))     # ("failed", "ValueError")
"""

from __future__ import annotations

from typing import Optional

#: Every outcome, in lifecycle order.
OUTCOMES: tuple[str, ...] = ("running", "completed", "failed", "interrupted", "terminated")

#: ``(outcome, exception class)`` of a run that has started and not ended.
RUNNING: tuple[str, str] = ("running", "")

# Lightning (2.x) raises SIGTERMException (a SystemExit) when its signal connector saw a SIGTERM, e.g. a scheduler
# ending a job; older releases named it GracefulExitException. Matched by name so that no Lightning import or
# version is needed here.
_TERMINATED = ("SIGTERMException", "GracefulExitException")


def classify(exception: Optional[BaseException]) -> tuple[str, str]:
    """The outcome of a run that ended with ``exception`` (``None``: it ended normally).

    Args:
        exception: what Lightning passed to ``on_exception``, or ``None``.

    Returns:
        ``(outcome, exception class name)``; the name is ``""`` for a completed run.
    """
    if exception is None:
        return ("completed", "")
    name = type(exception).__name__
    if isinstance(exception, KeyboardInterrupt):
        return ("interrupted", name)
    if any(klass.__name__ in _TERMINATED for klass in type(exception).__mro__):
        return ("terminated", name)
    return ("failed", name)
