"""The Pushgateway: every rank pushes its final figures there at the end of a run (in bounded time), finished groups
are deleted once past their retention, and both speak TLS and basic auth to a secured Pushgateway through a
``prometheus_client`` push handler configured from ``DGDN_MONITOR_PUSHGATEWAY_*`` variables.

A failed push is the caller's to report; retention is housekeeping and never warns.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import Optional, Union
from urllib.request import HTTPSHandler, Request, build_opener

from prometheus_client import CollectorRegistry, delete_from_gateway, push_to_gateway
from prometheus_client.exposition import default_handler

from dgdn_lightning_monitor.guards import describe
from dgdn_lightning_monitor.labels import DEFAULT_JOB

log = logging.getLogger(__name__)

PathArg = Union[str, "os.PathLike[str]"]

#: The most a Pushgateway push may take at the end of a run.
PUSH_TIMEOUT_S = 2.0
#: Final figures a run pushed stay in the Pushgateway this long; then the next run that pushes to it (at its set-up)
#: or the native stack deletes the group. Prometheus keeps what it scraped of them meanwhile.
PUSH_RETENTION_S = 3600.0


# ---------------------------------------------------------------------------------------------- TLS and basic auth
#: Environment variables read by :func:`push_handler_from_env`.
PUSHGATEWAY_ENV = (
    "DGDN_MONITOR_PUSHGATEWAY_USERNAME",
    "DGDN_MONITOR_PUSHGATEWAY_PASSWORD",
    "DGDN_MONITOR_PUSHGATEWAY_CA_FILE",
    "DGDN_MONITOR_PUSHGATEWAY_CERT_FILE",
    "DGDN_MONITOR_PUSHGATEWAY_KEY_FILE",
)
PushHandler = Callable[[str, str, float | None, list[tuple[str, str]], bytes], Callable[[], None]]


def push_handler(
    username: str | None = None,
    password: str | None = None,
    ca_file: PathArg | None = None,
    cert_file: PathArg | None = None,
    key_file: PathArg | None = None,
) -> PushHandler | None:
    """A ``prometheus_client`` push handler with basic auth and TLS settings, or ``None`` when none are given.

    Args:
        username, password: basic-auth credentials (both or neither).
        ca_file: CA certificates to verify the Pushgateway's certificate with (the system's by default).
        cert_file, key_file: a client certificate and its key, for a Pushgateway that asks for one (both or neither).

    Raises:
        ValueError: naming the argument, when only one of a pair is given or a file cannot be loaded.

    Example::

        handler = push_handler("trainer", "s3cret", ca_file="certs/ca.crt")
        push_to_gateway("https://pushgateway:9091", job="dgdn-training", registry=registry, handler=handler)
    """
    if (username is None) != (password is None):
        raise ValueError("the Pushgateway username and password must be given together")
    if (cert_file is None) != (key_file is None):
        raise ValueError("the Pushgateway client cert_file and key_file must be given together")
    if username is None and ca_file is None and cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=os.fspath(ca_file))
        except (ssl.SSLError, OSError) as error:
            raise ValueError(f"Pushgateway ca_file {os.fspath(ca_file)!r} cannot be loaded: {error}") from None
    if cert_file is not None and key_file is not None:
        try:
            context.load_cert_chain(certfile=os.fspath(cert_file), keyfile=os.fspath(key_file))
        except (ssl.SSLError, OSError) as error:
            raise ValueError(
                f"Pushgateway cert_file {os.fspath(cert_file)!r} / key_file {os.fspath(key_file)!r} "
                f"cannot be loaded: {error}"
            ) from None
    authorization = None
    if username is not None and password is not None:
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        authorization = f"Basic {token}"

    def handler(
        url: str, method: str, timeout: float | None, headers: list[tuple[str, str]], data: bytes
    ) -> Callable[[], None]:
        def handle() -> None:
            request = Request(url, data=data, method=method)
            for name, value in headers:
                request.add_header(name, value)
            if authorization is not None:
                request.add_header("Authorization", authorization)
            with build_opener(HTTPSHandler(context=context)).open(request, timeout=timeout) as response:
                if response.status >= 400:
                    raise OSError(f"error talking to the Pushgateway: {response.status} {response.reason}")

        return handle

    return handler


def push_handler_from_env(environ: Mapping[str, str] | None = None) -> PushHandler | None:
    """:func:`push_handler` configured from ``DGDN_MONITOR_PUSHGATEWAY_*`` environment variables.

    Reads ``DGDN_MONITOR_PUSHGATEWAY_USERNAME`` / ``_PASSWORD`` (basic auth), ``_CA_FILE`` (CA to verify the
    Pushgateway with) and ``_CERT_FILE`` / ``_KEY_FILE`` (client certificate). Empty variables count as unset.

    Args:
        environ: where to read the variables; ``os.environ`` by default.

    Returns:
        A handler for ``prometheus_client.push_to_gateway(handler=...)``, or ``None`` when no variable is set.

    Raises:
        ValueError: naming the variable, when a pair is incomplete or a file cannot be loaded.

    Example::

        handler = push_handler_from_env()
        push_to_gateway(url, job="dgdn-training", registry=registry, **({"handler": handler} if handler else {}))
    """
    env = os.environ if environ is None else environ
    values = {name: (env.get(name) or None) for name in PUSHGATEWAY_ENV}
    username, password, ca_file, cert_file, key_file = (values[name] for name in PUSHGATEWAY_ENV)
    try:
        return push_handler(username, password, ca_file, cert_file, key_file)
    except ValueError as error:
        raise ValueError(f"{error} (from the environment variables {', '.join(PUSHGATEWAY_ENV)})") from None


# ---------------------------------------------------------------------------------------------- push and retention
def push_final_metrics(
    url: str,
    job: str,
    registry: CollectorRegistry,
    grouping_key: Mapping[str, str],
    timeout_s: float = PUSH_TIMEOUT_S,
) -> Optional[str]:
    """Push ``registry`` to the Pushgateway at ``url`` (``host:port`` or ``http(s)://host:port``) as the group of
    ``job`` and ``grouping_key`` (replacing it), from a helper thread waited for about ``timeout_s``, with the TLS and
    basic-auth settings of the ``DGDN_MONITOR_PUSHGATEWAY_*`` variables (see
    :func:`push_handler_from_env`; a bad setting fails like a push).

    Returns:
        ``None`` when the push succeeded, else a short reason.

    Example::

        reason = push_final_metrics("http://localhost:9091", "dgdn-training", registry, {"rank": "0"})
    """
    outcome: list[Optional[str]] = [f"no answer within {timeout_s:.1f} s"]

    def push() -> None:
        try:
            handler = push_handler_from_env() or default_handler  # TLS and basic auth of a secured Pushgateway
            push_to_gateway(
                url, job=job, registry=registry, grouping_key=dict(grouping_key), timeout=timeout_s, handler=handler
            )
            outcome[0] = None
        except Exception as error:  # the reason is reported by the caller
            outcome[0] = describe(error)

    worker = threading.Thread(target=push, name="dgdn-pushgateway", daemon=True)
    worker.start()
    worker.join(timeout_s + 0.5)  # bounds name resolution too, which the socket timeout does not cover
    return outcome[0]


def remove_finished_groups(
    url: str, job: str = DEFAULT_JOB, retention_s: float = PUSH_RETENTION_S, timeout_s: float = PUSH_TIMEOUT_S
) -> list[dict[str, str]]:
    """Delete the Pushgateway groups of ``job`` pushed more than ``retention_s`` ago (every group the callback pushes
    is a finished run's: it pushes only when a run ends).

    Args:
        url: the Pushgateway.
        job: only groups of this job are considered.
        retention_s: age, from the group's ``push_time_seconds``, after which a group is deleted.
        timeout_s: per request.

    Returns:
        The grouping labels of the deleted groups. Failures are logged at debug level and end the sweep.
    """
    base = url if "://" in url else f"http://{url}"
    deleted: list[dict[str, str]] = []
    try:
        with urllib.request.urlopen(base.rstrip("/") + "/api/v1/metrics", timeout=timeout_s) as response:  # noqa: S310
            groups = json.loads(response.read())["data"]
        now = time.time()
        handler = push_handler_from_env() or default_handler
        for group in groups:
            pushed = group.get("push_time_seconds", {}).get("metrics", [{}])[0]
            labels = dict(pushed.get("labels", {}))
            if labels.pop("job", None) != job or now - float(pushed.get("value", now)) <= retention_s:
                continue
            if labels.get("instance") == "":  # the Pushgateway's empty default, not part of the grouping key
                del labels["instance"]
            delete_from_gateway(url, job=job, grouping_key=labels, timeout=timeout_s, handler=handler)
            deleted.append(labels)
    except Exception as error:  # retention is housekeeping: never a reason to stop or warn a run
        log.debug("Pushgateway retention at %s stopped: %s", url, error)
    return deleted
