"""Helpers of the deploy tests: the stack's files, PromQL parsing of the dashboard, and real Prometheus,
Alertmanager and HTTP receivers on loopback.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import yaml

from dgdn_lightning_monitor.catalogue import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES_FILE = PROMETHEUS_DIR / "rules" / "dgdn-alerts.yml"
RULES_TEST_FILE = PROMETHEUS_DIR / "tests" / "dgdn-alerts.test.yml"
STACK_RULES_FILE = PROMETHEUS_DIR / "rules" / "dgdn-stack.yml"
STACK_RULES_TEST_FILE = PROMETHEUS_DIR / "tests" / "dgdn-stack.test.yml"
SCHEDULER_RULES_FILE = PROMETHEUS_DIR / "rules" / "dgdn-scheduler.yml"
SCHEDULER_RULES_TEST_FILE = PROMETHEUS_DIR / "tests" / "dgdn-scheduler.test.yml"
#: DGDNRankStraggler at the shipped 5 s scrape interval, written by scripts/straggler_rule_tests.py.
STRAGGLER_RULES_TEST_FILE = PROMETHEUS_DIR / "tests" / "dgdn-straggler.test.yml"
ALL_RULES_FILES = (RULES_FILE, STACK_RULES_FILE, SCHEDULER_RULES_FILE)
ALL_RULES_TEST_FILES = (RULES_TEST_FILE, STACK_RULES_TEST_FILE, SCHEDULER_RULES_TEST_FILE, STRAGGLER_RULES_TEST_FILE)
TARGETS_EXAMPLE = PROMETHEUS_DIR / "targets" / "ranks.json.example"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
ALERTMANAGER_EXAMPLES = {
    name: DEPLOY / "alertmanager" / "examples" / f"{name}.yml" for name in ("webhook", "slack", "email")
}
DOCKER_DESKTOP_OVERRIDE = DEPLOY / "docker-compose.docker-desktop.yml"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "dgdn-training.json"
DASHBOARD_GENERATOR = GRAFANA_DIR / "generate_dashboard.py"

# ------------------------------------------------------------------------------------------------ metric names
#: What MonitoringCallback exports (with the default namespace), by type: from its metrics catalogue, less the
#: per-hop sampler counters (below), which only some loaders produce.
CALLBACK_SAMPLED_METRICS = {"dgdn_sampled_nodes_total", "dgdn_sampled_edges_total"}
CALLBACK_GAUGES = {f.exposed() for f in FAMILIES if f.type in ("gauge", "info")}
CALLBACK_COUNTERS = {f.exposed() for f in FAMILIES if f.type == "counter"} - CALLBACK_SAMPLED_METRICS
CALLBACK_HISTOGRAMS = {f.exposed() for f in FAMILIES if f.type == "histogram"}
CALLBACK_METRICS = (
    CALLBACK_GAUGES
    | CALLBACK_COUNTERS
    | {f"{name}{suffix}" for name in CALLBACK_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
#: Callback metrics that exist only when the run trains on a GPU.
CALLBACK_GPU_PREFIX = "dgdn_gpu_"
#: Callback metrics that exist only when the run trains on a GPU, beyond those with the GPU prefix.
CALLBACK_CUDA_ONLY = {"dgdn_batch_capacity_nodes", "dgdn_batch_capacity_edges"}

#: Metrics of the other exporters the stack ships, as far as the dashboard uses them.
PROMETHEUS_METRICS = {"up", "scrape_duration_seconds", "ALERTS", "ALERTS_FOR_STATE"}
#: What the stack's own components export, as far as the rules on the stack use it.
STACK_METRICS = {
    "prometheus_rule_evaluation_failures_total",
    "prometheus_notifications_errors_total",
    "prometheus_notifications_dropped_total",
    "prometheus_notifications_alertmanagers_discovered",
    "prometheus_config_last_reload_successful",
    "alertmanager_notifications_failed_total",
    "alertmanager_config_last_reload_successful",
}
NODE_EXPORTER_METRICS = {
    "node_cpu_seconds_total",
    "node_memory_MemAvailable_bytes",
    "node_memory_MemTotal_bytes",
    "node_load1",
    "node_load5",
    "node_load15",
    "node_filesystem_avail_bytes",
    "node_filesystem_size_bytes",
}
CADVISOR_METRICS = {
    "container_cpu_usage_seconds_total",
    "container_memory_working_set_bytes",
    "container_network_receive_bytes_total",
    "container_network_transmit_bytes_total",
}
#: Fields of the DCGM exporter's default counter set.
DCGM_METRICS = {
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_MEM_CLOCK",
    "DCGM_FI_DEV_XID_ERRORS",
}
#: Series the recording rules of rules/dgdn-alerts.yml write.
RECORDED_METRICS = {
    "dgdn_rank:run:info",
    "dgdn_rank:run_outcome:timestamp_seconds",
    "dgdn_target:up:answered",
    "dgdn_run_rank:training_loss_min:this_process",
    "dgdn_run_rank:training_loss_max:this_process",
    "dgdn_run_rank:training_loss_min:all_processes",
    "dgdn_run_rank:training_loss_max:all_processes",
    "dgdn_rank:step_own_work_seconds:mean_recent",
    "dgdn_rank:step_own_work_seconds:other_ranks_mean_recent",
    "dgdn_rank:step_own_work_seconds:ratio_to_other_ranks_recent",
    "dgdn_rank:step_own_work_seconds:other_ranks_spread_recent",
}
#: Metrics of kube-state-metrics that deploy/kubernetes/rules/ reads.
KUBE_STATE_METRICS = {
    "kube_pod_container_status_terminated_reason",
    "kube_pod_container_status_last_terminated_reason",
    "kube_pod_container_status_restarts_total",
}
KNOWN_METRICS = (
    CALLBACK_METRICS
    | CALLBACK_SAMPLED_METRICS
    | PROMETHEUS_METRICS
    | STACK_METRICS
    | NODE_EXPORTER_METRICS
    | CADVISOR_METRICS
    | DCGM_METRICS
    | RECORDED_METRICS
)

# ------------------------------------------------------------------------------------------------ PromQL
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*),\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S)


def run_tool(
    args: list[str],
    cwd: Path = DEPLOY,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    stdout_only: bool = False,
) -> str:
    """Run a command that must succeed; returns its output (stdout and stderr, or stdout alone)."""
    result = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed ({result.returncode}):\n{output}"
    return result.stdout if stdout_only else output


_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
_DURATION = re.compile(r"(\d+)(ms|s|m|h)")


def _scaled(duration: str, scale: float) -> str:
    seconds = sum(int(n) * _UNIT_S[unit] for n, unit in _DURATION.findall(duration))
    return f"{max(1, round(seconds * 1000 / scale))}ms"


def scaled_rules(workdir: Path, scale: float, source: Path = RULES_FILE) -> Path:
    """The shipped rules of ``source``, time-compressed: every duration (range windows, offsets, ``for:``, a group's
    evaluation interval) and every ``time() - x > N`` budget divided by ``scale``; the expressions are otherwise the
    shipped ones, and so is the stall threshold a run exports. A group's interval stays at least 200 ms, several times
    per scrape of the live tests."""
    rules = yaml.safe_load(source.read_text())
    budgets = 0
    for group in rules["groups"]:
        if "interval" in group:
            group["interval"] = f"{max(200, int(_scaled(group['interval'], scale)[:-2]))}ms"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = _scaled(rule["for"], scale)
            expr = re.sub(r"\[(\w+)\]", lambda m: f"[{_scaled(m.group(1), scale)}]", rule["expr"])
            expr = re.sub(r"offset (\w+)", lambda m: f"offset {_scaled(m.group(1), scale)}", expr)
            expr, count = re.subn(
                r"(time\(\) - [a-z_]+\{[^}]*\} > )(\d+)", lambda m: f"{m.group(1)}{int(m.group(2)) / scale:g}", expr
            )
            budgets += count
            # The stall threshold the run exports (seconds) and the one without it (written x * 0 + N).
            threshold = r"dgdn_stall_threshold_seconds\{[^}]*\}"
            expr, count = re.subn(threshold, lambda m: f"({m.group(0)} / {scale:g})", expr)
            budgets += count
            expr, count = re.subn(r"(\* 0 \+ )(\d+)", lambda m: f"{m.group(1)}{int(m.group(2)) / scale:g}", expr)
            budgets += count
            rule["expr"] = expr
    assert source != RULES_FILE or budgets == 4, "the liveness budgets are no longer written as expected"
    path = workdir / source.name
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def metric_names(expr: str) -> set[str]:
    """Names of the metrics a PromQL expression selects (functions, keywords and label names left out)."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub("", text)
    text = _BRACKETS.sub("", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def variable_expr(query: str) -> str:
    """The PromQL part of a Grafana Prometheus variable query such as ``label_values(metric{...}, label)``."""
    match = _LABEL_VALUES.match(query)
    if match:
        return match.group(1) or ""
    for prefix in ("query_result(", "metrics("):
        if query.startswith(prefix) and query.endswith(")"):
            return query[len(prefix) : -1]
    return query


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replaces Grafana variables (``$name``, ``${name}``, ``[[name]]``) by the given values."""

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise KeyError(f"no value for Grafana variable {name!r} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", replace, expr)


@dataclass
class DashboardQuery:
    where: str  # panel title, "variable job" or "annotation ..."
    expr: str
    exemplar: bool = False


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def iter_panels(dashboard: dict[str, Any]):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def dashboard_queries(dashboard: dict[str, Any]) -> list[DashboardQuery]:
    """Every PromQL expression of the dashboard: panel targets, variables and annotations."""
    queries = []
    for panel in iter_panels(dashboard):
        for tgt in panel.get("targets", []):
            if tgt.get("expr"):
                queries.append(DashboardQuery(panel.get("title", "?"), tgt["expr"], bool(tgt.get("exemplar"))))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else (query or "")
        queries.append(DashboardQuery(f"variable {variable['name']}", variable_expr(query)))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            queries.append(DashboardQuery(f"annotation {annotation.get('name')}", annotation["expr"]))
    return queries


# ------------------------------------------------------------------------------------------------ processes
def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback test servers only
        return response.read()


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Polls ``predicate`` until it returns something truthy, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError, KeyError) as error:
            last_error = error
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f} s waiting for {what}"
                + (f" (last error: {last_error})" if last_error else "")
            )
        time.sleep(interval)


class ServerProcess:
    """A server binary on a loopback port, its output in a log file; stopped (killed if need be) by ``stop``."""

    ready_path = "/-/ready"

    def __init__(self, args: list[str], port: int, log_path: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.process.args[0]} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                http_get(self.url + self.ready_path, timeout=1.0)
                return True
            except (OSError, urllib.error.URLError):
                return False

        wait_until(ready, timeout, what=f"{self.process.args[0]} on port {self.port}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


class Prometheus(ServerProcess):
    def __init__(self, binary: str, config: Path, workdir: Path, port: int) -> None:
        super().__init__(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--enable-feature=exemplar-storage",
                "--log.level=warn",
            ],
            port,
            workdir / "prometheus.log",
        )

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        try:
            body = http_get(f"{self.url}/api/v1/{path}?{query}", timeout=10.0)
        except urllib.error.HTTPError as error:
            body = error.read()
        payload = json.loads(body)
        if payload.get("status") != "success":
            raise PromQLError(f"{payload.get('errorType')}: {payload.get('error')}")
        return payload["data"]

    def query(self, expr: str, at: Optional[float] = None) -> list[dict[str, Any]]:
        return self.api("query", query=expr, time=at)["result"]

    def exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return self.api("query_exemplars", query=expr, start=start, end=end)


def rules_evaluated_after(prometheus: Prometheus, moment: float, timeout: float = 30.0) -> None:
    """Waits until Prometheus has evaluated every rule group at a time after ``moment`` (Unix seconds): whatever
    the rules would say by then, they have said."""

    def evaluated() -> bool:
        groups = prometheus.api("rules")["groups"]
        return bool(groups) and all(
            datetime.fromisoformat(group["lastEvaluation"].replace("Z", "+00:00")).timestamp() > moment
            for group in groups
        )

    bound = timeout + max(0.0, moment - time.time())
    wait_until(evaluated, bound, what=f"every rule group evaluated after {moment:.1f}")


class PromQLError(Exception):
    """Prometheus rejected a query."""


class Alertmanager(ServerProcess):
    def __init__(self, binary: str, config: Path, workdir: Path, port: int) -> None:
        super().__init__(
            [
                binary,
                f"--config.file={config}",
                f"--storage.path={workdir / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",  # no gossip listener on other interfaces
                "--log.level=warn",
            ],
            port,
            workdir / "alertmanager.log",
        )


# ------------------------------------------------------------------------------------------------ receivers
@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HttpSink:
    """An HTTP server on 127.0.0.1 that answers every POST with 200 and keeps what it received.

    Serves as Alertmanager's webhook receiver and as an OTLP/HTTP trace receiver.
    """

    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        sink = self
        self._lock = threading.Lock()
        self._event = threading.Condition(self._lock)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                with sink._event:
                    sink.received.append(Received(self.path, dict(self.headers), body))
                    sink._event.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", self.headers.get("Content-Type") or "application/json")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="http-sink", daemon=True
        )
        self._thread.start()

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def wait_for(self, predicate: Callable[[list[Received]], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._event:
            while True:
                value = predicate(list(self.received))
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"timed out after {timeout:.0f} s waiting for {what}; received "
                        f"{[r.path for r in self.received]}"
                    )
                self._event.wait(min(remaining, 0.5))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def webhook_alerts(received: list[Received]) -> list[tuple[str, dict[str, Any]]]:
    """(request path, alert) for every alert in the Alertmanager webhook payloads received so far."""
    alerts = []
    for item in received:
        try:
            payload = item.json()
        except ValueError:
            continue
        for alert in payload.get("alerts", []):
            alerts.append((item.path, alert))
    return alerts


class Pushgateway(ServerProcess):
    """A Pushgateway that keeps its groups in memory (Debian's build persists to /var/lib/prometheus by default,
    which every instance on the machine would share)."""

    def __init__(self, binary: str, workdir: Path, port: int) -> None:
        super().__init__(
            [binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file=", "--log.level=warn"],
            port,
            workdir / "pushgateway.log",
        )
