"""Real multi-process runs: Lightning DDP on CPU (gloo) with MonitoringCallback in every rank.

Each run is ``tests/ddp_train.py`` in its own process group, so this test process never initialises
``torch.distributed``. The script holds every rank at ``on_train_end`` until the test creates a release file,
which is when the live endpoints, discovery files and a real Prometheus are checked.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, require_tool
from otlp_receiver import OTLPReceiver

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("ddp_train.py")
GRAPHS, EPOCHS, BATCH = 40, 2, 4  # ddp_train.py defaults: 40 graphs, 2 epochs, batches of 4
RUN_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------------------------------- helpers
def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free on loopback (rank 0 and rank 1 of one node)."""
    for _ in range(50):
        port = free_port()
        if port >= 65535:
            continue
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "SLURM_", "PL_", "TORCHELASTIC_"))
           and k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "MASTER_ADDR",
                         "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OTEL_TRACES_EXPORTER", "none")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo on loopback whatever the host name resolves to
    env.update(extra)
    return env


class Runs:
    """The training processes of one test; every process group it started is killed on exit."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.processes: list[tuple[subprocess.Popen, Path]] = []

    def start(self, *args: str, env: dict[str, str], name: str = "run") -> subprocess.Popen:
        log = self.out / f"{name}.log"
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--out", str(self.out), *args], cwd=ROOT, env=env,
                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.processes.append((process, log))
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n" + log.read_text(errors="replace")[-4000:] for _, log in self.processes)

    def check_alive(self) -> None:
        for process, log in self.processes:
            if process.poll() is not None and process.returncode != 0:
                pytest.fail(f"training process exited with {process.returncode}\n{self.logs()}")

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout_s: float = RUN_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            self.check_alive()
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}\n{self.logs()}")

    def ready(self, ranks: Sequence[int]) -> dict[int, dict[str, Any]]:
        paths = {rank: self.out / f"ready-rank{rank}.json" for rank in ranks}
        self.wait_for(f"ranks {list(ranks)} at on_train_end", lambda: all(p.exists() for p in paths.values()))
        return {rank: json.loads(path.read_text()) for rank, path in paths.items()}

    def release_and_wait(self, timeout_s: float = 60.0) -> None:
        (self.out / "release").touch()
        deadline = time.monotonic() + timeout_s
        for process, _ in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"training did not finish within {timeout_s} s\n{self.logs()}")
            assert process.returncode == 0, self.logs()

    def kill_all(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                    try:
                        os.killpg(process.pid, sig)  # the group holds the ranks Lightning started too
                    except ProcessLookupError:
                        break
                    try:
                        process.wait(timeout=wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue


@contextmanager
def runs(tmp_path: Path) -> Iterator[Runs]:
    group = Runs(tmp_path)
    try:
        yield group
    finally:
        group.kill_all()


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name].append((dict(sample.labels), sample.value))
    return found


def only(samples: list[tuple[dict[str, str], float]], **labels: str) -> tuple[dict[str, str], float]:
    matches = [(l, v) for l, v in samples if all(l.get(k) == want for k, want in labels.items())]
    assert len(matches) == 1, f"{labels} matches {matches}"
    return matches[0]


def discovery_files(directory: Path) -> dict[str, list[dict[str, Any]]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


@contextmanager
def prometheus(targets_dir: Path, workdir: Path) -> Iterator[str]:
    """A real Prometheus scraping ``targets_dir/*.json`` under the deploy stack's training job name."""
    binary = require_tool("prometheus")
    job = "dgdn-training"
    deploy_config = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    if deploy_config.exists():  # use the stack's own job definition, as far as file SD goes
        import yaml

        jobs = {c["job_name"]: c for c in yaml.safe_load(deploy_config.read_text())["scrape_configs"]}
        assert job in jobs and jobs[job].get("file_sd_configs"), "the stack no longer scrapes file-SD targets"
        assert not jobs[job].get("honor_labels"), "series labels would win over discovery labels"
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        f"global: {{scrape_interval: 1s, scrape_timeout: 1s}}\n"
        f"scrape_configs:\n"
        f"  - job_name: {job}\n"
        f"    file_sd_configs: [{{files: ['{targets_dir}/*.json'], refresh_interval: 1s}}]\n"
    )
    with open(workdir / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """Terminate a server started by a test; kill it if it does not go within 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())["data"]["result"]
    except OSError:
        return []  # not up yet


# ---------------------------------------------------------------------------------------------- tests
def test_ddp_two_ranks_serve_labelled_endpoints_discovery_and_one_trace_per_epoch(tmp_path: Path) -> None:
    targets = tmp_path / "targets"
    base = free_port_pair()
    with OTLPReceiver() as receiver, runs(tmp_path) as group:
        env = clean_env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint)
        del env["OTEL_TRACES_EXPORTER"]
        group.start("--strategy", "ddp", "--devices", "2", "--port", str(base), "--targets-dir", str(targets),
                    "--targets-host", "127.0.0.1", "--hold", env=env)
        reports = group.ready([0, 1])
        run_id = reports[0]["run_id"]
        assert reports[1]["run_id"] == run_id, "ranks started as separate processes adopt rank 0's run id"

        # Every rank serves at port + local_rank, with its own rank labels.
        total = 0.0
        for rank in (0, 1):
            assert reports[rank]["url"] == f"http://127.0.0.1:{base + rank}/metrics"
            found = scrape(reports[rank]["url"])
            labels, samples = only(found["dgdn_samples_processed_total"])
            assert labels == {"rank": str(rank), "local_rank": str(rank), "node_rank": "0", "world_size": "2"}
            assert samples == GRAPHS // 2 * EPOCHS  # DistributedSampler: half of the graphs per epoch
            total += samples
            _, batches = only(found["dgdn_batch_processing_seconds_count"])
            assert batches == GRAPHS // 2 // BATCH * EPOCHS
            info, _ = only(found["dgdn_training_info"])
            assert info["run_id"] == run_id
            assert info["strategy"] == "DDPStrategy"  # what DGDNRankStraggler requires
        assert total == GRAPHS * EPOCHS

        # One discovery file for the node, listing both endpoints.
        files = discovery_files(targets)
        assert list(files) == [expected_file(0, run_id)]
        assert files[next(iter(files))] == [{
            "targets": [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"],
            "labels": {"job": "dgdn-training", "run_id": run_id},
        }]
        assert not [p for p in targets.iterdir() if not p.name.endswith(".json")], "temporary files left"

        # A real Prometheus finds both ranks through the file and computes a batch-time quantile per rank.
        with prometheus(targets, tmp_path) as server:
            promql = "histogram_quantile(0.9, sum by (rank, le) (dgdn_batch_processing_seconds_bucket))"
            result = group.wait_for("Prometheus to scrape both ranks",
                                    lambda: (r := query(server, promql)) and len(r) == 2 and r, timeout_s=30)
            assert sorted(r["metric"]["rank"] for r in result) == ["0", "1"]
            assert all(0 < float(r["value"][1]) < 60 for r in result)
            up = query(server, 'up{job="dgdn-training"}')
            assert sorted(r["metric"]["instance"] for r in up) == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
            assert all(r["metric"]["run_id"] == run_id and r["value"][1] == "1" for r in up)
            series = query(server, "dgdn_samples_processed_total")
            assert not any(name.startswith("exported_") for r in series for name in r["metric"])

        group.release_and_wait()
        assert discovery_files(targets) == {}, "the discovery file is removed when the run ends"

    # One trace per epoch: rank 1's train_epoch is a child of rank 0's, and holds rank 1's batches.
    epochs = receiver.named("train_epoch")
    assert len(epochs) == 2 * EPOCHS
    by_trace: dict[str, list[Any]] = defaultdict(list)
    for span in receiver.spans:
        by_trace[span.trace_id].append(span)
    epoch_traces = {span.trace_id for span in epochs}
    assert len(epoch_traces) == EPOCHS
    for trace_id in epoch_traces:
        spans = by_trace[trace_id]
        roots = {s.attributes["training.rank"]: s for s in spans if s.name == "train_epoch"}
        assert set(roots) == {0, 1}
        assert roots[0].parent_span_id == ""
        assert roots[1].parent_span_id == roots[0].span_id
        assert roots[0].attributes["training.epoch"] == roots[1].attributes["training.epoch"]
        batches = [s for s in spans if s.name == "train_batch"]
        assert sorted(s.attributes["training.rank"] for s in batches) == [0] * 5 + [1] * 5
        for batch in batches:
            assert batch.parent_span_id == roots[batch.attributes["training.rank"]].span_id
    assert {s.resource.get("training.run_id") for s in receiver.spans} == {run_id}


def test_ddp_spawn_pickles_the_callback_and_pushes_final_figures(tmp_path: Path) -> None:
    binary = require_tool("pushgateway")
    port = free_port()
    gateway = subprocess.Popen(
        # Debian's build persists to one shared file by default: this test keeps its own.
        [binary, f"--web.listen-address=127.0.0.1:{port}", f"--persistence.file={tmp_path / 'pushgateway.data'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        with runs(tmp_path) as group:
            group.start("--strategy", "ddp_spawn", "--devices", "2", "--port", "0",
                        "--pushgateway", f"http://127.0.0.1:{port}", env=clean_env())
            reports = group.ready([0, 1])
            group.release_and_wait(timeout_s=RUN_TIMEOUT_S)
        run_id = reports[0]["run_id"]
        assert reports[1]["run_id"] == run_id
        found = scrape(f"http://127.0.0.1:{port}/metrics")
        for rank in (0, 1):
            labels, value = only(found["dgdn_samples_processed_total"], job="dgdn-training", rank=str(rank),
                                 run_id=run_id)
            assert labels["world_size"] == "2" and labels["local_rank"] == str(rank)
            assert value == GRAPHS // 2 * EPOCHS
            only(found["push_time_seconds"], job="dgdn-training", rank=str(rank), run_id=run_id)
            _, batches = only(found["dgdn_batch_processing_seconds_count"], rank=str(rank), run_id=run_id)
            assert batches == GRAPHS // 2 // BATCH * EPOCHS
    finally:
        stop(gateway)


def test_two_nodes_on_one_machine_have_distinct_node_ranks(tmp_path: Path) -> None:
    targets = tmp_path / "targets"
    with OTLPReceiver() as receiver, runs(tmp_path) as group:
        master_port = str(free_port())
        for node in (0, 1):
            env = clean_env(NODE_RANK=str(node), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=master_port, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint)
            del env["OTEL_TRACES_EXPORTER"]
            # Both "nodes" share this machine, so port 0; only rank 0 traces.
            group.start("--strategy", "ddp", "--devices", "1", "--num-nodes", "2", "--port", "0",
                        "--targets-dir", str(targets), "--targets-host", "127.0.0.1", "--trace-ranks", "0",
                        "--hold", env=env, name=f"node{node}")
        reports = group.ready([0, 1])
        run_id = reports[0]["run_id"]
        files = discovery_files(targets)
        names = sorted(files)
        assert names == [expected_file(n, run_id) for n in (0, 1)]
        for node, name in enumerate(names):
            (group_,) = files[name]
            (target,) = group_["targets"]
            assert group_["labels"] == {"job": "dgdn-training", "run_id": run_id}
            found = scrape(f"http://{target}/metrics")
            labels, value = only(found["dgdn_samples_processed_total"])
            assert labels == {"rank": str(node), "local_rank": "0", "node_rank": str(node), "world_size": "2"}
            assert value == GRAPHS // 2 * EPOCHS
            assert reports[node]["url"] == f"http://{target}/metrics"
        group.release_and_wait()
        assert discovery_files(targets) == {}
    epochs = receiver.named("train_epoch")
    assert sorted(s.attributes["training.rank"] for s in epochs) == [0] * EPOCHS
    assert {s.attributes["training.rank"] for s in receiver.named("train_batch")} == {0}


def test_a_rank_whose_exchange_raises_leaves_no_rank_waiting(tmp_path: Path) -> None:
    # Rank 1's part of the set-up exchange raises before the collective: both ranks still finish the run at once,
    # agree on rank 0's run id, leave rank 1's endpoint out of the discovery file and count the error.
    targets = tmp_path / "targets"
    base = free_port_pair()
    with runs(tmp_path) as group:
        started = time.monotonic()
        group.start("--strategy", "ddp", "--devices", "2", "--port", str(base), "--targets-dir", str(targets),
                    "--targets-host", "127.0.0.1", "--fail-exchange-rank", "1", "--hold", env=clean_env())
        reports = group.ready([0, 1])
        assert time.monotonic() - started < RUN_TIMEOUT_S  # far below the process group's 30-minute timeout
        assert reports[0]["run_id"] == reports[1]["run_id"]
        for rank in (0, 1):
            assert reports[rank]["samples"] == GRAPHS // 2 * EPOCHS
            assert reports[rank]["errors"]["exchange"] == 1  # its own failure on rank 1, rank 1's marker on rank 0
            _, counted = only(scrape(reports[rank]["url"])["dgdn_monitor_errors_total"], part="exchange")
            assert counted == 1
        (listed,) = discovery_files(targets).values()
        assert listed[0]["targets"] == [f"127.0.0.1:{base}"]
        group.release_and_wait()
    log = (tmp_path / "run.log").read_text()
    assert "injected failure of this rank's exchange" in log
    # The module logs no 'train_acc': said by rank 0 only, not once per rank.
    assert log.count("the module has not logged 'train_acc'") == 1, log


def expected_file(node_rank: int, run_id: str) -> str:
    """``<job>-<hostname>-node<node_rank>-<run_id>.json``, the host name as the file name writes it."""
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", socket.gethostname()).strip("_")
    return f"dgdn-training-{host}-node{node_rank}-{run_id}.json"
