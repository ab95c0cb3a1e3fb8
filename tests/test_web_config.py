"""load_web_config: the web configuration file format of Prometheus and its exporters, checked at load; and the
endpoint it secures, over real HTTPS connections with a CA and certificates made by openssl."""

from __future__ import annotations

import dataclasses
import shutil
import ssl
import urllib.error
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app
from tls_helpers import SecuredServer, basic, bcrypt_hash, client_context, fetch, make_certificates, write_web_config

from dgdn_lightning_monitor import web_config
from dgdn_lightning_monitor.pushgateway import push_handler, push_handler_from_env
from dgdn_lightning_monitor.web_config import WebConfig, load_web_config

GAUGE_VALUE = 42.5


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def app():
    registry = CollectorRegistry()
    Gauge("dgdn_test_value", "A value the tests read back.", registry=registry).set(GAUGE_VALUE)
    return make_wsgi_app(registry)


def _tls(certs, **extra) -> dict:
    return {"tls_server_config": {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key), **extra}}


# ------------------------------------------------------------------------------------------------ loading
def test_empty_file_is_plain_http(tmp_path, app):
    path = tmp_path / "web.yml"
    path.write_text("")
    config = load_web_config(path)
    assert config.scheme == "http" and config.ssl_context is None and not config.users
    assert config.wrap(app) is app
    assert WebConfig.plain().scheme == "http"


def test_relative_paths_resolve_against_the_files_directory(tmp_path, certificates, monkeypatch):
    # The file refers to its certificates relative to itself; loading it from elsewhere must still find them.
    folder = tmp_path / "conf"
    (folder / "tls").mkdir(parents=True)
    for source in (certificates.server_cert, certificates.server_key, certificates.ca_cert):
        shutil.copy(source, folder / "tls" / source.name)
    write_web_config(
        folder / "web.yml",
        {
            "tls_server_config": {
                "cert_file": "tls/server.crt",
                "key_file": "tls/server.key",
                "client_ca_file": "tls/ca.crt",
                "client_auth_type": "RequireAndVerifyClientCert",
            }
        },
    )
    monkeypatch.chdir(tmp_path)
    config = load_web_config(Path("conf/web.yml"))
    assert config.scheme == "https"
    assert config.ssl_context.verify_mode == ssl.CERT_REQUIRED and config.client_certificate_required


@pytest.mark.parametrize(
    ("auth_type", "verify_mode"),
    [
        ("NoClientCert", ssl.CERT_NONE),
        ("RequestClientCert", ssl.CERT_NONE),
        ("VerifyClientCertIfGiven", ssl.CERT_OPTIONAL),
        ("RequireAndVerifyClientCert", ssl.CERT_REQUIRED),
        ("RequireAnyClientCert", ssl.CERT_REQUIRED),
    ],
)
def test_client_auth_types(tmp_path, certificates, auth_type, verify_mode):
    extra = {"client_auth_type": auth_type}
    if auth_type != "NoClientCert":
        extra["client_ca_file"] = str(certificates.ca_cert)
    config = load_web_config(write_web_config(tmp_path / "web.yml", _tls(certificates, **extra)))
    assert config.ssl_context.verify_mode == verify_mode
    assert config.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2


def _bad_cases(certs, tmp: Path) -> list[tuple[str, object, str]]:
    """(id, file content, field the error must name)."""
    garbage = tmp / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    return [
        ("yaml", "tls_server_config: [unclosed", "YAML"),
        ("top-level-list", "- a\n- b\n", "top level"),
        ("unknown-top", {"tls_config": {}}, "tls_config"),
        ("unknown-tls-field", _tls(certs, certfile="x"), "tls_server_config.certfile"),
        ("missing-cert", _tls(certs, cert_file=str(tmp / "nope.crt")), "tls_server_config.cert_file"),
        ("no-key-field", {"tls_server_config": {"cert_file": str(certs.server_cert)}}, "tls_server_config.key_file"),
        ("key-not-pem", _tls(certs, key_file=str(certs.server_cert)), "tls_server_config.key_file"),
        ("key-unreadable", _tls(certs, key_file=str(garbage)), "tls_server_config.cert_file/key_file"),
        ("key-mismatch", _tls(certs, key_file=str(certs.client_key)), "tls_server_config.cert_file/key_file"),
        (
            "auth-type",
            _tls(certs, client_auth_type="RequireClientCertPlease", client_ca_file=str(certs.ca_cert)),
            "tls_server_config.client_auth_type",
        ),
        ("ca-without-policy", _tls(certs, client_ca_file=str(certs.ca_cert)), "tls_server_config.client_auth_type"),
        (
            "ca-missing",
            _tls(certs, client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(tmp / "x")),
            "tls_server_config.client_ca_file",
        ),
        (
            "any-cert-without-ca",
            _tls(certs, client_auth_type="RequireAnyClientCert"),
            "tls_server_config.client_auth_type",
        ),
        ("tls-version", _tls(certs, min_version="TLS14"), "tls_server_config.min_version"),
        (
            "unsupported-sans",
            _tls(
                certs,
                client_auth_type="RequireAndVerifyClientCert",
                client_ca_file=str(certs.ca_cert),
                client_allowed_sans=["a"],
            ),
            "tls_server_config.client_allowed_sans",
        ),
        ("hash-malformed", {"basic_auth_users": {"alice": "plaintext-password"}}, "basic_auth_users.alice"),
        ("hash-truncated", {"basic_auth_users": {"alice": bcrypt_hash("pw")[:-1]}}, "basic_auth_users.alice"),
        ("user-colon", {"basic_auth_users": {"a:b": bcrypt_hash("pw")}}, "basic_auth_users.a:b"),
        ("users-list", {"basic_auth_users": ["alice"]}, "basic_auth_users"),
        ("header-newline", {"http_server_config": {"headers": {"X-A": "a\r\nb"}}}, "http_server_config.headers.X-A"),
    ]


def test_bad_files_name_the_file_and_the_field(tmp_path, certificates):
    for case, content, where in _bad_cases(certificates, tmp_path):
        path = tmp_path / f"{case}.yml"
        if isinstance(content, str):
            path.write_text(content)
        else:
            write_web_config(path, content)
        with pytest.raises(ValueError) as error:
            load_web_config(path)
        message = str(error.value)
        assert str(path) in message, (case, message)
        assert where in message, (case, message)


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as error:
        load_web_config(tmp_path / "absent.yml")
    assert str(tmp_path / "absent.yml") in str(error.value)
    with pytest.raises(ValueError, match="cannot be read"):
        load_web_config(tmp_path)  # a directory
    with pytest.raises(ValueError, match="web_config_file"):
        load_web_config("")


# ------------------------------------------------------------------------------------------------ serving
def test_https_serves_the_metrics(tmp_path, certificates, app):
    server = SecuredServer(load_web_config(write_web_config(tmp_path / "web.yml", _tls(certificates))), app)
    try:
        assert server.url.startswith("https://")
        status, _, body = fetch(server.url, client_context(certificates.ca_cert))
        assert status == 200
        assert f"dgdn_test_value {GAUGE_VALUE}" in body.decode()
        with pytest.raises(urllib.error.URLError):  # a client that does not trust the CA refuses the server
            fetch(server.url, client_context(certificates.directory / "rogue-ca.crt"))
    finally:
        server.close()


def _refused(url: str, context: ssl.SSLContext) -> bool:
    try:
        status, _, _ = fetch(url, context, timeout=10)
    except (urllib.error.URLError, ssl.SSLError, ConnectionError):
        return True
    return False


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(tmp_path, certificates, app):
    config = load_web_config(
        write_web_config(
            tmp_path / "web.yml",
            _tls(certificates, client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(certificates.ca_cert)),
        )
    )
    server = SecuredServer(config, app)
    try:
        assert _refused(server.url, client_context(certificates.ca_cert))  # no certificate
        rogue = client_context(certificates.ca_cert, certificates.rogue_client_cert, certificates.rogue_client_key)
        assert _refused(server.url, rogue)  # a certificate of another CA
        trusted = client_context(certificates.ca_cert, certificates.client_cert, certificates.client_key)
        status, _, body = fetch(server.url, trusted)
        assert status == 200 and f"dgdn_test_value {GAUGE_VALUE}" in body.decode()
    finally:
        server.close()


def test_verify_if_given_lets_clients_without_certificates_in(tmp_path, certificates, app):
    config = load_web_config(
        write_web_config(
            tmp_path / "web.yml",
            _tls(certificates, client_auth_type="VerifyClientCertIfGiven", client_ca_file=str(certificates.ca_cert)),
        )
    )
    server = SecuredServer(config, app)
    try:
        assert fetch(server.url, client_context(certificates.ca_cert))[0] == 200
        rogue = client_context(certificates.ca_cert, certificates.rogue_client_cert, certificates.rogue_client_key)
        assert _refused(server.url, rogue)
    finally:
        server.close()


def test_basic_auth(tmp_path, certificates, app):
    config = load_web_config(
        write_web_config(
            tmp_path / "web.yml",
            {
                **_tls(certificates),
                "basic_auth_users": {
                    "prometheus": bcrypt_hash("right horse"),
                    "grafana": bcrypt_hash("battery staple"),
                },
                "http_server_config": {"headers": {"X-Frame-Options": "deny"}},
            },
        )
    )
    server = SecuredServer(config, app)
    context = client_context(certificates.ca_cert)
    try:
        for authorization in (
            None,
            basic("prometheus", "wrong"),
            basic("nobody", "right horse"),
            basic("grafana", "right horse"),
            "Basic !!!notbase64",
            "Bearer abc",
            "Basic " + "cHJvbWV0aGV1cw==",  # "prometheus" without a colon
        ):
            status, headers, body = fetch(server.url, context, authorization)
            assert status == 401, authorization
            assert headers.get("WWW-Authenticate") == "Basic"
            assert b"dgdn_test_value" not in body
        for user, password in (("prometheus", "right horse"), ("grafana", "battery staple")):
            status, headers, body = fetch(server.url, context, basic(user, password))
            assert status == 200 and f"dgdn_test_value {GAUGE_VALUE}" in body.decode()
            assert headers.get("X-Frame-Options") == "deny"
    finally:
        server.close()


def test_password_checks_are_cached_briefly(tmp_path, monkeypatch, app):
    calls = []
    real_checkpw = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(web_config.bcrypt, "checkpw", counting)
    config = load_web_config(write_web_config(tmp_path / "web.yml", {"basic_auth_users": {"u": bcrypt_hash("pw")}}))
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""}
    statuses = []

    def call(wrapped, authorization):
        list(wrapped({**environ, "HTTP_AUTHORIZATION": authorization}, lambda status, headers: statuses.append(status)))
        return statuses[-1]

    wrapped = config.wrap(app)
    assert call(wrapped, basic("u", "pw")).startswith("200")
    assert call(wrapped, basic("u", "pw")).startswith("200")
    assert call(wrapped, basic("u", "bad")).startswith("401")
    assert call(wrapped, basic("u", "bad")).startswith("401")
    assert len(calls) == 2  # one bcrypt check per distinct (user, password) within the cache's lifetime

    expiring = dataclasses.replace(config, auth_cache_ttl_s=0.0).wrap(app)
    calls.clear()
    assert call(expiring, basic("u", "pw")).startswith("200")
    assert call(expiring, basic("u", "pw")).startswith("200")
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------------ push handler
def test_push_handler_from_env_arguments(tmp_path, certificates):
    assert push_handler_from_env({}) is None
    assert push_handler_from_env({"DGDN_MONITOR_PUSHGATEWAY_USERNAME": ""}) is None
    with pytest.raises(ValueError, match="DGDN_MONITOR_PUSHGATEWAY_PASSWORD"):
        push_handler_from_env({"DGDN_MONITOR_PUSHGATEWAY_USERNAME": "u"})
    with pytest.raises(ValueError, match="cert_file and key_file"):
        push_handler_from_env({"DGDN_MONITOR_PUSHGATEWAY_CERT_FILE": str(certificates.client_cert)})
    with pytest.raises(ValueError, match="ca_file"):
        push_handler(ca_file=tmp_path / "absent.crt")
    assert callable(push_handler_from_env({"DGDN_MONITOR_PUSHGATEWAY_CA_FILE": str(certificates.ca_cert)}))
