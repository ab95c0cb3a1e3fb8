"""PeerExchange against a real torch.distributed TCPStore (the rendezvous store of a run): every rank sees the others'
own work once all have shared it, runs and stages do not mix, a lost store is warned once and counted, and a rank
alone or without ``MASTER_ADDR`` starts nothing. The 2-rank gloo DDP runs of the fault matrix
(``tests/test_bottleneck_matrix.py``) exercise it through Lightning's own rendezvous. Alone, the rounds evaluate the
verdict all the same."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, Optional

import pytest
import torch.distributed as dist
from prom_helpers import wait_until

from dgdn_lightning_monitor.guards import MonitorErrors
from dgdn_lightning_monitor.peers import PeerExchange, store_address

EVERY_S = 0.05


@pytest.fixture
def store() -> Iterator[Any]:
    """The rendezvous store as rank 0 of a run hosts it."""
    yield dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def work(forward: float) -> dict[str, float]:
    return {"data_wait": 0.001, "forward": forward, "between_steps": 0.002}


def exchanges(store: Any, own: list[Optional[dict[str, float]]], namespace: str = "run/fit-1") -> list[PeerExchange]:
    address = ("127.0.0.1", store.port)
    ranks = []
    for rank in range(len(own)):
        exchange = PeerExchange(
            rank, len(own), namespace, lambda: None, lambda r=rank: own[r], every_s=EVERY_S, address=address
        )
        exchange.start()
        ranks.append(exchange)
    return ranks


def test_every_rank_sees_the_others_once_all_its_peers_have_shared(store) -> None:
    own: list[Optional[dict[str, float]]] = [work(0.01), work(0.02), None]  # rank 2 has no window yet
    ranks = exchanges(store, own)
    try:
        time.sleep(10 * EVERY_S)
        assert [r.figures() for r in ranks[:2]] == [{}, {}]  # not until every peer has shared
        assert ranks[2].figures() == {0: work(0.01), 1: work(0.02)}  # its own peers all have
        own[2] = work(0.05)
        wait_until(lambda: all(len(r.figures()) == 2 for r in ranks), 20.0, 0.01, "figures of every peer")
        assert ranks[0].figures() == {1: work(0.02), 2: work(0.05)}
        assert ranks[2].figures() == {0: work(0.01), 1: work(0.02)}
        own[1] = work(0.03)  # the next window
        wait_until(lambda: ranks[0].figures()[1] == work(0.03), 20.0, 0.01, "the newer figures")
    finally:
        for r in ranks:
            r.stop()
    assert ranks[0].figures()[1] == work(0.03)  # kept for the run's last evaluation


def test_each_round_evaluates_first_and_runs_do_not_mix(store) -> None:
    rounds = []
    address = ("127.0.0.1", store.port)
    first = PeerExchange(
        0, 2, "run-a/fit-1", lambda: rounds.append(1), lambda: work(0.01), every_s=EVERY_S, address=address
    )
    other = PeerExchange(1, 2, "run-b/fit-1", lambda: None, lambda: work(0.09), every_s=EVERY_S, address=address)
    first.start(), other.start()
    try:
        wait_until(lambda: len(rounds) >= 5, 20.0, 0.01, "rounds")
        assert first.figures() == {} and other.figures() == {}  # rank 1 of run-a never shared: nothing
    finally:
        first.stop(), other.stop()


def test_a_lost_store_is_warned_once_and_counted_and_the_verdict_goes_on(caplog) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    errors = MonitorErrors(logging.getLogger("dgdn_lightning_monitor.peers"))
    rounds: list[float] = []
    exchange = PeerExchange(
        0,
        2,
        "run/fit-1",
        lambda: rounds.append(time.monotonic()),
        lambda: work(0.01),
        errors,
        EVERY_S,
        ("127.0.0.1", port),
    )
    with caplog.at_level(logging.WARNING, logger="dgdn_lightning_monitor"):
        began = time.monotonic()
        exchange.start()
        assert time.monotonic() - began < 0.5  # start never waits for the store
        wait_until(lambda: errors.counts["exchange"] >= 1, 60.0, 0.01, "a counted failure")
        warned = len(rounds)
        # The verdict is still evaluated every EVERY_S once the store was given up.
        wait_until(lambda: len(rounds) >= warned + 10, 20.0, 0.01, "evaluations after the store was given up")
        exchange.stop()
    said = [r for r in caplog.records if "straggler figures" in r.getMessage()]
    assert len(said) == 1 and errors.counts["exchange"] == 1, (said, errors.counts)
    assert exchange.figures() == {}


def test_alone_or_without_a_store_the_rounds_only_evaluate(monkeypatch) -> None:
    """The verdict's clock runs for one process too: a run that nothing scrapes still hears its verdict."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    rounds: list[int] = []
    alone = PeerExchange(0, 1, "run/fit-1", lambda: rounds.append(0), lambda: work(0.01), every_s=EVERY_S)
    unreachable = PeerExchange(0, 2, "run/fit-1", lambda: rounds.append(1), lambda: work(0.01), every_s=EVERY_S)
    assert not alone.sharing and not unreachable.sharing
    alone.start(), unreachable.start()
    try:
        wait_until(lambda: rounds.count(0) >= 3 and rounds.count(1) >= 3, 20.0, 0.01, "evaluations")
    finally:
        alone.stop(), unreachable.stop()
    assert alone.figures() == unreachable.figures() == {}


def test_an_evaluation_that_fails_is_counted_and_the_rounds_go_on(caplog) -> None:
    calls: list[int] = []

    def failing() -> None:
        calls.append(1)
        raise RuntimeError("no ledger")

    errors = MonitorErrors(logging.getLogger("dgdn_lightning_monitor.peers"))
    rounds = PeerExchange(0, 1, "run/fit-1", failing, lambda: None, errors, EVERY_S)
    with caplog.at_level(logging.WARNING, logger="dgdn_lightning_monitor"):
        rounds.start()
        wait_until(lambda: len(calls) >= 3, 20.0, 0.01, "three rounds")
        rounds.stop()
    assert errors.counts["metrics"] >= 3
    assert len([r for r in caplog.records if "no ledger" in r.getMessage()]) == 1


EXIT_SCRIPT = """
import sys, time
import torch.distributed as dist
from dgdn_lightning_monitor.peers import PeerExchange
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # rank 0 hosts the rendezvous store
work = lambda: {"data_wait": 0.0, "forward": 0.1, "between_steps": 0.0}
for rank in range(2):
    PeerExchange(rank, 2, "run", lambda: None, work, every_s=0.01, address=("127.0.0.1", store.port)).start()
time.sleep(0.3)  # and exit without stopping them, rounds under way
"""


def test_a_process_that_exits_with_its_rounds_under_way_exits_cleanly() -> None:
    """A thread inside a store operation when the interpreter finalises makes torch abort the process (about half
    of such exits did before the rounds ended at exit): the user's job must not end with SIGABRT."""
    for _ in range(4):
        done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_the_store_address_is_the_rendezvous_one() -> None:
    assert store_address({"MASTER_ADDR": "node-7", "MASTER_PORT": "29500"}) == ("node-7", 29500)
    assert store_address({"MASTER_ADDR": "node-7"}) is None
    assert store_address({"MASTER_PORT": "29500"}) is None
    assert store_address({"MASTER_ADDR": "node-7", "MASTER_PORT": "x"}) is None


@pytest.mark.parametrize(
    ("arguments", "name"),
    [({"rank": 2, "world_size": 2}, "rank"), ({"world_size": 0}, "world_size"), ({"every_s": 0.0}, "every_s")],
)
def test_bad_arguments_are_named(arguments, name) -> None:
    kwargs: dict[str, Any] = {"rank": 0, "world_size": 2, "every_s": 1.0, **arguments}
    with pytest.raises(ValueError, match=name):
        PeerExchange(kwargs["rank"], kwargs["world_size"], "run", lambda: None, lambda: None, every_s=kwargs["every_s"])
