"""Spans to a collector behind TLS: the OTLP exporter takes OpenTelemetry's own certificate and header variables
(``OTEL_EXPORTER_OTLP_CERTIFICATE``, ``OTEL_EXPORTER_OTLP_HEADERS``), with a CA made by openssl in the test."""

from __future__ import annotations

import ssl

import pytest
from lit_models import GraphClassifier, graph_loaders, quiet_trainer
from otlp_receiver import OTLPReceiver
from tls_helpers import make_certificates

from dgdn_lightning_monitor import MonitoringCallback

OTEL_VARIABLES = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                  "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")  # fmt: skip
# The exporter sends with requests, which lets these override the exporter's CA (docs/production.md says so).
REQUESTS_BUNDLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


@pytest.fixture(autouse=True)
def clean_otel_environment(monkeypatch):
    for name in OTEL_VARIABLES + REQUESTS_BUNDLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def server_context(certificates) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates.server_cert, certificates.server_key)
    return context


def fit_traced() -> None:
    train, val, *_ = graph_loaders()  # 36 training graphs in 5 batches
    callback = MonitoringCallback(port=0, addr="127.0.0.1", tracing=True, trace_every_n_steps=1, gpu_devices=None)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(GraphClassifier(), train, val)


def test_spans_reach_an_https_collector_with_the_otel_certificate_and_headers(certificates, monkeypatch):
    with OTLPReceiver(ssl_context=server_context(certificates)) as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(certificates.ca_cert))
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20s3cret")
        fit_traced()
    assert receiver.endpoint.startswith("https://")
    assert len(receiver.named("train_epoch")) == 1
    assert len(receiver.named("train_batch")) == 5  # every step traced
    assert receiver.authorizations and set(receiver.authorizations) == {"Bearer s3cret"}


def test_without_the_ca_no_span_gets_through_and_training_completes(certificates, monkeypatch):
    with OTLPReceiver(ssl_context=server_context(certificates)) as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
        fit_traced()  # the exporter cannot verify the collector: it drops the spans, training goes on
    assert receiver.spans == [] and receiver.requests == 0
