"""Securing the metrics endpoint with the web configuration file of Prometheus and its exporters.

Prometheus, Alertmanager, the Pushgateway and the exporters built on the Prometheus exporter toolkit read the same
YAML file through ``--web.config.file``. :func:`load_web_config` reads that format, so one file can secure the
training endpoint and the rest of the stack alike::

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # mutual TLS; the default is NoClientCert
      client_ca_file: ca.crt
      min_version: TLS12
    basic_auth_users:
      prometheus: $2b$12$...         # bcrypt hash, e.g. from `htpasswd -nBC 12 "" | tr -d ':\\n'`
    http_server_config:
      headers:
        Strict-Transport-Security: max-age=31536000

TLS is served with Python's :mod:`ssl` (the same server-side context ``prometheus_client`` builds for its
``certfile``/``client_cafile`` options); basic-auth passwords are checked against their bcrypt hash with the
``bcrypt`` package. Everything is checked when the file is loaded: a bad file fails there, with a
:class:`ValueError` naming the file and the field, not at the first scrape.

The Pushgateway's client side (TLS and basic auth of a push) is in :mod:`~dgdn_lightning_monitor.pushgateway`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

import bcrypt
import yaml

log = logging.getLogger(__name__)

PathArg = Union[str, "os.PathLike[str]"]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

#: ``client_auth_type`` values of the exporter toolkit.
CLIENT_AUTH_TYPES = (
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_TOP_LEVEL = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_TLS_FIELDS = (
    "cert_file",
    "key_file",
    "client_ca_file",
    "client_auth_type",
    "min_version",
    "max_version",
    "cipher_suites",
    "curve_preferences",
    "prefer_server_cipher_suites",
    "client_allowed_sans",
    "cert",
    "key",
    "client_ca",
)
# Fields of the toolkit that this endpoint cannot honour. Ignoring them could serve weaker TLS or let in clients the
# file meant to refuse, so they are refused instead.
_TLS_UNSUPPORTED = {
    "cipher_suites": "Go cipher suite names have no exact OpenSSL equivalent; Python's defaults are used",
    "curve_preferences": "Go curve names have no exact OpenSSL equivalent; Python's defaults are used",
    "client_allowed_sans": "the endpoint cannot restrict client certificates by subject alternative name",
    "cert": "give the certificate as a file with cert_file",
    "key": "give the private key as a file with key_file",
    "client_ca": "give the client CA certificates as a file with client_ca_file",
}
_HTTP_FIELDS = ("http2", "headers")
_BCRYPT_HASH = re.compile(r"^\$2[abxy]?\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

# Checked when the user name is unknown, so that the answer takes as long as for a known user with a wrong password
# (nobody knows the password it was made from).
_DUMMY_HASH = b"$2b$10$/H.QRMiTePNe.AzG8O16we.CxVCVymD5XzTDGnbRYuZkC25/RTaiu"

#: How long the outcome of a password check is remembered. A scrape every 15 s then costs one bcrypt check a minute
#: (tens of milliseconds of CPU in the training process) instead of one per scrape.
AUTH_CACHE_TTL_S = 60.0
_AUTH_CACHE_SIZE = 256


def _fail(path: Path, where: str, problem: str) -> ValueError:
    return ValueError(f"web configuration file {str(path)!r}: {where}: {problem}")


# ---------------------------------------------------------------------------------------------- basic auth
class _BasicAuth:
    """Checks ``Authorization: Basic`` credentials against bcrypt hashes, remembering outcomes for a while.

    Outcomes are cached under a keyed hash of user and password (the key is random per process, the password is
    never kept). Only one bcrypt check runs at a time, so a client guessing passwords costs the training process
    at most one core, and the bcrypt package releases the GIL while hashing.
    """

    def __init__(self, users: Mapping[str, bytes], ttl_s: float = AUTH_CACHE_TTL_S) -> None:
        self.users = dict(users)
        self.ttl_s = ttl_s
        self._key = secrets.token_bytes(32)
        self._cache: dict[bytes, tuple[bool, float]] = {}
        self._cache_lock = threading.Lock()
        self._check_lock = threading.Lock()

    def check(self, user: str, password: str) -> bool:
        digest = hmac.new(self._key, user.encode("utf-8") + b"\0" + password.encode("utf-8"), hashlib.sha256).digest()
        now = time.monotonic()
        with self._cache_lock:
            cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        hashed = self.users.get(user)
        with self._check_lock:
            try:
                ok = bcrypt.checkpw(password.encode("utf-8"), hashed if hashed is not None else _DUMMY_HASH)
            except ValueError:  # hashes are validated at load; be safe anyway
                ok = False
        ok = ok and hashed is not None
        with self._cache_lock:
            if len(self._cache) >= _AUTH_CACHE_SIZE:
                self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
                if len(self._cache) >= _AUTH_CACHE_SIZE:
                    self._cache.clear()
            self._cache[digest] = (ok, now + self.ttl_s)
        return ok

    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, found, password = decoded.partition(":")
        return bool(found) and self.check(user, password)


_UNAUTHORIZED_BODY = b"Unauthorized\n"


# ---------------------------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class WebConfig:
    """A loaded web configuration: how the endpoint serves (TLS or not) and whom it lets in.

    Made by :func:`load_web_config`; :meth:`plain` is the configuration without a file (plain HTTP, no auth).

    Attributes:
        path: the file it was read from, or ``None``.
        ssl_context: the server-side TLS context, or ``None`` for plain HTTP.
        users: the basic-auth users and their bcrypt hashes (empty: no authentication).
        headers: extra response headers (``http_server_config.headers``).

    Example::

        config = load_web_config("deploy/secure/web-config.yml")
        app = config.wrap(make_wsgi_app(registry))
        httpd = make_server("0.0.0.0", 8000, app, ThreadingWSGIServer)
        if config.ssl_context is not None:
            httpd.socket = config.ssl_context.wrap_socket(httpd.socket, server_side=True)
        print(f"{config.scheme}://localhost:8000/metrics")
    """

    path: Path | None = None
    ssl_context: ssl.SSLContext | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()
    auth_cache_ttl_s: float = AUTH_CACHE_TTL_S

    @classmethod
    def plain(cls) -> WebConfig:
        """Plain HTTP without authentication: what the endpoint does without a web configuration file."""
        return cls()

    @property
    def scheme(self) -> str:
        """``"https"`` when TLS is configured, else ``"http"``."""
        return "https" if self.ssl_context is not None else "http"

    @property
    def client_certificate_required(self) -> bool:
        """Whether a client must present a verified certificate to connect."""
        return self.ssl_context is not None and self.ssl_context.verify_mode == ssl.CERT_REQUIRED

    def wrap(self, app: WSGIApp) -> WSGIApp:
        """``app`` behind basic authentication (when users are configured) and with the configured headers.

        Requests without valid credentials get ``401 Unauthorized`` with ``WWW-Authenticate: Basic``; ``app`` is
        returned unchanged when there is nothing to add.

        Args:
            app: the WSGI application to protect, e.g. ``prometheus_client.make_wsgi_app(registry)``.
        """
        if not self.users and not self.headers:
            return app
        auth = _BasicAuth(self.users, self.auth_cache_ttl_s) if self.users else None
        extra = list(self.headers)

        def secured(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            if auth is not None and not auth.authorized(environ.get("HTTP_AUTHORIZATION")):
                start_response(
                    "401 Unauthorized",
                    [
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("WWW-Authenticate", "Basic"),
                        ("Content-Length", str(len(_UNAUTHORIZED_BODY))),
                        *extra,
                    ],
                )
                return [_UNAUTHORIZED_BODY]
            if not extra:
                return app(environ, start_response)

            def start_with_headers(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
                return start_response(status, [*headers, *extra], *args)

            return app(environ, start_with_headers)

        return secured


def load_web_config(path: PathArg) -> WebConfig:
    """Read a web configuration file in the format of Prometheus' ``--web.config.file``.

    Args:
        path: the YAML file. Relative ``cert_file``, ``key_file`` and ``client_ca_file`` paths in it are resolved
            against the file's directory, as Prometheus does.

    Returns:
        The :class:`WebConfig`; an empty file gives plain HTTP without authentication.

    Raises:
        ValueError: naming the file and the field, when the file is missing or not valid YAML, has an unknown
            field, a certificate or key that cannot be read or loaded, a ``client_auth_type`` that is not one of
            :data:`CLIENT_AUTH_TYPES`, or a password that is not a bcrypt hash.

    Example::

        config = load_web_config("web-config.yml")
        config.scheme        # "https"
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"web_config_file must be a path to a YAML file, got {path!r}")
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"web configuration file {str(file)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"web configuration file {str(file)!r} cannot be read: {error}") from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise _fail(file, "YAML", str(error).replace("\n", " ")) from None
    if content is None:
        return WebConfig(path=file)
    if not isinstance(content, dict):
        raise _fail(file, "top level", f"must be a mapping of {', '.join(_TOP_LEVEL)}")
    unknown = sorted(str(key) for key in content if key not in _TOP_LEVEL)
    if unknown:
        raise _fail(file, unknown[0], f"unknown field (known: {', '.join(_TOP_LEVEL)})")
    base = file.resolve().parent
    context = _tls_context(file, base, content.get("tls_server_config"))
    users = _users(file, content.get("basic_auth_users"))
    headers = _headers(file, content.get("http_server_config"))
    # rate_limit is accepted (a file shared with the stack may set it); the endpoint serves one scraper per rank.
    return WebConfig(path=file, ssl_context=context, users=MappingProxyType(users), headers=headers)


def _mapping(file: Path, where: str, value: Any, known: tuple[str, ...]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(file, where, "must be a mapping")
    for key in value:
        if key not in known:
            raise _fail(file, f"{where}.{key}", f"unknown field (known: {', '.join(known)})")
    return value


def _string(file: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(file, where, f"must be a non-empty string, got {value!r}")
    return value


def _readable(file: Path, base: Path, where: str, value: Any, marker: str, what: str) -> str:
    path = base / os.path.expanduser(_string(file, where, value))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _fail(file, where, f"{what} {str(path)!r} does not exist") from None
    except OSError as error:
        raise _fail(file, where, f"{what} {str(path)!r} cannot be read: {error.strerror or error}") from None
    if marker.encode() not in data:
        raise _fail(file, where, f"{str(path)!r} is not a PEM {what} (no '{marker}' block)")
    return str(path)


def _tls_context(file: Path, base: Path, value: Any) -> ssl.SSLContext | None:
    tls = _mapping(file, "tls_server_config", value, _TLS_FIELDS)
    if not any(tls.get(key) not in (None, "", [], False) for key in tls):
        return None
    for key, reason in _TLS_UNSUPPORTED.items():
        if tls.get(key) not in (None, "", []):
            raise _fail(file, f"tls_server_config.{key}", f"not supported by the training endpoint ({reason})")
    if not tls.get("cert_file"):
        raise _fail(file, "tls_server_config.cert_file", "missing (TLS needs a certificate and its key)")
    if not tls.get("key_file"):
        raise _fail(file, "tls_server_config.key_file", "missing (TLS needs a certificate and its key)")
    cert_file = _readable(
        file, base, "tls_server_config.cert_file", tls["cert_file"], "CERTIFICATE-----", "certificate"
    )
    key_file = _readable(file, base, "tls_server_config.key_file", tls["key_file"], "PRIVATE KEY-----", "private key")
    auth_type = tls.get("client_auth_type") or "NoClientCert"
    if auth_type == "RequireClientCert":  # the toolkit's older spelling
        auth_type = "RequireAnyClientCert"
    if auth_type not in CLIENT_AUTH_TYPES:
        raise _fail(
            file, "tls_server_config.client_auth_type", f"{auth_type!r} is not one of {', '.join(CLIENT_AUTH_TYPES)}"
        )
    ca_file = None
    if tls.get("client_ca_file"):
        ca_file = _readable(
            file, base, "tls_server_config.client_ca_file", tls["client_ca_file"], "CERTIFICATE-----", "certificate"
        )
        if auth_type == "NoClientCert":
            raise _fail(
                file,
                "tls_server_config.client_auth_type",
                "client_ca_file is set but client certificates are not asked for (NoClientCert); set "
                "client_auth_type, e.g. to RequireAndVerifyClientCert",
            )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # the toolkit's default
    for key, attribute in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if tls.get(key) is not None:
            version = _TLS_VERSIONS.get(tls[key])
            if version is None:
                raise _fail(file, f"tls_server_config.{key}", f"{tls[key]!r} is not one of {', '.join(_TLS_VERSIONS)}")
            setattr(context, attribute, version)
    try:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    except (ssl.SSLError, OSError) as error:
        raise _fail(
            file,
            "tls_server_config.cert_file/key_file",
            f"cannot load the certificate {cert_file!r} with the private key {key_file!r} (a key that "
            f"does not match, or that is encrypted?): {error}",
        ) from None

    if auth_type in ("NoClientCert", "RequestClientCert"):
        # RequestClientCert asks for a certificate but accepts any answer, so letting everyone in without asking
        # is the same as far as access goes.
        context.verify_mode = ssl.CERT_NONE
        return context
    if auth_type == "RequireAnyClientCert":
        # Python's ssl cannot accept a certificate without verifying it; with a CA the certificate is verified,
        # which is stricter than the toolkit.
        if ca_file is None:
            raise _fail(
                file,
                "tls_server_config.client_auth_type",
                "RequireAnyClientCert (any certificate, unverified) cannot be enforced by Python's ssl; "
                "set client_ca_file (certificates are then verified against it) or use "
                "RequireAndVerifyClientCert",
            )
        log.info("%s: RequireAnyClientCert: client certificates are verified against %s", file, ca_file)
    try:
        if ca_file is not None:
            context.load_verify_locations(cafile=ca_file)
        else:
            context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    except (ssl.SSLError, OSError) as error:
        raise _fail(file, "tls_server_config.client_ca_file", f"cannot load {ca_file!r}: {error}") from None
    context.verify_mode = ssl.CERT_OPTIONAL if auth_type == "VerifyClientCertIfGiven" else ssl.CERT_REQUIRED
    return context


def _users(file: Path, value: Any) -> dict[str, bytes]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(file, "basic_auth_users", "must be a mapping of user name to bcrypt hash")
    users = {}
    for user, hashed in value.items():
        where = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user:
            raise _fail(file, where, "a user name must be a non-empty string without ':'")
        if not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed):
            raise _fail(
                file,
                where,
                "the password must be a bcrypt hash such as '$2b$12$...' (60 characters), "
                "e.g. from `htpasswd -nBC 12 \"\" | tr -d ':\\n'`",
            )
        users[user] = hashed.encode("ascii")
    return users


def _headers(file: Path, value: Any) -> tuple[tuple[str, str], ...]:
    http = _mapping(file, "http_server_config", value, _HTTP_FIELDS)
    # http2 is accepted and has no effect: the endpoint speaks HTTP/1.1, which every scraper speaks too.
    headers = http.get("headers") or {}
    if not isinstance(headers, dict):
        raise _fail(file, "http_server_config.headers", "must be a mapping of header name to value")
    result = []
    for name, text in headers.items():
        where = f"http_server_config.headers.{name}"
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise _fail(file, where, "not a valid header name")
        if name.lower() in (
            "authorization",
            "www-authenticate",
            "content-type",
            "content-encoding",
            "content-length",
            "set-cookie",
        ):
            raise _fail(file, where, "this header cannot be set")
        if not isinstance(text, str) or "\n" in text or "\r" in text:
            raise _fail(file, where, "the value must be a one-line string")
        result.append((name, text))
    return tuple(result)
