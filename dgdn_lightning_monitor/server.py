"""The HTTP endpoint that serves ``/metrics`` from a registry, with a clear error when the port is taken.

Collectors passed as ``direct`` (the callback's :class:`~dgdn_lightning_monitor.metrics.TrainingMetrics`) write
their own exposition text, which is many times cheaper than ``prometheus_client`` building and formatting their
samples; the rest of the registry is written by ``prometheus_client`` as usual.
"""

from __future__ import annotations

import errno
import gzip
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import Any, Optional, Protocol
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder, gzip_accepted

# How often the serving loop checks for shutdown; stopping waits up to this long (the library's default is
# 0.5 s, which would be most of the run-end budget).
_POLL_INTERVAL_S = 0.05

# Compression level of gzip responses. Level 1 compresses eight ranks' exposition (~90 kB) in ~0.1 ms to ~7.5 kB;
# the library's level 9 takes over 1 ms for ~6 kB, on the scrape's latency and in the training process.
_GZIP_LEVEL = 1
_OPENMETRICS = "application/openmetrics-text"
_UNDERSCORES = "underscores"  # the name escaping of a scrape that asks for none
_ESCAPING_PARAMETER = "; escaping="

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class DirectCollector(Protocol):
    """A collector that writes its own exposition text, e.g. a
    :class:`~dgdn_lightning_monitor.metrics.TrainingMetrics`."""

    def render_families(self, openmetrics: bool, escaping: str) -> Sequence[tuple[str, str]]:
        """``(header, samples)`` per family: the ``# HELP``/``# TYPE`` lines and the sample lines, exactly as
        ``prometheus_client`` writes them (OpenMetrics without ``# EOF``)."""

    def exported_directly(self) -> AbstractContextManager[None]:
        """A context in which the collector's ``collect()`` yields nothing, in the calling thread only."""


def render_direct(collectors: Sequence[DirectCollector], openmetrics: bool, escaping: str = _UNDERSCORES) -> str:
    """The exposition text of ``collectors``, each family once: families of the same name from several collectors
    (several ranks' metrics under one namespace) are merged, their samples in the order of ``collectors``."""
    if len(collectors) == 1:
        return "".join(header + samples for header, samples in collectors[0].render_families(openmetrics, escaping))
    merged: dict[str, list[str]] = {}
    for collector in collectors:
        for header, samples in collector.render_families(openmetrics, escaping):
            parts = merged.get(header)
            if parts is None:
                merged[header] = [header, samples]
            else:
                parts.append(samples)
    return "".join("".join(parts) for parts in merged.values())


def make_metrics_app(registry: CollectorRegistry, direct: Sequence[DirectCollector] = ()) -> WSGIApp:
    """A WSGI app serving ``registry`` like ``prometheus_client.make_wsgi_app``, with ``direct`` written by
    themselves.

    ``GET`` of any path but ``/favicon.ico`` returns the exposition: OpenMetrics or the Prometheus text format as
    the ``Accept`` header asks (the library's negotiation, with its ``Content-Type``), gzip-compressed when
    ``Accept-Encoding`` lists gzip. The body is the direct collectors' text followed by what the library writes for
    the rest of the registry, during which the direct collectors' ``collect()`` yields nothing in the serving thread
    (so a direct collector that is also registered is written once). Requests filtering by ``name[]``, other
    methods and ``/favicon.ico`` are answered by the library's app.
    """
    library_app = make_wsgi_app(registry)
    if not direct:
        return library_app
    collectors = tuple(direct)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING")
        if (environ.get("REQUEST_METHOD") != "GET" or environ.get("PATH_INFO") == "/favicon.ico"
                or (query and "name[]" in parse_qs(query))):
            return library_app(environ, start_response)
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT"))
        openmetrics = content_type.startswith(_OPENMETRICS)
        _, found, escaping = content_type.partition(_ESCAPING_PARAMETER)
        text = render_direct(collectors, openmetrics, escaping if found else _UNDERSCORES)
        with ExitStack() as stack:
            for collector in collectors:
                stack.enter_context(collector.exported_directly())
            rest = encoder(registry)  # OpenMetrics: ends with the one "# EOF" line, also when nothing is left
        output = text.encode("utf-8") + rest
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING")):
            output = gzip.compress(output, compresslevel=_GZIP_LEVEL)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [output]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass  # one line per scrape on stderr would drown the training output


def _address_family(addr: str, port: int) -> socket.AddressFamily:
    infos = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


class PortInUseError(OSError):
    """The metrics port is already taken by another process (or another Trainer in this one)."""


class MetricsServer:
    """Serves a registry on ``http://addr:port/metrics`` from a daemon thread.

    Args:
        registry: what to serve.
        addr: interface to bind; ``0.0.0.0`` for all (so a Prometheus container can reach it).
        port: TCP port; ``0`` picks a free one.
        direct: collectors that write their own exposition text (see :func:`make_metrics_app`); they are served
            whether or not they are registered in ``registry``.

    Example::

        server = MetricsServer(registry, "127.0.0.1", 0, direct=(metrics,))
        server.start()
        print(server.url)  # http://127.0.0.1:43121/metrics
        server.stop()
    """

    def __init__(self, registry: CollectorRegistry, addr: str = "0.0.0.0", port: int = 8000,
                 direct: Sequence[DirectCollector] = ()) -> None:
        self.registry = registry
        self.addr = addr
        self.port = port
        self.direct = tuple(direct)
        self._httpd = None
        self._thread: Optional[threading.Thread] = None
        self.bound_port: Optional[int] = None

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def url(self) -> Optional[str]:
        if self.bound_port is None:
            return None
        host = self.addr
        if host in ("0.0.0.0", "", "::"):
            host = socket.gethostname() if host == "" else ("localhost" if host == "0.0.0.0" else "[::1]")
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.bound_port}/metrics"

    def start(self) -> None:
        if self._httpd is not None:
            return
        class Server(ThreadingWSGIServer):
            address_family = _address_family(self.addr, self.port)

        try:
            httpd = make_server(self.addr, self.port, make_metrics_app(self.registry, self.direct), Server,
                                handler_class=_QuietHandler)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    errno.EADDRINUSE,
                    f"MonitoringCallback cannot serve metrics: port {self.port} on {self.addr} is already in use. "
                    f"Pass another port, or port=0 to pick a free one.",
                ) from error
            raise
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": _POLL_INTERVAL_S},
                                  name="dgdn-metrics-server", daemon=True)
        thread.start()
        self._httpd, self._thread = httpd, thread
        self.bound_port = int(httpd.server_address[1])

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()  # returns once serve_forever has left its loop (within one poll interval)
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=2.0)
