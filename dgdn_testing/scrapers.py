"""Scrapers as a metrics endpoint meets them, for the run-end tests and benchmark: a regular one (a thread of HTTP
GETs that can stop and start again) and misbehaving connections held open on the endpoint."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any, Optional


class Scraper:
    """GETs ``url`` every ``every_s`` from a thread until closed; :meth:`pause` and :meth:`resume` stop and restart it
    (a scraper that stops).

    Args:
        url: the ``/metrics`` URL.
        every_s: seconds between the end of one scrape and the start of the next.
        read: what to keep of each answer's text (``answers`` holds ``(began, read(text))``); by default nothing.
        name: the thread's name.
    """

    def __init__(
        self, url: str, every_s: float, read: Callable[[str], Any] = lambda text: None, name: str = "scraper"
    ) -> None:
        self.url, self.every_s, self._read = url, every_s, read
        self.answers: list[tuple[float, Any]] = []  # (when the request began, read(answer))
        self._on, self._closed = threading.Event(), threading.Event()
        self._on.set()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed.is_set():
            if not self._on.wait(0.05):
                continue
            began = time.time()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    self.answers.append((began, self._read(response.read().decode())))
            except OSError:  # nothing serves yet, or any more
                pass
            self._closed.wait(self.every_s)

    def wait_for_answers(self, count: int, timeout_s: float = 30.0) -> bool:
        """Whether ``count`` more scrapes were answered within ``timeout_s``."""
        wanted, deadline = len(self.answers) + count, time.monotonic() + timeout_s
        while len(self.answers) < wanted and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(self.answers) >= wanted

    def pause(self) -> None:
        self._on.clear()

    def resume(self) -> None:
        self._on.set()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(10)


def held_connections(kind: Optional[str], port: int) -> list[socket.socket]:
    """Connections a misbehaving scraper keeps open on the endpoint at ``127.0.0.1:port``: ``slow`` trickles a request
    one byte every 0.2 s (from a thread, until closed) and sends another whose answer it never reads; ``idle``
    connects and says nothing; anything else holds none. Close them when done."""
    if kind == "idle":
        return [socket.create_connection(("127.0.0.1", port), timeout=5)]
    if kind != "slow":
        return []
    trickling = socket.create_connection(("127.0.0.1", port), timeout=5)
    unread = socket.socket()
    unread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    unread.connect(("127.0.0.1", port))
    unread.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")

    def trickle() -> None:
        try:
            trickling.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            while True:
                trickling.sendall(b"x")
                time.sleep(0.2)
        except OSError:  # closed by its owner
            pass

    threading.Thread(target=trickle, name="trickle", daemon=True).start()
    return [trickling, unread]
