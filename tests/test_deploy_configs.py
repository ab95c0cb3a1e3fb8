"""The stack's configuration files, checked by the real tools (promtool, amtool, docker-compose) and for the
properties the stack relies on (pinned images, loopback ports, paths that match between files)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_tool
from prom_helpers import (
    ALERTMANAGER_CONFIG,
    ALERTMANAGER_EXAMPLES,
    ALL_RULES_FILES,
    ALL_RULES_TEST_FILES,
    CALLBACK_METRICS,
    COMPOSE_FILE,
    DASHBOARD_FILE,
    DCGM_METRICS,
    DEPLOY,
    DOCKER_DESKTOP_OVERRIDE,
    GRAFANA_DIR,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    RECORDED_METRICS,
    ROOT,
    RULES_FILE,
    RULES_TEST_FILE,
    STACK_METRICS,
    TARGETS_EXAMPLE,
    metric_names,
    run_tool,
)

REQUIRED_ALERTS = {
    "DGDNHighTrainingLoss",
    "DGDNGPUMemoryHigh",
    "DGDNTrainingLossNotFinite",
    "DGDNTrainingStalled",
    "DGDNTrainingStagnation",
    "DGDNThroughputDrop",
    "DGDNRankStraggler",
    "DGDNRunDown",
    "DGDNMetricsEndpointGone",
    "DGDNRunFailed",
    "DGDNTargetNeverScraped",
    "DGDNRunNotStarted",
    "DGDNGPUMonitoringDown",
    "DGDNGPUXidError",
    "DGDNGPUTemperatureHigh",
    "DGDNMonitoringTargetDown",
    "DGDNPrometheusRuleEvaluationFailures",
    "DGDNPrometheusNotificationsFailing",
    "DGDNAlertmanagerNotificationsFailing",
    "DGDNWatchdog",
}
SEVERITIES = {"critical", "warning", "info"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules(files=ALL_RULES_FILES) -> list[dict[str, Any]]:
    return [rule for path in files for group in load_yaml(path)["groups"] for rule in group["rules"] if "alert" in rule]


def rule_tests() -> list[dict[str, Any]]:
    return [case for path in ALL_RULES_TEST_FILES for case in load_yaml(path)["tests"]]


# ================================================================================================ Prometheus
def test_promtool_check_config_accepts_the_shipped_config():
    promtool = require_tool("promtool")
    output = run_tool([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert "SUCCESS" in output
    assert f"{len(ALL_RULES_FILES)} rule files found" in output  # rules/*.yml resolves relative to the config file


def test_file_sd_example_is_valid_once_enabled(tmp_path):
    """Copying the documented example to targets/*.json gives a config promtool accepts, SD file included."""
    promtool = require_tool("promtool")
    copy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, copy)
    shutil.copy(TARGETS_EXAMPLE, copy / "targets" / "ranks.json")
    output = run_tool([promtool, "check", "config", str(copy / "prometheus.yml")], cwd=tmp_path)
    assert "does not exist" not in output
    groups = json.loads(TARGETS_EXAMPLE.read_text())
    assert sum(len(group["targets"]) for group in groups) >= 3
    for group in groups:
        assert all(re.fullmatch(r"[\w.-]+:\d+", target) for target in group["targets"])


def test_prometheus_config_scrapes_the_training_host_and_the_stack():
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    training = jobs["dgdn-training"]
    assert training["static_configs"][0]["targets"] == ["host.docker.internal:8000"]
    assert training["file_sd_configs"][0]["files"] == ["targets/*.json"]
    # A discovered target at the static address loses its run_id, so that both merge into one target.
    relabel = training["relabel_configs"][0]
    assert relabel["source_labels"] == ["__address__"] and relabel["target_label"] == "run_id"
    assert re.fullmatch(relabel["regex"], "host.docker.internal:8000") and relabel["replacement"] == ""
    # Every component of the stack is scraped (the meta-alerts need it).
    assert {
        "prometheus",
        "alertmanager",
        "pushgateway",
        "grafana",
        "jaeger",
        "node-exporter",
        "cadvisor",
        "dcgm",
    } <= set(jobs)
    assert config["rule_files"] == ["rules/*.yml"]
    # The promtool unit tests live outside rules/, so Prometheus never loads them as rules.
    assert RULES_TEST_FILE.parent != RULES_FILE.parent

    compose = load_yaml(COMPOSE_FILE)["services"]
    # Every stack target is a compose service on the port that service listens on.
    service_ports = {
        "alertmanager": 9093,
        "pushgateway": 9091,
        "node-exporter": 9100,
        "cadvisor": 8080,
        "dcgm-exporter": 9400,
        "grafana": 3000,
        "jaeger": 8888,
    }
    static_targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ] + [target for am in config["alerting"]["alertmanagers"] for s in am["static_configs"] for target in s["targets"]]
    for target in static_targets:
        host, port = target.rsplit(":", 1)
        if host in ("localhost", "host.docker.internal"):
            continue
        assert host in compose, f"{target} names no compose service"
        assert int(port) == service_ports[host], target
    dcgm = jobs["dcgm"]["dns_sd_configs"][0]
    assert dcgm["names"] == ["dcgm-exporter"] and dcgm["port"] == service_ports["dcgm-exporter"]
    assert jobs["pushgateway"]["honor_labels"] is True


@pytest.mark.parametrize("path", ALL_RULES_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path):
    promtool = require_tool("promtool")
    output = run_tool([promtool, "check", "rules", str(path)])
    rules = [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]
    assert f"SUCCESS: {len(rules)} rules found" in output


@pytest.mark.parametrize("path", ALL_RULES_TEST_FILES, ids=lambda p: p.name)
def test_promtool_rule_unit_tests_pass(path):
    promtool = require_tool("promtool")
    output = run_tool([promtool, "test", "rules", str(path)])
    assert "SUCCESS" in output and "FAILED" not in output


def test_rule_unit_tests_cover_the_scenarios():
    """The promtool scenarios the alerts are judged by exist, each with its firing or silent outcome."""
    cases = {case["name"]: case for case in load_yaml(RULES_TEST_FILE)["tests"]}

    def outcome(fragment: str, alert: str) -> set[bool]:
        matching = [case for name, case in cases.items() if fragment in name]
        assert matching, f"no scenario named like {fragment!r}"
        return {
            bool(check["exp_alerts"])
            for case in matching
            for check in case["alert_rule_test"]
            if check["alertname"] == alert
        }

    assert outcome("ends normally stays quiet", "DGDNRunDown") == {False}
    assert True in outcome("killed mid-run", "DGDNRunDown")
    assert outcome("static quick-start target after a normal end", "DGDNRunDown") == {False}
    assert True in outcome("static quick-start target killed mid-run", "DGDNRunDown")
    assert True in outcome("a run that fails", "DGDNRunFailed")
    assert True in outcome("never reached", "DGDNTargetNeverScraped")
    assert True in outcome("without a first step", "DGDNRunNotStarted")
    assert True in outcome("stops finishing steps later", "DGDNTrainingStalled")
    assert True in outcome("2 ranks in synchronous DDP", "DGDNRankStraggler")
    assert True in outcome("4 ranks on 2 nodes", "DGDNRankStraggler")
    assert outcome("even ranks", "DGDNRankStraggler") == {False}
    assert outcome("new run on the same static port", "DGDNTrainingStagnation") == {False}
    assert outcome("slower run on the same static port", "DGDNThroughputDrop") == {False}
    assert outcome("tensors at 60% stays silent", "DGDNGPUMemoryHigh") == {False}


def test_alert_rules_are_complete_and_labelled():
    rules = alert_rules()
    assert REQUIRED_ALERTS <= {rule["alert"] for rule in rules}
    known = CALLBACK_METRICS | RECORDED_METRICS | DCGM_METRICS | {"up"}
    for rule in rules:
        stack = rule["labels"].get("component") == "monitoring"
        assert rule["labels"]["severity"] in SEVERITIES | ({"none"} if stack else set()), rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]
        for name in metric_names(rule["expr"]):
            assert name in known | (STACK_METRICS if stack else set()), f"{rule['alert']} uses unknown metric {name}"
    thresholds = {rule["alert"]: rule for rule in rules}
    assert re.fullmatch(r'dgdn_training_loss\{instance!=""\} > 10', thresholds["DGDNHighTrainingLoss"]["expr"].strip())
    assert thresholds["DGDNHighTrainingLoss"]["for"] == "5m"
    gpu = [rule for rule in rules if rule["alert"] == "DGDNGPUMemoryHigh"]
    assert all(
        "dgdn_gpu_max_memory_allocated_bytes" in rule["expr"] and "memory_used" not in rule["expr"] for rule in gpu
    )
    assert "dgdn_last_step_timestamp_seconds" in thresholds["DGDNTrainingStalled"]["expr"]
    assert "> 0" not in thresholds["DGDNTrainingStalled"]["expr"]
    assert thresholds["DGDNRankStraggler"]["expr"].strip() == (
        "dgdn_rank:step_own_work_seconds:ratio_to_other_ranks5m >= 1.5"
    )
    records = {
        rule["record"]: rule["expr"]
        for group in load_yaml(RULES_FILE)["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    assert set(records) == RECORDED_METRICS
    assert 'phase=~"data_fetch|forward"' in records["dgdn_rank:step_own_work_seconds:mean5m"]


def test_alert_rules_ignore_pushed_series():
    """Series pushed to the Pushgateway at the end of a run carry no instance and never go stale: every selector of
    a callback metric in the rules drops them, and a unit test shows each such alert silent on pushed series."""
    pushed_silent = set()
    for case in rule_tests():
        if any('instance=""' in series["series"] for series in case.get("input_series", [])):
            pushed_silent |= {
                check["alertname"] for check in case.get("alert_rule_test", []) if not check.get("exp_alerts")
            }
    recorded = {
        group_rule["record"]: group_rule["expr"]
        for group in load_yaml(RULES_FILE)["groups"]
        for group_rule in group["rules"]
        if "record" in group_rule
    }
    for rule in alert_rules():
        expr = rule["expr"]
        for name, record_expr in recorded.items():  # an alert on a recorded series inherits its selectors
            if name in expr:
                expr = expr.replace(name, "") + "\n" + record_expr.replace("dgdn_rank:", "")
        selectors = list(re.finditer(r"\b(dgdn_\w+)(\{[^}]*\})?(?!:)", expr))
        for selector in selectors:
            assert 'instance!=""' in (selector.group(2) or ""), f"{rule['alert']}: {selector.group(0)}"
        if selectors:
            assert rule["alert"] in pushed_silent, f"{rule['alert']} is not shown to ignore pushed series"


def test_every_alert_is_unit_tested_firing_and_silent():
    tests = rule_tests()
    firing, silent = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names <= firing, f"never shown to fire: {names - firing}"
    assert names - {"DGDNWatchdog"} <= silent, f"never shown to stay silent: {names - silent}"


# ================================================================================================ Alertmanager
def test_amtool_check_config():
    amtool = require_tool("amtool")
    output = run_tool([amtool, "check-config", str(ALERTMANAGER_CONFIG)])
    assert "SUCCESS" in output


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=critical", "alertname=DGDNTrainingLossNotFinite"], "critical"),
        (["severity=critical", "alertname=DGDNRunDown", "run_id=r1"], "critical"),
        (["severity=warning", "alertname=DGDNHighTrainingLoss"], "default"),
        (["severity=info", "alertname=DGDNTrainingStagnation"], "default"),
        (["severity=warning", "component=monitoring", "alertname=DGDNMonitoringTargetDown"], "default"),
        (["severity=none", "component=monitoring", "alertname=DGDNWatchdog"], "heartbeat"),
        (["alertname=SomethingElse"], "default"),
    ],
)
@pytest.mark.parametrize("config", [ALERTMANAGER_CONFIG, *ALERTMANAGER_EXAMPLES.values()], ids=lambda p: p.name)
def test_alertmanager_routes_by_severity(labels, receiver, config):
    amtool = require_tool("amtool")
    output = run_tool([amtool, "config", "routes", "test", f"--config.file={config}", *labels], stdout_only=True)
    assert output.split() == [receiver]


def test_alertmanager_default_sends_nowhere_and_says_so():
    config = load_yaml(ALERTMANAGER_CONFIG)
    route = config["route"]
    assert route["receiver"] == "default"
    # One run, one notification: a DDP incident (every rank stalls or dies) is one group.
    assert route["group_by"] == ["job", "run_id"]
    for receiver in config["receivers"]:
        assert set(receiver) == {"name"}, f"the default receiver {receiver['name']} must be a no-op"
    text = ALERTMANAGER_CONFIG.read_text()
    assert "SENDS NOWHERE" in text and "examples/webhook.yml" in text
    inhibit = config["inhibit_rules"][0]
    assert inhibit["source_matchers"] == ['severity="critical"']
    assert inhibit["target_matchers"] == ['severity="warning"']
    assert set(inhibit["equal"]) == {"alertname", "instance"}


@pytest.mark.parametrize("name", sorted(ALERTMANAGER_EXAMPLES))
def test_alertmanager_examples_are_valid_and_keep_the_routing(name):
    """Each example is the default routing with real receivers whose secrets come from files."""
    amtool = require_tool("amtool")
    path = ALERTMANAGER_EXAMPLES[name]
    assert "SUCCESS" in run_tool([amtool, "check-config", str(path)])
    default, example = load_yaml(ALERTMANAGER_CONFIG), load_yaml(path)
    assert example["route"] == default["route"]
    assert example["inhibit_rules"] == default["inhibit_rules"]
    receivers = {receiver["name"]: receiver for receiver in example["receivers"]}
    assert set(receivers) == {"default", "critical", "heartbeat"}
    kind = {"webhook": "webhook_configs", "slack": "slack_configs", "email": "email_configs"}[name]
    assert receivers["default"][kind] and receivers["critical"][kind]
    text = path.read_text()
    secrets = re.findall(r"(?:_file|credentials_file): (\S+)", text)
    assert secrets and all(s.startswith("/etc/alertmanager/secrets/") for s in secrets), secrets
    assert f"ALERTMANAGER_CONFIG=examples/{name}.yml" in text
    # The secrets folder is mounted with the configuration and ignored by git.
    assert "alertmanager/secrets/" in (DEPLOY / ".gitignore").read_text().split()


# ================================================================================================ compose
def compose_config(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    docker_compose = require_tool("docker-compose")
    base = [docker_compose, "-f", str(COMPOSE_FILE), *args]
    run_tool([*base, "config", "-q"], env=env)
    return yaml.safe_load(run_tool([*base, "config"], env=env, stdout_only=True))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_config()


EXPECTED_IMAGES = {
    "prometheus": r"prom/prometheus:v3\.\d+\.\d+",
    "grafana": r"grafana/grafana:12\.\d+\.\d+",
    "alertmanager": r"prom/alertmanager:v0\.\d+\.\d+",
    "node-exporter": r"prom/node-exporter:v1\.\d+\.\d+",
    "cadvisor": r"ghcr\.io/google/cadvisor:v0\.\d+\.\d+",
    "pushgateway": r"prom/pushgateway:v1\.\d+\.\d+",
    "jaeger": r"jaegertracing/jaeger:2\.\d+\.\d+",
    "dcgm-exporter": r"nvcr\.io/nvidia/k8s/dcgm-exporter:\d+\.\d+\.\d+-\d+\.\d+\.\d+-ubuntu\d+\.\d+",
}


def test_compose_images_are_pinned(compose):
    services = compose["services"]
    assert set(services) == set(EXPECTED_IMAGES)
    for name, pattern in EXPECTED_IMAGES.items():
        assert re.fullmatch(pattern, services[name]["image"]), f"{name}: {services[name]['image']}"
    assert "latest" not in COMPOSE_FILE.read_text().replace("# ", "")


def _port_strings(service: dict[str, Any]) -> list[str]:
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):  # long syntax
            ports.append(f"{port.get('host_ip', '')}:{port.get('published')}:{port.get('target')}")
        else:
            ports.append(str(port))
    return ports


def test_compose_services_are_healthchecked_restarted_and_loopback_only(compose):
    published = {}
    for name, service in compose["services"].items():
        assert service.get("restart") == "unless-stopped", name
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        assert service.get("network_mode") != "host", f"{name} must not share the host network"
        for port in _port_strings(service):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
            published[int(port.split(":")[1])] = name
    assert published == {
        3000: "grafana",
        9090: "prometheus",
        9093: "alertmanager",
        9091: "pushgateway",
        16686: "jaeger",
        4317: "jaeger",
        4318: "jaeger",
    }


def test_compose_volumes_and_mounts_match_the_configs(compose):
    services = compose["services"]
    assert {"prometheus-data", "grafana-data", "alertmanager-data", "pushgateway-data"} <= set(compose["volumes"])

    def mounts(name: str) -> dict[str, str]:
        result = {}
        for volume in services[name]["volumes"]:
            if isinstance(volume, dict):
                result[volume["target"]] = volume["source"]
            else:
                parts = volume.split(":")
                result[parts[1]] = parts[0]
        return result

    prometheus = mounts("prometheus")
    assert Path(prometheus["/etc/prometheus"]) == PROMETHEUS_DIR
    assert prometheus["/prometheus"] == "prometheus-data"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    assert "host.docker.internal:host-gateway" in services["prometheus"]["extra_hosts"]
    # The machine's own name, which discovery files list by default, resolves in the container too.
    assert "${DGDN_TRAINING_HOST:-training-host}:host-gateway" in services["prometheus"]["extra_hosts"]
    assert "DGDN_TRAINING_HOST=$${DGDN_TRAINING_HOST:-$$(hostname)}" in (DEPLOY.parent / "Makefile").read_text()
    assert Path(mounts("alertmanager")["/etc/alertmanager"]) == ALERTMANAGER_CONFIG.parent

    grafana = mounts("grafana")
    assert Path(grafana["/etc/grafana/provisioning"]) == GRAFANA_DIR / "provisioning"
    dashboards_target = next(t for t, s in grafana.items() if Path(s) == DASHBOARD_FILE.parent)
    provider = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml")["providers"][0]
    assert provider["options"]["path"] == dashboards_target
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_target}/{DASHBOARD_FILE.name}"


def test_grafana_credentials_come_from_the_environment():
    compose = compose_config(env={"GF_ADMIN_PASSWORD": "s3cret-from-env"})
    environment = compose["services"]["grafana"]["environment"]
    assert environment["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret-from-env"
    assert environment["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "${GF_ADMIN_PASSWORD:-" in COMPOSE_FILE.read_text()


def test_jaeger_is_v2_with_otlp_ports(compose):
    jaeger = compose["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/jaeger:2.")
    assert {"127.0.0.1:4317:4317", "127.0.0.1:4318:4318", "127.0.0.1:16686:16686"} <= {
        p.removesuffix("/tcp") for p in _port_strings(jaeger)
    }


@pytest.mark.parametrize("how", ["--profile", "COMPOSE_PROFILES"])
def test_gpu_profile_adds_dcgm_with_a_gpu_reservation(how):
    compose = (
        compose_config("--profile", "gpu") if how == "--profile" else compose_config(env={"COMPOSE_PROFILES": "gpu"})
    )
    dcgm = compose["services"]["dcgm-exporter"]
    assert dcgm["profiles"] == ["gpu"]
    devices = dcgm["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_only_the_gpu_exporter_needs_the_gpu_profile(compose):
    """Without a profile every service but dcgm-exporter starts, so hosts without a GPU run the stack."""
    for name, service in compose["services"].items():
        if name == "dcgm-exporter":
            assert service["profiles"] == ["gpu"]
        else:
            assert not service.get("profiles"), name
            assert "deploy" not in service, f"{name} must not reserve devices"


def test_compose_pins_are_the_versions_the_readme_lists(compose):
    """deploy/README.md lists every image's version and the date it was checked; the compose file uses them."""
    readme = (DEPLOY / "README.md").read_text()
    assert re.search(r"checked on \d{4}-\d{2}-\d{2}", readme)
    for name, service in compose["services"].items():
        image, tag = service["image"].rsplit(":", 1)
        assert f"`{image}:{tag}`" in readme, f"{name}: {image}:{tag} is not listed in deploy/README.md"


def test_pushgateway_persists_where_its_user_may_write(compose):
    """The image runs as nobody and owns only /pushgateway: the volume and the persistence file live there."""
    pushgateway = compose["services"]["pushgateway"]
    assert "--persistence.file=/pushgateway/pushgateway.db" in pushgateway["command"]
    assert any(str(volume).startswith("pushgateway-data:/pushgateway") for volume in pushgateway["volumes"])


def test_docker_desktop_override_mounts_the_host_root_without_propagation():
    merged = compose_config("-f", str(DOCKER_DESKTOP_OVERRIDE))
    volumes = merged["services"]["node-exporter"]["volumes"]
    assert volumes == ["/:/host:ro"], volumes
    assert compose_config()["services"]["node-exporter"]["volumes"] == ["/:/host:ro,rslave"]


def test_alertmanager_config_is_chosen_by_an_environment_variable():
    command = compose_config(env={"ALERTMANAGER_CONFIG": "examples/slack.yml"})["services"]["alertmanager"]["command"]
    assert "--config.file=/etc/alertmanager/examples/slack.yml" in command
    default = compose_config()["services"]["alertmanager"]["command"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in default


@pytest.mark.parametrize("missing", ["docker", "compose plugin"])
def test_make_stack_says_in_one_line_what_is_missing(tmp_path, missing):
    make = require_tool("make")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if missing == "compose plugin":  # a docker whose `compose` subcommand does not exist
        fake = bin_dir / "docker"
        fake.write_text("#!/bin/sh\necho \"unknown shorthand flag: 'f' in -f\" >&2\nexit 125\n")
        fake.chmod(0o755)
    for tool in ("sh", "make"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    result = subprocess.run(
        [make, "-s", "-C", str(ROOT), "stack"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("make stack:")]
    assert len(lines) == 1, result.stderr
    assert ("Docker is not installed" if missing == "docker" else "Compose v2 plugin is missing") in lines[0]
    assert "unknown shorthand flag" not in result.stdout + result.stderr


# ================================================================================================ Grafana provisioning
def test_grafana_datasources_have_fixed_uids_and_exemplar_links():
    config = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "datasources.yml")
    sources = {source["uid"]: source for source in config["datasources"]}
    prometheus, jaeger = sources["prometheus"], sources["jaeger"]
    assert prometheus["type"] == "prometheus" and prometheus["url"] == "http://prometheus:9090"
    assert prometheus["isDefault"] is True
    assert prometheus["jsonData"]["exemplarTraceIdDestinations"] == [{"name": "trace_id", "datasourceUid": "jaeger"}]
    assert jaeger["type"] == "jaeger" and jaeger["url"] == "http://jaeger:16686"


def test_grafana_dashboard_provider_loads_the_dashboard_folder():
    config = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml")
    provider = config["providers"][0]
    assert provider["type"] == "file"
    assert DASHBOARD_FILE.exists() and DASHBOARD_FILE.suffix == ".json"


def test_env_example_names_only_variables_the_compose_file_reads():
    text = COMPOSE_FILE.read_text()
    keys = [
        line.split("=", 1)[0]
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "GF_ADMIN_PASSWORD" in keys
    for key in keys:
        assert "${" + key + ":-" in text, f"{key} is not used by docker-compose.yml"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
