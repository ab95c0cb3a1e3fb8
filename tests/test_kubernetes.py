"""The Kubernetes base (deploy/kubernetes/): generated files in step with their sources, core objects valid against
Kubernetes' own schemas (kubernetes-validate, offline), the custom resources checked on the fields their operators
read, the PodMonitor's relabelling run by a real Prometheus, and the kube-state-metrics rules by promtool."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port, require_tool
from prom_helpers import DASHBOARD_FILE, DEPLOY, Prometheus, run_tool, wait_until

from dgdn_lightning_monitor.scheduler import info_labels, scheduler_run_id

K8S = DEPLOY / "kubernetes"
GENERATOR = K8S / "generate.py"
KUBERNETES_VERSION = "1.30"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def generator() -> Any:
    sys.path.insert(0, str(K8S))
    try:
        import generate
    finally:
        sys.path.remove(str(K8S))
    return generate


def test_kustomization_lists_every_base_object_and_nothing_missing():
    kustomization = load(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization["resources"]) == {"podmonitor.yaml", "prometheusrule.yaml", "grafana-dashboard.yaml"}
    for name in kustomization["resources"]:
        assert (K8S / name).is_file(), name


def test_generated_files_are_up_to_date_and_generation_is_reproducible():
    gen = generator()
    first, second = gen.outputs(), gen.outputs()
    assert first == second
    for path, content in first.items():
        assert path.read_text(encoding="utf-8") == content, f"{path.name} is stale: run python {GENERATOR}"
    result = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_prometheus_rule_holds_exactly_the_rule_files_groups():
    """Whatever the rule files contain now: the PrometheusRule carries the same groups, rule for rule."""
    rule = load(K8S / "prometheusrule.yaml")
    sources = [
        DEPLOY / "prometheus" / "rules" / "dgdn-alerts.yml",
        DEPLOY / "prometheus" / "rules" / "dgdn-scheduler.yml",
        *sorted((K8S / "rules").glob("*.yml")),
    ]
    expected = [group for path in sources for group in load(path)["groups"]]
    assert rule["spec"]["groups"] == expected
    # Fields the Prometheus Operator reads.
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    names = [group["name"] for group in rule["spec"]["groups"]]
    assert len(names) == len(set(names)), "the Operator rejects duplicate group names"
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            assert set(item) <= {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert ("record" in item) != ("alert" in item) and isinstance(item["expr"], str)


def test_prometheus_rule_spec_passes_promtool(tmp_path):
    promtool = require_tool("promtool")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": load(K8S / "prometheusrule.yaml")["spec"]["groups"]}))
    run_tool([promtool, "check", "rules", str(rules)])


def test_kubernetes_rules_unit_tests_pass():
    promtool = require_tool("promtool")
    for path in (K8S / "tests").glob("*.test.yml"):
        output = run_tool([promtool, "test", "rules", str(path)], cwd=path.parent)
        assert "SUCCESS" in output


def test_dashboard_config_map_is_valid_and_carries_the_dashboard_for_the_sidecar():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    config_map = load(K8S / "grafana-dashboard.yaml")
    kubernetes_validate.validate(config_map, KUBERNETES_VERSION, strict=True)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name, content), = config_map["data"].items()
    assert name == DASHBOARD_FILE.name
    assert json.loads(content) == json.loads(DASHBOARD_FILE.read_text())
    assert len(yaml.safe_dump(config_map).encode()) < 1024 * 1024, "a ConfigMap holds at most 1 MiB"


def pytorchjob() -> dict[str, Any]:
    return load(K8S / "example" / "pytorchjob.yaml")


def test_pytorchjob_pods_are_valid_pods_that_the_podmonitor_selects():
    """The replicas' pod templates, as the pods the training-operator makes of them, pass Kubernetes' Pod schema;
    the job runs dgdn-monitor train on 2 workers that the PodMonitor selects and scrapes."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    job = pytorchjob()
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert sum(spec["replicas"] for spec in replicas.values()) == 2
    monitor = load(K8S / "podmonitor.yaml")
    keep = next(r for r in monitor["spec"]["podMetricsEndpoints"][0]["relabelings"] if r.get("action") == "keep")
    for kind, spec in replicas.items():
        template = spec["template"]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"gnn-{kind.lower()}-0", **template["metadata"]},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
        assert template["metadata"]["labels"].items() >= monitor["spec"]["selector"]["matchLabels"].items()
        (container,) = template["spec"]["containers"]
        assert container["name"] == "pytorch"  # the container the training-operator configures
        assert container["command"] == ["dgdn-monitor", "train"]
        assert "--trainer.num_nodes=2" in container["args"] and "--trainer.devices=1" in container["args"]
        ports = [port for port in container["ports"] if re.fullmatch(keep["regex"], port["name"])]
        assert [port["containerPort"] for port in ports] == [8000]  # the callback's default port, one rank a pod
        # Long enough for the last scrape (15 s interval) plus the end of the run.
        assert template["spec"]["terminationGracePeriodSeconds"] >= 15 + 10


def downward_env(pod: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would fill it from the downward API for ``pod``."""
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "HOSTNAME": pod["metadata"]["name"]}
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


def operator_pod(kind: str, index: int, job: dict[str, Any], namespace: str) -> dict[str, Any]:
    """A pod as the training-operator creates it from the job: the template plus its labels."""
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


def test_the_podmonitor_relabelling_gives_the_labels_the_rules_key_on_run_by_a_real_prometheus(tmp_path):
    """The PodMonitor's relabelings, as the Operator passes them to Prometheus, applied by a real Prometheus to
    targets carrying the meta labels Kubernetes discovery gives the example's pods (and a Trainer pod): job is
    dgdn-training, run_id is the id the callback in that pod derives, ports not named metrics are dropped."""
    binary = require_tool("prometheus")
    monitor = load(K8S / "podmonitor.yaml")
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    relabel = [
        {re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), key): value for key, value in rule.items()}
        for rule in endpoint["relabelings"]
    ]
    job = pytorchjob()
    pods = [operator_pod("Master", 0, job, "ml"), operator_pod("Worker", 0, job, "ml")]
    trainer_pod = copy.deepcopy(pods[1])  # a Kubeflow Trainer TrainJob's pod: JobSet labels instead
    trainer_pod["metadata"]["labels"] = {"dgdn.io/monitor": "training", "jobset.sigs.k8s.io/jobset-name": "gnn2"}
    trainer_pod["metadata"]["name"] = "gnn2-node-0-0-x7k2p"
    groups, expected = [], {}
    for number, pod in enumerate([*pods, trainer_pod]):
        address = f"10.4.1.{number + 1}"
        meta = {
            "__meta_kubernetes_namespace": pod["metadata"]["namespace"],
            "__meta_kubernetes_pod_name": pod["metadata"]["name"],
            **{"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
               for k, v in pod["metadata"]["labels"].items()},
        }
        for port, name in ((8000, "metrics"), (29500, "pytorchjob-port")):
            groups.append({"targets": [f"{address}:{port}"],
                           "labels": {**meta, "__meta_kubernetes_pod_container_port_name": name}})
        env = downward_env(pod) if pod is not trainer_pod else {
            "KUBERNETES_SERVICE_HOST": "10.96.0.1", "POD_NAMESPACE": "ml", "KUBEFLOW_JOB_NAME": "gnn2"}
        expected[f"{address}:8000"] = scheduler_run_id(env)
    (tmp_path / "pods.json").write_text(json.dumps(groups))
    config = {
        "global": {"scrape_interval": "1h"},
        "scrape_configs": [{
            "job_name": "podmonitor", "file_sd_configs": [{"files": [str(tmp_path / "pods.json")]}],
            "relabel_configs": relabel,
        }],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = Prometheus(binary, tmp_path / "prometheus.yml", tmp_path, free_port())
    try:
        prometheus.wait_ready()
        targets = wait_until(lambda: prometheus.api("targets")["activeTargets"], 30, what="the discovered targets")
    finally:
        prometheus.stop()
    seen = {t["labels"]["instance"]: t["labels"] for t in targets}
    assert set(seen) == set(expected), "only the ports named metrics are scraped"
    assert expected["10.4.1.1:8000"] == "ml-gnn" and expected["10.4.1.3:8000"] == "ml-gnn2"
    for instance, labels in seen.items():
        assert labels["job"] == "dgdn-training" and re.fullmatch("dgdn.*", labels["job"])
        assert labels["run_id"] == expected[instance], labels
    # And what the callback in the Master pod labels its info series with.
    assert info_labels(downward_env(pods[0])) == {
        "k8s_namespace_name": "ml",
        "k8s_pod_name": "gnn-master-0",
        "kubeflow_job_name": "gnn",
        "kubeflow_replica_index": "0",
    }


def test_podmonitor_fields_the_operator_reads():
    monitor = load(K8S / "podmonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    assert spec["selector"]["matchLabels"] == {"dgdn.io/monitor": "training"}
    allowed = {"source_labels", "separator", "target_label", "regex", "modulus", "replacement", "action"}
    for endpoint in spec["podMetricsEndpoints"]:
        assert endpoint["path"] == "/metrics"
        for rule in endpoint["relabelings"]:
            snake = {re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), key) for key in rule}
            assert snake <= allowed, rule
