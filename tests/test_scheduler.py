"""Scheduler identity and end classification (dgdn_lightning_monitor.scheduler), and how a real Lightning run
carries them: labels of dgdn_training_info, resource attributes of the spans a real OTLP receiver gets, and the
default run id. The same, under a real SLURM cluster, is in tests/test_slurm.py."""

from __future__ import annotations

import urllib.request

import pytest
from lightning.pytorch import Callback
from lit_models import GraphClassifier, graph_loaders, quiet_trainer
from otlp_receiver import OTLPReceiver
from prometheus_client.parser import text_string_to_metric_families

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.scheduler import (
    CANCELLED,
    REQUEUED,
    TIME_LIMIT,
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
