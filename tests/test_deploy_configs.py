"""The stack's configuration files, checked by the real tools (promtool, amtool, docker-compose) and for the
properties the stack relies on (pinned images, loopback ports, paths that match between files)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
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
    PROMETHEUS_METRICS,
    RECORDED_METRICS,
    ROOT,
    RULES_FILE,
    RULES_TEST_FILE,
    SCHEDULER_RULES_TEST_FILE,
    STACK_METRICS,
    STACK_RULES_FILE,
    STRAGGLER_RULES_TEST_FILE,
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
    "DGDNRunUnreachable",
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
    assert True in outcome("30 minutes after set-up", "DGDNRunNotStarted")
    assert outcome("25-minute first step, and an eval-only run", "DGDNRunNotStarted") == {False}
    assert outcome("25-minute first step, and an eval-only run", "DGDNTrainingStalled") == {False}
    assert True in outcome("stops mid-stage", "DGDNTrainingStalled")
    assert True in outcome("first unit gets 30 minutes", "DGDNTrainingStalled")
    assert True in outcome("above half its range", "DGDNHighTrainingLoss")
    assert outcome("large-scale losses", "DGDNHighTrainingLoss") == {False}
    assert True in outcome("five non-finite losses in a row", "DGDNTrainingLossNotFinite")
    assert outcome("single non-finite losses", "DGDNTrainingLossNotFinite") == {False}
    assert True in outcome("ten validation evaluations", "DGDNTrainingStagnation")
    assert outcome("every two hours", "DGDNTrainingStagnation") == {False}
    assert outcome("15-minute validation, a fit followed by test", "DGDNThroughputDrop") == {False}
    assert outcome("under FSDP", "DGDNRankStraggler") == {False}
    assert True in outcome("new XID fires once", "DGDNGPUXidError")
    assert outcome("static quick-start target after a normal end", "DGDNRunDown") == {False}
    assert True in outcome("static quick-start target killed mid-run", "DGDNRunDown")
    assert True in outcome("a run that fails", "DGDNRunFailed")
    assert True in outcome("never reached", "DGDNTargetNeverScraped")
    assert True in outcome("2 ranks in synchronous DDP", "DGDNRankStraggler")
    assert True in outcome("4 ranks on 2 nodes", "DGDNRankStraggler")
    assert outcome("even ranks", "DGDNRankStraggler") == {False}
    assert True in outcome("a rank 1.3 times slower fires", "DGDNRankStraggler")
    assert outcome("one spike the allocator gives back", "DGDNGPUMemoryHigh") == {False}
    # The situations that used to page falsely: each stays quiet, and its counterpart still fires.
    assert outcome("the launcher then kills the other", "DGDNRunDown") == {False}
    assert outcome("the launcher then kills the other", "DGDNRunFailed") == {True, False}
    assert outcome("suspended SLURM job", "DGDNRunDown") == {False}
    assert outcome("suspended SLURM job", "DGDNRunUnreachable") == {True, False}
    assert outcome("a pod is a target from its start", "DGDNTargetNeverScraped") == {True, False}
    assert outcome("a crashed run leaves behind", "DGDNTargetNeverScraped") == {False}
    assert True in outcome("a crashed run leaves behind", "DGDNRunDown")
    assert outcome("a requeued run is judged against the range it reached before", "DGDNHighTrainingLoss") == {
        True,
        False,
    }
    # At the shipped 5 s scrape interval: a 1.3x straggler waits for `for:`, then fires; healthy runs never do.
    straggler = {case["name"]: case for case in load_yaml(STRAGGLER_RULES_TEST_FILE)["tests"]}
    outcomes = {
        name: [bool(check["exp_alerts"]) for check in case["alert_rule_test"]] for name, case in straggler.items()
    }
    slow = next(o for name, o in outcomes.items() if "1.3 times slower is flagged" in name)
    assert slow[0] is False and slow[-1] is True
    assert [name for name, o in outcomes.items() if not any(o)] == [
        name for name in straggler if "healthy" in name or "neither is flagged" in name
    ]
    assert len(outcomes) == 3
    scheduler = {case["name"]: case for case in load_yaml(SCHEDULER_RULES_TEST_FILE)["tests"]}
    local = next(case for name, case in scheduler.items() if "outside any scheduler" in name)
    assert {check["alertname"] for check in local["alert_rule_test"] if not check["exp_alerts"]} >= {
        "DGDNRunTerminated",
        "DGDNRunDown",
    }


def test_straggler_rule_tests_match_their_generator():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "straggler_rule_tests.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_alert_rules_are_complete_and_labelled():
    rules = alert_rules()
    assert REQUIRED_ALERTS <= {rule["alert"] for rule in rules}
    known = CALLBACK_METRICS | RECORDED_METRICS | DCGM_METRICS | PROMETHEUS_METRICS
    for rule in rules:
        stack = rule["labels"].get("component") == "monitoring"
        assert rule["labels"]["severity"] in SEVERITIES | ({"none"} if stack else set()), rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]
        for name in metric_names(rule["expr"]):
            assert name in known | (STACK_METRICS if stack else set()), f"{rule['alert']} uses unknown metric {name}"
    thresholds = {rule["alert"]: rule for rule in rules}
    # No fixed loss scale: the loss alert compares the run with its own range, across its processes.
    assert "dgdn_run_rank:training_loss_min:all_processes" in thresholds["DGDNHighTrainingLoss"]["expr"]
    assert not re.search(r"dgdn_training_loss\{[^}]*\} > \d", thresholds["DGDNHighTrainingLoss"]["expr"])
    gpu = [rule for rule in rules if rule["alert"] == "DGDNGPUMemoryHigh"]
    assert all(
        "max_over_time(dgdn_gpu_memory_allocated_bytes" in rule["expr"]
        and "max_memory" not in rule["expr"]
        and "memory_used" not in rule["expr"]
        for rule in gpu
    )
    for name in ("DGDNTrainingStalled", "DGDNRunNotStarted"):  # liveness on progress in any stage
        assert "dgdn_last_progress_timestamp_seconds" in thresholds[name]["expr"]
        assert "last_step" not in thresholds[name]["expr"]
    assert 'stage="train"' in thresholds["DGDNThroughputDrop"]["expr"]
    assert 'strategy="DDPStrategy"' in thresholds["DGDNRankStraggler"]["expr"]
    assert "changes(DCGM_FI_DEV_XID_ERRORS" in thresholds["DGDNGPUXidError"]["expr"]
    records = {
        rule["record"]: rule["expr"]
        for group in load_yaml(RULES_FILE)["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    assert set(records) == RECORDED_METRICS
    assert 'phase=~"data_fetch|forward"' in records["dgdn_rank:step_own_work_seconds:mean_recent"]


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

    def inherited(expr: str, seen: frozenset[str] = frozenset()) -> str:
        """``expr`` with every recorded series replaced by the expression that records it (selectors and all)."""
        for name in sorted(recorded, key=len, reverse=True):
            if name in expr:
                expr = expr.replace(name, "")
                if name not in seen:
                    expr += "\n" + inherited(recorded[name], seen | {name})
        return expr

    for rule in alert_rules():
        expr = inherited(rule["expr"])  # an alert on a recorded series inherits its selectors
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


STATIC_TARGET = "host.docker.internal:8000"
#: Labels every series of the callback carries (dgdn_lightning_monitor.labels.RANK_LABEL_NAMES).
RANK_LABELS = {"rank", "local_rank", "node_rank", "world_size"}
#: Labels the Prometheus Operator gives every target of a PodMonitor.
POD_LABELS = {"namespace", "pod", "container"}
ALL_PROMTOOL_TEST_FILES = (*ALL_RULES_TEST_FILES, *sorted((DEPLOY / "kubernetes" / "tests").glob("*.test.yml")))


def _series(case: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    series = []
    for item in case.get("input_series", []):
        name, _, body = item["series"].partition("{")
        series.append((name, dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', body))))
    return series


def _deployment(labels: dict[str, str]) -> str:
    """Which shipped way of scraping gives a target these labels."""
    if POD_LABELS <= labels.keys():
        return "podmonitor"
    if labels.get("run_id", "").startswith("slurm-"):
        return "slurm"
    if labels.get("run_id"):
        return "file discovery"
    return "static" if labels.get("instance") == STATIC_TARGET else "other"


def test_rule_tests_feed_the_label_sets_of_every_deployment():
    """The promtool tests use series labelled as each deployment labels them: every callback series with its rank
    labels; a discovered target's series all with its run_id, a pod's all with namespace, pod and container; the
    run's dgdn_training_info with the scheduler's labels (slurm_*, k8s_*); and each deployment is there."""
    seen = set()
    for path in ALL_PROMTOOL_TEST_FILES:
        for case in load_yaml(path)["tests"]:
            targets: dict[tuple[str, str], list[tuple[str, dict[str, str]]]] = {}
            for name, labels in _series(case):
                if labels.get("job", "").startswith("dgdn") and labels.get("instance"):
                    targets.setdefault((labels["job"], labels["instance"]), []).append((name, labels))
                if name.startswith("dgdn_"):
                    assert RANK_LABELS <= labels.keys(), f"{path.name}, {case['name']}: {name} {labels}"
            for (_, instance), items in targets.items():
                kinds = {_deployment(labels) for name, labels in items if name != "dgdn_training_info"}
                assert len(kinds) == 1, f"{case['name']}: {instance} labelled as {kinds}"
                kind = kinds.pop()
                seen.add(kind)
                for name, labels in items:
                    if name == "dgdn_training_info":
                        assert labels.get("run_id"), f"{case['name']}: {instance}'s info names no run"
                        if kind == "slurm":
                            assert labels.get("slurm_job_id") == labels["run_id"].removeprefix("slurm-")
                        if kind == "podmonitor":
                            assert labels.get("k8s_pod_name") == labels["pod"]
                        if kind in ("slurm", "podmonitor", "file discovery"):
                            assert labels.get("exported_run_id") == labels["run_id"]
    assert seen >= {"static", "file discovery", "slurm", "podmonitor"}, seen


#: Alerts about a run that cannot fire on the static quick-start target, and why.
NOT_ON_THE_STATIC_TARGET = {
    "DGDNTargetNeverScraped",  # discovered targets only: the static target answers once a run serves it
    "DGDNRankStraggler",  # a run's other ranks are discovered targets
    "DGDNRunTerminated",  # a local run's SIGTERM is quiet; a scheduler's runs are discovered
    "DGDNRunTimeLimit",  # SLURM
    "DGDNTrainingContainerCrashed",  # Kubernetes
}
#: Alerts that do not name a run: the stack's, the DCGM exporter's, and an endpoint that never said its run.
NOT_ABOUT_A_RUN = {"DGDNGPUXidError", "DGDNGPUTemperatureHigh", "DGDNMetricsEndpointGone"}


def test_every_alert_names_its_run_on_the_static_target_and_on_discovered_ones():
    """For every alert about a run, a promtool test shows it firing on the static quick-start target and on a
    discovered one, with run_id among its labels and the run id in its rendered summary."""
    shown: dict[str, set[str]] = {}
    for path in ALL_PROMTOOL_TEST_FILES:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                for alert in check.get("exp_alerts") or []:
                    labels = {k: str(v) for k, v in alert["exp_labels"].items()}
                    run_id = labels.get("run_id", "")
                    summary = (alert.get("exp_annotations") or {}).get("summary", "")
                    if run_id and run_id in summary:
                        kind = "static" if labels.get("instance") == STATIC_TARGET else "discovered"
                        shown.setdefault(check["alertname"], set()).add(kind)
                    if POD_LABELS <= labels.keys() or labels.get("pod"):
                        assert {"namespace", "pod"} <= labels.keys(), f"{case['name']}: {labels}"
    stack = {rule["alert"] for rule in alert_rules((STACK_RULES_FILE,))}
    kubernetes = DEPLOY / "kubernetes" / "rules" / "dgdn-kubernetes.yml"
    for rule in alert_rules((*ALL_RULES_FILES, kubernetes)):
        name = rule["alert"]
        if name in stack | NOT_ABOUT_A_RUN:
            continue
        expected = {"discovered"} | (set() if name in NOT_ON_THE_STATIC_TARGET else {"static"})
        assert expected <= shown.get(name, set()), f"{name} is shown naming its run only on {shown.get(name)}"


def _severities() -> dict[str, set[str]]:
    kubernetes = DEPLOY / "kubernetes" / "rules" / "dgdn-kubernetes.yml"
    severities: dict[str, set[str]] = {}
    for rule in alert_rules((*ALL_RULES_FILES, kubernetes)):
        severities.setdefault(rule["alert"], set()).add(rule["labels"]["severity"])
    return severities


def test_the_alert_tables_and_lines_say_what_the_rules_do():
    """deploy/README.md has one row per alert with its severities; wherever it or docs/stack.md gives an alert a
    severity (the critical `DGDNRunFailed`, `DGDNRunUnreachable` (warning)), the rules give it that one."""
    severities = _severities()
    rows = {}
    for line in (DEPLOY / "README.md").read_text().splitlines():
        match = re.match(r"^\| `(DGDN\w+)` \| ([a-z /]+) \|", line)
        if match:
            rows[match.group(1)] = set(match.group(2).split(" / "))
    assert rows == severities
    for path in (DEPLOY / "README.md", ROOT / "docs" / "stack.md"):
        text = " ".join(path.read_text().split())
        named = re.findall(r"\b(critical|warning|info) `(DGDN\w+)`", text)
        named += [(severity, name) for name, severity in re.findall(r"`(DGDN\w+)` \((critical|warning|info)\)", text)]
        assert named, path
        for severity, name in named:
            assert severity in severities[name], f"{path.name} calls {name} {severity}"
        for name in set(re.findall(r"`(DGDN[A-Z]\w*)`", text)):
            assert name in severities, f"{path.name} names {name}, which no rule defines"


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
        (["severity=critical", "alertname=DGDNRunFailed", "run_id=r1", "exception=ValueError"], "critical"),
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


def _matches(matchers: list[str], labels: dict[str, str]) -> bool:
    """Whether ``labels`` satisfy Alertmanager matchers of the forms name="v", name=~"re" and name!="v"."""
    for matcher in matchers:
        name, op, value = re.fullmatch(r'(\w+)(=~|!=|=)"(.*)"', matcher).groups()
        actual = labels.get(name, "")
        if not {"=": actual == value, "!=": actual != value, "=~": re.fullmatch(value, actual) is not None}[op]:
            return False
    return True


def test_the_failure_of_a_run_is_never_muted_by_what_it_caused():
    """A rank that raises pages with DGDNRunFailed, critical; no inhibition rule mutes it for anything its run
    raises, while it mutes the deaths, cancels and warnings of the same run that follow from it."""
    config = load_yaml(ALERTMANAGER_CONFIG)
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert rules["DGDNRunFailed"]["labels"]["severity"] == "critical"
    run = {"job": "dgdn-training", "run_id": "slurm-81750", "instance": "gpu001:41003"}
    failed = {**run, "alertname": "DGDNRunFailed", "severity": "critical", "exception": "ValueError"}
    others = [
        {**run, "alertname": name, "severity": rules[name]["labels"]["severity"], "instance": "gpu002:41003"}
        for name in ("DGDNRunDown", "DGDNRunTerminated", "DGDNRunUnreachable", "DGDNTrainingStalled")
    ]

    def inhibited(target: dict[str, str], source: dict[str, str]) -> bool:
        return any(
            _matches(rule["source_matchers"], source)
            and _matches(rule["target_matchers"], target)
            and all(source.get(label) == target.get(label) for label in rule["equal"])
            for rule in config["inhibit_rules"]
        )

    for other in others:
        assert not inhibited(failed, other), f"{other['alertname']} mutes DGDNRunFailed"
        assert inhibited(other, failed), f"DGDNRunFailed does not mute {other['alertname']} of its run"
        assert not inhibited(other, {**failed, "run_id": "another-run"})


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
    assert "training-host:host-gateway" in services["prometheus"]["extra_hosts"]  # as compose resolves it
    assert '"${DGDN_TRAINING_HOST:-training-host}:host-gateway"' in COMPOSE_FILE.read_text()
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


def test_stack_target_alert_names_exactly_the_stack_jobs_of_every_shipped_config():
    """DGDNMonitoringTargetDown selects the stack's own jobs by name, so a training job of any name (the callback's
    job=, a PodMonitor's) is never reported as a stack outage, and every stack job of every shipped config is."""
    rule = next(rule for rule in alert_rules() if rule["alert"] == "DGDNMonitoringTargetDown")
    pattern = re.fullmatch(r'up\{job=~"([^"]+)"\} == 0', rule["expr"].strip()).group(1)
    scaling = DEPLOY / "scaling" / "prometheus-ha-alertmanager.yml"
    for path in (PROMETHEUS_CONFIG, DEPLOY / "secure" / "prometheus.yml", scaling):
        jobs = {job["job_name"] for job in load_yaml(path)["scrape_configs"]}
        stack = {job for job in jobs if re.fullmatch(pattern, job)}
        assert jobs - stack == {"dgdn-training"}, path
    for name in ("dgdn-training", "train-gnn", "default/gnn-trainer", "prometheus-training", "my-alertmanager"):
        assert not re.fullmatch(pattern, name), name


# ================================================================================================ overrides
SECURE_OVERRIDE = DEPLOY / "docker-compose.secure.yml"
HA_OVERRIDE = DEPLOY / "scaling" / "docker-compose.ha-alertmanager.yml"
OVERRIDES = {
    "secure": ["-f", str(SECURE_OVERRIDE)],
    "ha-alertmanager": ["-f", str(HA_OVERRIDE)],
    "docker-desktop": ["-f", str(DOCKER_DESKTOP_OVERRIDE)],
}
OVERRIDE_ENV = {"GF_ADMIN_PASSWORD": "test-only"}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, options) of a service's volumes as docker-compose config writes them."""
    result = []
    for volume in service.get("volumes", []):
        source, target, *options = volume.split(":")
        result.append((source, target, options[0] if options else ""))
    return result


@pytest.mark.parametrize("override", sorted(OVERRIDES))
def test_every_override_honours_alertmanager_config(override):
    """ALERTMANAGER_CONFIG picks the configuration of every Alertmanager, whichever override runs it."""
    env = {**OVERRIDE_ENV, "ALERTMANAGER_CONFIG": "examples/webhook.yml"}
    services = compose_config(*OVERRIDES[override], env=env)["services"]
    alertmanagers = [name for name in services if name.startswith("alertmanager")]
    assert alertmanagers
    for name in alertmanagers:
        assert "--config.file=/etc/alertmanager/examples/webhook.yml" in services[name]["command"], name
        assert (str(DEPLOY / "alertmanager"), "/etc/alertmanager", "ro,z") in _mounts(services[name])


def test_one_alertmanager_version_across_the_compose_files():
    images = set()
    for path in (COMPOSE_FILE, SECURE_OVERRIDE, HA_OVERRIDE, DOCKER_DESKTOP_OVERRIDE):
        images |= set(re.findall(r"image:\s*(prom/alertmanager:\S+)", path.read_text()))
    assert len(images) == 1, images
    services = compose_config(*OVERRIDES["ha-alertmanager"])["services"]
    assert services["alertmanager"]["image"] == services["alertmanager-2"]["image"] == images.pop()


def test_secured_pushgateway_persists_into_its_volume():
    service = compose_config(*OVERRIDES["secure"], env=OVERRIDE_ENV)["services"]["pushgateway"]
    persistence = next(arg.split("=", 1)[1] for arg in service["command"] if arg.startswith("--persistence.file="))
    volumes = [target for source, target, _ in _mounts(service) if source == "pushgateway-data"]
    assert volumes and Path(persistence).parent == Path(volumes[0]), (persistence, volumes)


@pytest.mark.parametrize("override", [None, *sorted(OVERRIDES)])
def test_project_bind_mounts_carry_the_shared_selinux_label_and_system_paths_none(override):
    services = compose_config(*(OVERRIDES[override] if override else []), env=OVERRIDE_ENV)["services"]
    for name, service in services.items():
        for source, _, options in _mounts(service):
            if source.startswith(str(DEPLOY)):
                assert "z" in options.split(","), f"{name}: {source} without the z label"
            elif source.startswith("/"):  # the host's own paths must never be relabelled
                assert not {"z", "Z"} & set(options.split(",")), f"{name}: {source} relabelled"


def test_cadvisor_reads_the_docker_data_root_given():
    snap = "/var/snap/docker/common/var-lib-docker"
    for env, root in (({}, "/var/lib/docker"), ({"DOCKER_DATA_ROOT": snap}, snap)):
        service = compose_config(env=env)["services"]["cadvisor"]
        assert (root, "/var/lib/docker", "ro") in _mounts(service)


def test_one_scrape_password_path_in_docs_and_config():
    docs = set(re.findall(r"password_file: (\S+?)\}", (ROOT / "docs" / "production.md").read_text()))
    config = set(re.findall(r"password_file: (\S+?)\}", (DEPLOY / "secure" / "prometheus.yml").read_text()))
    assert docs == config == {"secrets/scrape-password"}
    assert "secure/secrets/" in (DEPLOY / ".gitignore").read_text().split()


def test_every_shipped_training_job_merges_static_and_discovered_targets():
    """The run-id relabelling of prometheus.yml is in every shipped config that finds runs both ways."""
    shipped = next(job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"] if job["job_name"] == "dgdn-training")
    for path in (DEPLOY / "scaling" / "remote-write.yml", DEPLOY / "scaling" / "prometheus-ha-alertmanager.yml"):
        job = next(job for job in load_yaml(path)["scrape_configs"] if job["job_name"] == "dgdn-training")
        assert job.get("static_configs") and job.get("file_sd_configs"), path
        assert job["relabel_configs"] == shipped["relabel_configs"], path
