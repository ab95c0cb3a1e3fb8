"""Small guards every part uses: argument checks, warnings said once, and thread handling across ``fork``."""

from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from collections.abc import Hashable
from typing import Any, Optional, TypeVar

T = TypeVar("T")

#: A Prometheus metric name prefix, of letters, digits and underscores, not starting with a digit or ending with '_'.
NAMESPACE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*(?<!_)$")


def check(name: str, value: T, valid: bool, expected: str) -> T:
    """Return ``value``, or raise ``ValueError("<name> must be <expected>, got <value>")``.

    Example::

        port = check("port", port, isinstance(port, int) and 0 <= port <= 65535, "an integer between 0 and 65535")
    """
    if not valid:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    """An ``int`` (not a ``bool``) in ``[low, high]``."""
    valid = type(value) is int and value >= low and (high is None or value <= high)
    return check(
        name, value, valid, f"an integer between {low} and {high}" if high is not None else f"an integer >= {low}"
    )


def check_optional(name: str, value: T, kind: Any, expected: str) -> T:
    """``value`` when it is ``None`` or an instance of ``kind``, else the ``ValueError`` of :func:`check`."""
    return check(name, value, value is None or isinstance(value, kind), f"{expected} or None")


def check_namespace(value: Any, name: str = "namespace") -> str:
    return check(
        name,
        value,
        isinstance(value, str) and bool(NAMESPACE.match(value)),
        "a Prometheus name prefix like 'dgdn' (letters, digits, underscores; not starting with a digit "
        "or ending with '_')",
    )


def describe(error: BaseException) -> str:
    """``TypeName: message`` of an exception, for warnings and span statuses (the type alone without a message).

    Example::

        describe(ValueError("bad port"))  # "ValueError: bad port"
    """
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class WarnOnce:
    """Say each kind of message once per owner: a failing part says so, then keeps quiet and keeps going. The one
    say-once mechanism of the package (:class:`MonitorErrors` says the first error of each part through it).

    Args:
        logger: where the warnings go.

    Example::

        warn = WarnOnce(logging.getLogger(__name__))
        warn("push", "Could not push (%s)", reason)  # logged
        warn("push", "Could not push (%s)", reason)  # not again
        warn("checked", None)  # claims the kind without saying anything: True the first time only
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.said: set[Hashable] = set()
        self._lock = threading.Lock()

    def __call__(self, kind: Hashable, message: Optional[str], *args: Any, **kwargs: Any) -> bool:
        """Warn ``message % args`` if ``kind`` was not said yet (``None``: say nothing, only claim ``kind``);
        returns whether ``kind`` was new."""
        with self._lock:
            if kind in self.said:
                return False
            self.said.add(kind)
        if message is not None:
            self.logger.warning(message, *args, **kwargs)
        return True

    def __reduce__(self) -> tuple[type[WarnOnce], tuple[logging.Logger]]:
        return WarnOnce, (self.logger,)  # a copy starts with nothing said; loggers pickle by name


#: The parts of the monitor whose errors are counted in ``<namespace>_monitor_errors_total{part}``.
ERROR_PARTS: tuple[str, ...] = (
    "graph_size",
    "metrics",
    "tracing",
    "gpu",
    "discovery",
    "push",
    "exchange",
    "watchdog",
    "memory",
)


class MonitorErrors:
    """The errors the monitor degraded on, counted by part; the first of each part is warned with its cause,
    later ones are only counted, so a monitor that stopped measuring shows in its own metrics.

    Args:
        logger: where the first error of each part is warned.

    Example::

        errors = MonitorErrors(logging.getLogger(__name__))
        errors.report("push", "Could not push the final metrics to %s (%s)", url, describe(error))  # warned, counted
        errors.report("push", "Could not push the final metrics to %s (%s)", url, describe(error))  # counted
        errors.counts["push"]  # 2
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.counts = dict.fromkeys(ERROR_PARTS, 0)  # fixed keys: a scrape reads it while parts report
        self._lock = threading.Lock()
        self._first = WarnOnce(logger)  # the first error of each part is said

    def report(self, part: str, message: Optional[str] = None, *args: Any, **kwargs: Any) -> None:
        """Count one error of ``part``; warn ``message % args`` if it is the part's first (without a message the
        error is only counted: its part warns in its own words)."""
        with self._lock:
            self.counts[part] += 1
        self._first(part, message, *args, **kwargs)

    def __reduce__(self) -> tuple[type[MonitorErrors], tuple[logging.Logger]]:
        return MonitorErrors, (self.logger,)  # a copy in another process counts its own errors


_FORK_AWARE: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for owner in list(_FORK_AWARE):
        try:
            owner.after_fork_in_child()
        except Exception:  # pragma: no cover - a child must never fail because of monitoring
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def forget_threads_after_fork(owner: Any) -> None:
    """Have ``owner.after_fork_in_child()`` called in a forked child, where the owner's threads do not exist
    (only the forking thread survives ``fork``), so that it marks them dead and starts afresh when used again.

    The owner is held weakly: registering costs nothing once it is gone.
    """
    _FORK_AWARE.add(owner)
