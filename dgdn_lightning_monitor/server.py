"""The HTTP endpoint that serves ``/metrics`` from a registry with ``prometheus_client``'s own WSGI app (text and
OpenMetrics negotiation, gzip, exemplars), adding what a training process needs: a clear error when the port is
taken, a deep listen backlog, renders one at a time (each after its request arrived), an optional TLS / basic-auth web
configuration, a fast stop, and the end of a run told to Prometheus without keeping the user waiting.

An endpoint outlives the run it serves: when a run ends it keeps serving the run's final figures (the next run of its
callback reuses it), and the process's exit waits, once and bounded, until a scrape has read them, but only where
something scrapes the endpoint regularly (:func:`wait_for_final_scrapes`). A new endpoint in the same process takes
over the port of a finished one, and closes the finished ones that owe Prometheus nothing.

The port a rank serves on is decided here too (:func:`start_rank_server`): :data:`DEFAULT_PORT` (the stack's static
quick-start target) by default, a free port with discovery, offset by the local rank under DDP, a free one instead of
a taken default."""

from __future__ import annotations

import atexit
import errno
import logging
import multiprocessing
import multiprocessing.util
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from dgdn_lightning_monitor.guards import forget_threads_after_fork
from dgdn_lightning_monitor.web_config import WebConfig

log = logging.getLogger(__name__)

#: The port of the stack's static quick-start target (``host.docker.internal:8000``): the default without
#: ``targets_dir``. With ``targets_dir`` every rank binds a free port by default and the discovery file says which.
DEFAULT_PORT = 8000
# Hosts of a discovered target the stacks merge with their static quick-start target (deploy/prometheus/prometheus.yml
# and its derivation by scripts/native_stack.py).
_QUICK_START_HOSTS = ("host.docker.internal", "127.0.0.1", "localhost")
# How often the serving loop checks for shutdown; stopping (a new run taking the port over, in its set-up) waits up
# to this long (the library's default is 0.5 s).
_POLL_INTERVAL_S = 0.05
# Connections the kernel queues while every handler is busy: several Prometheus servers, federation and a user's
# curl loop at once must not be refused (the socketserver default is 5).
LISTEN_BACKLOG = 128
#: The longest the exit of a process waits for a scrape to read how its runs ended (:func:`wait_for_final_scrapes`).
FINAL_SCRAPE_LIMIT_S = 30.0
# Scrapes whose arrivals are closer than this are one burst (concurrent scrapers): one arrival for the interval.
_BURST_S = 0.1

StartResponse = Callable[..., Any]

# The serving endpoints of this process: process-wide by nature, as the exit of the process waits for all of them and
# a port is the process's, whichever callback's endpoint holds it. Changed only by plain set operations (atomic under
# the GIL), so neither the exit handler nor a forked child can ever wait on a lock here.
_SERVING: set[MetricsServer] = set()


def wait_for_final_scrapes(limit_s: float = FINAL_SCRAPE_LIMIT_S) -> None:
    """Run at the interpreter's exit: wait until a scrape has read how each finished run ended on the endpoints
    that owe one (:meth:`MetricsServer.owes_final_scrape`), at most until the latest of their deadlines and
    ``limit_s``. Returns at once when no endpoint owes a scrape (nothing scrapes them regularly, a scrape after the
    end read it, or the scraper stopped); the endpoints then go with the process. Ctrl-C ends the wait."""
    owing = [server for server in list(_SERVING) if server.wait_at_exit and server.owes_final_scrape()]
    if not owing:
        return
    log.info(
        "Waiting (at most %.0f s) for a scrape of %s to read how the run ended (Ctrl-C skips it; "
        "wait_for_final_scrape=False turns it off)",
        min(limit_s, max(server.deadline() for server in owing) - time.monotonic()),
        ", ".join(str(server.url) for server in owing),
    )
    give_up = time.monotonic() + limit_s
    try:
        for server in owing:  # one after another, each until its own deadline: at most the latest one overall
            server.wait_for_final_scrape(give_up_at=give_up)
    except KeyboardInterrupt:  # skipped: not again at a later exit hook of this process
        for server in owing:
            server.wait_at_exit = False


def reachable_host(addr: str, local: bool = True) -> str:
    """The host by which a server bound to ``addr`` is reached: ``addr`` itself, unless it is a wildcard (every
    interface), reached through this machine: by its loopback name from here (``local``), else by its host name."""
    if addr not in ("0.0.0.0", "::", ""):
        return addr
    return {"0.0.0.0": "localhost", "::": "::1"}.get(addr, socket.gethostname()) if local else socket.gethostname()


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------- the port policy
def serving_port(port: Optional[int], local_rank: int, per_local_rank: bool, discovery: Optional[Path]) -> int:
    """The port one rank binds.

    Args:
        port: what the user passed; ``None`` picks the default: :data:`DEFAULT_PORT` (the quick-start target's)
            without discovery, ``0`` (a free port, written into the discovery file) with it, so that several runs on
            one node never clash.
        local_rank: the rank's index on its node, added to a non-zero port when ``per_local_rank``.
        per_local_rank: offset the port by the local rank.
        discovery: ``targets_dir``, or ``None``.

    Raises:
        ValueError: when the port plus the local rank is above 65535.
    """
    given = port
    if port is None:
        port = 0 if discovery is not None else DEFAULT_PORT
    if port and per_local_rank and port + local_rank > 65535:
        raise ValueError(
            f"port {given} + local_rank {local_rank} is above 65535; pass a lower port, port=0 or "
            f"port_per_local_rank=False"
        )
    return port + local_rank if port and per_local_rank else port


def start_rank_server(
    registry: CollectorRegistry,
    addr: str,
    port: Optional[int],
    local_rank: int,
    per_local_rank: bool,
    discovery: Optional[Path],
    web_config: Optional[WebConfig] = None,
    wait_at_exit: bool = True,
) -> MetricsServer:
    """Start one rank's endpoint on the port :func:`serving_port` decides; a default port (``port`` ``None`` or 0)
    that is taken gives way to a free one (with a warning), a port the user chose fails with
    :class:`PortInUseError`. A finished endpoint of this process on that port hands it over.

    Args:
        registry, addr, web_config, wait_at_exit: as for :class:`MetricsServer`.
        port, local_rank, per_local_rank, discovery: as for :func:`serving_port`.

    Raises:
        PortInUseError: the port the user chose is taken.
        ValueError: the port plus the local rank is above 65535.

    Example::

        server = start_rank_server(registry, "0.0.0.0", None, local_rank=1, per_local_rank=True, discovery=None)
        server.bound_port  # 8001
    """
    chosen = serving_port(port, local_rank, per_local_rank, discovery)
    server = MetricsServer(registry, addr, chosen, web_config, free_port_if_taken=not port, wait_at_exit=wait_at_exit)
    server.start()
    return server


def doubles_quick_start_target(host: str, port: Optional[int]) -> bool:
    """Whether a discovered target ``host:port`` is also scraped as the stacks' static quick-start target under
    another name (which the stacks do not merge): Prometheus would scrape that rank twice."""
    return port == DEFAULT_PORT and host not in _QUICK_START_HOSTS


class _Answer(list):
    """A WSGI body whose ``close`` (which the server calls once the body is written) runs ``on_sent``."""

    def __init__(self, body: Iterable[bytes], on_sent: Callable[[], None]) -> None:
        super().__init__(body)
        self._on_sent = on_sent

    def close(self) -> None:
        self._on_sent()


class _QuietHandler(WSGIRequestHandler):
    # Buffer the response so that status line, headers and body leave in one send instead of five.
    wbufsize = 1 << 16

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass  # one line per scrape on stderr would drown the training output


class PortInUseError(OSError):
    """The metrics port is already taken by another process (or another Trainer in this one)."""


class MetricsServer:
    """Serves a registry on ``http(s)://addr:port/metrics`` from a daemon thread.

    Args:
        registry: what to serve.
        addr: interface to bind; ``0.0.0.0`` for all (so a Prometheus container can reach it).
        port: TCP port; ``0`` picks a free one.
        web_config: TLS and basic auth to apply, or ``None`` for plain HTTP.
        free_port_if_taken: when ``port`` is taken, serve on a free port instead (with a warning) of raising
            :class:`PortInUseError`.
        wait_at_exit: whether the exit of the process waits for a scrape to read how its last run ended
            (:func:`wait_for_final_scrapes`).

    Example::

        server = MetricsServer(registry, "127.0.0.1", 0)
        server.start()
        print(server.url)  # http://127.0.0.1:43121/metrics
        server.run_ended()  # the registry holds how the run ended: serve on; the exit waits for a scrape of it
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        addr: str = "0.0.0.0",
        port: int = 8000,
        web_config: Optional[WebConfig] = None,
        free_port_if_taken: bool = False,
        wait_at_exit: bool = True,
    ) -> None:
        self.registry = registry
        self.addr = addr
        self.port = port
        self.web_config = web_config
        self.free_port_if_taken = free_port_if_taken
        self.wait_at_exit = wait_at_exit
        self._httpd: Optional[ThreadingWSGIServer] = None
        self._thread: Optional[threading.Thread] = None
        self.bound_port: Optional[int] = None
        self._forget_scrapes()

    def _forget_scrapes(self) -> None:
        # Arrival times (monotonic) of the last scrapes (a burst counts once), for the interval at which the
        # endpoint is scraped; when the registry last took a run's end, and how many scrapes were sent since.
        self._scrapes: deque[float] = deque(maxlen=8)
        self._scraped = threading.Condition()
        self.ended_at: Optional[float] = None
        self._read_since_end = 0

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def url(self) -> Optional[str]:
        if self.bound_port is None:
            return None
        scheme = self.web_config.scheme if self.web_config is not None else "http"
        return f"{scheme}://{host_port(reachable_host(self.addr), self.bound_port)}/metrics"

    def start(self) -> None:
        if self._httpd is not None:
            return
        info = socket.getaddrinfo(self.addr or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)

        class Server(ThreadingWSGIServer):
            address_family = info[0][0]
            request_queue_size = LISTEN_BACKLOG

        render, lock = make_wsgi_app(self.registry), threading.Lock()

        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            arrived = self._arrived()

            def sent() -> None:  # the server has written the whole answer: what it rendered has been read
                self._sent(arrived)

            with lock:  # one render at a time, each after its request arrived (the library renders in the call)
                return _Answer(render(environ, start_response), sent)

        served = self.web_config.wrap(app) if self.web_config is not None else app  # authenticated before the lock
        _hand_over(self.port)
        try:
            httpd = make_server(self.addr, self.port, served, Server, handler_class=_QuietHandler)
        except OSError as error:
            if error.errno == errno.EADDRINUSE and self.free_port_if_taken and self.port:
                httpd = make_server(self.addr, 0, served, Server, handler_class=_QuietHandler)
                log.warning(
                    "Port %d is taken (another run on this machine?): serving metrics on port %d instead. A static "
                    "scrape target for port %d does not see this run; with targets_dir, Prometheus discovers it.",
                    self.port,
                    httpd.server_address[1],
                    self.port,
                )
            elif error.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    errno.EADDRINUSE,
                    f"MonitoringCallback cannot serve metrics: port {self.port} on {self.addr} is already in use. "
                    f"Pass another port, or port=0 to pick a free one.",
                ) from error
            else:
                raise
        context = self.web_config.ssl_context if self.web_config is not None else None
        if context is not None:
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_S},
            name="dgdn-metrics-server",
            daemon=True,
        )
        thread.start()
        self._httpd, self._thread = httpd, thread
        self.bound_port = int(httpd.server_address[1])
        _SERVING.add(self)
        forget_threads_after_fork(self)

    def _arrived(self) -> float:
        with self._scraped:
            arrived, scrapes = time.monotonic(), self._scrapes
            if scrapes and arrived - scrapes[-1] < _BURST_S:
                scrapes[-1] = arrived
            else:
                scrapes.append(arrived)
            return arrived

    def _sent(self, arrived: float) -> None:
        with self._scraped:
            if self.ended_at is not None and arrived >= self.ended_at:
                self._read_since_end += 1
                self._scraped.notify_all()

    # ------------------------------------------------------------------ the end of a run
    def run_started(self) -> None:
        """A new run serves from this endpoint: nothing is owed for the previous one."""
        with self._scraped:
            self.ended_at, self._read_since_end = None, 0
            self._scraped.notify_all()

    def run_ended(self) -> None:
        """The registry now holds how the run ended. The endpoint serves on; a scrape that arrives from now on
        reads the end, and the exit of the process waits for one (:func:`wait_for_final_scrapes`)."""
        with self._scraped:
            self.ended_at, self._read_since_end = time.monotonic(), 0
            self._scraped.notify_all()
        # Registered again at every end, so that it runs before the exit handlers registered since (a discovery
        # file's removal): atexit runs the last registered first.
        atexit.unregister(wait_for_final_scrapes)
        atexit.register(wait_for_final_scrapes)
        _wait_at_worker_exit()

    def deadline(self, scrapes: int = 1) -> float:
        """When ``scrapes`` more scrapes after the last one should have arrived (monotonic): the largest interval
        between recent scrapes once per scrape and once more, plus a second; ``-inf`` before two scrapes (nothing
        scrapes the endpoint regularly)."""
        with self._scraped:
            arrivals = list(self._scrapes)
        if len(arrivals) < 2:
            return float("-inf")
        interval = max(later - earlier for earlier, later in zip(arrivals, arrivals[1:]))
        return arrivals[-1] + (scrapes + 1) * interval + 1.0

    def owes_final_scrape(self) -> bool:
        """Whether the endpoint serves a finished run that a regular scraper has not read yet, and that scraper is
        not overdue (one that stopped is not waited for)."""
        return (
            self.running
            and self.ended_at is not None
            and self._read_since_end == 0
            and time.monotonic() < self.deadline()
        )

    def wait_for_final_scrape(self, scrapes: int = 1, give_up_at: Optional[float] = None) -> bool:
        """Wait until ``scrapes`` scrapes have read the end of the run, at most until they are overdue
        (:meth:`deadline`), ``give_up_at`` (monotonic) or :data:`FINAL_SCRAPE_LIMIT_S`; a new run on the
        endpoint, or its stop, ends the wait.

        Returns:
            Whether they did.
        """
        ended_at = self.ended_at
        if ended_at is None:
            return False
        give_up = min(self.deadline(scrapes), time.monotonic() + FINAL_SCRAPE_LIMIT_S)
        if give_up_at is not None:
            give_up = min(give_up, give_up_at)
        with self._scraped:
            while self._read_since_end < scrapes and self.ended_at == ended_at and self.running:
                remaining = give_up - time.monotonic()
                if remaining <= 0:
                    break
                self._scraped.wait(remaining)
            return self._read_since_end >= scrapes and self.ended_at == ended_at

    def stop(self) -> None:
        """Close the endpoint (within one poll interval)."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        _SERVING.discard(self)
        with self._scraped:
            self._scraped.notify_all()  # a wait for a final scrape ends
        if httpd is None:
            return
        httpd.shutdown()  # returns once serve_forever has left its loop (within one poll interval)
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=2.0)

    def after_fork_in_child(self) -> None:
        """In a forked child the serving thread does not exist and the socket belongs to the parent: forget both
        (without closing the parent's socket) so that the child can start its own server; its exit waits for
        nothing."""
        self._httpd = self._thread = None
        self.bound_port = None
        _SERVING.discard(self)
        self._forget_scrapes()  # a new condition: the parent's serving thread may have held this one at the fork


# The process whose exit runs wait_for_final_scrapes through multiprocessing's finalizers (registered once per
# process, like the atexit handler; a forked child registers its own).
_worker_exit_registered: Optional[int] = None


def _wait_at_worker_exit() -> None:
    """A process that multiprocessing started (the workers of ddp_spawn, ddp_fork, ddp_notebook) runs
    multiprocessing's exit finalizers and then, when forked, ends without atexit: wait there too."""
    global _worker_exit_registered
    if multiprocessing.parent_process() is None or _worker_exit_registered == os.getpid():
        return
    _worker_exit_registered = os.getpid()
    multiprocessing.util.Finalize(None, wait_for_final_scrapes, exitpriority=0)


def _hand_over(port: int) -> None:
    """Before a new endpoint binds ``port``: close the endpoints of this process whose run has ended and that
    either hold that port (a notebook cell run again: the new run takes the address Prometheus scrapes) or owe
    Prometheus nothing (read, or never scraped regularly), so that finished endpoints do not pile up."""
    for server in list(_SERVING):
        if server.ended_at is not None and ((port and server.bound_port == port) or not server.owes_final_scrape()):
            server.stop()
