"""The HTTP endpoint that serves ``/metrics`` from a registry with ``prometheus_client``'s own WSGI app (text and
OpenMetrics negotiation, gzip, exemplars), adding what a training process needs: a clear error when the port is
taken, a deep listen backlog, renders one at a time (each after its request arrived), an optional TLS / basic-auth web
configuration, and a fast stop."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Optional
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from dgdn_lightning_monitor.guards import forget_threads_after_fork
from dgdn_lightning_monitor.web_config import WebConfig

log = logging.getLogger(__name__)

# How often the serving loop checks for shutdown; stopping waits up to this long (the library's default is
# 0.5 s, which would be most of the run-end budget).
_POLL_INTERVAL_S = 0.05
# Connections the kernel queues while every handler is busy: several Prometheus servers, federation and a user's
# curl loop at once must not be refused (the socketserver default is 5).
LISTEN_BACKLOG = 128
#: The longest :meth:`MetricsServer.linger` keeps an ending run's endpoint up for a last scrape.
LINGER_LIMIT_S = 30.0

StartResponse = Callable[..., Any]


def reachable_host(addr: str, local: bool = True) -> str:
    """The host by which a server bound to ``addr`` is reached: ``addr`` itself, unless it is a wildcard (every
    interface), reached through this machine: by its loopback name from here (``local``), else by its host name."""
    if addr not in ("0.0.0.0", "::", ""):
        return addr
    return {"0.0.0.0": "localhost", "::": "::1"}.get(addr, socket.gethostname()) if local else socket.gethostname()


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


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

    Example::

        server = MetricsServer(registry, "127.0.0.1", 0)
        server.start()
        print(server.url)  # http://127.0.0.1:43121/metrics
        server.stop()
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        addr: str = "0.0.0.0",
        port: int = 8000,
        web_config: Optional[WebConfig] = None,
        free_port_if_taken: bool = False,
    ) -> None:
        self.registry = registry
        self.addr = addr
        self.port = port
        self.web_config = web_config
        self.free_port_if_taken = free_port_if_taken
        self._httpd: Optional[ThreadingWSGIServer] = None
        self._thread: Optional[threading.Thread] = None
        self.bound_port: Optional[int] = None
        # Arrival times (monotonic) of the last scrapes, to wait for the next one when the run ends.
        self._scrapes: deque[float] = deque(maxlen=3)
        self._scraped = threading.Condition()

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

        render, lock, scraped = make_wsgi_app(self.registry), threading.Lock(), self._scraped

        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            arrived = time.monotonic()

            def sent() -> None:  # the server has written the whole answer: the process may exit now
                with scraped:
                    self._scrapes.append(arrived)
                    scraped.notify_all()

            with lock:  # one render at a time, each after its request arrived (the library renders in the call)
                return _Answer(render(environ, start_response), sent)

        served = self.web_config.wrap(app) if self.web_config is not None else app  # authenticated before the lock
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
        forget_threads_after_fork(self)

    def linger(self, limit_s: float = LINGER_LIMIT_S) -> bool:
        """Keep serving until the next scrape has read what is registered now, so that Prometheus sees a run's last
        values (its outcome above all) before the endpoint goes.

        Waits at most twice the interval seen between the last two scrapes, plus a second (and ``limit_s``); returns
        at once when the endpoint was scraped fewer than twice (nothing scrapes it regularly).

        Returns:
            Whether a scrape arrived. A run that ends before its second scrape is not waited for: Prometheus
            last saw it running.
        """
        with self._scraped:
            if self._httpd is None or len(self._scrapes) < 2:
                return False
            interval = self._scrapes[-1] - self._scrapes[-2]
        start = time.monotonic()
        deadline = start + min(limit_s, 2 * interval + 1)
        with self._scraped:
            while not (self._scrapes and self._scrapes[-1] >= start):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._scraped.wait(remaining)
        return True

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()  # returns once serve_forever has left its loop (within one poll interval)
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=2.0)

    def after_fork_in_child(self) -> None:
        """In a forked child the serving thread does not exist and the socket belongs to the parent: forget both
        (without closing the parent's socket) so that the child can start its own server."""
        self._httpd = self._thread = None
        self.bound_port = None
