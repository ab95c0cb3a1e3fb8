"""``scripts/native_stack.py``: the shipped configs rewritten for loopback, and the real Prometheus, Alertmanager
and Pushgateway started from PATH, scraping a real training run, evaluating the shipped rules, and stopped with
no process left behind."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from conftest import free_port, require_tool
from prom_helpers import ALERTMANAGER_CONFIG, PROMETHEUS_CONFIG, RULES_FILE, http_get, wait_until

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "native_stack.py"
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
READY_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def native_stack() -> ModuleType:
    spec = importlib.util.spec_from_file_location("native_stack", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["native_stack"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


PORTS = {"prometheus": 19090, "alertmanager": 19093, "pushgateway": 19091}


def _all_targets(config: dict[str, Any]) -> list[str]:
    jobs = config.get("scrape_configs", []) + config.get("alerting", {}).get("alertmanagers", [])
    return [t for job in jobs for static in job.get("static_configs", []) for t in static["targets"]]


# ------------------------------------------------------------------------------------------------ derived configs
def test_the_training_job_is_derived_from_its_static_targets(native_stack):
    """One source for the quick-start address: the shipped merge relabelling is what quick_start_relabel derives
    from the shipped static targets, and the native config derives it again from the rewritten ones; discovered
    targets naming host.docker.internal are scraped on loopback there."""
    shipped = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    job = shipped["dgdn-training"]
    statics = [t for static in job["static_configs"] for t in static["targets"]]
    assert job["relabel_configs"] == [native_stack.quick_start_relabel(statics)]

    rewriter = native_stack.Rewriter(PORTS, native_stack.compose_services(COMPOSE_FILE))
    native = {
        job["job_name"]: job for job in native_stack.prometheus_config(PROMETHEUS_CONFIG, rewriter)["scrape_configs"]
    }
    derived = native["dgdn-training"]
    native_statics = [t for static in derived["static_configs"] for t in static["targets"]]
    assert native_statics == ["127.0.0.1:8000"]
    alias, merge = derived["relabel_configs"]
    assert merge == native_stack.quick_start_relabel(native_statics)
    assert re.fullmatch(merge["regex"], "127.0.0.1:8000") and not re.fullmatch(merge["regex"], "127.0.0.1:18000")
    assert re.sub(alias["regex"], alias["replacement"].replace("$1", r"\1"), "host.docker.internal:41234") == (
        "127.0.0.1:41234"
    )


def test_shipped_prometheus_config_is_rewritten_for_loopback(native_stack):
    services = native_stack.compose_services(COMPOSE_FILE)
    rewriter = native_stack.Rewriter(PORTS, services)
    config = native_stack.prometheus_config(PROMETHEUS_CONFIG, rewriter)
    shipped = yaml.safe_load(PROMETHEUS_CONFIG.read_text())

    targets = _all_targets(config)
    assert targets and all(t.startswith("127.0.0.1:") for t in targets), targets
    # Nothing left that only the Compose network can resolve.
    assert not [name for name in services - set(PORTS) if name in yaml.safe_dump(config)], yaml.safe_dump(config)
    assert "127.0.0.1:19093" in _all_targets({"alerting": config["alerting"]})
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    shipped_jobs = {job["job_name"]: job for job in shipped["scrape_configs"]}
    # The jobs of the servers that run here and the training job stay; their settings are kept.
    for name, job in jobs.items():
        assert {k: v for k, v in job.items() if not k.endswith("_configs")} == {
            k: v for k, v in shipped_jobs[name].items() if not k.endswith("_configs")
        }
    # A job is only dropped when every target it had belonged to a Compose service that is not started here.
    for name, job in shipped_jobs.items():
        if name in jobs:
            continue
        hosts = [t.rsplit(":", 1)[0] for s in job.get("static_configs", []) for t in s["targets"]]
        hosts += [n for d in job.get("dns_sd_configs", []) for n in d["names"]]
        assert hosts and all(h in services and h not in PORTS for h in hosts), (name, hosts)
    training = [job for job in config["scrape_configs"] if job.get("file_sd_configs")]
    assert training, "the file-SD job of the training runs is kept"
    for job in training:
        for file_sd in job["file_sd_configs"]:
            assert all(os.path.isabs(f) and f.startswith(str(ROOT / "deploy" / "prometheus")) for f in file_sd["files"])
    rule_files = config["rule_files"]
    assert rule_files and all(os.path.isabs(p) for p in rule_files)
    assert any(Path(p).parent == RULES_FILE.parent for p in rule_files)


def test_rewriting_is_generic(native_stack, tmp_path):
    """Another service, another job, a remote host, an https URL with credentials: each mapped by the same rules."""
    (tmp_path / "prometheus").mkdir()
    (tmp_path / "alertmanager").mkdir()
    (tmp_path / "docker-compose.yml").write_text(
        yaml.safe_dump(
            {"services": {"prometheus": {}, "alertmanager": {}, "pushgateway": {}, "grafana": {}, "tempo": {}}}
        )
    )
    (tmp_path / "prometheus" / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "rule_files": ["rules/*.yml", "/abs/rules.yml"],
                "scrape_configs": [
                    {
                        "job_name": "mixed",
                        "static_configs": [{"targets": ["tempo:3200", "gpu-node-7:8000", "host.docker.internal:8001"]}],
                    },
                    {"job_name": "only-tempo", "static_configs": [{"targets": ["tempo:3200"]}]},
                    {"job_name": "self", "static_configs": [{"targets": ["localhost:9090"]}]},
                    {"job_name": "discovered", "file_sd_configs": [{"files": ["targets/*.json"]}]},
                ],
            }
        )
    )
    (tmp_path / "alertmanager" / "alertmanager.yml").write_text(
        yaml.safe_dump(
            {
                "receivers": [
                    {
                        "name": "x",
                        "webhook_configs": [
                            {"url": "https://user:pw@host.docker.internal:5001/hook"},
                            {"url": "http://grafana:3000/api"},
                            {"url": "https://hooks.example.org/abc"},
                        ],
                    }
                ],
            }
        )
    )
    rewriter = native_stack.Rewriter(PORTS, native_stack.compose_services(tmp_path / "docker-compose.yml"))
    config = native_stack.prometheus_config(
        tmp_path / "prometheus" / "prometheus.yml", rewriter, targets_dir=tmp_path / "sd"
    )
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"mixed", "self", "discovered"}
    assert jobs["mixed"]["static_configs"][0]["targets"] == ["gpu-node-7:8000", "127.0.0.1:8001"]
    assert jobs["self"]["static_configs"][0]["targets"] == ["127.0.0.1:19090"]
    assert jobs["discovered"]["file_sd_configs"][0]["files"] == [str(tmp_path / "sd" / "*.json")]
    assert config["rule_files"] == [str(tmp_path / "prometheus" / "rules/*.yml"), "/abs/rules.yml"]

    hooks = native_stack.alertmanager_config(tmp_path / "alertmanager" / "alertmanager.yml", rewriter)
    urls = [h["url"] for h in hooks["receivers"][0]["webhook_configs"]]
    # A URL of a service not started here is left as it is (Alertmanager logs the failed delivery).
    assert urls == ["https://user:pw@127.0.0.1:5001/hook", "http://grafana:3000/api", "https://hooks.example.org/abc"]


def test_derived_configs_pass_the_official_checks(native_stack, tmp_path):
    promtool = require_tool("promtool")
    amtool = require_tool("amtool")
    stack = native_stack.Stack(tmp_path / "state", ports=PORTS, targets_dir=tmp_path / "targets")
    paths = stack.write_configs()
    for command in (
        [promtool, "check", "config", str(paths["prometheus"])],
        [amtool, "check-config", str(paths["alertmanager"])],
    ):
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    amcfg = yaml.safe_load(paths["alertmanager"].read_text())
    shipped = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert amcfg["route"] == shipped["route"] and amcfg.get("inhibit_rules") == shipped.get("inhibit_rules")
    assert "host.docker.internal" not in paths["alertmanager"].read_text()


def test_the_slurm_template_is_derived_for_a_user_and_passes_the_official_checks(native_stack, tmp_path, monkeypatch):
    """deploy/slurm/prometheus.yml as monitoring.sbatch derives it: the user's discovery directory and ports, the
    shipped rules by absolute path, no Pushgateway, the user's Alertmanager config and, for endpoints served with
    web_config_file, the CA and client certificate of scripts/make-certs.sh."""
    promtool, amtool = require_tool("promtool"), require_tool("amtool")
    certs, targets = tmp_path / "certs", tmp_path / "targets"
    certs.mkdir()
    for name in ("ca.crt", "client.crt", "client.key"):
        (certs / name).write_text("")
    own = tmp_path / "alertmanager.yml"
    own.write_text(ALERTMANAGER_CONFIG.read_text().replace("resolve_timeout: 5m", "resolve_timeout: 7m"))
    monkeypatch.chdir(ROOT)  # the template named as the batch script names it, relative to the repository
    stack = native_stack.Stack(
        tmp_path / "state",
        ports={"prometheus": 29090, "alertmanager": 29093, "pushgateway": 29091},
        targets_dir=targets,
        servers=("prometheus", "alertmanager"),
        prometheus_template=Path("deploy/slurm/prometheus.yml"),
        alertmanager_template=own,
        scrape_certs=certs,
    )
    paths = stack.write_configs()
    assert set(paths) == {"prometheus", "alertmanager"}
    config = yaml.safe_load(paths["prometheus"].read_text())
    assert config["rule_files"] == [str(RULES_FILE.parent / "*.yml")]
    assert _all_targets(config) == ["127.0.0.1:29090", "127.0.0.1:29093", "127.0.0.1:29093"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"dgdn-training", "prometheus", "alertmanager"}
    assert jobs["dgdn-training"]["file_sd_configs"][0]["files"] == [str(targets / "*.json")]
    assert jobs["dgdn-training"]["tls_config"] == {
        "ca_file": str(certs / "ca.crt"),
        "cert_file": str(certs / "client.crt"),
        "key_file": str(certs / "client.key"),
    }
    assert "tls_config" not in jobs["prometheus"]
    assert yaml.safe_load(paths["alertmanager"].read_text())["global"]["resolve_timeout"] == "7m"
    for command in (
        [promtool, "check", "config", "--syntax-only", str(paths["prometheus"])],
        [amtool, "check-config", str(paths["alertmanager"])],
    ):
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    assert stack.targets == targets.resolve()


def test_a_server_not_started_is_left_out_wherever_the_config_names_it(native_stack, tmp_path):
    """Without the Pushgateway its scrape job goes, whether the config names it as a Compose service or as
    localhost at its usual port; without Alertmanager, Prometheus is not pointed at a port nothing serves."""
    rewriter = native_stack.Rewriter({"prometheus": 29090}, native_stack.compose_services(COMPOSE_FILE))
    assert rewriter.address("localhost:9091") is None and rewriter.address("pushgateway:9091") is None
    assert rewriter.address("localhost:9093") is None
    assert rewriter.address("localhost:9090") == "127.0.0.1:29090"
    assert rewriter.address("localhost:8000") == "127.0.0.1:8000"  # not a server of the stack: kept
    config = native_stack.prometheus_config(ROOT / "deploy" / "slurm" / "prometheus.yml", rewriter, tmp_path)
    assert not (config.get("alerting") or {}).get("alertmanagers")
    assert [job["job_name"] for job in config["scrape_configs"]] == ["dgdn-training", "prometheus"]


def test_scraping_https_endpoints_needs_the_ca(native_stack, tmp_path):
    stack = native_stack.Stack(tmp_path / "state", ports=PORTS, scrape_certs=tmp_path / "no-certs")
    with pytest.raises(native_stack.StackError, match="--scrape-certs: .*ca.crt does not exist"):
        stack.write_configs()
    (tmp_path / "ca.crt").write_text("")
    only_ca = native_stack.Stack(tmp_path / "state", ports=PORTS, scrape_certs=tmp_path)
    config = yaml.safe_load(only_ca.write_configs()["prometheus"].read_text())
    training = next(job for job in config["scrape_configs"] if job["job_name"] == "dgdn-training")
    assert training["tls_config"] == {"ca_file": str(tmp_path / "ca.crt")}  # no client certificate: TLS only


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"servers": ("alertmanager",)}, "servers: prometheus"),
        ({"servers": ("prometheus", "grafana")}, "servers: unknown server 'grafana'"),
        ({"prometheus_template": Path("/nonexistent/prometheus.yml")}, "prometheus_template: .* does not exist"),
    ],
)
def test_bad_stack_settings_are_refused_at_construction(native_stack, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        native_stack.Stack(tmp_path, **kwargs)


@pytest.mark.parametrize("ports", [{"prometheus": 0}, {"grafana": 3000}, {"prometheus": 9093}])
def test_bad_ports_are_refused_at_construction(native_stack, tmp_path, ports):
    with pytest.raises(ValueError, match="ports"):
        native_stack.Stack(tmp_path, ports=ports)


def test_the_stack_sweeps_expired_discovery_files_and_old_pushgateway_groups(native_stack, tmp_path, monkeypatch):
    """What a running stack does every 30 s: a killed run's expired file goes, hand-written and fresh ones stay,
    and Pushgateway groups past their retention are deleted (a real Pushgateway on the stack's port)."""
    from prom_helpers import Pushgateway

    from dgdn_lightning_monitor import distributed, pushgateway

    targets = tmp_path / "targets"
    targets.mkdir()
    expired, fresh, hand = (targets / name for name in ("job-a-node0-dead.json", "job-b-node0-live.json", "r.json"))
    for path in (expired, fresh, hand):
        path.write_text("[]")
    old = time.time() - distributed.EXPIRE_S - 10
    for path in (expired, hand):
        os.utime(path, (old, old))
    ports = {**PORTS, "pushgateway": free_port()}
    gateway = Pushgateway(require_tool("pushgateway"), tmp_path, ports["pushgateway"])
    try:
        gateway.wait_ready()
        body = b"dgdn_samples_processed_total 5\n"
        request = urllib.request.Request(
            f"{gateway.url}/metrics/job/dgdn-training/run_id/old/rank/0", data=body, method="PUT"
        )
        urllib.request.urlopen(request, timeout=5).close()
        stack = native_stack.Stack(tmp_path / "state", ports=ports, targets_dir=targets)
        monkeypatch.setattr(pushgateway, "PUSH_RETENTION_S", 3600.0)
        stack.sweep()
        assert "old" in http_get(gateway.url + "/metrics").decode()  # within the retention
        monkeypatch.setattr(pushgateway, "PUSH_RETENTION_S", 0.0)
        stack.sweep()
        assert 'run_id="old"' not in http_get(gateway.url + "/metrics").decode()
    finally:
        gateway.stop()
    assert not expired.exists() and fresh.exists() and hand.exists()


def test_a_missing_binary_is_named_in_one_line(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "up", "--dir", str(tmp_path / "state")],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "prometheus is not on PATH" in lines[0] and "apt-get install prometheus" in lines[0]
    assert "brew install prometheus" in lines[0] and "prometheus.io/download" in lines[0]
    assert not (tmp_path / "state" / "run").exists() or not list((tmp_path / "state" / "run").iterdir())


# ------------------------------------------------------------------------------------------------ live stack
def _pids(state: Path) -> dict[str, int]:
    return {path.stem: int(path.read_text().split()[0]) for path in (state / "run").glob("*.pid")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _api(url: str, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    payload = json.loads(http_get(f"{url}/api/v1/{path}" + (f"?{query}" if query else ""), timeout=10))
    assert payload["status"] == "success", payload
    return payload["data"]


def _start(state: Path, targets: Path, ports: dict[str, int], *extra: str) -> subprocess.Popen:
    argv = [sys.executable, str(SCRIPT), "up", "--dir", str(state), "--targets-dir", str(targets), *extra]
    argv += [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until_ready(process: subprocess.Popen) -> str:
    """The launcher's output up to its URL lines (it keeps running)."""
    lines = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Data and logs:" in line:
            return "".join(lines)
    process.kill()
    raise AssertionError("the native stack did not report ready:\n" + "".join(lines))


@pytest.mark.slow
def test_native_stack_scrapes_a_run_evaluates_the_rules_and_stops(tmp_path):
    for tool in ("prometheus", "alertmanager", "pushgateway"):
        require_tool(tool)
    import deploy_training as dt

    from dgdn_lightning_monitor import MonitoringCallback

    state, targets = tmp_path / "state", tmp_path / "targets"
    targets.mkdir()
    ports = {"prometheus": free_port(), "alertmanager": free_port(), "pushgateway": free_port()}
    launcher = _start(state, targets, ports)
    try:
        printed = _read_until_ready(launcher)
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for url in urls.values():
            assert url in printed
        pids = _pids(state)
        assert set(pids) == set(ports) and all(_alive(pid) for pid in pids.values())

        # Prometheus sends alerts to the Alertmanager started with it.
        active = wait_until(
            lambda: _api(urls["prometheus"], "alertmanagers")["activeAlertmanagers"],
            30,
            what="Prometheus to discover its Alertmanager",
        )
        assert [am["url"] for am in active] == [f"{urls['alertmanager']}/api/v2/alerts"]

        seen: dict[str, Any] = {}

        def scraped_and_alerting(trainer) -> None:
            if seen or trainer.global_step < 9:  # after the first epoch, whose end counts its NaN losses
                return
            seen["target"] = dt.host_port(monitor.metrics_url)
            wait_until(
                lambda: _api(urls["prometheus"], "query", query='up{job="dgdn-training"} == 1')["result"],
                60,
                what="Prometheus to discover the run through file-SD and scrape it",
            )
            # The shipped rules evaluate the scraped figures (NaN in every step here): the alert is pending.
            seen["pending"] = wait_until(
                lambda: _api(
                    urls["prometheus"],
                    "query",
                    query='ALERTS{alertname="DGDNTrainingLossNotFinite",alertstate="pending"}',
                )["result"],
                90,
                what="DGDNTrainingLossNotFinite pending",
            )
            seen["streak"] = _api(urls["prometheus"], "query", query="dgdn_nonfinite_loss_streak")["result"]

        monitor = MonitoringCallback(
            port=0,
            addr="127.0.0.1",
            tracing=False,
            targets_dir=str(targets),
            targets_host="127.0.0.1",
            pushgateway_url=urls["pushgateway"],
        )
        model = dt.LiveGCN(nan_after_step=0, step_sleep_s=0.01)
        train, val = dt.loaders()
        # After the monitor: it has taken the batch's loss when the hook waits for Prometheus.
        dt.trainer([monitor, dt.Hooks(lambda t: None, scraped_and_alerting, lambda t: None)], max_epochs=2).fit(
            model, train, val
        )

        assert seen["pending"][0]["metric"]["instance"] == seen["target"]
        assert float(seen["streak"][0]["value"][1]) >= 8
        groups = _api(urls["prometheus"], "rules")["groups"]
        assert groups and all(g["file"].startswith(str(RULES_FILE.parent)) for g in groups)
        rules = [rule for group in groups for rule in group["rules"]]
        shipped_alerts = {
            r["alert"] for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"] if "alert" in r
        }
        assert {rule["name"] for rule in rules} >= shipped_alerts
        assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
        # The run pushed its final figures to the Pushgateway at its end.
        pushed = http_get(urls["pushgateway"] + "/metrics").decode()
        assert re.search(r'dgdn_samples_processed_total\{[^}]*job="dgdn-training"[^}]*\} 64', pushed), pushed[-2000:]
        # The endpoint serves on after the run; its discovery file goes once a scrape has read the run's end.
        wait_until(lambda: not list(targets.glob("*.json")), 30, what="the run's discovery file removed after its end")

        launcher.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = launcher.communicate(timeout=60)
        assert launcher.returncode == 0, out
        assert "Stopped." in out
        assert not any(_alive(pid) for pid in pids.values())
        assert not list((state / "run").glob("*.pid"))
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)
        subprocess.run(
            [sys.executable, str(SCRIPT), "down", "--dir", str(state)], check=False, capture_output=True, timeout=60
        )


@pytest.mark.slow
def test_detached_stack_is_stopped_by_down_and_refuses_a_second_start(tmp_path):
    for tool in ("prometheus", "alertmanager", "pushgateway"):
        require_tool(tool)
    state, targets = tmp_path / "state", tmp_path / "targets"
    targets.mkdir()
    ports = {"prometheus": free_port(), "alertmanager": free_port(), "pushgateway": free_port()}
    try:
        started = _start(state, targets, ports, "--detach")
        out, _ = started.communicate(timeout=READY_TIMEOUT_S)
        assert started.returncode == 0, out
        assert "make stack-native-down" in out
        pids = _pids(state)
        assert len(pids) == 3 and all(_alive(pid) for pid in pids.values())

        again = _start(state, targets, {name: free_port() for name in ports}, "--detach")
        out, _ = again.communicate(timeout=60)
        assert again.returncode == 1 and "already runs" in out and len(out.strip().splitlines()) == 1

        down = subprocess.run(
            [sys.executable, str(SCRIPT), "down", "--dir", str(state)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert down.returncode == 0 and "Stopped" in down.stdout
        assert not any(_alive(pid) for pid in pids.values())
        assert not list((state / "run").glob("*.pid"))
    finally:
        subprocess.run(
            [sys.executable, str(SCRIPT), "down", "--dir", str(state)], check=False, capture_output=True, timeout=60
        )
