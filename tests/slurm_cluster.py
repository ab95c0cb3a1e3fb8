"""A real single-node SLURM cluster for the tests: ``munged``, ``slurmctld`` and ``slurmd`` from Debian's
``munge`` and ``slurm-wlm``, started as root with every file (configuration, munge key and socket, state, spool,
logs) in temporary directories and on free ports, so nothing of the machine's own SLURM set-up is used or touched.

Any user of the machine can submit jobs, as on a real cluster: what every user reads (``slurm.conf``, munge's
socket, slurmd's spool, where job scripts run from) is in a directory of its own that everyone may enter
(``shared``); the munge key, state and logs stay in ``workdir``. The node offers at least ``MIN_CPUS`` CPUs
(``SlurmdParameters=config_overrides`` lets it offer more than ``slurmd -C`` counts, so that two 2-task jobs run
at once on a small machine); ``proctrack/linuxproc`` and ``task/none`` need no cgroups; ``KillWait`` is SLURM's
default 30 s, which a signalled job's callback needs on a loaded machine too.

Example::

    with SlurmCluster(tmp_path) as cluster:
        job = cluster.sbatch(["--ntasks=2", "job.sh"])
        cluster.wait_state(job, {"COMPLETED"})
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

#: Commands every test of the cluster needs.
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
#: Seconds from SIGTERM to SIGKILL, SLURM's default: the callback's end (Lightning's stop, ``scontrol``, a last
#: scrape) within it even on a loaded machine. It costs time only when a job's processes do not end by themselves.
KILL_WAIT_S = 30
MIN_CPUS = 4
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_cpus() -> int:
    """CPUs of this machine as slurmd counts them (a node configured with more is marked invalid)."""
    output = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"\bCPUs=(\d+)", output)
    return int(match.group(1)) if match else max(1, os.cpu_count() or 1)


class SlurmCluster:
    """A cluster of one node (this machine) named after ``socket.gethostname()``, partition ``debug``.

    Args:
        workdir: an empty directory for every file of the cluster.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.shared = Path(tempfile.mkdtemp(prefix="dgdn-slurm-"))
        self.shared.chmod(0o755)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = max(MIN_CPUS, node_cpus())
        self.conf = self.shared / "slurm.conf"
        self.munge_socket = self.shared / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for name in [key for key in self.env if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SQUEUE_"))]:
            if name != "SLURM_CONF":
                del self.env[name]
        self._daemons: list[tuple[subprocess.Popen, object]] = []

    # ------------------------------------------------------------------ life
    def start(self) -> SlurmCluster:
        munge = self.workdir / "munge"  # the key, pid, seed and log: root's alone
        for directory in (munge, self.munge_socket.parent, self.workdir / "state", self.shared / "spool"):
            directory.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o700)
        self.munge_socket.parent.chmod(0o755)
        key = munge / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True, timeout=30)
        key.chmod(0o600)
        self.conf.write_text(self._config(), encoding="utf-8")
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--seed-file={munge / 'munged.seed'}",
                f"--log-file={munge / 'munged.log'}",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_idle, "the node to be idle in sinfo")
        return self

    def stop(self) -> None:
        """Cancel every job of every user and wait for them to end, then stop the daemons this object started
        (killed if they do not stop)."""
        if self._daemons and all(process.poll() is None for process, _ in self._daemons):
            subprocess.run(["scancel", "--partition=debug"], env=self.env, capture_output=True, timeout=30)
            try:
                self._wait(self._no_jobs, "every job to end after scancel", KILL_WAIT_S + 60)
            except (TimeoutError, subprocess.TimeoutExpired):
                pass  # the daemons are stopped all the same
        for process, log in reversed(self._daemons):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)
            log.close()  # type: ignore[attr-defined]
        self._daemons = []
        shutil.rmtree(self.shared, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ commands
    def run(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        """A SLURM command against this cluster; its stdout."""
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}{self.logs()}")
        return result.stdout

    def sbatch(self, args: list[str], env: Optional[dict[str, str]] = None) -> str:
        """Submit a batch job; returns its id."""
        result = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=30,
            cwd=self.workdir,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr}{self.logs()}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the controller forgot the job)."""
        result = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", job_id], env=self.env, capture_output=True, text=True, timeout=30
        )
        fields: dict[str, str] = {}
        for token in result.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120) -> dict[str, str]:
        """Wait until the job's JobState is one of ``states``; returns its fields."""
        seen: dict[str, str] = {}

        def reached() -> bool:
            seen.update(self.job(job_id))
            return seen.get("JobState") in states

        self._wait(reached, f"job {job_id} in {sorted(states)} (last {seen.get('JobState')})", timeout)
        return seen

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(f"\n--- {name}\n" + path.read_text(errors="replace")[-3000:])
        return "".join(parts)

    # ------------------------------------------------------------------ helpers
    def _config(self) -> str:
        w = self.workdir
        return "\n".join(
            [
                "ClusterName=dgdntest",
                f"SlurmctldHost={self.node}(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={self.munge_socket}",
                f"StateSaveLocation={w / 'state'}",
                f"SlurmdSpoolDir={self.shared / 'spool'}",
                f"SlurmctldPidFile={w / 'slurmctld.pid'}",
                f"SlurmdPidFile={w / 'slurmd.pid'}",
                f"SlurmctldLogFile={w / 'slurmctld.log'}",
                f"SlurmdLogFile={w / 'slurmd.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "MpiDefault=none",
                "SwitchType=switch/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "SchedulerType=sched/builtin",
                "ReturnToService=2",
                "SlurmdParameters=config_overrides",
                f"KillWait={KILL_WAIT_S}",
                "JobRequeue=1",
                "MinJobAge=600",
                f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1 State=UNKNOWN",
                f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.out", "wb")  # noqa: SIM115 - closed in stop()
        process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._daemons.append((process, log))

    def _no_jobs(self) -> bool:
        result = subprocess.run(
            ["squeue", "--noheader", "--format=%i"], env=self.env, capture_output=True, text=True, timeout=30
        )
        return result.returncode == 0 and not result.stdout.strip()

    def _node_idle(self) -> bool:
        for process, _ in self._daemons:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited with {process.returncode}{self.logs()}")
        result = subprocess.run(
            ["sinfo", "--noheader", "--node", self.node, "--format=%T"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def _wait(self, predicate, what: str, timeout: float = START_TIMEOUT_S) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{self.logs()}")
            time.sleep(0.2)


def rules_evaluated_after(groups: list[dict], when: float) -> bool:
    """Whether every rule group of Prometheus' ``/api/v1/rules`` answer was evaluated after ``when`` (Unix time):
    the SLURM tests' "nothing fired" checks wait on it rather than on a fixed sleep."""

    def seconds(stamp: str) -> float:  # RFC 3339 with nanoseconds, which datetime reads only from Python 3.11
        match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", stamp)
        if match is None:
            return 0.0
        base, fraction, zone = match.groups()
        moment = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone))
        return moment.timestamp() + float(fraction or 0)

    return bool(groups) and all(seconds(group.get("lastEvaluation", "")) > when for group in groups)
