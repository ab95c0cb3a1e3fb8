"""The example PyTorchJob trains as shipped: its container's command and arguments, started as the two processes the
Kubeflow training operator starts (gnn-master-0 and gnn-worker-0) with the environment it gives them
(tests/kubeflow_operator.py), form one 2-rank DDP group on CPU (gloo).

Only what a pod has and this machine cannot is replaced: ``MASTER_ADDR`` (the Master pod's service) is 127.0.0.1,
``MASTER_PORT`` a free port instead of 23456, each pod's metrics port 8000 a free port on 127.0.0.1 (the pods have
a network namespace each), and the collector the job sends spans to is a real OTLP receiver. A few options shrink
the training so that it ends in seconds; they come after the job's own, as a user's overrides would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port
from kubeflow_operator import container_env
from otlp_receiver import OTLPReceiver
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "deploy" / "kubernetes" / "example" / "pytorchjob.yaml"
NAMESPACE = "ml"
#: A training of a few seconds: a small synthetic graph, a small model, 2 epochs of 4 steps.
TINY = ["--trainer.max_epochs=2", "--data.num_nodes=40", "--data.num_events=800", "--data.batch_size=150",
        "--data.num_neighbors=5", "--model.hidden_dim=8", "--model.num_heads=1", "--model.num_layers=1",
        "--model.diffusion_steps=1", "--model.time_dim=4", "--monitor.trace_every_n_steps=2"]
RUN_TIMEOUT_S = 120.0
#: How the callback says that a launcher's processes were not joined (dgdn_lightning_monitor.scheduler).
LAUNCH_WARNING = "training processes"


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def test_the_example_pytorchjob_forms_one_ddp_group_with_both_endpoints_and_one_trace(tmp_path: Path) -> None:
    job = yaml.safe_load(JOB.read_text(encoding="utf-8"))
    replicas = [("Master", 0), ("Worker", 0)]
    master_port = str(free_port())
    bin_dir = str(Path(sys.executable).parent)  # where the project's console script is installed
    processes: dict[str, tuple[subprocess.Popen, Path, str]] = {}
    with OTLPReceiver() as receiver:
        collector = receiver.endpoint.rsplit("/v1/traces", 1)[0]
        try:
            for kind, index in replicas:
                template = job["spec"]["pytorchReplicaSpecs"][kind]["template"]
                (container,) = template["spec"]["containers"]
                env = container_env(job, kind, index, NAMESPACE)
                assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://")  # the job's collector, replaced:
                env.update(MASTER_ADDR="127.0.0.1", PET_MASTER_ADDR="127.0.0.1", MASTER_PORT=master_port,
                           PET_MASTER_PORT=master_port, OTEL_EXPORTER_OTLP_ENDPOINT=collector)
                # This machine's part: where the commands are, the checkout's package first, gloo on loopback.
                # One thread each: the two "pods" share this machine's cores.
                env.update(PATH=f"{bin_dir}:/usr/bin:/bin", HOME=str(tmp_path), PYTHONPATH=str(ROOT),
                           GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
                port = free_port()
                executable = shutil.which(container["command"][0], path=env["PATH"])
                assert executable, f"{container['command'][0]} is not installed in {bin_dir}"
                command = [executable, *container["command"][1:], *container["args"], *TINY,
                           f"--monitor.port={port}", "--monitor.addr=127.0.0.1"]
                log = tmp_path / f"{env['POD_NAME']}.log"
                with open(log, "wb") as handle:
                    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=handle,
                                               stderr=subprocess.STDOUT, start_new_session=True)
                processes[env["POD_NAME"]] = (process, log, f"http://127.0.0.1:{port}/metrics")

            def logs() -> str:
                return "\n".join(f"--- {name}\n{log.read_text(errors='replace')[-3000:]}"
                                 for name, (_, log, _) in processes.items())

            # Scrape both endpoints until both processes have ended: every answer is kept, the last one of each
            # pod read after its run ended (the endpoint lingers for the next scrape).
            last: dict[str, dict[str, Any]] = {}
            both_at_once = False
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while any(process.poll() is None for process, _, _ in processes.values()):
                if time.monotonic() > deadline:
                    pytest.fail(f"the two pods did not finish training within {RUN_TIMEOUT_S} s\n{logs()}")
                for name, (process, _, _) in processes.items():
                    if process.poll() not in (None, 0):
                        pytest.fail(f"{name} exited with {process.returncode}\n{logs()}")
                answered = 0
                for name, (_, _, url) in processes.items():
                    try:
                        last[name] = scrape(url)
                        answered += 1
                    except OSError:
                        pass
                both_at_once |= answered == 2
                time.sleep(0.2)
            for name, (process, _, _) in processes.items():
                assert process.returncode == 0, f"{name} exited with {process.returncode}\n{logs()}"
        finally:
            for process, _, _ in processes.values():
                if process.poll() is None:
                    os.killpg(process.pid, 9)
                    process.wait(timeout=10)
        spans = receiver.spans

    assert both_at_once, f"the two endpoints never served at the same time\n{logs()}"
    ranks = {}
    for name in ("gnn-master-0", "gnn-worker-0"):
        assert name in last, f"{name} never answered a scrape\n{logs()}"
        (info, _), = last[name]["dgdn_training_info"]
        assert info["world_size"] == "2" and info["strategy"] == "DDPStrategy", info
        assert info["run_id"] == f"{NAMESPACE}-gnn" and info["k8s_pod_name"] == name, info
        ranks[name] = info["rank"]
        outcome = {labels["outcome"]: value for labels, value in last[name]["dgdn_run_outcome"]}
        assert outcome["completed"] == 1, f"{name}'s last scrape: {outcome}"
        assert LAUNCH_WARNING not in processes[name][1].read_text(), "no warning when Lightning joined the pods"
    assert ranks == {"gnn-master-0": "0", "gnn-worker-0": "1"}  # RANK as the operator set it

    # One trace per epoch, holding both ranks' epoch spans: rank 1's is a child of rank 0's.
    epochs = [span for span in spans if span.name == "train_epoch"]
    by_trace: dict[str, dict[int, Any]] = {}
    for span in epochs:
        by_trace.setdefault(span.trace_id, {})[span.attributes["training.rank"]] = span
    assert len(by_trace) == 2, f"{len(by_trace)} traces of train_epoch spans, expected one per epoch"
    for roots in by_trace.values():
        assert set(roots) == {0, 1}
        assert roots[1].parent_span_id == roots[0].span_id
    pods = {span.resource.get("k8s.pod.name") for span in spans}
    assert pods == {"gnn-master-0", "gnn-worker-0"}
