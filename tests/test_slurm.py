"""SLURM, for real: a single-node cluster started by the tests (tests/slurm_cluster.py), 2-task DDP jobs submitted
with ``sbatch`` running ``srun tests/slurm_train.py`` with MonitoringCallback, and a real Prometheus running the
shipped ``dgdn-training`` scrape job (1 s intervals) over the jobs' shared discovery directory with the shipped
rules (``dgdn-alerts.yml`` and ``dgdn-scheduler.yml``).

Each job ends the way SLURM ends jobs: normally, by ``scancel``, at its time limit, by ``scontrol requeue``; the
tests assert what Prometheus saw and which alerts it raised. The time-limited job is submitted first and checked
last: SLURM's limits count in minutes, so it runs while the others do.

Every wait is on a condition, bounded for a loaded 2-core machine: a job's start (Python, torch and PyG in both
tasks), SLURM's ``KillWait`` after a signal, and, before "nothing fired", Prometheus having evaluated the rules
for longer than the shortened ``for`` since the moment in question (:func:`quiet_since`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port, require_tool
from prom_helpers import ROOT, RULES_FILE, SCHEDULER_RULES_FILE, Prometheus, wait_until
from slurm_cluster import KILL_WAIT_S, rules_evaluated_after

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("slurm_train.py")
#: ``for`` of the lifecycle alerts cut so that a wrong crash page shows within the test (shipped: 1 minute).
SHORTENED_FOR = {"DGDNRunDown": "5s", "DGDNTargetNeverScraped": "5s", "DGDNMetricsEndpointGone": "5s"}
#: Seconds of rule evaluations after which an alert that was going to fire has fired: the shortened `for` and one.
QUIET_S = 6.0
START_TIMEOUT_S = 300.0  # sbatch to both ranks scraped: Python, torch and PyG start in every task of a busy machine
END_TIMEOUT_S = 300.0  # a job's last steps, Lightning's teardown and the callback's end on a busy machine
SIGNALLED_S = KILL_WAIT_S + 60  # a signalled job's end: the callback's, or SLURM's SIGKILL after KillWait
TIME_LIMIT_MIN = 2  # SLURM's limits count in minutes; two leave a slow start a minute of training
GRAPHS_PER_RANK = 200  # slurm_train.py: 400 graphs split over 2 ranks, 50 steps of 0.2 s per epoch


@pytest.fixture(scope="module")
def stack(slurm_cluster, tmp_path_factory) -> Any:
    """Prometheus with the shipped training job and rules, reading the discovery directory the jobs share."""
    binary = require_tool("prometheus")
    import deploy_training as dt

    workdir = tmp_path_factory.mktemp("slurm-prometheus")
    targets = workdir / "targets"
    targets.mkdir()
    rules = []
    for path in (RULES_FILE, SCHEDULER_RULES_FILE):
        content = yaml.safe_load(path.read_text())
        for group in content["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") in SHORTENED_FOR:
                    rule["for"] = SHORTENED_FOR[rule["alert"]]
        rules.append(workdir / path.name)
        rules[-1].write_text(yaml.safe_dump(content, sort_keys=False))
    # The static quick-start target points at a port nothing serves; only discovered targets matter here.
    static = f"127.0.0.1:{free_port()}"
    config = dt.shipped_training_config(workdir / "prometheus.yml", static, targets, rule_files=rules)
    prometheus = Prometheus(binary, config, workdir, free_port())
    try:
        prometheus.wait_ready()
        yield {"prometheus": prometheus, "targets": targets, "cluster": slurm_cluster, "workdir": workdir}
    finally:
        prometheus.stop()


def submit(stack: dict[str, Any], *sbatch: str, epochs: int = 100000, after_requeue: int = 0) -> str:
    """A 2-task DDP job of slurm_train.py; returns its id."""
    workdir: Path = stack["workdir"]
    script = workdir / f"job-{time.monotonic_ns()}.sh"
    extra = f" --epochs-after-requeue {after_requeue}" if after_requeue else ""
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --nodes=1 --ntasks-per-node=2 --output={workdir}/slurm-%j.out --open-mode=append\n"
        f"srun {sys.executable} {SCRIPT} --targets-dir {stack['targets']} --epochs {epochs}{extra}\n"
    )
    env = {
        "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
        "PYTHONUNBUFFERED": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_PORT": str(free_port()),
        "OTEL_TRACES_EXPORTER": "none",
    }
    return stack["cluster"].sbatch([*sbatch, str(script)], env=env)


def job_log(stack: dict[str, Any], job: str) -> str:
    path = stack["workdir"] / f"slurm-{job}.out"
    return path.read_text(errors="replace")[-4000:] if path.exists() else "(no output yet)"


def wait_scraped(stack: dict[str, Any], job: str, restarts: str = "0") -> list[dict[str, Any]]:
    """Both ranks of the job's start ``restarts`` scraped after a first training step; their info series."""
    prometheus: Prometheus = stack["prometheus"]
    run = f"slurm-{job}"

    def both() -> Any:
        state = stack["cluster"].job(job).get("JobState")
        if state not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING"):
            raise AssertionError(f"job {job} is {state}:\n{job_log(stack, job)}")
        info = prometheus.query(f'dgdn_training_info{{run_id="{run}", slurm_restart_count="{restarts}"}}')
        stepped = prometheus.query(f'dgdn_last_step_timestamp_seconds{{run_id="{run}"}} > 0')
        # Scraped a few times, as any job is: an ending endpoint waits for the next scrape only when it has seen
        # regular ones.
        regular = prometheus.query(f'sum_over_time(up{{run_id="{run}"}}[20s]) >= 3')
        started = {s["metric"]["instance"] for s in stepped} & {s["metric"]["instance"] for s in regular}
        return info if len(info) == 2 and len(started) == 2 else None

    try:
        return wait_until(both, START_TIMEOUT_S, interval=0.5, what=f"both ranks of job {job} scraped")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{job_log(stack, job)}") from error


def quiet_since(prometheus: Prometheus, since: float) -> None:
    """Wait until every rule group was evaluated more than QUIET_S after ``since`` (Unix time)."""
    wait_until(
        lambda: rules_evaluated_after(prometheus.api("rules")["groups"], since + QUIET_S),
        QUIET_S + 60,
        what=f"the rules evaluated {QUIET_S:.0f} s after the moment checked",
    )


def alerts(prometheus: Prometheus, run: str) -> dict[str, list[dict[str, str]]]:
    """The run's alerts in Prometheus (pending or firing), by name."""
    found: dict[str, list[dict[str, str]]] = {}
    for series in prometheus.query(f'ALERTS{{run_id="{run}"}}'):
        found.setdefault(series["metric"]["alertname"], []).append(series["metric"])
    return found


def wait_firing(stack: dict[str, Any], job: str, alertname: str, timeout: float = 60) -> list[dict[str, str]]:
    run = f"slurm-{job}"

    def firing() -> Any:
        found = [a for a in alerts(stack["prometheus"], run).get(alertname, []) if a["alertstate"] == "firing"]
        return found if len(found) == 2 else None

    try:
        return wait_until(firing, timeout, interval=0.5, what=f"{alertname} on both ranks of {run}")
    except TimeoutError as error:
        seen = last_outcomes(stack["prometheus"], run)
        files = [p.name for p in stack["targets"].iterdir()]
        raise AssertionError(
            f"{error}; alerts: {alerts(stack['prometheus'], run)}; outcomes: {seen}; files: {files}\n"
            f"{job_log(stack, job)}"
        ) from error


def last_outcomes(prometheus: Prometheus, run: str) -> set[tuple[str, str, str, str]]:
    """(rank, outcome, exception, reason) of every outcome series of the run that was 1 in the last 10 minutes."""
    found = prometheus.query(f'max_over_time(dgdn_run_outcome{{run_id="{run}"}}[10m]) == 1')
    return {
        (s["metric"]["rank"], s["metric"]["outcome"], s["metric"].get("exception", ""), s["metric"].get("reason", ""))
        for s in found
    }


@pytest.fixture(scope="module")
def time_limited_job(stack) -> str:
    """Submitted before the other jobs: its limit runs out while they run."""
    return submit(stack, f"--time={TIME_LIMIT_MIN}")


# ------------------------------------------------------------------------------------------------ tests
def test_a_job_is_discovered_labelled_with_its_job_and_its_normal_end_is_quiet(stack, time_limited_job):
    prometheus, cluster = stack["prometheus"], stack["cluster"]
    epochs = 2  # 50 steps per epoch and rank, 0.2 s each: about 20 s of training
    job = submit(stack, epochs=epochs)
    run = f"slurm-{job}"
    info = wait_scraped(stack, job)

    # Both ranks, discovered from one node file, each labelled with the job as squeue/scontrol name it.
    assert sorted(s["metric"]["rank"] for s in info) == ["0", "1"]
    for series in info:
        labels = series["metric"]
        assert labels["slurm_job_id"] == job
        assert labels["slurm_partition"] == "debug"
        assert labels["slurm_nodelist"] == cluster.node
        assert labels["slurm_restart_count"] == "0"
        assert "slurm_array_job_id" not in labels
    files = list(stack["targets"].glob(f"*{run}*.json"))
    assert len(files) == 1, [p.name for p in stack["targets"].iterdir()]
    up = prometheus.query(f'up{{run_id="{run}"}} == 1')
    assert len(up) == 2 and len({s["metric"]["instance"] for s in up}) == 2

    fields = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=END_TIMEOUT_S)
    assert fields["JobState"] == "COMPLETED", job_log(stack, job)
    assert "finished run " + run in job_log(stack, job)

    # The last scrape of each rank read its outcome and its final counts: every graph of its shard, every epoch.
    wait_until(
        lambda: len(last_outcomes(prometheus, run) & {("0", "completed", "", ""), ("1", "completed", "", "")}) == 2,
        30,
        what=f"the completed outcome of {run}",
    )
    samples = prometheus.query(f'max by (rank) (max_over_time(dgdn_samples_processed_total{{run_id="{run}"}}[10m]))')
    assert {s["metric"]["rank"]: float(s["value"][1]) for s in samples} == {
        "0": GRAPHS_PER_RANK * epochs,
        "1": GRAPHS_PER_RANK * epochs,
    }
    assert not list(stack["targets"].glob(f"*{run}*.json")), "a normal end leaves no discovery file"
    wait_until(lambda: not prometheus.query(f'up{{run_id="{run}"}}'), 30, what="the run's targets gone")
    quiet_since(prometheus, time.time())
    assert alerts(prometheus, run) == {}


def test_scancel_raises_the_crash_alert(stack, time_limited_job):
    prometheus, cluster = stack["prometheus"], stack["cluster"]
    job = submit(stack)
    run = f"slurm-{job}"
    wait_scraped(stack, job)
    cluster.run("scancel", job)

    # Lightning stops gracefully on SIGTERM: the last scrape says terminated, reason cancelled. When its SIGTERM
    # handler's broadcast catches a rank inside another collective, the ranks hang until SLURM's SIGKILL
    # (KillWait later): the endpoints go silent while the discovery file stays, and DGDNRunDown pages instead.
    def paged() -> Any:
        found = alerts(prometheus, run)
        for name in ("DGDNRunTerminated", "DGDNRunDown"):
            firing = [a for a in found.get(name, []) if a["alertstate"] == "firing"]
            if len(firing) == 2:
                return name, firing
        return None

    name, firing = wait_until(paged, SIGNALLED_S, interval=0.5, what=f"a crash page for {run}")
    assert {a["severity"] for a in firing} == {"critical"}
    if name == "DGDNRunTerminated":
        assert {(a["rank"], a["reason"], a["exception"]) for a in firing} == {
            ("0", "cancelled", "SIGTERMException"),
            ("1", "cancelled", "SIGTERMException"),
        }
    assert cluster.wait_state(job, {"CANCELLED"}, timeout=SIGNALLED_S)["JobState"] == "CANCELLED"
    quiet_since(prometheus, time.time())
    found = alerts(prometheus, run)
    assert set(found) == {name}, found  # never taken for a time limit


def test_a_requeued_job_continues_as_the_same_run_and_stays_quiet(stack, time_limited_job):
    prometheus, cluster = stack["prometheus"], stack["cluster"]
    job = submit(stack, "--requeue", after_requeue=2)
    run = f"slurm-{job}"
    wait_scraped(stack, job)
    cluster.run("scontrol", "requeue", job)
    cluster.wait_state(job, {"PENDING"}, timeout=SIGNALLED_S)
    # SLURM holds a requeued job back for a while (Reason=BeginTime); let it start now.
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    second = wait_scraped(stack, job, restarts="1")  # the same run id, its restart count one higher
    assert {s["metric"]["slurm_job_id"] for s in second} == {job}
    requeued = {(rank, "terminated", "SIGTERMException", "requeued") for rank in ("0", "1")}
    assert requeued <= last_outcomes(prometheus, run)
    fields = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=END_TIMEOUT_S)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", job_log(stack, job)
    wait_until(lambda: ("0", "completed", "", "") in last_outcomes(prometheus, run), 30, what="the restart's end")
    quiet_since(prometheus, time.time())
    assert alerts(prometheus, run) == {}  # neither the requeue nor the restart's end raised anything


def test_a_time_limit_gives_its_own_outcome_told_apart_from_a_crash(stack, time_limited_job):
    prometheus, cluster = stack["prometheus"], stack["cluster"]
    job, run = time_limited_job, f"slurm-{time_limited_job}"
    # Submitted first, it may have ended already while the other tests ran.
    # SLURM checks limits about every 30 s: the SIGTERM comes up to 30 s after the limit. (A DGDNRunDown here means
    # Lightning's SIGTERM handling hung until SIGKILL: see test_scancel_raises_the_crash_alert.)
    firing = wait_firing(stack, job, "DGDNRunTimeLimit", timeout=TIME_LIMIT_MIN * 60 + 30 + START_TIMEOUT_S)
    assert {(a["rank"], a["severity"], a["reason"]) for a in firing} == {
        ("0", "warning", "time_limit"),
        ("1", "warning", "time_limit"),
    }
    assert cluster.wait_state(job, {"TIMEOUT"}, timeout=SIGNALLED_S)["JobState"] == "TIMEOUT"
    info = prometheus.query(f'max_over_time(dgdn_training_info{{run_id="{run}"}}[10m])')
    assert {(s["metric"]["rank"], s["metric"]["slurm_job_id"]) for s in info} == {("0", job), ("1", job)}
    quiet_since(prometheus, time.time())
    found = alerts(prometheus, run)
    assert set(found) == {"DGDNRunTimeLimit"}, found
