"""The HTTP endpoint that serves ``/metrics`` from a registry, with a clear error when the port is taken."""

from __future__ import annotations

import errno
import socket
import threading
from typing import Optional

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_http_server


class PortInUseError(OSError):
    """The metrics port is already taken by another process (or another Trainer in this one)."""


class MetricsServer:
    """Serves a registry on ``http://addr:port/metrics`` from a daemon thread.

    Args:
        registry: what to serve.
        addr: interface to bind; ``0.0.0.0`` for all (so a Prometheus container can reach it).
        port: TCP port; ``0`` picks a free one.

    Example::

        server = MetricsServer(registry, "127.0.0.1", 0)
        server.start()
        print(server.url)  # http://127.0.0.1:43121/metrics
        server.stop()
    """

    def __init__(self, registry: CollectorRegistry, addr: str = "0.0.0.0", port: int = 8000) -> None:
        self.registry = registry
        self.addr = addr
        self.port = port
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
        try:
            httpd, thread = start_http_server(self.port, addr=self.addr, registry=self.registry)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    errno.EADDRINUSE,
                    f"MonitoringCallback cannot serve metrics: port {self.port} on {self.addr} is already in use. "
                    f"Pass another port, or port=0 to pick a free one.",
                ) from error
            raise
        self._httpd, self._thread = httpd, thread
        self.bound_port = int(httpd.server_address[1])

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()  # returns once serve_forever has left its loop (it polls every 0.5 s at most)
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=2.0)
