"""A PyTorchJob's pods as the Kubeflow training operator (kubeflow.org/v1, training-operator v1.9) and the kubelet
make them from the job, for the tests of deploy/kubernetes/example/pytorchjob.yaml.

What the operator does, from its source (pkg/controller.v1/pytorch/envvar.go and master.go, defaults from
pkg/apis/kubeflow.org/v1/pytorch_defaults.go and pytorch_types.go, release 1.9):

* pods named ``<job>-<master|worker>-<index>`` with the labels ``training.kubeflow.org/job-name``,
  ``replica-type``, ``replica-index`` and ``operator-name``;
* in every container, after the template's own variables: ``PYTHONUNBUFFERED=1``; ``MASTER_PORT`` and
  ``PET_MASTER_PORT`` (the Master's container port named ``pytorchjob-port``, which it adds as 23456 when the
  template has none); ``MASTER_ADDR`` and ``PET_MASTER_ADDR`` (``<job>-master-0``, the Master pod's service);
  ``WORLD_SIZE`` (all replicas x ``nprocPerNode``, which counts 1 unless it is a number), ``RANK`` and
  ``PET_NODE_RANK`` (the Master 0, Worker i i+1); ``PET_NPROC_PER_NODE`` (``nprocPerNode``, defaulted to
  ``auto``); ``PET_NNODES`` (all replicas, without an elastic policy).

Kubernetes adds ``KUBERNETES_SERVICE_HOST`` and ``HOSTNAME`` (the pod's name) and fills the template's downward
API variables.
"""

from __future__ import annotations

import copy
import re
from typing import Any

#: The port the operator adds to the Master's ``pytorch`` container when it declares none named pytorchjob-port.
DEFAULT_PORT_NAME, DEFAULT_PORT = "pytorchjob-port", 23456
#: The cluster IP of the API service, as the kubelet sets it (nothing here connects to it).
API_SERVICE_HOST = "10.96.0.1"


def operator_pod(kind: str, index: int, job: dict[str, Any], namespace: str) -> dict[str, Any]:
    """The pod the operator creates for replica ``index`` of ``kind`` (``Master``/``Worker``): template plus labels."""
    template = copy.deepcopy(job["spec"]["pytorchReplicaSpecs"][kind]["template"])
    name = job["metadata"]["name"]
    template["metadata"]["labels"].update({
        "training.kubeflow.org/job-name": name,
        "training.kubeflow.org/replica-type": kind.lower(),
        "training.kubeflow.org/replica-index": str(index),
        "training.kubeflow.org/operator-name": "pytorchjob-controller",
    })
    template["metadata"].update(name=f"{name}-{kind.lower()}-{index}", namespace=namespace)
    return template


def downward_env(pod: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet fills it: its own variables, the downward API's from ``pod``."""
    env = {"KUBERNETES_SERVICE_HOST": API_SERVICE_HOST, "HOSTNAME": pod["metadata"]["name"]}
    (container,) = pod["spec"]["containers"]
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        path = item["valueFrom"]["fieldRef"]["fieldPath"]
        match = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
        if match:
            env[item["name"]] = pod["metadata"]["labels"][match.group(1)]
        else:
            env[item["name"]] = pod["metadata"][path.split(".", 1)[1]]
    return env


def operator_env(job: dict[str, Any], kind: str, index: int) -> dict[str, str]:
    """The variables the operator appends to the container of replica ``index`` of ``kind``."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    replicas = sum(spec.get("replicas", 1) for spec in specs.values())
    nproc = job["spec"].get("nprocPerNode", "auto")
    (master,) = [c for c in specs["Master"]["template"]["spec"]["containers"] if c["name"] == "pytorch"]
    port = next((p["containerPort"] for p in master.get("ports", []) if p["name"] == DEFAULT_PORT_NAME), DEFAULT_PORT)
    rank = index + 1 if kind == "Worker" else index
    master_addr = f"{job['metadata']['name']}-master-0"
    return {
        "PYTHONUNBUFFERED": "1",
        "MASTER_PORT": str(port),
        "PET_MASTER_PORT": str(port),
        "MASTER_ADDR": master_addr,
        "PET_MASTER_ADDR": master_addr,
        "WORLD_SIZE": str(replicas * (int(nproc) if nproc.isdigit() else 1)),
        "RANK": str(rank),
        "PET_NODE_RANK": str(rank),
        "PET_NPROC_PER_NODE": nproc,
        "PET_NNODES": str(replicas),
    }


def container_env(job: dict[str, Any], kind: str, index: int, namespace: str) -> dict[str, str]:
    """Everything the pod's ``pytorch`` container finds in its environment besides the image's own variables."""
    return {**downward_env(operator_pod(kind, index, job, namespace)), **operator_env(job, kind, index)}
