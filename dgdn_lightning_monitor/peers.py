"""The bottleneck verdict's own clock, and what a rank needs from the other ranks of its run to say whether one of
them is a straggler: their own work per training step (:data:`~dgdn_lightning_monitor.bottleneck.OWN_WORK`),
shared through the key-value store that ``torch.distributed`` set its process group up with.

Every ``every_s`` seconds during ``fit`` a daemon thread of each rank (never a training step, never a collective,
never the device):

1. asks for a new verdict (``evaluate``, the judge's evaluation as a scrape does it; evaluations closer than the
   judge's interval count once), so that a change is said in the log within seconds even where nothing scrapes,
   and the figures below are fresh;
2. under DDP, writes the rank's own work (``own_work()``) under its rank,
3. and reads every other rank's in one request, once every rank has written its own.

The store is the TCP store at ``MASTER_ADDR``:``MASTER_PORT``, the rendezvous that every Lightning cluster
environment and ``torchrun`` set up, reached through a client connection of this thread's own: a slow or lost store
delays this thread alone, and no operation of the process group waits behind it. Keys live under the run's id and
stage. A failed round is retried at the next one; three in a row are counted and warned once, later tries come a
minute apart, and the straggler verdict waits until the figures come back. A rank alone, or without ``MASTER_ADDR``
(another rendezvous), only evaluates.

Example::

    exchange = PeerExchange(rank=1, world_size=4, namespace="run-id/fit", evaluate=report, own_work=lambda: work)
    exchange.start()
    exchange.figures()  # {0: {"data_wait": 0.004, "forward": 0.021, "between_steps": 0.001}, 2: {...}, 3: {...}}
    exchange.stop()
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Optional

from dgdn_lightning_monitor.bottleneck import OWN_WORK
from dgdn_lightning_monitor.guards import MonitorErrors, check, describe

log = logging.getLogger(__name__)

#: Rounds that fail in a row before the exchange says so (a peer that just ended its run fails one or two).
FAILURES_TO_WARN = 3
#: Seconds between tries once that many failed (each failed connection also logs an error of torch's own).
BACK_OFF_S = 60.0
#: Seconds a store operation may take before its round gives up (a live store answers in milliseconds).
STORE_TIMEOUT_S = 2.0
#: The longest the end of a run (or of the process) waits for a round under way, since a process that exits while
#: the thread is inside a store operation is aborted by torch's client.
STOP_WAIT_S = STORE_TIMEOUT_S + 1.0


def store_address(environ: Mapping[str, str] = os.environ) -> Optional[tuple[str, int]]:
    """The rendezvous store's host and port from ``MASTER_ADDR`` and ``MASTER_PORT``; ``None`` without them."""
    host, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT", "")
    return (host, int(port)) if host and port.isdigit() else None


def connect(address: tuple[str, int], timeout_s: float) -> Any:
    """A client connection of its own to the TCP store at ``address`` (not counted as a worker of the rendezvous)."""
    import torch.distributed as dist

    host, port = address
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


class PeerExchange:
    """Evaluate the verdict on a clock; under DDP, share this rank's own work per training step with the other ranks
    of its run, and keep theirs.

    Args:
        rank: this process's global rank.
        world_size: the number of ranks.
        namespace: what the run's keys live under (its id and stage: ranks of one run agree on it, other runs do not).
        evaluate: called first in every round (the judge's evaluation; an error is counted under ``metrics``).
        own_work: this rank's figures now (seconds per step by category), ``None`` before it has any.
        errors: where a failing exchange is counted (part ``exchange``).
        every_s: seconds between rounds.
        address: the store's host and port; by default :func:`store_address`.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        namespace: str,
        evaluate: Callable[[], Any],
        own_work: Callable[[], Optional[Mapping[str, float]]],
        errors: Optional[MonitorErrors] = None,
        every_s: float = 5.0,
        address: Optional[tuple[str, int]] = None,
    ) -> None:
        check("world_size", world_size, type(world_size) is int and world_size >= 1, "an integer >= 1")
        check("rank", rank, type(rank) is int and 0 <= rank < world_size, "an integer in [0, world_size)")
        check(
            "every_s",
            every_s,
            isinstance(every_s, (int, float)) and math.isfinite(every_s) and every_s > 0,
            "seconds > 0",
        )
        self.rank, self.world_size, self.every_s = rank, world_size, float(every_s)
        self.namespace = namespace
        self._evaluate, self._own_work = evaluate, own_work
        self._errors = errors if errors is not None else MonitorErrors(log)
        self._address = address if address is not None else store_address()
        self._peers = [str(peer) for peer in range(world_size) if peer != rank]
        self._figures: dict[int, dict[str, float]] = {}  # replaced whole: a reader on another thread needs no lock
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def figures(self) -> dict[int, dict[str, float]]:
        """The other ranks' latest figures, by rank (empty until every rank has shared its own)."""
        return self._figures

    @property
    def sharing(self) -> bool:
        """Whether the rounds share figures (there are peers, and a store to reach them through)."""
        return bool(self._peers) and self._address is not None

    def start(self) -> None:
        """Start the rounds (once); they end with :meth:`stop`, or at the latest when the process exits."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dgdn-monitor-rounds", daemon=True)
            self._thread.start()
            atexit.register(self.stop)

    def stop(self) -> None:
        """End the rounds, waiting at most :data:`STOP_WAIT_S` for one under way (its store operations time out
        sooner); the last figures stay, for the run's last evaluation. Also called when the process exits."""
        self._stop.set()
        atexit.unregister(self.stop)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_WAIT_S)

    def _run(self) -> None:
        store: Any = None
        failures, next_try = 0, 0.0
        while not self._stop.wait(self.every_s):
            try:
                self._evaluate()
            except Exception as error:  # a monitoring failure: said once, and the rounds go on
                self._errors.report("metrics", "Could not evaluate the bottleneck verdict (%s)", describe(error))
            if not self.sharing or time.monotonic() < next_try:
                continue
            try:
                if store is None:
                    assert self._address is not None
                    store = connect(self._address, STORE_TIMEOUT_S)
                self._round(store)
                failures = 0
            except Exception as error:  # the store gone (its rank ended), a timeout: try again at the next round
                store, failures = None, failures + 1
                if failures >= FAILURES_TO_WARN:
                    next_try = time.monotonic() + BACK_OFF_S
                if failures == FAILURES_TO_WARN and not self._stop.is_set():
                    self._errors.report(
                        "exchange", "Could not share the straggler figures with the other ranks (%s)", describe(error)
                    )

    def _round(self, store: Any) -> None:
        own = self._own_work()
        prefix = f"dgdn-monitor/{self.namespace}/own-work/"
        if own is not None:
            store.set(prefix + str(self.rank), json.dumps({name: float(own.get(name, 0.0)) for name in OWN_WORK}))
        keys = [prefix + peer for peer in self._peers]
        if not store.check(keys):  # a rank without a window yet: its peers keep what they had
            return
        figures = {}
        for peer, value in zip(self._peers, store.multi_get(keys)):
            shared = json.loads(value)
            figures[int(peer)] = {name: float(shared.get(name, 0.0)) for name in OWN_WORK}
        self._figures = figures
