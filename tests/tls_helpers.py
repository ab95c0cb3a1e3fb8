"""Helpers of the secured-endpoint tests: a throw-away CA and certificates made with openssl, bcrypt hashes, web
configuration files, and HTTPS clients.
"""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import yaml
from conftest import require_tool


@dataclass(frozen=True)
class Certificates:
    """A CA, a server certificate for ``localhost``/``127.0.0.1`` and a client certificate, all signed by the CA;
    plus a second CA that signed nothing here (to make a client certificate the server must refuse)."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _signed(directory: Path, name: str, ca: str, subject: str, extensions: str) -> None:
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        subject,
        cwd=directory,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-sha256",
        "-extfile",
        ext.name,
        "-out",
        f"{name}.crt",
        cwd=directory,
    )


def make_certificates(directory: Path) -> Certificates:
    """Create the CA and certificates in ``directory`` with the ``openssl`` command (skips/fails like every tool)."""
    if shutil.which("openssl") is None:
        require_tool("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "rogue-ca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.crt",
            "-days",
            "2",
            "-subj",
            f"/CN=test {ca}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory,
        )
    _signed(
        directory,
        "server",
        "ca",
        "/CN=localhost",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    _signed(
        directory,
        "client",
        "ca",
        "/CN=prometheus",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    _signed(
        directory,
        "rogue-client",
        "rogue-ca",
        "/CN=intruder",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    d = directory
    return Certificates(
        d,
        d / "ca.crt",
        d / "ca.key",
        d / "server.crt",
        d / "server.key",
        d / "client.crt",
        d / "client.key",
        d / "rogue-client.crt",
        d / "rogue-client.key",
    )


def bcrypt_hash(password: str, rounds: int = 4) -> str:
    """A bcrypt hash (few rounds: the tests check the mechanism, not the cost)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


def write_web_config(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def client_context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def fetch(
    url: str, context: ssl.SSLContext | None = None, authorization: str | None = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers, body)`` of a GET; HTTP errors are answers too (status >= 400)."""
    request = urllib.request.Request(url)
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


class SecuredServer:
    """``config.wrap(app)`` served on a loopback port from a thread, TLS when the config has it (the way the
    training endpoint uses a :class:`WebConfig`)."""

    def __init__(self, config: Any, app: Any) -> None:
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client.exposition import ThreadingWSGIServer

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = make_server("127.0.0.1", 0, config.wrap(app), ThreadingWSGIServer, handler_class=Quiet)
        if config.ssl_context is not None:
            self.httpd.socket = config.ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = int(self.httpd.server_address[1])
        self.url = f"{config.scheme}://127.0.0.1:{self.port}/metrics"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
