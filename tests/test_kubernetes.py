"""The Kubernetes base (deploy/kubernetes/) and the example job: generated files in step with their sources; the base
as `kubectl kustomize` renders it (and the overlay docs/kubernetes.md shows); core objects valid against
Kubernetes' own schemas (kubernetes-validate, offline); the custom resources valid against their operators'
schemas (test_custom_resources_*, which say where the schemas come from); the PodMonitor's relabelling run by a real
Prometheus; the kube-state-metrics rules by promtool; the example image's Dockerfile in step with the job and the
docs. That the job trains as shipped is tests/test_kubernetes_pytorchjob.py."""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port, require_tool
from kubeflow_operator import API_SERVICE_HOST, downward_env, operator_pod
from prom_helpers import DASHBOARD_FILE, DEPLOY, Prometheus, run_tool, wait_until

from dgdn_lightning_monitor.scheduler import info_labels, scheduler_run_id

K8S = DEPLOY / "kubernetes"
GENERATOR = K8S / "generate.py"
KUBERNETES_VERSION = "1.30"
DOCS = DEPLOY.parent / "docs" / "kubernetes.md"
DOCKERFILE = K8S / "example" / "Dockerfile"


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
        # Lightning never detects KubeflowEnvironment: without the plugin both pods are rank 0.
        assert "--trainer.plugins=lightning.pytorch.plugins.environments.KubeflowEnvironment" in container["args"]
        ports = [port for port in container["ports"] if re.fullmatch(keep["regex"], port["name"])]
        assert [port["containerPort"] for port in ports] == [8000]  # the callback's default port, one rank a pod
        # Long enough for the last scrape (15 s interval) plus the end of the run.
        assert template["spec"]["terminationGracePeriodSeconds"] >= 15 + 10


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
            "KUBERNETES_SERVICE_HOST": API_SERVICE_HOST, "POD_NAMESPACE": "ml", "KUBEFLOW_JOB_NAME": "gnn2"}
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


# ------------------------------------------------------------------------------ kubectl kustomize
def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize`` renders from ``directory``."""
    kubectl = require_tool("kubectl")
    output = run_tool([kubectl, "kustomize", str(directory)], cwd=directory, stdout_only=True)
    return [document for document in yaml.safe_load_all(output) if document]


def rendered(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (document,) = [d for d in documents if d["kind"] == kind]
    return document


def test_kubectl_kustomize_renders_the_base_into_its_namespace():
    documents = kustomize(K8S)
    assert sorted(d["kind"] for d in documents) == ["ConfigMap", "PodMonitor", "PrometheusRule"]
    for name in load(K8S / "kustomization.yaml")["resources"]:
        source = load(K8S / name)
        (document,) = [d for d in documents if d["kind"] == source["kind"]]
        assert document["metadata"].pop("namespace") == "monitoring"
        assert document == source, f"kustomize changed {name} beyond its namespace"


def test_the_overlay_the_docs_show_labels_every_object_and_no_selector(tmp_path):
    """The overlay of docs/kubernetes.md, on the base: `labels` (not the deprecated commonLabels) puts the release
    label on every object for kube-prometheus-stack's selectors, and leaves the PodMonitor's pod selector alone."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    (overlay,) = [yaml.safe_load(block) for block in blocks if "kind: Kustomization" in block]
    assert "commonLabels" not in overlay
    assert overlay["resources"] == ["../../deploy/kubernetes"]
    overlay["resources"] = [os.path.relpath(K8S, tmp_path)]  # the same base, from where this overlay is
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    documents = kustomize(tmp_path)
    assert len(documents) == 3
    for document in documents:
        assert document["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert document["metadata"]["namespace"] == overlay["namespace"]
    monitor = rendered(documents, "PodMonitor")
    assert monitor["spec"]["selector"] == load(K8S / "podmonitor.yaml")["spec"]["selector"]
    base = load(K8S / "kustomization.yaml")
    assert "commonLabels" not in base and "labels:\n#     - pairs:" in (K8S / "kustomization.yaml").read_text()


# ---------------------------------------------------------------------- the operators' schemas
def require_module(name: str) -> Any:
    """Import ``name``; skip without it (fail under DGDN_MONITOR_REQUIRE_TOOLS): the dev extra installs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"{name} is not installed (pip install -e '.[dev]')"
        if os.environ.get("DGDN_MONITOR_REQUIRE_TOOLS"):
            pytest.fail(message + "; DGDN_MONITOR_REQUIRE_TOOLS is set, so this is a failure", pytrace=False)
        pytest.skip(message)


def closed(schema: Any) -> Any:
    """``schema`` with every object that lists its properties closed to others: an unknown field is an error, as the
    API server's strict field validation (kubectl's default) makes it."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            closed(value)
    elif isinstance(schema, list):
        for value in schema:
            closed(value)
    return schema


def schema_of(model: Any) -> dict[str, Any]:
    """The JSON schema of a pydantic model, closed to unknown fields."""
    return closed(model.model_json_schema(by_alias=True))


def schema_errors(schema: dict[str, Any], document: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)]


def test_custom_resources_pass_the_prometheus_operator_crd_schemas():
    """The rendered PodMonitor and PrometheusRule against the Prometheus Operator's CRD schemas, as the PyPI package
    cloudcoil-models-prometheus-operator==0.80.1.0 (pinned in the dev extra) ships them: pydantic models generated
    from the operator's v0.80.1 CRDs (types, required fields, enums, duration patterns), checked both by the models
    and, closed to unknown fields, as JSON schema."""
    models = require_module("cloudcoil.models.prometheus_operator.v1")
    documents = kustomize(K8S)
    for kind in ("PodMonitor", "PrometheusRule"):
        model = getattr(models, kind)
        document = rendered(documents, kind)
        model.model_validate(document)
        assert schema_errors(schema_of(model), document) == [], kind
    # The schemas can fail: a misspelt field, a duration Prometheus cannot read.
    monitor = rendered(documents, "PodMonitor")
    misspelt = copy.deepcopy(monitor)
    misspelt["spec"]["podMetricEndpoints"] = misspelt["spec"].pop("podMetricsEndpoints")
    assert any("podMetricEndpoints" in error for error in schema_errors(schema_of(models.PodMonitor), misspelt))
    slow = copy.deepcopy(monitor)
    slow["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    assert schema_errors(schema_of(models.PodMonitor), slow)


def openapi_schema(type_name: str, models: Any, configuration: Any) -> dict[str, Any]:
    """JSON schema of a type of an OpenAPI-generated SDK: its models' ``openapi_types``/``attribute_map`` give the
    fields, a setter that refuses ``None`` a required field. Kubernetes' own types (object metadata, the pod
    template, autoscaling metrics) are left open here: kubernetes-validate checks the pod templates against
    Kubernetes' schema."""
    if match := re.fullmatch(r"list\[(.+)\]", type_name):
        return {"type": "array", "items": openapi_schema(match.group(1), models, configuration)}
    if match := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        return {"type": "object", "additionalProperties": openapi_schema(match.group(1), models, configuration)}
    primitives = {"str": "string", "int": "integer", "bool": "boolean", "float": "number", "datetime": "string"}
    if type_name in primitives:
        return {"type": primitives[type_name]}
    if not hasattr(models, type_name):  # Kubernetes' own (V1ObjectMeta, V1PodTemplateSpec, K8sIoApi...)
        return {"type": "object"}
    model = getattr(models, type_name)
    required = []
    for attribute in model.openapi_types:
        probe = model.__new__(model)
        probe.local_vars_configuration = configuration
        try:
            setattr(probe, attribute, None)
        except ValueError:
            required.append(model.attribute_map[attribute])
    return {
        "type": "object",
        "properties": {model.attribute_map[attribute]: openapi_schema(kind, models, configuration)
                       for attribute, kind in model.openapi_types.items()},
        "required": required,
        "additionalProperties": False,
    }


def test_custom_resources_pass_the_training_operator_pytorchjob_schema():
    """The example PyTorchJob against the training operator's kubeflow.org/v1 API, as the PyPI package
    kubeflow-training==1.9.4 (the training operator's own SDK, pinned in the dev extra) ships it: OpenAPI models
    generated from the operator's v1.9 Go types, from which its CRD's schema is generated too. No registry package
    ships the CRD itself; the pod templates inside are checked against Kubernetes' Pod schema by
    test_pytorchjob_pods_are_valid_pods_that_the_podmonitor_selects."""
    require_module("kubeflow.training")
    from kubeflow.training import Configuration, models

    job = pytorchjob()
    schema = openapi_schema("KubeflowOrgV1PyTorchJob", models, Configuration())
    assert schema["properties"]["spec"]["required"] == ["pytorchReplicaSpecs", "runPolicy"]
    assert schema_errors(schema, job) == []
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["runPolicy"]["cleanPodPolice"] = misspelt["spec"]["runPolicy"].pop("cleanPodPolicy")
    assert any("cleanPodPolice" in error for error in schema_errors(schema, misspelt))
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "1"
    assert schema_errors(schema, wrong_type)


# ------------------------------------------------------------------------------------ the image
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_image_the_job_names_is_the_one_the_docs_build_from_the_dockerfile():
    replicas = pytorchjob()["spec"]["pytorchReplicaSpecs"].values()
    (image,) = {spec["template"]["spec"]["containers"][0]["image"] for spec in replicas}
    docs = DOCS.read_text(encoding="utf-8")
    build = f"docker build -f {DOCKERFILE.relative_to(DEPLOY.parent)} -t {image} ."
    assert build in docs and f"docker push {image}" in docs
    # The tag says the project's version and the build the Dockerfile makes by default.
    version = re.search(r'^version = "([^"]+)"', (DEPLOY.parent / "pyproject.toml").read_text(), flags=re.M).group(1)
    default_variant = next(args.split("=", 1)[1] for op, args in dockerfile_instructions()
                           if op == "ARG" and args.startswith("TORCH_VARIANT="))
    assert image.endswith(f":{version}-{default_variant}")


def test_the_dockerfile_entry_point_is_the_job_command_and_its_context_holds_what_it_copies():
    instructions = dockerfile_instructions()
    entrypoints = [json.loads(args) for op, args in instructions if op == "ENTRYPOINT"]
    for spec in pytorchjob()["spec"]["pytorchReplicaSpecs"].values():
        (container,) = spec["template"]["spec"]["containers"]
        assert entrypoints[-1] == container["command"]
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
        assert ("EXPOSE", str(port)) in instructions
    # The build context (the repository root, cut down by Dockerfile.dockerignore) holds every file it copies.
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = [part for op, args in instructions if op == "COPY" and "--from" not in args
              for part in args.split()[:-1]]
    assert set(copied) == kept
    for path in copied:
        assert (DEPLOY.parent / path).exists(), path
    # The wheel it builds is the project's: pyproject's package and console script.
    project = (DEPLOY.parent / "pyproject.toml").read_text()
    assert 'dgdn-monitor = "dgdn_lightning_monitor.cli:main"' in project
    assert entrypoints[-1][0] == "dgdn-monitor"
