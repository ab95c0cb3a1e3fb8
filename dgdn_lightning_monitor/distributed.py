"""The multi-process side of a monitored run. Under Lightning's DDP every rank serves its own ``/metrics``;
:class:`DistributedRun` adds what needs the other ranks or the outside world:

* **One small collective at set-up** (none per step or epoch): the ranks exchange their endpoints and adopt rank
  0's run id and trace key (from which every rank derives each epoch's trace ids); a rank whose part failed
  still takes part, with the cause.
* **Discovery**: the local rank 0 of every node writes a Prometheus file-SD file listing its node's endpoints
  (written atomically, removed when the run ends, also after an exception: once a scrape has read how the run
  ended and the node's other ranks have closed their endpoints, from a background thread).
* **Pushgateway** (:mod:`~dgdn_lightning_monitor.pushgateway`): at the end of a run every rank pushes its final
  figures (job, run id, rank), in bounded time; rank 0 deletes finished groups past their retention at set-up.

A failed write, push or exchange is counted, warned once, and the feature dropped; training goes on.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing
import multiprocessing.util
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlparse

import torch.distributed as dist
from prometheus_client import CollectorRegistry

from dgdn_lightning_monitor import pushgateway
from dgdn_lightning_monitor.guards import MonitorErrors, check, describe, forget_threads_after_fork
from dgdn_lightning_monitor.labels import DEFAULT_JOB, RankLabels
from dgdn_lightning_monitor.pushgateway import PUSH_TIMEOUT_S, push_final_metrics, remove_finished_groups
from dgdn_lightning_monitor.server import (
    FINAL_SCRAPE_LIMIT_S,
    MetricsServer,
    doubles_quick_start_target,
    host_port,
    reachable_host,
)

log = logging.getLogger(__name__)

#: A run rewrites the modification time of its discovery file this often, from a daemon thread.
REFRESH_S = 30.0
#: A discovery file not refreshed for this long belongs to a run that is gone (killed, its node lost); the next run
#: writing into the directory, every live run's refresh and the native stack remove it.
EXPIRE_S = 180.0

_JOB = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")
_HOST = re.compile(r"^[A-Za-z0-9_.:%\[\]-]+$")
_FILE_PART = re.compile(r"[^A-Za-z0-9_.-]+")


# How often a finished run's removal checks whether the other ranks of its node still serve, and how long one check
# may take.
_PEER_POLL_S = 0.1


def _serving(peer: Endpoint) -> bool:
    """Whether ``peer``'s endpoint still accepts connections (its process has not exited)."""
    try:
        with socket.create_connection((peer.host, int(peer.port or 0)), timeout=_PEER_POLL_S):
            return True
    except OSError:
        return False


def _join_at_exit(thread: threading.Thread) -> Callable[[], None]:
    """Make the exit of the process (also of a multiprocessing worker, which may end without atexit) wait for
    ``thread``, a discovery file's removal; registered after the endpoint's own exit wait, so it runs first.
    Returns what forgets it again (once the thread is done)."""

    def join() -> None:
        thread.join(FINAL_SCRAPE_LIMIT_S)

    atexit.register(join)
    finalizer = None
    if multiprocessing.parent_process() is not None:
        finalizer = multiprocessing.util.Finalize(None, join, exitpriority=1)

    def forget() -> None:
        atexit.unregister(join)
        if finalizer is not None:
            finalizer.cancel()

    return forget


def _is_url(value: Any) -> bool:
    """``host:port`` or an ``http(s)://`` URL with a host (and no port 0)."""
    if not isinstance(value, str) or any(c.isspace() for c in value):
        return False
    parsed = urlparse(value if "://" in value else f"http://{value}")
    try:
        return parsed.scheme in ("http", "https") and bool(parsed.hostname) and parsed.port != 0
    except ValueError:  # a port that is not a number
        return False


# ---------------------------------------------------------------------------------------------- endpoints
@dataclass(frozen=True)
class Endpoint:
    """Where one rank serves its metrics: its place in the run, the host Prometheus reaches it by, and its bound
    port (``None`` when its server did not start)."""

    rank: int
    local_rank: int
    node_rank: int
    host: str
    port: Optional[int]

    @property
    def target(self) -> Optional[str]:
        """``host:port`` as Prometheus writes a target (IPv6 literals in brackets)."""
        return host_port(self.host, self.port) if self.port is not None else None


# ---------------------------------------------------------------------------------------------- file SD
class FileSDTargets:
    """One Prometheus file-SD file: the ``/metrics`` endpoints of one node of a run.

    The file is named ``<job>-<hostname>-node<node_rank>-<run_id>.json``, so nodes and concurrent runs sharing
    a directory never overwrite each other, and Prometheus' ``targets/*.json`` pattern picks it up. It is
    written to a hidden temporary file first and renamed into place, so Prometheus never reads half a file.

    Args:
        directory: where Prometheus looks for ``*.json`` files; created when missing.
        job: the job name, first part of the file name.
        node_rank: the node's index in the run.
        run_id: the run's id.
        hostname: the machine's name for the file name; ``socket.gethostname()`` by default.
        errors: where a file that cannot be removed is counted (as ``discovery``).

    Example::

        sd = FileSDTargets(Path("deploy/prometheus/targets"), "dgdn-training", 0, "4f1c2a")
        sd.write(["node-0:8000", "node-0:8001"], {"job": "dgdn-training", "run_id": "4f1c2a"})
        ...
        sd.remove()
    """

    def __init__(
        self, directory: Path, job: str, node_rank: int, run_id: str, hostname: Optional[str] = None, errors: Any = None
    ) -> None:
        self.directory, self.errors = Path(directory), errors if errors is not None else MonitorErrors(log)
        parts = (job, hostname or socket.gethostname(), f"node{int(node_rank)}", run_id)
        name = "-".join(_FILE_PART.sub("_", part).strip("_") or "_" for part in parts)
        self.path = self.directory / f"{name}.json"
        self._written = False
        self._content = ""

    def write(self, targets: Sequence[str], labels: Mapping[str, str]) -> Path:
        """Replace the file with one target group; raises ``OSError`` when the directory is not writable.

        The first write also deletes the files of earlier runs that list one of these endpoints: such a run was
        killed (a run that ends removes its file), and once its port serves this run, its file would make
        Prometheus scrape this run twice and report the dead run as up again.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self._written:
            self._remove_stale(set(targets))
        self._content = json.dumps([{"targets": list(targets), "labels": dict(labels)}], indent=2) + "\n"
        self._replace(self._content)
        if not self._written:
            self._written = True
            atexit.register(self.remove)  # a process that exits without Lightning's teardown still cleans up
        return self.path

    def refresh(self) -> None:
        """Mark the file as still wanted (its modification time is the run's heartbeat), writing it again if it
        was removed meanwhile (a sweep on a node whose clock is ahead); never raises."""
        if not self._written:
            return
        try:
            os.utime(self.path)
        except FileNotFoundError:
            try:
                self._replace(self._content)
            except OSError:
                pass
        except OSError:
            pass

    def _replace(self, content: str) -> None:
        temporary = self.directory / f".{self.path.stem}.{os.getpid()}.tmp"  # not *.json: never read half-written
        try:
            temporary.write_text(content, encoding="utf-8")
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def _remove_stale(self, targets: set[str]) -> None:
        remove_expired_targets(self.directory, keep=self.path)
        for path in self.directory.glob("*.json"):
            if path == self.path:
                continue
            try:
                groups = json.loads(path.read_text(encoding="utf-8"))
                listed = {target for group in groups for target in group.get("targets", [])}
            except (OSError, ValueError, TypeError, AttributeError):
                continue  # not a discovery file of ours, or one being replaced: leave it
            if listed & targets:
                log.info("Removing %s: it lists %s, now served by this run", path, ", ".join(sorted(listed & targets)))
                path.unlink(missing_ok=True)

    def leave(self) -> None:
        """Stop owning the file without deleting it (not even at exit): it expires like the file of a dead run."""
        if self._written:
            self._written = False
            atexit.unregister(self.remove)

    def remove(self) -> bool:
        """Delete the file if this object wrote it; returns whether a file was removed. Never raises."""
        if not self._written:
            return False
        self._written = False
        atexit.unregister(self.remove)
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as error:
            self.errors.report("discovery", "Could not remove the discovery file %s: %s", self.path, error)
            return False


#: Discovery files written by the callback: ``<job>-<host>-node<N>-<run_id>.json`` (hand-written files never match).
_OUR_FILE = re.compile(r"^[A-Za-z0-9_.-]+-node[0-9]+-[A-Za-z0-9_.-]+\.json$")


def remove_expired_targets(
    directory: Union[str, os.PathLike], max_age_s: float = EXPIRE_S, keep: Optional[Path] = None
) -> list[Path]:
    """Delete the callback's discovery files in ``directory`` not refreshed for ``max_age_s``.

    A running callback refreshes its file every :data:`REFRESH_S`; a file older than :data:`EXPIRE_S` belongs to a
    process that died without its teardown. Hand-written files (any other name) are left alone. Never raises.

    Returns:
        The files removed.
    """
    removed: list[Path] = []
    now = time.time()
    try:
        paths = list(Path(directory).glob("*.json"))
    except OSError:
        return removed
    for path in paths:
        if path == keep or not _OUR_FILE.match(path.name):
            continue
        try:
            if now - path.stat().st_mtime > max_age_s:
                path.unlink()
                removed.append(path)
                log.info("Removed the expired discovery file %s (not refreshed for %.0f s)", path, max_age_s)
        except OSError:
            continue
    return removed


# ---------------------------------------------------------------------------------------------- collectives
class DistributedRun:
    """Set-up exchange, discovery file and final push for one :class:`~dgdn_lightning_monitor.MonitoringCallback`.

    Outside ``torch.distributed`` (or with one process) no collective runs and every method still works.

    Args:
        job: Prometheus job name for discovery files and pushes (``dgdn-training``, what the deploy stack
            scrapes).
        targets_dir: directory for file-SD files, or ``None`` for none.
        targets_host: host name written into them; by default this machine's name when the endpoints bind every
            interface, else the address they bind.
        pushgateway_url: Pushgateway to push final figures to, or ``None``.
        https: whether the endpoints serve TLS (Prometheus must then scrape them with ``https``).
        errors: where failures are counted (``discovery``, ``push``, ``exchange``) and first warned.

    Raises:
        ValueError: naming the argument that is not valid.

    Example::

        run = DistributedRun(targets_dir="deploy/prometheus/targets")
        run_id = run.exchange(labels, "0.0.0.0", 8000, "4f1c2a")  # every rank, at set-up
        run.publish(labels, run_id)
        run.finish(registry, labels, run_id)
    """

    def __init__(
        self,
        job: str = DEFAULT_JOB,
        targets_dir: Optional[Union[str, os.PathLike[str]]] = None,
        targets_host: Optional[str] = None,
        pushgateway_url: Optional[str] = None,
        https: bool = False,
        errors: Optional[MonitorErrors] = None,
    ) -> None:
        valid = isinstance(job, str) and bool(_JOB.match(job))
        self.job = check("job", job, valid, "a non-empty name of letters, digits, '_', '.', ':' or '-'")
        path = Path(targets_dir) if isinstance(targets_dir, (str, os.PathLike)) and os.fspath(targets_dir) else None
        valid = targets_dir is None or (path is not None and (path.is_dir() or not path.exists()))
        check("targets_dir", targets_dir, valid, "a directory (or one to create) or None")
        self.targets_dir = path
        valid = targets_host is None or (isinstance(targets_host, str) and bool(_HOST.match(targets_host)))
        expected = "a host name or IP address such as 'node-3' or 'host.docker.internal'"
        self.targets_host = check("targets_host", targets_host, valid, expected)
        valid = pushgateway_url is None or _is_url(pushgateway_url)
        expected = "a URL such as 'http://pushgateway:9091' or None"
        self.pushgateway_url = check("pushgateway_url", pushgateway_url, valid, expected)
        self.peers: list[Endpoint] = []
        self.trace_key: Optional[str] = None
        self.https = https
        self._sd: Optional[FileSDTargets] = None
        self.errors = errors if errors is not None else MonitorErrors(log)
        self._heartbeat: Optional[_Heartbeat] = None
        self._node_peers: list[Endpoint] = []
        self._retention: Optional[threading.Thread] = None
        self._file_generation = 0  # one more at every publish: the file then belongs to the new run
        # Held to remove a finished run's discovery file and to claim it for the next run, so that a removal waiting
        # for the last scrape of one run never deletes the file of the next; a new one in a forked child.
        self._file_lock = threading.Lock()
        forget_threads_after_fork(self)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file_lock": None}  # a lock does not pickle (ddp_spawn pickles the callback)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.after_fork_in_child()
        forget_threads_after_fork(self)

    def after_fork_in_child(self) -> None:
        """A forked child never inherits the lock held (by a removal thread that does not exist there)."""
        self._file_lock = threading.Lock()

    # ------------------------------------------------------------------ set-up (every rank, same order)
    def exchange(self, labels: RankLabels, addr: str, port: Optional[int], run_id: str) -> str:
        """Learn every rank's endpoint and agree on one run id (one all-gather under DDP, none alone). A rank whose
        part failed still enters it, sending the cause; every rank then takes the same decision from the same
        list (run id and trace key of the lowest rank that took part, endpoints of those that did).

        Args:
            labels: this rank's labels.
            addr: the interface its server binds (for the advertised host).
            port: the port it serves on, or ``None`` when its server did not start.
            run_id: this rank's run id.

        Returns:
            The run id every rank uses.
        """
        world_size = int(dist.get_world_size()) if dist.is_available() and dist.is_initialized() else 1
        rank = int(dist.get_rank()) if world_size > 1 else 0
        mine: Any
        try:
            host = self.targets_host or reachable_host(addr, local=False)
            mine = (run_id, uuid.uuid4().hex, Endpoint(labels.rank, labels.local_rank, labels.node_rank, host, port))
        except Exception as error:  # still enter the collective below, with the cause in place of the endpoint
            mine = describe(error)
            self._failed("this rank's part", mine)
        gathered: list[Any] = [mine]
        if world_size > 1:
            gathered = [None] * world_size
            try:
                dist.all_gather_object(gathered, mine)
            except Exception as error:  # a broken process group: go on with what this rank knows
                gathered = [mine]
                self._failed("endpoints", describe(error))
        for other, entry in enumerate(gathered):
            if isinstance(entry, str) and other != rank:  # this rank's own failure is counted above
                self._failed(f"rank {other}'s part", entry)
        taking_part = [entry for entry in gathered if isinstance(entry, tuple)]
        self.peers = sorted((entry[2] for entry in taking_part), key=lambda peer: peer.rank)
        # Under DDP, a key every rank of this set-up shares: each epoch's trace id is derived from it.
        self.trace_key = taking_part[0][1] if world_size > 1 and taking_part else None
        return str(taking_part[0][0]) if taking_part else run_id

    def publish(self, labels: RankLabels, run_id: str) -> None:
        """On a node's local rank 0, write the node's discovery file (when ``targets_dir`` is set) and keep it fresh
        from a daemon thread; on rank 0, delete Pushgateway groups past their retention (in the background)."""
        if self.pushgateway_url is not None and labels.rank == 0:
            self._retention = threading.Thread(
                target=remove_finished_groups,
                args=(self.pushgateway_url, self.job, pushgateway.PUSH_RETENTION_S),
                name="dgdn-push-retention",
                daemon=True,
            )
            self._retention.start()
        if self.targets_dir is None or labels.local_rank != 0:
            return
        with self._file_lock:  # a removal still waiting for the previous run's last scrape leaves the file alone
            self._file_generation += 1
        node = sorted((peer for peer in self.peers if peer.node_rank == labels.node_rank), key=lambda p: p.local_rank)
        self._node_peers = [peer for peer in node if peer.local_rank != 0 and peer.port is not None]
        wanted = FileSDTargets(self.targets_dir, self.job, labels.node_rank, run_id, errors=self.errors)
        if self._sd is None or self._sd.path != wanted.path:
            if self._sd is not None:
                self._sd.remove()
            self._sd = wanted
        try:
            labels_out = {"job": self.job, "run_id": run_id, **({"__scheme__": "https"} if self.https else {})}
            self._sd.write([peer.target for peer in node if peer.target is not None], labels_out)
            self._heartbeat = _Heartbeat(self._sd)
            if self.targets_host is None and node and node[0].host not in ("127.0.0.1", "::1", "localhost"):
                log.info(
                    "Listed %s in %s for Prometheus; it must resolve %r (make stack lets its container do so); "
                    "else pass targets_host='host.docker.internal' (Prometheus in Docker) or an address it reaches.",
                    ", ".join(peer.target or "?" for peer in node),
                    self._sd.path,
                    node[0].host,
                )
            doubled = [peer for peer in node if doubles_quick_start_target(peer.host, peer.port)]
            if doubled:
                log.warning(
                    "%s is listed for discovery on port %d, which the stacks' static quick-start target also "
                    "scrapes: Prometheus would scrape this rank twice. Leave port unset with targets_dir (a free "
                    "port), or pass targets_host='host.docker.internal' so that the stack merges the two.",
                    doubled[0].target,
                    doubled[0].port,
                )
        except OSError as error:
            message = "Could not write the Prometheus discovery file %s (%s); this node's endpoints must be configured "
            self.errors.report("discovery", message + "by hand.", self._sd.path, error)

    # ------------------------------------------------------------------ end of run (never raises)
    def finish(
        self, registry: CollectorRegistry, labels: RankLabels, run_id: str, server: Optional[MetricsServer] = None
    ) -> None:
        """Remove this node's discovery file and push the final figures; failures are reported once.

        Args:
            registry: what to push.
            labels: this rank's labels.
            run_id: the run's id, in the push's grouping key.
            server: this rank's endpoint, which holds how the run ended: when a scraper reads it regularly, the file
                goes once a scrape has read that end and the other ranks it lists have closed their endpoints
                (their processes exit once a scrape has read their own end), from a background thread that the
                process's exit waits for (:data:`~dgdn_lightning_monitor.server.FINAL_SCRAPE_LIMIT_S` at most);
                else at once.
        """
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._sd is not None:
            sd, generation, peers = self._sd, self._file_generation, list(self._node_peers)

            def current() -> bool:
                return self._file_generation == generation  # a next run has not claimed the file

            def remove(server: Optional[MetricsServer], at_exit: Sequence[Callable[[], None]] = ()) -> None:
                give_up = time.monotonic() + FINAL_SCRAPE_LIMIT_S
                if server is not None:
                    server.wait_for_final_scrape()
                # The other ranks of this node may end later than this one: their processes exit once a scrape has
                # read their end (or nothing scrapes them), so the file lists them until their endpoints are gone.
                while peers and current() and time.monotonic() < give_up:
                    peers[:] = [peer for peer in peers if _serving(peer)]
                    if peers:
                        time.sleep(_PEER_POLL_S)
                with self._file_lock:
                    if current() and peers:
                        # A rank still serving long after this one ended is hung or lives on: the file stays for
                        # it (a killed rank then pages as down) and expires like a dead run's.
                        sd.leave()
                        serving = ", ".join(peer.target or "?" for peer in peers)
                        log.info("Left %s for %s, still serving; it expires in %.0f s", sd.path, serving, EXPIRE_S)
                    elif current():
                        sd.remove()
                for forget in at_exit:
                    forget()

            if peers or (server is not None and server.owes_final_scrape()):
                owed = server if server is not None and server.owes_final_scrape() else None
                at_exit: list[Callable[[], None]] = []
                removal = threading.Thread(
                    target=remove, args=(owed, at_exit), name="dgdn-discovery-removal", daemon=True
                )
                at_exit.append(_join_at_exit(removal))
                removal.start()
            else:
                remove(None)
        if self._retention is not None:
            self._retention.join(PUSH_TIMEOUT_S)  # before this run's own push: never deletes it
            self._retention = None
        if self.pushgateway_url is None:
            return
        grouping = {"run_id": run_id, "rank": str(labels.rank)}
        reason = push_final_metrics(self.pushgateway_url, self.job, registry, grouping)
        if reason is not None:
            message = "Could not push the final metrics to the Pushgateway at %s (%s); they are only on this rank's "
            self.errors.report("push", message + "/metrics endpoint.", self.pushgateway_url, reason)

    # ------------------------------------------------------------------ helpers
    def _failed(self, what: str, cause: str) -> None:
        message = "Could not exchange %s with the other ranks (%s); continuing without it."
        self.errors.report("exchange", message, what, cause)


class _Heartbeat:
    """Refreshes a discovery file every :data:`REFRESH_S` and removes the expired files of its directory."""

    def __init__(self, sd: FileSDTargets, interval_s: Optional[float] = None) -> None:
        self.sd = sd
        self.interval_s = REFRESH_S if interval_s is None else interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dgdn-discovery-refresh", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sd.refresh()
            remove_expired_targets(self.sd.directory, keep=self.sd.path)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
