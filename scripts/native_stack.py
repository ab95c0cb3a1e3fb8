"""Prometheus, Alertmanager and Pushgateway without Docker, from the binaries on PATH and the shipped configs.

``make stack-native`` (``python scripts/native_stack.py up``) starts the three servers on loopback ports with the
alert rules and routing of ``deploy/``, prints their URLs and runs until Ctrl-C; ``make stack-native-down``
(``python scripts/native_stack.py down``) stops a stack started elsewhere (or with ``--detach``) from its pid
files. Data, logs, pid files and the derived configs live in ``.stack/``.

The shipped configs are written for the Docker Compose network (``alertmanager:9093``,
``host.docker.internal:8000``). At every start they are read again and rewritten for this machine: Compose
service names of the started servers become their loopback addresses, ``host.docker.internal`` and
``localhost`` become ``127.0.0.1``, and scrape targets of Compose services that are not started here
(node-exporter, cAdvisor, DCGM, Grafana, Jaeger) are dropped, so no target is shown as down for nothing. The
training job's relabelling is derived from its rewritten static targets (:func:`quick_start_relabel`), and
discovered targets that name ``host.docker.internal`` are scraped on loopback. Rule files and file-SD target files
are used where they are, so edits to ``deploy/`` apply at the next start. While it runs, the stack removes expired
discovery files and Pushgateway groups past their retention, as every run does at its start.

On a SLURM cluster, without root, ``deploy/slurm/monitoring.sbatch`` runs it as a job of its own from the template
``deploy/slurm/prometheus.yml`` (``--prometheus-config``; its ``localhost:9090``/``:9093`` become the chosen
ports), with the user's discovery directory (``--targets-dir``), no Pushgateway (``--no-pushgateway``), the user's
Alertmanager config (``--alertmanager-config``) and, for endpoints served with ``web_config_file``, the CA and
client certificate to scrape them (``--scrape-certs``); see docs/slurm.md.

Example::

    python scripts/native_stack.py up                  # foreground; Ctrl-C stops all three
    python scripts/native_stack.py up --detach         # returns once they are ready
    python scripts/native_stack.py down
    python scripts/native_stack.py up --no-pushgateway --prometheus-config deploy/slurm/prometheus.yml \\
        --dir ~/dgdn/stack --targets-dir ~/dgdn/targets     # what deploy/slurm/monitoring.sbatch runs
"""

from __future__ import annotations

import argparse
import copy
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
LOOPBACK = "127.0.0.1"
#: Names under which the Docker stack reaches the machine (or Prometheus itself) that mean this machine here.
HOST_ALIASES = {"host.docker.internal", "localhost", "127.0.0.1"}


@dataclass(frozen=True)
class Server:
    """One server of the native stack."""

    name: str  # the Compose service name, as the shipped configs use it
    binaries: tuple[str, ...]  # names on PATH, the upstream one first
    container_port: int  # the port the shipped configs use for it
    install: str  # how to get it, in one line


SERVERS = (
    Server(
        "prometheus",
        ("prometheus",),
        9090,
        "apt-get install prometheus (Debian/Ubuntu), brew install prometheus (macOS), or the release tarball "
        "from https://prometheus.io/download/",
    ),
    Server(
        "alertmanager",
        ("alertmanager", "prometheus-alertmanager"),
        9093,
        "apt-get install prometheus-alertmanager (Debian/Ubuntu), brew install alertmanager (macOS), or the "
        "release tarball from https://prometheus.io/download/",
    ),
    Server(
        "pushgateway",
        ("pushgateway", "prometheus-pushgateway"),
        9091,
        "apt-get install prometheus-pushgateway (Debian/Ubuntu), brew install pushgateway (macOS), or the "
        "release tarball from https://prometheus.io/download/",
    ),
)


class StackError(Exception):
    """Something the user has to fix; the message is one line."""


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        raise StackError("the native stack reads the YAML configs with PyYAML: pip install pyyaml") from None
    return yaml


def find_binary(server: Server) -> str:
    """Path of the server's binary on PATH; :class:`StackError` saying how to get it when there is none."""
    for name in server.binaries:
        path = shutil.which(name)
        if path:
            return path
    raise StackError(
        f"{server.name} is not on PATH (looked for {', '.join(server.binaries)}); install it: {server.install}"
    )


def compose_services(compose_file: Path) -> set[str]:
    """Service names (and container names / aliases) of the Docker Compose file."""
    compose = _yaml().safe_load(compose_file.read_text(encoding="utf-8")) or {}
    names = set()
    for name, service in (compose.get("services") or {}).items():
        names.add(name)
        if isinstance(service, dict) and service.get("container_name"):
            names.add(service["container_name"])
    return names


def _split_host_port(address: str) -> tuple[str, int | None]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address, None
    return host, int(port)


class Rewriter:
    """Maps addresses of the Compose network to this machine's loopback addresses.

    Args:
        ports: loopback port of each started server, by Compose service name.
        compose_names: every Compose service name; those not in ``ports`` are not started here.
    """

    def __init__(self, ports: dict[str, int], compose_names: set[str]) -> None:
        self.ports = ports
        self.compose_names = compose_names
        self._by_container_port = {server.container_port: server.name for server in SERVERS}

    def address(self, address: str) -> str | None:
        """The loopback ``host:port`` for ``address``, or ``None`` when it names a service not started here."""
        host, port = _split_host_port(address)
        if host in self.ports:
            return f"{LOOPBACK}:{self.ports[host]}"
        if host in HOST_ALIASES:
            # Inside the Prometheus container, localhost:9090 is Prometheus itself; on the host, the same.
            service = self._by_container_port.get(port) if port is not None else None
            if host != "host.docker.internal" and service is not None:
                # A server of the stack at its usual port: at its port here, or left out when not started.
                return f"{LOOPBACK}:{self.ports[service]}" if service in self.ports else None
            return LOOPBACK if port is None else f"{LOOPBACK}:{port}"
        if host in self.compose_names:
            return None
        return address  # a real host elsewhere: kept as it is

    def url(self, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if not parts.netloc:
            return url
        userinfo, at, hostport = parts.netloc.rpartition("@")
        mapped = self.address(hostport)
        if mapped is None:
            return url
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}{at}{mapped}"))


def _targets(config: dict[str, Any], rewriter: Rewriter) -> None:
    for static in config.get("static_configs") or []:
        static["targets"] = [
            mapped for mapped in (rewriter.address(t) for t in static.get("targets") or []) if mapped is not None
        ]
    config["static_configs"] = [s for s in config.get("static_configs") or [] if s["targets"]]
    if not config["static_configs"]:
        del config["static_configs"]
    dns = []
    for entry in config.get("dns_sd_configs") or []:
        entry["names"] = [
            name
            for name in entry.get("names") or []
            if rewriter.address(name) is not None and name not in rewriter.compose_names
        ]
        if entry["names"]:
            dns.append(entry)
    if dns:
        config["dns_sd_configs"] = dns
    else:
        config.pop("dns_sd_configs", None)


def quick_start_relabel(static_targets: list[str]) -> dict[str, Any]:
    """The relabelling that merges a discovered target at a static target's address into that target: it clears
    ``run_id``, so both have the same labels and Prometheus scrapes the endpoint once. Derived from the job's
    static targets here and for the shipped config (a test keeps ``deploy/prometheus/prometheus.yml`` equal to it),
    so no address is kept by hand in two places."""
    return {
        "source_labels": ["__address__"],
        "regex": "|".join(re.escape(target) for target in static_targets),
        "target_label": "run_id",
        "replacement": "",
    }


def _is_quick_start_relabel(rule: dict[str, Any]) -> bool:
    return rule.get("target_label") == "run_id" and rule.get("replacement") == "" and "regex" in rule


def _derive_training_job(job: dict[str, Any]) -> None:
    """Point the merge relabelling at the rewritten static targets, and let discovered targets that name this
    machine the Docker way (``host.docker.internal``) be scraped on loopback."""
    relabels = job.get("relabel_configs") or []
    if not job.get("file_sd_configs") or not any(_is_quick_start_relabel(rule) for rule in relabels):
        return
    statics = [target for static in job.get("static_configs") or [] for target in static["targets"]]
    aliases = sorted(alias for alias in HOST_ALIASES if alias != LOOPBACK)
    to_loopback = {
        "source_labels": ["__address__"],
        "regex": f"(?:{'|'.join(re.escape(alias) for alias in aliases)}):([0-9]+)",
        "target_label": "__address__",
        "replacement": f"{LOOPBACK}:$1",
    }
    derived = [to_loopback]
    for rule in relabels:
        if _is_quick_start_relabel(rule):
            if not statics:
                continue
            rule = quick_start_relabel(statics)
        derived.append(rule)
    job["relabel_configs"] = derived


def _discovers_anything(job: dict[str, Any]) -> bool:
    return any(key.endswith("_sd_configs") or key == "static_configs" for key in job)


def prometheus_config(shipped: Path, rewriter: Rewriter, targets_dir: Path | None = None) -> dict[str, Any]:
    """The shipped Prometheus config, rewritten for loopback (see the module docstring).

    Args:
        shipped: ``deploy/prometheus/prometheus.yml``.
        rewriter: the address mapping.
        targets_dir: where file-SD target files are read; by default where the shipped config says, relative to
            its own folder.
    """
    config = copy.deepcopy(_yaml().safe_load(shipped.read_text(encoding="utf-8")) or {})
    base = shipped.resolve().parent  # the derived file lives elsewhere: its paths must not be relative
    config["rule_files"] = [
        os.path.normpath(base / pattern) if not os.path.isabs(pattern) else pattern
        for pattern in config.get("rule_files") or []
    ]
    for alertmanagers in (config.get("alerting") or {}).get("alertmanagers") or []:
        _targets(alertmanagers, rewriter)
    alerting = config.get("alerting") or {}
    if "alertmanagers" in alerting:
        alerting["alertmanagers"] = [am for am in alerting["alertmanagers"] if _discovers_anything(am)]
    jobs = []
    for job in config.get("scrape_configs") or []:
        _targets(job, rewriter)
        for file_sd in job.get("file_sd_configs") or []:
            files = []
            for pattern in file_sd.get("files") or []:
                if targets_dir is not None:
                    files.append(str(targets_dir / os.path.basename(pattern)))
                else:
                    files.append(pattern if os.path.isabs(pattern) else os.path.normpath(base / pattern))
            file_sd["files"] = files
        _derive_training_job(job)
        if _discovers_anything(job):
            jobs.append(job)
    config["scrape_configs"] = jobs
    return config


def _rewrite_urls(node: Any, rewriter: Rewriter) -> Any:
    if isinstance(node, dict):
        return {key: _rewrite_urls(value, rewriter) for key, value in node.items()}
    if isinstance(node, list):
        return [_rewrite_urls(value, rewriter) for value in node]
    if isinstance(node, str) and node.startswith(("http://", "https://")):
        return rewriter.url(node)
    return node


def alertmanager_config(shipped: Path, rewriter: Rewriter) -> dict[str, Any]:
    """The shipped Alertmanager config with every URL of the Compose network pointed at this machine."""
    return _rewrite_urls(_yaml().safe_load(shipped.read_text(encoding="utf-8")) or {}, rewriter)


# ---------------------------------------------------------------------------------------------- processes
def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _pid_matches(pid: int, binary: str) -> bool:
    """Whether ``pid`` still runs ``binary`` (a recycled pid must not be signalled)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv0 = handle.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return _alive(pid)  # no /proc (macOS): trust the pid file
    return os.path.basename(argv0) == os.path.basename(binary)


def scrape_tls_config(certs_dir: Path) -> dict[str, str]:
    """``tls_config`` of a scrape job for endpoints secured with ``scripts/make-certs.sh``'s certificates: its
    ``ca.crt``, and ``client.crt``/``client.key`` when both exist (mutual TLS). :class:`StackError` without the CA."""
    certs_dir = Path(certs_dir).resolve()
    ca = certs_dir / "ca.crt"
    if not ca.is_file():
        raise StackError(f"--scrape-certs: {ca} does not exist (make it with scripts/make-certs.sh {certs_dir})")
    tls = {"ca_file": str(ca)}
    cert, key = certs_dir / "client.crt", certs_dir / "client.key"
    if cert.is_file() and key.is_file():
        tls.update(cert_file=str(cert), key_file=str(key))
    return tls


class Stack:
    """The native stack in ``state_dir``.

    Args:
        state_dir: data, logs, pid files and derived configs (created when missing).
        ports: loopback port of each server by name (``prometheus``, ``alertmanager``, ``pushgateway``).
        targets_dir: file-SD directory Prometheus watches (default: ``targets/`` beside the Prometheus config,
            the shipped ``deploy/prometheus/targets``).
        deploy_dir: the shipped configs.
        out: where progress lines go.
        servers: the servers to start (default all three); the scrape jobs of the others are left out.
        prometheus_template: the Prometheus config to derive from (default ``deploy/prometheus/prometheus.yml``;
            ``deploy/slurm/prometheus.yml`` for SLURM).
        alertmanager_template: the Alertmanager config to derive from (default
            ``deploy/alertmanager/alertmanager.yml``, which sends nowhere).
        scrape_certs: a ``scripts/make-certs.sh`` folder: the jobs that read discovery files scrape HTTPS
            endpoints (``web_config_file``) with its CA and client certificate.

    Example::

        Stack(Path("~/dgdn/stack").expanduser(), servers=("prometheus", "alertmanager"),
              prometheus_template=DEPLOY / "slurm" / "prometheus.yml").start()
    """

    def __init__(
        self,
        state_dir: Path,
        ports: dict[str, int] | None = None,
        targets_dir: Path | None = None,
        deploy_dir: Path = DEPLOY,
        out: Any = None,
        servers: tuple[str, ...] | None = None,
        prometheus_template: Path | None = None,
        alertmanager_template: Path | None = None,
        scrape_certs: Path | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        names = [server.name for server in SERVERS]
        for name in servers or ():
            if name not in names:
                raise ValueError(f"servers: unknown server {name!r}; choose from {', '.join(names)}")
        if servers is not None and "prometheus" not in servers:
            raise ValueError(f"servers: prometheus is the stack; got {', '.join(servers) or 'none'}")
        self.servers = tuple(name for name in names if servers is None or name in servers)
        self.ports = {server.name: server.container_port for server in SERVERS if server.name in self.servers}
        for name, port in (ports or {}).items():
            if name not in names:
                raise ValueError(f"ports: unknown server {name!r}; choose from {', '.join(names)}")
            if name not in self.servers:
                continue  # not started: its port is not used
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f"ports: {name} port must be 1-65535, got {port!r}")
            self.ports[name] = port
        if len(set(self.ports.values())) != len(self.ports):
            raise ValueError(f"ports: each server needs its own port, got {self.ports}")
        self.targets_dir = Path(targets_dir).resolve() if targets_dir is not None else None
        self.deploy_dir = Path(deploy_dir)
        self.prometheus_template = Path(
            prometheus_template or self.deploy_dir / "prometheus" / "prometheus.yml"
        ).resolve()
        self.alertmanager_template = Path(
            alertmanager_template or self.deploy_dir / "alertmanager" / "alertmanager.yml"
        ).resolve()
        for what, path in (("prometheus", self.prometheus_template), ("alertmanager", self.alertmanager_template)):
            if not path.is_file():
                raise ValueError(f"{what}_template: {path} does not exist")
        self.scrape_certs = Path(scrape_certs) if scrape_certs is not None else None
        self.out = sys.stdout if out is None else out
        self.processes: dict[str, subprocess.Popen] = {}
        self.training_jobs: list[dict[str, Any]] = []  # the derived jobs that read discovery files

    def url(self, name: str) -> str:
        return f"http://{LOOPBACK}:{self.ports[name]}"

    def _pid_file(self, name: str) -> Path:
        return self.state_dir / "run" / f"{name}.pid"

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def write_configs(self) -> dict[str, Path]:
        """Derive this start's configs from the shipped ones; returns their paths by server name."""
        yaml = _yaml()
        rewriter = Rewriter(self.ports, compose_services(self.deploy_dir / "docker-compose.yml"))
        config_dir = self.state_dir / "config"
        config_dir.mkdir(parents=True, exist_ok=True)
        paths = {"prometheus": config_dir / "prometheus.yml", "alertmanager": config_dir / "alertmanager.yml"}
        prometheus = prometheus_config(self.prometheus_template, rewriter, self.targets_dir)
        if self.scrape_certs is not None:
            tls = scrape_tls_config(self.scrape_certs)
            for job in prometheus["scrape_configs"]:
                if job.get("file_sd_configs"):
                    job["tls_config"] = dict(tls)
        templates = {"prometheus": self.prometheus_template, "alertmanager": self.alertmanager_template}
        configs = {"prometheus": prometheus}
        if "alertmanager" in self.servers:
            configs["alertmanager"] = alertmanager_config(self.alertmanager_template, rewriter)
        for name, config in configs.items():
            header = (
                f"# Derived at start-up by scripts/native_stack.py from {templates[name]}; edit that file instead.\n"
            )
            paths[name].write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.training_jobs = [job for job in prometheus["scrape_configs"] if job.get("file_sd_configs")]
        return {name: paths[name] for name in configs}

    def _commands(self, binaries: dict[str, str], configs: dict[str, Path]) -> dict[str, list[str]]:
        data = self.state_dir / "data"
        port = self.ports.get  # None for a server not started (its options are left out)
        options = {
            "alertmanager": [
                f"--config.file={configs.get('alertmanager')}",
                f"--storage.path={data / 'alertmanager'}",
                f"--web.listen-address={LOOPBACK}:{port('alertmanager')}",
                "--cluster.listen-address=",  # a single instance: no gossip port
            ],
            "pushgateway": [
                f"--web.listen-address={LOOPBACK}:{port('pushgateway')}",
                f"--persistence.file={data / 'pushgateway' / 'pushgateway.db'}",
                "--persistence.interval=1m",
            ],
            "prometheus": [
                f"--config.file={configs['prometheus']}",
                f"--storage.tsdb.path={data / 'prometheus'}",
                f"--web.listen-address={LOOPBACK}:{port('prometheus')}",
                "--web.enable-lifecycle",
                "--enable-feature=exemplar-storage",
            ],
        }
        return {name: [binaries[name], *options[name]] for name in self.servers}

    def running(self) -> dict[str, int]:
        """Servers of this state directory that run now, from their pid files."""
        alive = {}
        for server in SERVERS:
            path = self._pid_file(server.name)
            try:
                pid_text, _, binary = path.read_text(encoding="utf-8").partition("\n")
                pid = int(pid_text)
            except (OSError, ValueError):
                continue
            if _alive(pid) and _pid_matches(pid, binary.strip() or server.binaries[0]):
                alive[server.name] = pid
        return alive

    def start(self, ready_timeout_s: float = 60.0) -> None:
        """Start the servers and wait until each answers ``/-/ready``; on failure stop what started."""
        binaries = {server.name: find_binary(server) for server in SERVERS if server.name in self.servers}
        if self.running():
            raise StackError(f"a native stack already runs from {self.state_dir} (stop it: make stack-native-down)")
        for name, port in self.ports.items():
            if not _port_free(port):
                raise StackError(
                    f"port {port} for {name} is in use (the Docker stack, or another server); pass "
                    f"--{name}-port with a free port"
                )
        configs = self.write_configs()
        for directory in ("run", "logs", *(f"data/{name}" for name in self.servers)):
            (self.state_dir / directory).mkdir(parents=True, exist_ok=True)
        self.targets.mkdir(parents=True, exist_ok=True)  # watched from the start, before a run writes to it
        commands = self._commands(binaries, configs)
        try:
            # Prometheus last: its Alertmanager is up.
            for name in [name for name in ("alertmanager", "pushgateway", "prometheus") if name in self.servers]:
                log = open(self.state_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
                try:
                    process = subprocess.Popen(
                        commands[name],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                finally:
                    log.close()
                self.processes[name] = process
                self._pid_file(name).write_text(f"{process.pid}\n{commands[name][0]}\n", encoding="utf-8")
            for name in self.processes:
                self._wait_ready(name, ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        process = self.processes[name]
        while True:
            if process.poll() is not None:
                raise StackError(
                    f"{name} exited with status {process.returncode}; see {self.state_dir / 'logs' / (name + '.log')}"
                )
            try:
                with urllib.request.urlopen(self.url(name) + "/-/ready", timeout=2):
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise StackError(
                    f"{name} did not become ready within {timeout_s:.0f} s; see "
                    f"{self.state_dir / 'logs' / (name + '.log')}"
                )
            time.sleep(0.2)

    @property
    def targets(self) -> Path:
        """The file-SD directory Prometheus watches."""
        return self.targets_dir or self.prometheus_template.parent / "targets"

    def describe(self) -> list[str]:
        static = [
            target
            for job in self.training_jobs
            for config in job.get("static_configs") or []
            for target in config["targets"]
        ]
        runs = f"a run at {', '.join(static)} and " if static else ""
        return [
            (
                f"Prometheus    {self.url('prometheus')}  (alerts: {self.url('prometheus')}/alerts, "
                f"targets: {self.url('prometheus')}/targets)"
            ),
            *(f"{name.capitalize():<13} {self.url(name)}" for name in self.servers if name != "prometheus"),
            f"Scraped: {runs}file-SD targets in {self.targets} (expired ones removed)",
            f"Data and logs: {self.state_dir}",
        ]

    def stop(self, timeout_s: float = 10.0) -> list[str]:
        """Stop every server of this state directory (the ones started here and those in pid files)."""
        pids: dict[str, int] = {name: process.pid for name, process in self.processes.items() if process.poll() is None}
        for name, pid in self.running().items():
            pids.setdefault(name, pid)
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        for name, pid in pids.items():
            process = self.processes.get(name)
            while time.monotonic() < deadline:
                if process is not None and process.poll() is not None:
                    break
                if process is None and not _alive(pid):
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if process is not None:
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for server in SERVERS:
            self._pid_file(server.name).unlink(missing_ok=True)
        self.processes.clear()
        return sorted(pids)

    def sweep(self) -> None:
        """Remove expired discovery files (runs killed without their teardown) and Pushgateway groups past their
        retention, as the runs themselves do; needs the package (a no-op without it)."""
        try:
            from dgdn_lightning_monitor import distributed, pushgateway
        except ImportError:
            return
        distributed.remove_expired_targets(self.targets)
        if "pushgateway" in self.servers:
            pushgateway.remove_finished_groups(self.url("pushgateway"), retention_s=pushgateway.PUSH_RETENTION_S)

    def wait(self, sweep_every_s: float = 30.0) -> None:
        """Block until a server exits (or is stopped from elsewhere), sweeping every ``sweep_every_s``."""
        next_sweep = time.monotonic()
        while all(process.poll() is None for process in self.processes.values()):
            if time.monotonic() >= next_sweep:
                self.sweep()
                next_sweep = time.monotonic() + sweep_every_s
            time.sleep(0.5)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="native_stack.py",
        description="Prometheus, Alertmanager and Pushgateway from PATH with the shipped configs, on loopback.",
    )
    parser.add_argument("command", choices=("up", "down", "status"), help="start (foreground), stop, or list")
    parser.add_argument(
        "--dir", type=Path, default=ROOT / ".stack", help="data, logs, pid files and derived configs (default: .stack/)"
    )
    parser.add_argument("--detach", action="store_true", help="up: return once ready; stop with 'down'")
    parser.add_argument(
        "--targets-dir",
        type=Path,
        default=None,
        help="file-SD directory Prometheus watches (default: targets/ beside the Prometheus config)",
    )
    parser.add_argument(
        "--prometheus-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="the Prometheus config to derive from (default: deploy/prometheus/prometheus.yml; SLURM: "
        "deploy/slurm/prometheus.yml)",
    )
    parser.add_argument(
        "--alertmanager-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="the Alertmanager config to derive from (default: deploy/alertmanager/alertmanager.yml, sends nowhere)",
    )
    parser.add_argument(
        "--no-pushgateway", action="store_true", help="start Prometheus and Alertmanager only (no pushes to receive)"
    )
    parser.add_argument(
        "--scrape-certs",
        type=Path,
        default=None,
        metavar="DIR",
        help="scrape discovered HTTPS endpoints (web_config_file) with DIR's ca.crt, client.crt and client.key "
        "(scripts/make-certs.sh)",
    )
    for server in SERVERS:
        parser.add_argument(
            f"--{server.name}-port",
            type=int,
            default=server.container_port,
            metavar="PORT",
            help=f"loopback port of {server.name} (default: {server.container_port})",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        stack = Stack(
            args.dir,
            ports={server.name: getattr(args, f"{server.name}_port") for server in SERVERS},
            targets_dir=args.targets_dir,
            servers=("prometheus", "alertmanager") if args.no_pushgateway else None,
            prometheus_template=args.prometheus_config,
            alertmanager_template=args.alertmanager_config,
            scrape_certs=args.scrape_certs,
        )
    except ValueError as error:
        print(f"native_stack.py: error: {error}", file=sys.stderr)
        return 2
    if args.command == "down":
        stopped = stack.stop()
        print(f"Stopped {', '.join(stopped)}." if stopped else "No native stack runs from " + str(stack.state_dir))
        return 0
    if args.command == "status":
        running = stack.running()
        print("\n".join(f"{name} pid {pid}" for name, pid in running.items()) or "not running")
        return 0 if running else 1

    stop_requested: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stop_requested.append(signum)
        raise KeyboardInterrupt

    previous: dict[int, Callable[..., Any] | int | None] = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        stack.start()
        print("Native monitoring stack ready:")
        print("\n".join("  " + line for line in stack.describe()), flush=True)
        if args.detach:
            stack.processes.clear()  # they outlive this process; 'down' stops them from their pid files
            print("Stop it with: make stack-native-down", flush=True)
            return 0
        print("Ctrl-C (or make stack-native-down) stops it.", flush=True)
        stack.wait()
        failed = {
            name: process.returncode
            for name, process in stack.processes.items()
            if process.poll() is not None and process.returncode > 0
        }
        stack.stop()
        if failed:  # exited by itself, not stopped by a signal
            name, code = next(iter(failed.items()))
            print(
                f"native stack: {name} exited with status {code} (see {args.dir / 'logs' / (name + '.log')}); "
                "stopped the rest.",
                file=sys.stderr,
            )
            return 1
        print("Stopped.", flush=True)
        return 0
    except KeyboardInterrupt:
        stack.stop()
        print("\nStopped.", flush=True)
        return 0
    except StackError as error:
        print(f"native stack: {error}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
