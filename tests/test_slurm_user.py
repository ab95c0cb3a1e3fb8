"""docs/slurm.md, done by a user without root on a real one-node SLURM cluster (tests/slurm_cluster.py).

An unprivileged user (made with ``useradd`` when it does not exist yet) gets a home directory of its own in a
temporary folder, with a copy of this repository, a Python environment it can run (:func:`user_venv`) and
``~/dgdn/bin`` holding this machine's Prometheus and Alertmanager under the names the release tarballs give them.
The code blocks of docs/slurm.md marked ``<!-- step: NAME -->`` then run as that user (``runuser``, none of
root's environment), in the repository copy, as the page says: ``secure`` (web config and certificates),
``monitoring`` (``sbatch deploy/slurm/monitoring.sbatch``), ``train`` (``sbatch deploy/slurm/train.sbatch``,
scaled to this node by ``sbatch`` options before the script and to a short CPU run by arguments after it) and
``stop``. The page cannot drift from what is tested: a changed block is what runs here.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port, require_tool
from prom_helpers import ROOT, http_get, wait_until
from slurm_cluster import KILL_WAIT_S

DOC = ROOT / "docs" / "slurm.md"
SLURM_DIR = ROOT / "deploy" / "slurm"
USER = "dgdn-slurm-user"
STEPS = {"secure", "monitoring", "train", "stop"}
SUBMIT_TRAINING = "sbatch deploy/slurm/train.sbatch"
#: The example's 2 nodes x 4 GPUs x 8 CPUs as this node can run it, next to the 1-CPU monitoring job.
SCALED = "--nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 --time=15"
#: A short CPU run that lasts long enough (40 s of fit) for several 5 s scrapes before its end, however fast the
#: machine is.
SHORT_RUN = (
    "--trainer.accelerator cpu --trainer.max_time 00:00:00:40 --trainer.max_epochs 1000 "
    "--data.num_events 2000 --model.hidden_dim 16 --trainer.limit_val_batches 0"
)
START_TIMEOUT_S = 300.0  # sbatch to both ranks scraped: Python, torch and PyG start in both tasks of a busy machine
RUN_TIMEOUT_S = 300.0  # both ranks scraped to the job's end: 40 s of fit, Lightning's and the callback's ends


def doc_steps() -> dict[str, str]:
    """The bash blocks of docs/slurm.md marked ``<!-- step: NAME -->``, by name."""
    blocks = re.findall(r"^<!-- step: ([a-z-]+) -->\n```bash\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)
    return dict(blocks)


def need(ok: bool, message: str) -> None:
    """Skip when the machine cannot run this test (a failure with DGDN_MONITOR_REQUIRE_TOOLS, as in CI)."""
    if not ok:
        if os.environ.get("DGDN_MONITOR_REQUIRE_TOOLS"):
            pytest.fail(message + "; DGDN_MONITOR_REQUIRE_TOOLS is set, so this is a failure", pytrace=False)
        pytest.skip(message)


class User:
    """The unprivileged user and its home: commands run as it with a clean environment."""

    def __init__(self, account: pwd.struct_passwd, home: Path, slurm_conf: Path) -> None:
        self.account = account
        self.home = home
        self.repo = home / "dgdn-lightning-monitor"
        self.dgdn = home / "dgdn"
        self.environment = {
            "HOME": str(home),
            "USER": account.pw_name,
            "LOGNAME": account.pw_name,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "SLURM_CONF": str(slurm_conf),
            # What `pip install -e .` of the copy would do: its package first (the venv shares this test's
            # packages, whose editable install points at the checkout under test's origin).
            "PYTHONPATH": str(self.repo),
            "PYTHONUNBUFFERED": "1",
        }

    def run(self, script: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
        """``bash -euo pipefail -c script`` as the user in the repository copy; its stdout (fails on an error)."""
        environment = {**self.environment, **(env or {})}
        argv = ["runuser", "-u", self.account.pw_name, "--", "env", "-i"]
        argv += [f"{key}={value}" for key, value in environment.items()]
        argv += ["bash", "-euo", "pipefail", "-c", script]
        done = subprocess.run(argv, cwd=self.repo, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"as {self.account.pw_name}: {script}\n{done.stdout}{done.stderr}"
        return done.stdout

    def can_run(self, *argv: str) -> str | None:
        """The output of ``argv`` run as the user, or None when it fails (its error in ``last_error``)."""
        done = subprocess.run(
            ["runuser", "-u", self.account.pw_name, "--", *argv],
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.last_error = done.stderr[-2000:]
        return done.stdout.strip() if done.returncode == 0 else None

    def log(self, job: str) -> str:
        for path in self.repo.glob(f"*-{job}.out"):
            return path.read_text(errors="replace")[-4000:]
        return f"(no output of job {job})"


@pytest.fixture(scope="module")
def account(slurm_cluster) -> Any:
    for tool in ("runuser", "useradd", "userdel", "openssl", "prometheus", "alertmanager", "promtool", "amtool"):
        require_tool(tool)
    created = False
    try:
        found = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"]
            + ["--shell", "/bin/bash", USER],
            check=True,
            capture_output=True,
            timeout=60,
        )
        created, found = True, pwd.getpwnam(USER)
    try:
        yield found
    finally:
        if created:
            subprocess.run(["userdel", USER], check=False, capture_output=True, timeout=60)


LIBS = ("purelib", "platlib")


def readable_copy(user: User, path: str, copies: Path) -> str:
    """``path`` where the user can read it, else a copy the user can read: hard links (no data copied) in
    ``copies``, outside the user's home so that its chown leaves the originals alone. A checkout under a home only
    root enters (``/root``) has its environment there."""
    if user.can_run("ls", path) is not None:
        return path
    copy = copies / str(len(list(copies.iterdir())))
    linked = subprocess.run(["cp", "-al", path, str(copy)], capture_output=True, timeout=600)
    if linked.returncode != 0:  # another file system: a real copy
        shutil.rmtree(copy, ignore_errors=True)
        subprocess.run(["cp", "-a", path, str(copy)], check=True, capture_output=True, timeout=1200)
    return str(copy)


def user_venv(user: User, dest: Path, shared_copy: Path) -> None:
    """A Python environment the user can run with this test's packages, as ``~/venvs/dgdn``: a venv of an
    interpreter of this version that the user may execute (this one, or the system's where this one lives in a
    home only root enters), whose site-packages add this environment's, and the ``dgdn-monitor`` script that
    ``pip install`` writes for the project."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(sys.executable)]
    candidates += [path for path in (shutil.which(version, path=d) for d in ("/usr/local/bin", "/usr/bin")) if path]
    wanted = f"{sys.version_info.major}.{sys.version_info.minor}"
    check = "import sys; print('%d.%d' % sys.version_info[:2])"
    base = next((c for c in candidates if user.can_run(c, "-c", check) == wanted), None)
    need(base is not None, f"no {version} that {USER} may run (looked at {', '.join(candidates)})")
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(dest)], check=True, capture_output=True, timeout=120)
    shared = [readable_copy(user, path, shared_copy) for path in sorted({sysconfig.get_path(n) for n in LIBS})]
    site = dest / "lib" / version / "site-packages"
    (site / "shared-test-packages.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in shared), encoding="utf-8"
    )
    script = dest / "bin" / "dgdn-monitor"
    script.write_text(
        f"#!{dest}/bin/python\nimport sys\nfrom dgdn_lightning_monitor.cli import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)


@pytest.fixture(scope="module")
def user(account, slurm_cluster) -> Any:
    """The user's home: the repository copy, ``~/venvs/dgdn``, ``~/dgdn/bin``; removed at the end."""
    home = Path(tempfile.mkdtemp(prefix="dgdn-slurm-home-"))
    shared_copy = Path(tempfile.mkdtemp(prefix="dgdn-slurm-site-"))
    shared_copy.chmod(0o755)
    try:
        user = User(account, home, slurm_cluster.conf)
        skip = {".git", ".venv", ".stack", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
        shutil.copytree(ROOT, user.repo, ignore=lambda _, names: [n for n in names if n in skip or ".egg-info" in n])
        bin_dir = user.dgdn / "bin"
        bin_dir.mkdir(parents=True)
        for name in ("prometheus", "promtool", "alertmanager", "amtool"):
            (bin_dir / name).symlink_to(require_tool(name))
        user_venv(user, home / "venvs" / "dgdn", shared_copy)
        subprocess.run(["chown", "-R", f"{account.pw_uid}:{account.pw_gid}", str(home)], check=True, timeout=120)
        imports = "import torch, torch_geometric, lightning, yaml, dgdn_lightning_monitor as m; print(m.__file__)"
        imported = user.can_run(
            "env", f"PYTHONPATH={user.repo}", str(home / "venvs" / "dgdn" / "bin" / "python"), "-c", imports
        )
        need(
            imported == str(user.repo / "dgdn_lightning_monitor" / "__init__.py"),
            f"{USER} cannot import this test's packages (is {sysconfig.get_path('purelib')} readable by others?): "
            f"{imported}\n{user.last_error}",
        )
        yield user
    finally:
        subprocess.run(["scancel", f"--user={USER}"], env=slurm_cluster.env, capture_output=True, timeout=30)
        wait_until(lambda: not squeue(slurm_cluster), KILL_WAIT_S + 60, what=f"the jobs of {USER} to end")
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(shared_copy, ignore_errors=True)


def squeue(cluster: Any, *options: str) -> list[dict[str, str]]:
    """The user's jobs: id, name, state, reason."""
    out = cluster.run("squeue", "--noheader", f"--user={USER}", "--format=%i %j %T %r", *options)
    return [dict(zip(("id", "name", "state", "reason"), line.split(maxsplit=3))) for line in out.splitlines()]


def submitted(out: str) -> str:
    match = re.search(r"Submitted batch job (\d+)", out)
    assert match, out
    return match.group(1)


def api(port: int, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    payload = json.loads(http_get(f"http://127.0.0.1:{port}/api/v1/{path}" + (f"?{query}" if query else "")))
    assert payload["status"] == "success", payload
    return payload["data"]


def query(port: int, expr: str) -> list[dict[str, Any]]:
    return api(port, "query", query=expr)["result"]


def paths_in(node: Any) -> list[str]:
    """Every absolute path among the string values of a config."""
    if isinstance(node, dict):
        return [path for value in node.values() for path in paths_in(value)]
    if isinstance(node, list):
        return [path for value in node for path in paths_in(value)]
    return [node] if isinstance(node, str) and node.startswith("/") else []


def test_the_slurm_deploy_files_are_valid():
    """The template passes promtool with the shipped rules it loads; the batch scripts are valid bash; the training
    job asks for one task per GPU (Lightning's SLURMEnvironment), hands srun its CPUs, tells Lightning the tasks and
    nodes SLURM gave it, and keeps the requeue signal the alert rules are aligned to."""
    from prom_helpers import ALL_RULES_FILES, run_tool

    output = run_tool([require_tool("promtool"), "check", "config", str(SLURM_DIR / "prometheus.yml")])
    for path in ALL_RULES_FILES:
        assert path.name in output
    for name in ("train.sbatch", "monitoring.sbatch"):
        subprocess.run(["bash", "-n", str(SLURM_DIR / name)], check=True, timeout=30)
    script = (SLURM_DIR / "train.sbatch").read_text()
    options = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", script, flags=re.M))
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    assert options["signal"] == "SIGUSR1@120"
    assert 'srun --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_PER_TASK"' in script
    assert '--trainer.devices "$SLURM_NTASKS_PER_NODE" --trainer.num_nodes "$SLURM_JOB_NUM_NODES"' in script
    monitoring = (SLURM_DIR / "monitoring.sbatch").read_text()
    assert "scripts/native_stack.py up --no-pushgateway --prometheus-config deploy/slurm/prometheus.yml" in monitoring


@pytest.mark.slow
def test_the_slurm_guide_as_a_user_without_root(user, slurm_cluster):
    steps = doc_steps()
    assert set(steps) == STEPS, f"docs/slurm.md marks {sorted(steps)}"
    assert steps["train"].count(SUBMIT_TRAINING) == 1, steps["train"]
    cluster, uid = slurm_cluster, user.account.pw_uid
    ports = {"PROMETHEUS_PORT": str(free_port()), "ALERTMANAGER_PORT": str(free_port())}
    prometheus, alertmanager = int(ports["PROMETHEUS_PORT"]), int(ports["ALERTMANAGER_PORT"])

    # Securing the endpoints: the stack's web config beside certificates naming the cluster's nodes, keys private.
    user.run(steps["secure"])
    certs = user.dgdn / "certs"
    assert (user.dgdn / "web-config.yml").is_file()
    assert (
        cluster.node
        in subprocess.run(
            ["openssl", "x509", "-in", str(certs / "server.crt"), "-noout", "-ext", "subjectAltName"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    )
    assert {path.name: path.stat().st_mode & 0o777 for path in certs.glob("*.key")} == {
        "ca.key": 0o600,
        "server.key": 0o600,
        "client.key": 0o600,
    }

    # Monitoring: Prometheus and Alertmanager as the user's own job, on loopback, from ~/dgdn/bin.
    monitoring = submitted(user.run(steps["monitoring"], env=ports))

    def stack_up() -> Any:
        state = cluster.job(monitoring).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"monitoring job {state}:\n{user.log(monitoring)}"
        return api(prometheus, "alertmanagers")["activeAlertmanagers"]

    active = wait_until(stack_up, 120, what="the monitoring job's Prometheus to find its Alertmanager")
    assert [am["url"] for am in active] == [f"http://127.0.0.1:{alertmanager}/api/v2/alerts"]
    stack = user.dgdn / "stack"
    pids = {}
    for name in ("prometheus", "alertmanager"):
        pid, binary = (stack / "run" / f"{name}.pid").read_text().split()
        assert binary == str(user.dgdn / "bin" / name)
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{uid}\s", status, flags=re.M), f"{name} does not run as {USER}"
        pids[name] = int(pid)
    assert not (stack / "run" / "pushgateway.pid").exists()
    groups = api(prometheus, "rules")["groups"]
    assert {group["file"] for group in groups} == {
        str(user.repo / "deploy" / "prometheus" / "rules" / name)
        for name in ("dgdn-alerts.yml", "dgdn-scheduler.yml", "dgdn-stack.yml")
    }
    config = yaml.safe_load((stack / "config" / "prometheus.yml").read_text())
    outside = [path for path in paths_in(config) if not path.startswith(str(user.home) + "/")]
    assert not outside, f"the derived config names paths outside {USER}'s home: {outside}"
    training = next(job for job in config["scrape_configs"] if job["job_name"] == "dgdn-training")
    assert training["file_sd_configs"][0]["files"] == [str(user.dgdn / "targets" / "*.json")]
    assert training["tls_config"] == {
        "ca_file": str(certs / "ca.crt"),
        "cert_file": str(certs / "client.crt"),
        "key_file": str(certs / "client.key"),
    }

    # Training: the example job, scaled to this node and a short CPU run.
    training_step = steps["train"].replace(SUBMIT_TRAINING, f"sbatch {SCALED} deploy/slurm/train.sbatch {SHORT_RUN}")
    job = submitted(user.run(training_step))
    run = f"slurm-{job}"

    def both_ranks_scraped() -> Any:
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"training job {state}:\n{user.log(job)}"
        targets = [t for t in api(prometheus, "targets")["activeTargets"] if t["labels"].get("run_id") == run]
        up = [t for t in targets if t["health"] == "up"]
        return up if len(up) == 2 else None

    try:
        up = wait_until(both_ranks_scraped, START_TIMEOUT_S, interval=1, what=f"both ranks of job {job} scraped")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{user.log(job)}") from error
    assert len({t["labels"]["instance"] for t in up}) == 2
    assert all(t["scrapeUrl"].startswith(f"https://{cluster.node}:") for t in up), [t["scrapeUrl"] for t in up]
    info = query(prometheus, f'dgdn_training_info{{run_id="{run}"}}')
    assert {(s["metric"]["rank"], s["metric"]["slurm_job_id"]) for s in info} == {("0", job), ("1", job)}

    ended = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=RUN_TIMEOUT_S)
    assert ended["JobState"] == "COMPLETED", user.log(job)
    # The last scrape of each rank read its end: completed (the ending endpoint waits for it).
    outcomes = query(prometheus, f'last_over_time(dgdn_run_outcome{{run_id="{run}"}}[10m]) == 1')
    assert {(s["metric"]["rank"], s["metric"]["outcome"]) for s in outcomes} == {("0", "completed"), ("1", "completed")}
    assert not list((user.dgdn / "targets").glob(f"*{run}*")), "a normal end leaves no discovery file"

    # Alerts reach the Alertmanager (the always-firing watchdog), and none of the run's fires.
    wait_until(
        lambda: any(
            a["labels"]["alertname"] == "DGDNWatchdog"
            for a in json.loads(http_get(f"http://127.0.0.1:{alertmanager}/api/v2/alerts"))
        ),
        90,
        what="DGDNWatchdog in the Alertmanager (rules evaluated every 15 s)",
    )
    assert not query(prometheus, "prometheus_notifications_errors_total > 0")
    # Firing, as the comment says: on a 2-core machine shared with the stack, a rank can run 10 % behind the other
    # for a few 20 s windows and put DGDNRankStraggler in pending, which its `for: 1m` is there to filter.
    assert not query(prometheus, f'ALERTS{{run_id="{run}", alertstate="firing"}}')

    # Kept alive: on its signal before the time limit, the job queues its successor.
    user.run(f"scancel --signal=USR1 --batch {monitoring}")
    successor = wait_until(
        lambda: [j for j in squeue(cluster) if j["name"] == "dgdn-monitoring" and j["id"] != monitoring],
        60,
        what="the monitoring job's successor in the queue",
    )
    assert successor[0]["state"] == "PENDING" and successor[0]["reason"] == "Dependency", successor
    assert cluster.job(monitoring).get("JobState") == "RUNNING"

    # Stopping: scancel by name ends both, and the servers with the job.
    user.run(steps["stop"])
    wait_until(
        lambda: not [j for j in squeue(cluster) if j["name"] == "dgdn-monitoring"],
        KILL_WAIT_S + 60,
        what="the monitoring jobs to end",
    )
    wait_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids.values()),
        KILL_WAIT_S + 30,
        what="Prometheus and Alertmanager to stop",
    )
