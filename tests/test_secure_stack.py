"""The secured stack with the real binaries: certificates from scripts/make-certs.sh, Prometheus, Alertmanager and
the Pushgateway started with the shipped deploy/secure/web-config.yml, Prometheus scraping secured endpoints (mutual
TLS, basic auth) and alerting over mutual TLS, the containers' health-check commands, and a push with the
``DGDN_MONITOR_PUSHGATEWAY_*`` settings."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port, require_tool
from prom_helpers import DEPLOY, ROOT, ServerProcess, run_tool, wait_until
from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app, push_to_gateway
from tls_helpers import SecuredServer, basic, bcrypt_hash, client_context, fetch, write_web_config

from dgdn_lightning_monitor.pushgateway import push_final_metrics, push_handler_from_env
from dgdn_lightning_monitor.web_config import load_web_config

pytestmark = pytest.mark.slow

SECURE = DEPLOY / "secure"
WAIT_S = 60.0


class SecureProcess(ServerProcess):
    """A server binary on a loopback port serving HTTPS with the shipped web config."""

    def __init__(self, args: list[str], port: int, log_path: Path, context: ssl.SSLContext) -> None:
        super().__init__(args, port, log_path)
        self.url = f"https://127.0.0.1:{port}"
        self.context = context

    def get(self, path: str, context: ssl.SSLContext | None = None, authorization: str | None = None):
        return fetch(self.url + path, context or self.context, authorization)

    def wait_ready(self, path: str = "/-/ready") -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.process.args[0]} exited:\n{self.log_path.read_text(errors='replace')}")
            return self.get(path)[0] == 200

        wait_until(ready, WAIT_S, what=f"{self.process.args[0]} on {self.url}")

    def api(self, path: str, **params: Any) -> Any:
        status, _, body = self.get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert status == 200, body
        return json.loads(body)["data"]



@pytest.fixture(scope="module")
def secure_dir(tmp_path_factory) -> Path:
    """deploy/secure's web config and client config next to certificates made by scripts/make-certs.sh."""
    directory = tmp_path_factory.mktemp("secure")
    for name in ("web-config.yml", "http-client.yml"):
        shutil.copy(SECURE / name, directory / name)
    if shutil.which("openssl") is None:
        require_tool("openssl")
    run_tool(["bash", ROOT / "scripts" / "make-certs.sh", directory / "certs", "extra-node.example"], timeout=120)
    return directory


@pytest.fixture(scope="module")
def trusted(secure_dir) -> ssl.SSLContext:
    certs = secure_dir / "certs"
    return client_context(certs / "ca.crt", certs / "client.crt", certs / "client.key")


def test_make_certs_makes_a_chain_the_servers_accept(secure_dir):
    certs = secure_dir / "certs"
    run_tool(["openssl", "verify", "-CAfile", certs / "ca.crt", certs / "server.crt", certs / "client.crt"], timeout=30)
    san = subprocess.run(
        ["openssl", "x509", "-in", str(certs / "server.crt"), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    for name in (
        "DNS:localhost",
        "DNS:prometheus",
        "DNS:alertmanager",
        "DNS:pushgateway",
        "DNS:host.docker.internal",
        "DNS:extra-node.example",
        "IP Address:127.0.0.1",
    ):
        assert name in san
    # Private keys, the browser bundle and its password are the owner's alone; certificates are public.
    for name in ("ca.key", "server.key", "client.key", "client.p12", "client.p12.password"):
        assert oct((certs / name).stat().st_mode & 0o777) == "0o600", name
    for name in ("ca.crt", "server.crt", "client.crt"):
        assert oct((certs / name).stat().st_mode & 0o777) == "0o644", name
    # The browser bundle opens with its password only, never with an empty one.
    password = f"file:{certs / 'client.p12.password'}"
    run_tool(["openssl", "pkcs12", "-in", certs / "client.p12", "-passin", password, "-noout"], timeout=30)
    empty = subprocess.run(
        ["openssl", "pkcs12", "-in", str(certs / "client.p12"), "-passin", "pass:", "-noout"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert empty.returncode != 0
    # The shipped web config loads with them, in promtool and in the package alike.
    promtool = require_tool("promtool")
    run_tool([promtool, "check", "web-config", secure_dir / "web-config.yml"], timeout=30)
    config = load_web_config(secure_dir / "web-config.yml")
    assert config.scheme == "https" and config.client_certificate_required


def _prometheus_config(path: Path, certs: Path, alertmanager: int, targets: dict[str, Any]) -> Path:
    tls = {
        "ca_file": str(certs / "ca.crt"),
        "cert_file": str(certs / "client.crt"),
        "key_file": str(certs / "client.key"),
    }
    jobs = []
    for job, (address, extra) in targets.items():
        jobs.append(
            {
                "job_name": job,
                "scheme": "https",
                "tls_config": tls,
                "scrape_interval": "1s",
                "scrape_timeout": "900ms",
                "static_configs": [{"targets": [address]}],
                **extra,
            }
        )
    rules = path.parent / "always.rules.yml"
    rules.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "secure-test",
                        "interval": "1s",
                        "rules": [
                            {"alert": "SecureStackTestAlert", "expr": "vector(1)", "labels": {"severity": "info"}}
                        ],
                    }
                ]
            }
        )
    )
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "alerting": {
            "alertmanagers": [
                {"scheme": "https", "tls_config": tls, "static_configs": [{"targets": [f"127.0.0.1:{alertmanager}"]}]}
            ]
        },
        "scrape_configs": jobs,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_stack_with_the_shipped_web_config(tmp_path, secure_dir, trusted):
    prometheus_bin = require_tool("prometheus")
    alertmanager_bin = require_tool("alertmanager")
    pushgateway_bin = require_tool("pushgateway")
    promtool, amtool = require_tool("promtool"), require_tool("amtool")
    certs = secure_dir / "certs"
    web = secure_dir / "web-config.yml"
    no_cert = client_context(certs / "ca.crt")

    # Two training-like endpoints: one behind the same mutual-TLS file, one with TLS and basic auth.
    registry = CollectorRegistry()
    Gauge("dgdn_training_loss", "loss", registry=registry).set(0.625)
    mtls_endpoint = SecuredServer(load_web_config(web), make_wsgi_app(registry))
    password_file = tmp_path / "scrape-password"
    password_file.write_text("correct horse\n")
    basic_web = write_web_config(
        tmp_path / "basic-web.yml",
        {
            "tls_server_config": {"cert_file": str(certs / "server.crt"), "key_file": str(certs / "server.key")},
            "basic_auth_users": {"prometheus": bcrypt_hash("correct horse")},
        },
    )
    basic_endpoint = SecuredServer(load_web_config(basic_web), make_wsgi_app(registry))
    wrong_password = tmp_path / "wrong-password"
    wrong_password.write_text("battery staple")

    processes: list[SecureProcess] = []
    try:
        am_port, pg_port, prom_port = free_port(), free_port(), free_port()
        am_config = tmp_path / "alertmanager.yml"
        am_config.write_text(
            yaml.safe_dump({"route": {"receiver": "null", "group_wait": "1s"}, "receivers": [{"name": "null"}]})
        )
        alertmanager = SecureProcess(
            [
                alertmanager_bin,
                f"--config.file={am_config}",
                f"--storage.path={tmp_path / 'am'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
                f"--web.config.file={web}",
            ],
            am_port,
            tmp_path / "alertmanager.log",
            trusted,
        )
        processes.append(alertmanager)
        pushgateway = SecureProcess(
            [
                pushgateway_bin,
                f"--web.listen-address=127.0.0.1:{pg_port}",
                f"--web.config.file={web}",
                # Debian's build persists to one shared file by default: a test keeps its own.
                f"--persistence.file={tmp_path / 'pushgateway.data'}",
            ],
            pg_port,
            tmp_path / "pushgateway.log",
            trusted,
        )
        processes.append(pushgateway)
        config = _prometheus_config(
            tmp_path / "prometheus.yml",
            certs,
            am_port,
            {
                "prometheus": (f"127.0.0.1:{prom_port}", {}),
                "alertmanager": (f"127.0.0.1:{am_port}", {}),
                "pushgateway": (f"127.0.0.1:{pg_port}", {"honor_labels": True}),
                "training-mtls": (f"127.0.0.1:{mtls_endpoint.port}", {}),
                "training-basic": (
                    f"127.0.0.1:{basic_endpoint.port}",
                    {"basic_auth": {"username": "prometheus", "password_file": str(password_file)}},
                ),
                "training-wrong-password": (
                    f"127.0.0.1:{basic_endpoint.port}",
                    {"basic_auth": {"username": "prometheus", "password_file": str(wrong_password)}},
                ),
            },
        )
        run_tool([promtool, "check", "config", config])
        prometheus = SecureProcess(
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                f"--web.config.file={web}",
                "--log.level=warn",
            ],
            prom_port,
            tmp_path / "prometheus.log",
            trusted,
        )
        processes.append(prometheus)
        for process in processes:
            process.wait_ready()

        # Every component refuses a client without a certificate of the CA.
        for process in processes:
            with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
                process.get("/-/ready", no_cert)
            with pytest.raises(urllib.error.URLError):  # nor does a client that does not trust the CA get through
                process.get("/-/ready", client_context(None))

        # The containers' health checks: promtool and amtool with deploy/secure/http-client.yml, run from its
        # directory as in docker-compose.secure.yml.
        http_client = "--http.config.file=http-client.yml"
        # `promtool check ready` (the Prometheus image's health check) exists from Prometheus 2.43 on; with an older
        # promtool the same file is still exercised by amtool below.
        helps = subprocess.run([promtool, "check", "--help"], capture_output=True, text=True, timeout=60, check=False)
        if "ready" in helps.stdout + helps.stderr:
            url = f"--url=https://localhost:{prom_port}"
            run_tool([promtool, "check", "ready", url, http_client], cwd=secure_dir)
        url = f"--alertmanager.url=https://localhost:{am_port}"
        run_tool([amtool, url, http_client, "cluster", "show"], cwd=secure_dir)

        # A push with the DGDN_MONITOR_PUSHGATEWAY_* settings gets through; one without a certificate does not.
        pushed = CollectorRegistry()
        Gauge("dgdn_final_loss", "final loss", registry=pushed).set(0.125)
        handler = push_handler_from_env(
            {
                "DGDN_MONITOR_PUSHGATEWAY_CA_FILE": str(certs / "ca.crt"),
                "DGDN_MONITOR_PUSHGATEWAY_CERT_FILE": str(certs / "client.crt"),
                "DGDN_MONITOR_PUSHGATEWAY_KEY_FILE": str(certs / "client.key"),
            }
        )
        push_to_gateway(
            f"https://127.0.0.1:{pg_port}",
            job="dgdn-training",
            registry=pushed,
            grouping_key={"run_id": "secure", "rank": "0"},
            timeout=10,
            handler=handler,
        )
        without_cert = push_handler_from_env({"DGDN_MONITOR_PUSHGATEWAY_CA_FILE": str(certs / "ca.crt")})
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            push_to_gateway(
                f"https://127.0.0.1:{pg_port}",
                job="dgdn-training",
                registry=pushed,
                grouping_key={"run_id": "intruder", "rank": "0"},
                timeout=10,
                handler=without_cert,
            )
        body = pushgateway.get("/metrics")[2].decode()
        assert 'dgdn_final_loss{instance="",job="dgdn-training",rank="0",run_id="secure"} 0.125' in body
        assert 'run_id="intruder"' not in body

        # Prometheus scrapes every secured target; the wrong password is refused (up 0), and the values arrive.
        def targets_settled() -> dict[str, float]:
            up = {r["metric"]["job"]: float(r["value"][1]) for r in prometheus.api("query", query="up")["result"]}
            return up if len(up) == 6 else {}

        up = wait_until(targets_settled, WAIT_S, what="every target scraped")
        assert up == {
            "prometheus": 1,
            "alertmanager": 1,
            "pushgateway": 1,
            "training-mtls": 1,
            "training-basic": 1,
            "training-wrong-password": 0,
        }
        losses = {
            r["metric"]["job"]: float(r["value"][1])
            for r in prometheus.api("query", query="dgdn_training_loss")["result"]
        }
        assert losses == {"training-mtls": 0.625, "training-basic": 0.625}
        final = prometheus.api("query", query='dgdn_final_loss{run_id="secure"}')["result"]
        assert [float(r["value"][1]) for r in final] == [0.125]

        # Prometheus delivers its alert to Alertmanager over mutual TLS.
        def alert_arrived() -> bool:
            status, _, body = alertmanager.get("/api/v2/alerts")
            return status == 200 and any(
                a["labels"].get("alertname") == "SecureStackTestAlert" for a in json.loads(body)
            )

        wait_until(alert_arrived, WAIT_S, what="the alert in Alertmanager")
    finally:
        for process in reversed(processes):
            process.stop()
        mtls_endpoint.close()
        basic_endpoint.close()


def test_basic_auth_in_front_of_the_stack(tmp_path, secure_dir, monkeypatch):
    """The shipped file with basic_auth_users added (its documented variant): 401 without or with a wrong password."""
    pushgateway_bin = require_tool("pushgateway")
    certs = secure_dir / "certs"
    content = yaml.safe_load((secure_dir / "web-config.yml").read_text())
    content["tls_server_config"]["client_auth_type"] = "NoClientCert"
    del content["tls_server_config"]["client_ca_file"]
    content["basic_auth_users"] = {"trainer": bcrypt_hash("s3cret pass")}
    web = write_web_config(secure_dir / "web-config-basic.yml", content)
    port = free_port()
    pushgateway = SecureProcess(
        [
            pushgateway_bin,
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.config.file={web}",
            f"--persistence.file={tmp_path / 'pushgateway.data'}",
        ],
        port,
        tmp_path / "pg.log",
        client_context(certs / "ca.crt"),
    )
    try:

        def ready() -> bool:
            if pushgateway.process.poll() is not None:
                raise RuntimeError(pushgateway.log_path.read_text())
            return pushgateway.get("/-/ready", authorization=basic("trainer", "s3cret pass"))[0] == 200

        wait_until(ready, WAIT_S, what="the Pushgateway")
        assert pushgateway.get("/metrics")[0] == 401
        assert pushgateway.get("/metrics", authorization=basic("trainer", "wrong"))[0] == 401
        pushed = CollectorRegistry()
        Gauge("dgdn_final_loss", "final loss", registry=pushed).set(2.5)
        env = {
            "DGDN_MONITOR_PUSHGATEWAY_USERNAME": "trainer",
            "DGDN_MONITOR_PUSHGATEWAY_PASSWORD": "s3cret pass",
            "DGDN_MONITOR_PUSHGATEWAY_CA_FILE": str(certs / "ca.crt"),
        }
        push_to_gateway(
            f"https://127.0.0.1:{port}",
            job="dgdn-training",
            registry=pushed,
            timeout=10,
            handler=push_handler_from_env(env),
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            push_to_gateway(
                f"https://127.0.0.1:{port}",
                job="dgdn-training",
                registry=pushed,
                timeout=10,
                handler=push_handler_from_env({**env, "DGDN_MONITOR_PUSHGATEWAY_PASSWORD": "wrong"}),
            )
        assert refused.value.code == 401
        body = pushgateway.get("/metrics", authorization=basic("trainer", "s3cret pass"))[2].decode()
        assert 'dgdn_final_loss{instance="",job="dgdn-training"} 2.5' in body

        # The package's end-of-run push takes the same settings from the environment.
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert push_final_metrics(f"https://127.0.0.1:{port}", "dgdn-training", pushed, {"rank": "3"}, 10.0) is None
        body = pushgateway.get("/metrics", authorization=basic("trainer", "s3cret pass"))[2].decode()
        assert 'dgdn_final_loss{instance="",job="dgdn-training",rank="3"} 2.5' in body
        monkeypatch.setenv("DGDN_MONITOR_PUSHGATEWAY_PASSWORD", "wrong")
        reason = push_final_metrics(f"https://127.0.0.1:{port}", "dgdn-training", pushed, {"rank": "4"}, 10.0)
        assert reason is not None and "401" in reason
        monkeypatch.delenv("DGDN_MONITOR_PUSHGATEWAY_PASSWORD")
        reason = push_final_metrics(f"https://127.0.0.1:{port}", "dgdn-training", pushed, {"rank": "5"}, 10.0)
        assert reason is not None and "DGDN_MONITOR_PUSHGATEWAY_PASSWORD" in reason
    finally:
        pushgateway.stop()


def test_compose_override_validates_and_refuses_the_default_grafana_password():
    compose = require_tool("docker-compose")
    files = ["-f", str(DEPLOY / "docker-compose.yml"), "-f", str(DEPLOY / "docker-compose.secure.yml")]
    env = {k: v for k, v in os.environ.items() if k != "GF_ADMIN_PASSWORD"}
    refused = subprocess.run(
        [compose, *files, "config", "-q"], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert refused.returncode != 0 and "GF_ADMIN_PASSWORD" in refused.stderr
    merged = run_tool([compose, *files, "config"], env={"GF_ADMIN_PASSWORD": "a-real-password"}, stdout_only=True)
    services = yaml.safe_load(merged)["services"]
    for name in ("prometheus", "alertmanager", "pushgateway"):
        assert "--web.config.file=/etc/secure/web-config.yml" in services[name]["command"], name
    assert "--config.file=/etc/secure/prometheus.yml" in services["prometheus"]["command"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "a-real-password"


def test_secured_prometheus_config_keeps_the_plain_jobs():
    """deploy/secure/prometheus.yml is a copy of deploy/prometheus/prometheus.yml with TLS: same jobs, and every
    job of a component the override secures uses https with the client certificate."""
    promtool = require_tool("promtool")
    plain = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    secure = yaml.safe_load((SECURE / "prometheus.yml").read_text())
    assert [j["job_name"] for j in secure["scrape_configs"]] == [j["job_name"] for j in plain["scrape_configs"]]
    for job in secure["scrape_configs"]:
        if job["job_name"] in ("dgdn-training", "prometheus", "alertmanager", "pushgateway"):
            assert job["scheme"] == "https" and job["tls_config"]["cert_file"] == "certs/client.crt", job
    assert secure["alerting"]["alertmanagers"][0]["scheme"] == "https"
    certs = SECURE / "certs"
    if (certs / "client.crt").exists():  # after `make certs`; the check needs the files it names
        run_tool([promtool, "check", "config", SECURE / "prometheus.yml"])
