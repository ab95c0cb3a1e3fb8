"""Which scheduler runs this process, and how it ended the run: SLURM and Kubernetes (Kubeflow).

Everything here reads the environment the scheduler gives the process; nothing is read on the training step.

* :func:`identity` names the job the way ``squeue``/``sacct`` or ``kubectl`` do. Its attributes are the
  resource attributes of the run's spans and, with dots turned into underscores (:func:`info_labels`), labels of
  ``<namespace>_training_info``, so an alert can be mapped to ``scontrol show job <slurm_job_id>`` or
  ``kubectl -n <k8s_namespace_name> logs <k8s_pod_name>``.
* :func:`scheduler_run_id` is the run id the callback takes when none is given: the SLURM job (``slurm-<job>``,
  ``slurm-<array job>_<task>``) or the Kubeflow job (``<namespace>-<job>``). A requeued SLURM job keeps its id,
  so it continues as the same run.
* :func:`slurm_end` says, once at the end of a run ended by SIGTERM, why SLURM sent it: the time limit, a
  requeue (``scontrol requeue``, preemption in requeue mode), or a cancellation (``scancel``, preemption in cancel
  mode). :func:`termination_reason` gives it to ``<namespace>_run_outcome{outcome="terminated"}`` as its
  ``reason`` label.
* :func:`check_launch` warns, once at set-up, when a launcher started several training processes (torchrun, SLURM's
  ``srun``, the Kubeflow training operator's ``PyTorchJob``) but Lightning did not join them into one run: its
  cluster environment was not detected (Lightning never detects ``KubeflowEnvironment`` by itself; an ``srun`` in
  an allocation named ``bash`` or ``interactive`` is not taken for SLURM), so every process trains alone or as
  rank 0. The warning names the plugin to pass.

SLURM (from the variables ``sbatch``/``srun`` set in every task):

=========================  ===============================  ====================================
attribute                  variable                         example
=========================  ===============================  ====================================
``slurm.job.id``           ``SLURM_JOB_ID``                 ``81723``
``slurm.array.job.id``     ``SLURM_ARRAY_JOB_ID``           ``81700`` (array jobs only)
``slurm.array.task.id``    ``SLURM_ARRAY_TASK_ID``          ``23`` (array jobs only)
``slurm.restart.count``    ``SLURM_RESTART_COUNT``          ``0``, then 1, 2 after requeues
``slurm.partition``        ``SLURM_JOB_PARTITION``          ``gpu``
``slurm.nodelist``         ``SLURM_JOB_NODELIST``           ``gpu[001-004]``
=========================  ===============================  ====================================

Kubernetes (detected by ``KUBERNETES_SERVICE_HOST``, which the kubelet sets in every container). Kubernetes
puts no pod name or namespace into the environment by itself: the manifests in ``deploy/kubernetes/`` pass them
with the downward API, and the job name and replica index from the pod labels the Kubeflow operators set:

=============================  ==========================================================================
attribute                      variable (downward API), then fall-back
=============================  ==========================================================================
``k8s.namespace.name``         ``POD_NAMESPACE`` (``metadata.namespace``), then the service account's
                               namespace file
``k8s.pod.name``               ``POD_NAME`` (``metadata.name``), then ``HOSTNAME`` (a pod's host name is
                               its name)
``kubeflow.job.name``          ``KUBEFLOW_JOB_NAME`` (label ``jobset.sigs.k8s.io/jobset-name`` of a
                               Kubeflow Trainer ``TrainJob``, ``training.kubeflow.org/job-name`` of a
                               ``PyTorchJob``)
``kubeflow.replica.index``     ``KUBEFLOW_REPLICA_INDEX`` (label ``training.kubeflow.org/replica-index``),
                               then ``JOB_COMPLETION_INDEX`` (set by Kubernetes in the pods of an indexed
                               Job, which a ``TrainJob`` runs), then ``PET_NODE_RANK``
=============================  ==========================================================================

Outside both, every function returns nothing.

Example::

    from dgdn_lightning_monitor.scheduler import identity, info_labels

    identity()      # {'slurm.job.id': '81723', 'slurm.restart.count': '0', 'slurm.partition': 'gpu', ...}
    info_labels()   # {'slurm_job_id': '81723', 'slurm_restart_count': '0', ...}
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: How long the one ``scontrol`` call at the end of a run may take (SLURM's KillWait is 30 s by default).
SCONTROL_TIMEOUT_S = 3.0

_SLURM = (
    ("slurm.job.id", "SLURM_JOB_ID"),
    ("slurm.array.job.id", "SLURM_ARRAY_JOB_ID"),
    ("slurm.array.task.id", "SLURM_ARRAY_TASK_ID"),
    ("slurm.restart.count", "SLURM_RESTART_COUNT"),
    ("slurm.partition", "SLURM_JOB_PARTITION"),
    ("slurm.nodelist", "SLURM_JOB_NODELIST"),
)
#: Job names of interactive allocations (as Lightning's SLURMEnvironment treats them).
_INTERACTIVE = ("bash", "interactive")
_LABEL = re.compile(r"[^A-Za-z0-9_]")

#: Who starts the training processes, in Lightning's order of precedence (torchrun inside a SLURM job or a pod wins):
#: (name, variables that say it started this process, variable with the number of processes, variable with this
#: process's rank, Lightning's cluster environment that reads them). The Kubeflow training operator sets WORLD_SIZE
#: and RANK (and MASTER_ADDR, MASTER_PORT, PET_NNODES, PET_NODE_RANK) in every container of a PyTorchJob; srun sets
#: SLURM_STEP_ID in its tasks, not in the batch script.
_LAUNCHERS = (
    ("torchrun", ("TORCHELASTIC_RUN_ID",), "WORLD_SIZE", "RANK", "TorchElasticEnvironment"),
    ("SLURM's srun", ("SLURM_STEP_ID",), "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURMEnvironment"),
    ("Kubeflow's PyTorchJob", ("KUBERNETES_SERVICE_HOST", "MASTER_ADDR"), "WORLD_SIZE", "RANK", "KubeflowEnvironment"),
)

#: Why SLURM ended a run (the ``reason`` :func:`slurm_end` returns).
TIME_LIMIT, REQUEUED, CANCELLED = "time_limit", "requeued", "cancelled"


def _env(environ: Optional[Mapping[str, str]]) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def identity(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The scheduler's names for this process (see the module docstring); empty outside SLURM and Kubernetes.

    Args:
        environ: the environment to read; ``os.environ`` by default.
    """
    env = _env(environ)
    if env.get("SLURM_JOB_ID"):
        found = {attribute: env[name] for attribute, name in _SLURM if env.get(name)}
        found.setdefault("slurm.restart.count", "0")  # SLURM sets it only once a job was requeued
        return found
    if env.get("KUBERNETES_SERVICE_HOST"):
        namespace = env.get("POD_NAMESPACE")
        if not namespace:
            try:
                namespace = _SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip()
            except OSError:
                namespace = None
        index = env.get("KUBEFLOW_REPLICA_INDEX") or env.get("JOB_COMPLETION_INDEX") or env.get("PET_NODE_RANK")
        named: dict[str, Optional[str]] = {
            "k8s.namespace.name": namespace,
            "k8s.pod.name": env.get("POD_NAME") or env.get("HOSTNAME"),
            "kubeflow.job.name": env.get("KUBEFLOW_JOB_NAME"),
            "kubeflow.replica.index": index,
        }
        return {attribute: value for attribute, value in named.items() if value}
    return {}


def info_labels(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """:func:`identity` as Prometheus label names (``slurm.job.id`` -> ``slurm_job_id``)."""
    return {_LABEL.sub("_", attribute): value for attribute, value in identity(environ).items()}


def scheduler_run_id(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The run id a scheduler's job gives: the same for every rank and across requeues of the job.

    ``slurm-<job id>`` (``slurm-<array job id>_<task id>`` in an array) in a batch job (not in an interactive
    ``salloc``/``srun --pty bash``), ``<namespace>-<Kubeflow job>`` on Kubernetes when the job name is known,
    else ``None`` (the callback then draws a random id). Several trainings in one job share it: pass ``run_id``
    to tell them apart.

    Example::

        scheduler_run_id({"SLURM_JOB_ID": "81723"})  # 'slurm-81723'
    """
    env = _env(environ)
    if env.get("SLURM_JOB_ID"):
        if env.get("SLURM_JOB_NAME") in _INTERACTIVE:
            return None  # an salloc/srun --pty shell runs one training after another: each is its own run
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        return f"slurm-{env['SLURM_JOB_ID']}"
    found = identity(env)
    if "kubeflow.job.name" in found:
        return "-".join(part for part in (found.get("k8s.namespace.name"), found["kubeflow.job.name"]) if part)
    return None


def check_launch(
    world_size: int, global_rank: int, warn: Callable[..., object], environ: Optional[Mapping[str, str]] = None
) -> Optional[str]:
    """Warn when a launcher started several processes but Lightning does not run this one as their rank.

    Lightning is fine when its world size is above 1 and its global rank is the launcher's rank for this process.
    Otherwise (world size 1: the process trains alone; another rank: Lightning's own environment, which reads
    ``NODE_RANK``, made every process rank 0) the processes do not form one run, and this says which cluster
    environment to pass.

    Args:
        world_size: ``trainer.world_size``.
        global_rank: ``trainer.global_rank``.
        warn: called as ``warn("launch", "%s", message)`` (a :class:`~dgdn_lightning_monitor.guards.WarnOnce`).
        environ: the environment to read; ``os.environ`` by default.

    Returns:
        The warning, or ``None`` when no launcher started several processes or Lightning joined them.

    Example::

        # in a PyTorchJob's worker pod (WORLD_SIZE=2, RANK=1) trained without KubeflowEnvironment
        check_launch(trainer.world_size, trainer.global_rank, warn)
        # warns: "Kubeflow's PyTorchJob started 2 training processes (WORLD_SIZE=2, RANK=1) but Lightning runs
        # this one as rank 0 of 1 ... pass --trainer.plugins=lightning.pytorch.plugins.environments.KubeflowEnvironment"
    """
    env = _env(environ)
    found = next((launcher for launcher in _LAUNCHERS if all(env.get(name) for name in launcher[1])), None)
    if found is None:
        return None
    launcher, _, count, rank, plugin = found
    try:
        processes, own_rank = int(env[count]), int(env[rank])
    except (KeyError, ValueError):
        return None
    if processes <= 1 or (world_size > 1 and global_rank == own_rank):
        return None
    message = (
        f"{launcher} started {processes} training processes ({count}={processes}, {rank}={own_rank}) but Lightning "
        f"runs this one as rank {global_rank} of {world_size}, so they do not train as one run: use Lightning's "
        f"{plugin} (--trainer.plugins=lightning.pytorch.plugins.environments.{plugin}, or "
        f"Trainer(plugins=[{plugin}()])) with devices x num_nodes = {processes}"
    )
    warn("launch", "%s", message)
    return message


def _seconds(duration: str) -> Optional[int]:
    """SLURM's ``[days-]hours:minutes:seconds`` (or ``minutes:seconds``) in seconds; ``None`` for UNLIMITED."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", duration.strip())
    if not match:
        return None
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def classify_slurm_job(job: Mapping[str, str], restart_count: int) -> str:
    """Why SLURM signalled a job, from its ``scontrol show job`` fields read while it ends.

    Args:
        job: ``JobState``, ``Restarts``, ``RunTime`` and ``TimeLimit`` of the job.
        restart_count: this process's ``SLURM_RESTART_COUNT`` (0 when unset).

    Returns:
        :data:`REQUEUED` when the controller already counts one more restart than this process was started
        with (``scontrol requeue``, preemption in requeue mode, Lightning's auto-requeue); :data:`TIME_LIMIT`
        when the job's run time reached its limit; otherwise :data:`CANCELLED` (``scancel``, preemption in
        cancel mode, an administrator).
    """
    try:
        if int(job.get("Restarts", "0")) > restart_count:
            return REQUEUED
    except ValueError:
        pass
    limit, elapsed = _seconds(job.get("TimeLimit", "")), _seconds(job.get("RunTime", ""))
    if job.get("JobState") == "TIMEOUT" or (limit is not None and elapsed is not None and elapsed >= limit):
        return TIME_LIMIT
    return CANCELLED


def slurm_end(environ: Optional[Mapping[str, str]] = None, timeout_s: float = SCONTROL_TIMEOUT_S) -> Optional[str]:
    """Why SLURM is ending this job (see :func:`classify_slurm_job`); ``None`` outside SLURM or when
    ``scontrol`` cannot tell. Runs ``scontrol show job`` once: call it only at the end of a run that received
    SIGTERM.

    Example::

        if trainer.received_sigterm:
            reason = slurm_end()   # 'time_limit', 'requeued' or 'cancelled'
    """
    env = _env(environ)
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return None
    # SLURM signals every process of the job step, a child started now included: the shell makes scontrol ignore
    # SIGTERM (an ignored signal stays ignored across exec), and a call killed all the same is tried once more.
    command = ["sh", "-c", 'trap "" TERM; exec "$@"', "sh", "scontrol", "show", "job", "--oneliner", job_id]
    result: Optional[subprocess.CompletedProcess[str]] = None
    for _ in range(2):
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_s, env=dict(env), check=False
            )
        except (OSError, subprocess.SubprocessError) as error:
            log.warning("Could not ask SLURM why job %s ends (%s)", job_id, error)
            return None
        if result.returncode >= 0:
            break
    if result is None or result.returncode != 0:
        detail = (result.stderr.strip() or f"exit status {result.returncode}") if result is not None else "no answer"
        log.warning("Could not ask SLURM why job %s ends: %s", job_id, detail)
        return None
    fields: dict[str, str] = {}
    for token in result.stdout.split():
        key, _, value = token.partition("=")
        fields.setdefault(key, value)
    try:
        restart_count = int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restart_count = 0
    return classify_slurm_job(fields, restart_count)


def termination_reason(outcome: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """The ``reason`` label of a run's outcome: why SLURM ended a ``terminated`` run (:func:`slurm_end`), else
    ``""``. Asks the controller only for a terminated run under SLURM, once, at its end.

    Example::

        termination_reason("terminated")   # 'time_limit' in a SLURM job that reached its --time
        termination_reason("completed")    # ''
    """
    if outcome != "terminated":
        return ""
    return slurm_end(environ) or ""
