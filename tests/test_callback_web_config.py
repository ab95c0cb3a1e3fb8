"""MonitoringCallback(web_config_file=...) in real Trainer runs: the endpoint speaks HTTPS with an openssl-made CA,
mutual TLS refuses a client without a certificate, basic auth answers 401 or 200, and the discovery file tells
Prometheus to scrape over https."""

from __future__ import annotations

import json
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from exposition import value
from tls_helpers import basic, bcrypt_hash, client_context, fetch, make_certificates, write_web_config

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_testing.models import TensorRegressor, quiet_trainer, tensor_loader

ROWS, BATCH = 40, 8


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _tls(certificates: Any, **extra: Any) -> dict[str, Any]:
    return {
        "tls_server_config": {"cert_file": str(certificates.server_cert), "key_file": str(certificates.server_key)}
        | extra
    }


def _fit_probing(monitor: MonitoringCallback, probe: Callable[[str], None]) -> None:
    """A real fit; after its third batch, ``probe(metrics_url)`` runs while the endpoint serves."""
    probed: list[str] = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 3:
                url = str(monitor.metrics_url)
                probe(url)
                probed.append(url)

    quiet_trainer(max_epochs=1, callbacks=[monitor, Probe()]).fit(
        TensorRegressor(), tensor_loader(rows=ROWS, batch_size=BATCH)
    )
    assert probed == [monitor.metrics_url]  # the endpoint serves on after the run


def _refused(url: str, context: Any) -> bool:
    try:
        fetch(url, context, timeout=10)
    except (urllib.error.URLError, ConnectionError, OSError):
        return True
    return False


def test_mutual_tls_endpoint_and_https_discovery_in_a_real_run(tmp_path: Path, certificates: Any) -> None:
    config = write_web_config(
        tmp_path / "web.yml",
        _tls(certificates, client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(certificates.ca_cert)),
    )
    targets = tmp_path / "targets"
    monitor = MonitoringCallback(
        port=0, addr="127.0.0.1", tracing=False, web_config_file=config, targets_dir=targets, job="secured"
    )
    seen: dict[str, Any] = {}

    def probe(url: str) -> None:
        trusted = client_context(certificates.ca_cert, certificates.client_cert, certificates.client_key)
        seen["status"], _, body = fetch(url, trusted)
        seen["samples"] = value(body.decode(), "dgdn_samples_processed_total")
        seen["no certificate refused"] = _refused(url, client_context(certificates.ca_cert))
        rogue = client_context(certificates.ca_cert, certificates.rogue_client_cert, certificates.rogue_client_key)
        seen["other CA refused"] = _refused(url, rogue)
        seen["plain http refused"] = _refused(url.replace("https://", "http://"), None)
        seen["url"] = url
        seen["discovery"] = [json.loads(path.read_text()) for path in targets.glob("*.json")]

    _fit_probing(monitor, probe)
    assert seen["url"].startswith("https://127.0.0.1:")
    assert seen["status"] == 200 and seen["samples"] == 3 * BATCH  # three batches done when probed
    assert seen["no certificate refused"] and seen["other CA refused"] and seen["plain http refused"]
    [[group]] = seen["discovery"]
    port = seen["url"].rsplit(":", 1)[1].split("/")[0]
    assert group["labels"]["__scheme__"] == "https" and group["labels"]["job"] == "secured"
    assert [target.rsplit(":", 1)[1] for target in group["targets"]] == [port]


def test_basic_auth_endpoint_in_a_real_run(tmp_path: Path, certificates: Any) -> None:
    users = {"prometheus": bcrypt_hash("right horse")}
    config = write_web_config(tmp_path / "web.yml", {**_tls(certificates), "basic_auth_users": users})
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, web_config_file=config)
    statuses: dict[str, int] = {}
    bodies: dict[str, bytes] = {}

    def probe(url: str) -> None:
        context = client_context(certificates.ca_cert)
        for name, authorization in (
            ("none", None),
            ("wrong password", basic("prometheus", "wrong")),
            ("unknown user", basic("grafana", "right horse")),
            ("right", basic("prometheus", "right horse")),
        ):
            statuses[name], _, bodies[name] = fetch(url, context, authorization)

    _fit_probing(monitor, probe)
    assert statuses == {"none": 401, "wrong password": 401, "unknown user": 401, "right": 200}
    assert b"dgdn_samples_processed_total" not in bodies["none"] + bodies["wrong password"]
    assert value(bodies["right"].decode(), "dgdn_samples_processed_total") == 3 * BATCH
