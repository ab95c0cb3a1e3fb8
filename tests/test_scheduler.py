"""Scheduler identity and end classification (dgdn_lightning_monitor.scheduler), and how a real Lightning run
carries them: labels of dgdn_training_info, resource attributes of the spans a real OTLP receiver gets, and the
default run id. The same, under a real SLURM cluster, is in tests/test_slurm.py."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubeflow_operator import container_env
from lightning.pytorch import Callback
from lit_models import GraphClassifier, graph_loaders, quiet_trainer
from otlp_receiver import OTLPReceiver
from prometheus_client.parser import text_string_to_metric_families

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.scheduler import (
    CANCELLED,
    REQUEUED,
    TIME_LIMIT,
    check_launch,
    classify_slurm_job,
    identity,
    info_labels,
    scheduler_run_id,
    slurm_end,
    termination_reason,
)

#: What sbatch + srun set in a task of an array job that was requeued twice (copied from a real task's env).
SLURM_ARRAY = {
    "SLURM_JOB_ID": "4711",
    "SLURM_ARRAY_JOB_ID": "4700",
    "SLURM_ARRAY_TASK_ID": "11",
    "SLURM_RESTART_COUNT": "2",
    "SLURM_JOB_PARTITION": "gpu",
    "SLURM_JOB_NODELIST": "gpu[001-004]",
    "SLURM_JOB_NAME": "train.sh",
    "SLURM_PROCID": "3",
}
KUBEFLOW = {
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "POD_NAMESPACE": "ml",
    "POD_NAME": "gnn-node-0-1-x7k2p",
    "HOSTNAME": "gnn-node-0-1-x7k2p",
    "KUBEFLOW_JOB_NAME": "gnn",
    "JOB_COMPLETION_INDEX": "1",
}


def test_slurm_identity_names_the_job_array_task_restarts_partition_and_nodes():
    assert identity(SLURM_ARRAY) == {
        "slurm.job.id": "4711",
        "slurm.array.job.id": "4700",
        "slurm.array.task.id": "11",
        "slurm.restart.count": "2",
        "slurm.partition": "gpu",
        "slurm.nodelist": "gpu[001-004]",
    }
    assert info_labels(SLURM_ARRAY)["slurm_array_task_id"] == "11"
    plain = {"SLURM_JOB_ID": "12", "SLURM_JOB_PARTITION": "debug", "SLURM_JOB_NAME": "job.sh"}
    # SLURM sets SLURM_RESTART_COUNT only after a requeue; a first start says 0.
    assert info_labels(plain) == {"slurm_job_id": "12", "slurm_restart_count": "0", "slurm_partition": "debug"}


def test_kubernetes_identity_from_the_downward_api_and_the_indexed_job():
    assert info_labels(KUBEFLOW) == {
        "k8s_namespace_name": "ml",
        "k8s_pod_name": "gnn-node-0-1-x7k2p",
        "kubeflow_job_name": "gnn",
        "kubeflow_replica_index": "1",
    }
    # Without the downward API variables: the pod's host name; the replica index from PyTorchJob's label wins.
    bare = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "HOSTNAME": "p-0", "KUBEFLOW_REPLICA_INDEX": "3",
            "JOB_COMPLETION_INDEX": "9"}
    labels = info_labels(bare)
    assert labels["k8s_pod_name"] == "p-0" and labels["kubeflow_replica_index"] == "3"


def test_nothing_outside_a_scheduler():
    assert identity({"HOME": "/root", "HOSTNAME": "laptop"}) == {}
    assert scheduler_run_id({"HOSTNAME": "laptop"}) is None
    assert slurm_end({"HOSTNAME": "laptop"}) is None


def test_run_id_follows_the_job_not_the_restart():
    assert scheduler_run_id(SLURM_ARRAY) == "slurm-4700_11"
    requeued = {**SLURM_ARRAY, "SLURM_RESTART_COUNT": "3"}
    assert scheduler_run_id(requeued) == scheduler_run_id(SLURM_ARRAY)
    assert scheduler_run_id({"SLURM_JOB_ID": "12", "SLURM_JOB_NAME": "job.sh"}) == "slurm-12"
    # An interactive allocation runs one training after another: no shared id.
    assert scheduler_run_id({"SLURM_JOB_ID": "12", "SLURM_JOB_NAME": "bash"}) is None
    assert scheduler_run_id(KUBEFLOW) == "ml-gnn"
    assert scheduler_run_id({"KUBERNETES_SERVICE_HOST": "x", "POD_NAME": "p"}) is None


@pytest.mark.parametrize(
    ("fields", "restarts", "expected"),
    [
        # Fields as `scontrol show job` printed them from inside real jobs while they received SIGTERM.
        ({"JobState": "COMPLETING", "Restarts": "0", "RunTime": "00:00:01", "TimeLimit": "00:10:00"}, 0, CANCELLED),
        ({"JobState": "COMPLETING", "Restarts": "1", "RunTime": "00:00:00", "TimeLimit": "00:10:00"}, 0, REQUEUED),
        ({"JobState": "COMPLETING", "Restarts": "2", "RunTime": "00:04:00", "TimeLimit": "00:10:00"}, 1, REQUEUED),
        ({"JobState": "COMPLETING", "Restarts": "1", "RunTime": "00:01:12", "TimeLimit": "00:01:00"}, 1, TIME_LIMIT),
        ({"JobState": "TIMEOUT", "Restarts": "0", "RunTime": "00:00:59", "TimeLimit": "00:01:00"}, 0, TIME_LIMIT),
        ({"JobState": "RUNNING", "Restarts": "0", "RunTime": "1-02:00:00", "TimeLimit": "1-02:00:00"}, 0, TIME_LIMIT),
        ({"JobState": "COMPLETING", "Restarts": "0", "RunTime": "5-00:00:00", "TimeLimit": "UNLIMITED"}, 0, CANCELLED),
    ],
)
def test_why_slurm_ended_a_job(fields, restarts, expected):
    assert classify_slurm_job(fields, restarts) == expected


def test_the_scheduler_is_asked_only_about_a_terminated_run(tmp_path):
    # An scontrol that records its calls stands first in the job's PATH: it must not run for other outcomes (the
    # real scontrol's answers are in tests/test_slurm.py).
    calls = tmp_path / "calls"
    fake = tmp_path / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                    "echo JobId=12 JobState=COMPLETING Restarts=0 RunTime=00:02:00 TimeLimit=00:02:00\n")
    fake.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "12", "PATH": f"{tmp_path}:/usr/bin:/bin"}
    for outcome in ("running", "completed", "failed", "interrupted"):
        assert termination_reason(outcome, slurm) == ""
    assert not calls.exists()
    assert termination_reason("terminated", slurm) == TIME_LIMIT
    assert calls.read_text().split() == ["show", "job", "--oneliner", "12"]
    assert termination_reason("terminated", {"HOSTNAME": "laptop"}) == ""


def test_a_real_run_labels_its_info_series_and_spans_with_the_job_and_takes_its_run_id(monkeypatch):
    for name, value in SLURM_ARRAY.items():
        monkeypatch.setenv(name, value)
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    seen = {}

    class Scrape(Callback):
        def on_train_end(self, trainer, pl_module):
            monitor = next(cb for cb in trainer.callbacks if isinstance(cb, MonitoringCallback))
            with urllib.request.urlopen(monitor.metrics_url, timeout=10) as response:  # noqa: S310 - loopback
                seen["text"] = response.read().decode()

    with OTLPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
        callback = MonitoringCallback(port=0, addr="127.0.0.1", trace_every_n_steps=5, gpu_devices=None)
        assert callback.run_id == "slurm-4700_11"
        train, val, *_ = graph_loaders()
        quiet_trainer(max_epochs=1, callbacks=[callback, Scrape()]).fit(GraphClassifier(), train, val)
        spans = receiver.spans
    info = next(
        sample.labels
        for family in text_string_to_metric_families(seen["text"])
        for sample in family.samples
        if sample.name == "dgdn_training_info"
    )
    assert info["run_id"] == "slurm-4700_11"
    assert {k: v for k, v in info.items() if k.startswith("slurm_")} == info_labels(SLURM_ARRAY)
    resource = next(s for s in spans if s.name == "train_epoch").resource
    assert resource["training.run_id"] == "slurm-4700_11"
    assert {k: v for k, v in resource.items() if k.startswith("slurm.")} == identity(SLURM_ARRAY)


# ---------------------------------------------------------------------------------------- check_launch
EXAMPLE_JOB = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "example" / "pytorchjob.yaml"
#: What srun sets in task 1 of `srun --ntasks=2` inside an allocation named "interactive" (copied from a real task's
#: environment; host-specific values left out). Lightning does not take such a job for SLURM.
SRUN_TASK = {
    "SLURM_JOB_ID": "2", "SLURM_JOB_NAME": "interactive", "SLURM_JOB_PARTITION": "debug", "SLURM_JOB_NODELIST": "vm",
    "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1", "SLURM_GTIDS": "0,1", "SLURM_TASKS_PER_NODE": "2", "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2",
}
#: The batch script of the same job (`sbatch --ntasks=2`): one process, no step.
SLURM_BATCH = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")} | {
    "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


def said(world_size: int, global_rank: int, environ: dict[str, str]) -> list[str]:
    """What check_launch warns for a process Lightning runs as ``global_rank`` of ``world_size``."""
    warnings: list[str] = []
    returned = check_launch(world_size, global_rank, lambda kind, fmt, *args: warnings.append(fmt % args), environ)
    assert warnings == ([returned] if returned else [])
    return warnings


def pytorchjob_pods() -> dict[str, dict[str, str]]:
    """The environment of the example job's two pods, as the training operator and Kubernetes give it."""
    job = yaml.safe_load(EXAMPLE_JOB.read_text(encoding="utf-8"))
    return {f"gnn-{kind.lower()}-0": container_env(job, kind, 0, "ml") for kind in ("Master", "Worker")}


def test_the_operator_environment_of_the_example_job():
    pods = pytorchjob_pods()
    for name, rank in (("gnn-master-0", "0"), ("gnn-worker-0", "1")):
        operator = {k: v for k, v in pods[name].items() if k in (
            "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "PET_NODE_RANK", "PET_NNODES", "PET_NPROC_PER_NODE")}
        assert operator == {"MASTER_ADDR": "gnn-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": rank,
                            "PET_NODE_RANK": rank, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "auto"}


def test_a_pytorchjob_trained_without_kubeflow_environment_is_told_which_plugin_to_pass():
    pods = pytorchjob_pods()
    # Lightning's fall-back environment: each pod trains alone (num_nodes 1) ...
    for env in pods.values():
        (message,) = said(1, 0, env)
        assert message.startswith("Kubeflow's PyTorchJob started 2 training processes (WORLD_SIZE=2, RANK="), message
        assert "--trainer.plugins=lightning.pytorch.plugins.environments.KubeflowEnvironment" in message
        assert "\n" not in message
    # ... or, with num_nodes 2, every pod is rank 0 (it reads NODE_RANK, which the operator does not set): the
    # worker says so, should its rendezvous ever complete.
    (message,) = said(2, 0, pods["gnn-worker-0"])
    assert "(WORLD_SIZE=2, RANK=1) but Lightning runs this one as rank 0 of 2" in message
    # With KubeflowEnvironment: rank RANK of 2, nothing to say.
    for env in pods.values():
        assert said(2, int(env["RANK"]), env) == []


def test_srun_tasks_lightning_does_not_take_for_slurm_are_told_to_pass_slurm_environment():
    (message,) = said(1, 0, SRUN_TASK)
    assert message.startswith("SLURM's srun started 2 training processes (SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=1)")
    assert "lightning.pytorch.plugins.environments.SLURMEnvironment" in message
    assert said(2, 1, SRUN_TASK) == []  # SLURMEnvironment: rank SLURM_PROCID
    assert said(1, 0, SLURM_BATCH) == []  # the batch script is one process, whatever --ntasks says


def test_torchrun_processes_trained_alone_are_told_of_torch_elastic_environment(tmp_path):
    """The environments a real torchrun gives its two workers."""
    dump = "import json, os, sys; open(f'{sys.argv[1]}/{os.environ[\"RANK\"]}', 'w').write(json.dumps({**os.environ}))"
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_", "KUBERNETES_"))
             and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    "--no-python", sys.executable, "-c", dump, str(tmp_path)],
                   env=clean, check=True, timeout=120, capture_output=True)
    workers = [json.loads((tmp_path / rank).read_text()) for rank in ("0", "1")]
    for rank, env in enumerate(workers):
        (message,) = said(1, 0, env)
        assert message.startswith(f"torchrun started 2 training processes (WORLD_SIZE=2, RANK={rank})"), message
        assert "TorchElasticEnvironment" in message
        assert said(2, rank, env) == []  # Lightning detects TorchElasticEnvironment itself


def test_nothing_to_say_on_a_laptop_or_in_a_one_process_job():
    laptop = {"HOME": "/home/me", "HOSTNAME": "laptop", "PATH": "/usr/bin"}
    for world_size, rank in ((1, 0), (2, 0), (2, 1)):
        assert said(world_size, rank, laptop) == []
    master = pytorchjob_pods()["gnn-master-0"]
    one_pod = {**master, "WORLD_SIZE": "1", "PET_NNODES": "1"}  # a PyTorchJob with only a Master
    assert said(1, 0, one_pod) == []
    # Lightning's own launcher in one pod (devices=4 of a one-replica job): its ranks are its own.
    assert said(4, 3, one_pod) == []


def test_a_real_run_in_a_pytorchjob_pod_without_the_plugin_warns_once(monkeypatch, caplog):
    """A real Trainer in gnn-worker-0's environment, without KubeflowEnvironment and with num_nodes 1: Lightning
    trains it alone; the callback says so in one line, once, also when the Trainer is set up again."""
    for name in [n for n in os.environ if n.startswith(("SLURM_", "TORCHELASTIC_", "PET_", "OTEL_"))]:
        monkeypatch.delenv(name)
    for name, value in pytorchjob_pods()["gnn-worker-0"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    callback = MonitoringCallback(port=0, addr="127.0.0.1", gpu_devices=None)
    train, val, *_ = graph_loaders()
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="dgdn_lightning_monitor"):
        trainer.fit(GraphClassifier(), train, val)
        trainer.validate(trainer.lightning_module, val, verbose=False)
    assert trainer.world_size == 1
    warnings = [r.getMessage() for r in caplog.records if "training processes" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "(WORLD_SIZE=2, RANK=1) but Lightning runs this one as rank 0 of 1" in warnings[0]
    assert "KubeflowEnvironment" in warnings[0]
