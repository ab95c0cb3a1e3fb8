"""Run lifecycle and discovery with the real parts: a real Prometheus running the ``dgdn-training`` scrape job as
``make stack-native`` derives it (static quick-start target, file SD, derived relabelling) with the shipped rules, a
real Alertmanager running the shipped webhook example, a webhook receiver in the test, and real Lightning runs
(in this process, in child processes, and 2-rank DDP). For every way of running: each rank is scraped exactly once,
the sums Prometheus holds equal what was trained, a normal end is quiet once the endpoint is gone (its process has
exited after a scrape read the end) or no longer listed (its discovery file removed), and a SIGKILL pages
``DGDNRunDown`` naming the run, on the static quick-start target as on discovered ones; a suspended process warns
instead; a failed run pages with its exception, also when another rank of the run is killed after it; a stale
discovery file is removed by the next run, and a target that was never reachable warns as a configuration problem.
Every wait is on a condition Prometheus or the process reports, never a fixed sleep."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml
from conftest import free_port, require_tool
from prom_helpers import (
    ALERTMANAGER_EXAMPLES,
    ROOT,
    RULES_FILE,
    Alertmanager,
    HttpSink,
    Prometheus,
    rules_evaluated_after,
    wait_until,
    webhook_alerts,
)

pytestmark = pytest.mark.slow

#: How long an alert may take to reach the webhook: scrape and evaluation every second, `for` cut to a few seconds,
#: Alertmanager group_wait 1 s; generous for a loaded machine.
ALERT_TIMEOUT_S = 60.0
#: Lifecycle alerts whose `for` the test shortens; the others keep theirs and cannot fire in a short test.
SHORTENED = {
    "DGDNRunDown": "3s",
    "DGDNRunUnreachable": "3s",
    "DGDNTargetNeverScraped": "3s",
    "DGDNMetricsEndpointGone": "1s",
}
START_TIMEOUT_S = 120.0


def lifecycle_rules(workdir: Path) -> Path:
    """The shipped rules with the lifecycle alerts' `for` shortened, and the run-identity group evaluated four times
    per scrape (the shipped 2 s are for 5 s scrapes; these tests scrape every second)."""
    rules = yaml.safe_load(RULES_FILE.read_text())
    for group in rules["groups"]:
        if "interval" in group:
            group["interval"] = "250ms"
        for rule in group["rules"]:
            if rule.get("alert") in SHORTENED:
                rule["for"] = SHORTENED[rule["alert"]]
    path = workdir / "dgdn-alerts.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def webhook_example(sink_url: str, workdir: Path) -> Path:
    """The shipped webhook example pointed at ``sink_url`` (paths kept), its token file in ``workdir``."""
    config = yaml.safe_load(ALERTMANAGER_EXAMPLES["webhook"].read_text())
    token = workdir / "webhook_token"
    token.write_text("lifecycle-test-token\n")
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = sink_url + "/" + webhook["url"].split("//", 1)[1].split("/", 1)[1]
            webhook["http_config"]["authorization"]["credentials_file"] = str(token)
    for route in [config["route"], *config["route"]["routes"]]:
        route.update(group_wait="1s", group_interval="1s")
    path = workdir / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Any:
    """Prometheus (the derived training job; its static quick-start target on a free port standing for 8000) +
    Alertmanager + webhook sink."""
    prometheus_binary = require_tool("prometheus")
    alertmanager_binary = require_tool("alertmanager")
    import deploy_training as dt

    workdir = tmp_path_factory.mktemp("lifecycle")
    targets = workdir / "targets"
    targets.mkdir()
    sink = HttpSink()
    alertmanager = Alertmanager(alertmanager_binary, webhook_example(sink.url, workdir), workdir, free_port())
    static_port = free_port()
    config = dt.shipped_training_config(
        workdir / "prometheus.yml",
        f"127.0.0.1:{static_port}",
        targets,
        rule_files=[lifecycle_rules(workdir)],
        alertmanager=f"127.0.0.1:{alertmanager.port}",
    )
    prometheus = Prometheus(prometheus_binary, config, workdir, free_port())
    try:
        alertmanager.wait_ready()
        prometheus.wait_ready()
        yield {"prometheus": prometheus, "sink": sink, "targets": targets, "static_port": static_port}
    finally:
        prometheus.stop()
        alertmanager.stop()
        sink.close()


# ------------------------------------------------------------------------------------------------ helpers
def _alerts(received, alertname: str, status: str = "firing") -> list[tuple[str, dict[str, Any]]]:
    return [
        (path, alert)
        for path, alert in webhook_alerts(received)
        if alert["labels"].get("alertname") == alertname and alert["status"] == status
    ]


def _value(prometheus: Prometheus, expr: str) -> Optional[float]:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if result else None


def _wait_for_down_alert(sink: HttpSink, **labels: str) -> dict[str, Any]:
    def matching(received):
        return [
            (path, alert)
            for path, alert in _alerts(received, "DGDNRunDown")
            if all(alert["labels"].get(k) == v for k, v in labels.items())
        ]

    path, alert = sink.wait_for(matching, ALERT_TIMEOUT_S, f"DGDNRunDown for {labels}")[0]
    assert path == "/alerts/critical" and alert["labels"]["severity"] == "critical"
    return alert


def _loud_about(sink: HttpSink, prometheus: Prometheus, **labels: str) -> list[Any]:
    """Warning or critical alerts about the series with ``labels``: at the webhook and firing in Prometheus."""
    at_webhook = [
        alert["labels"]
        for _, alert in webhook_alerts(sink.snapshot())
        if alert["status"] == "firing"
        and alert["labels"].get("severity") in ("warning", "critical")
        and all(alert["labels"].get(k) == v for k, v in labels.items())
    ]
    selector = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    firing = prometheus.query(f'ALERTS{{alertstate="firing", severity=~"warning|critical", {selector}}}')
    return at_webhook + firing


def _targets_ever(prometheus: Prometheus, selector: str) -> int:
    """How many targets (``up`` series) matching ``selector`` Prometheus has held in the last 10 minutes."""
    return int(_value(prometheus, f"count(count_over_time(up{{{selector}}}[10m]))") or 0)


def _scraped_total(prometheus: Prometheus, selector: str) -> Optional[float]:
    """The sum over every series of the last scraped ``dgdn_samples_processed_total`` matching ``selector``."""
    return _value(prometheus, f'sum(last_over_time(dgdn_samples_processed_total{{instance!="", {selector}}}[10m]))')


def _gone_quietly(prometheus: Prometheus, sink: HttpSink, selector: str, **labels: str) -> None:
    """The targets matching ``selector`` no longer answer or are no longer scraped, for longer than the shortened
    ``for`` of DGDNRunDown plus two evaluations, and nothing warning or critical fired about them."""
    wait_until(lambda: not prometheus.query(f"up{{{selector}}} == 1"), 60, what=f"{selector} gone")
    down_for = int(SHORTENED["DGDNRunDown"].rstrip("s")) + 3
    wait_until(
        lambda: not prometheus.query(f"up{{{selector}}}")  # dropped with its discovery file
        or (_value(prometheus, f"min(count_over_time((up{{{selector}}} == 0)[30s:1s]))") or 0) >= down_for,
        60,
        what=f"{selector} dropped, or down for {down_for} s of evaluations",
    )
    assert not _loud_about(sink, prometheus, **labels)


def _outcome_scraped(prometheus: Prometheus, selector: str, outcome: str) -> None:
    wait_until(
        lambda: prometheus.query(f'last_over_time(dgdn_run_outcome{{{selector}, outcome="{outcome}"}}[1m]) == 1'),
        30,
        what=f"outcome {outcome} scraped for {selector}",
    )


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }


class Child:
    """``tests/deploy_training.py`` in its own process group; knows its run id and endpoint once it serves."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "deploy_training.py"), *args],
            cwd=ROOT,
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.run_id = self.target = ""

    def _expect(self, word: str) -> str:
        line = ""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not line.startswith(word) and time.monotonic() < deadline and self.process.poll() is None:
            line = self.process.stdout.readline()
        assert line.startswith(word), f"no {word!r} from the training process (exit {self.process.poll()})"
        return line

    def serving(self) -> Child:
        _, self.run_id, url = self._expect("serving").split()
        self.target = url.split("//", 1)[1].split("/", 1)[0]
        return self

    def release_once_scraped(self, prometheus: Prometheus, selector: str) -> None:
        """With ``--hold``: once its last step is done and Prometheus has scraped it three times (a regular scraper,
        whose scrape of the end its exit waits for), let its run end."""
        self._expect("holding")
        wait_until(
            lambda: (_value(prometheus, f"min(count_over_time(up{{{selector}}}[1m]))") or 0) >= 3,
            60,
            what=f"three scrapes of {selector}",
        )
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def done(self) -> int:
        """Samples trained by a run that ends by itself."""
        out, _ = self.process.communicate(timeout=START_TIMEOUT_S)
        line = next(line for line in out.splitlines() if line.startswith("done"))
        assert self.process.returncode == 0
        return int(line.split("samples=")[1])

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


# ------------------------------------------------------------------------------------------------ tests
def test_one_process_with_defaults_is_scraped_once_ends_quietly_and_pages_when_killed(stack):
    """No arguments: the run serves the quick-start port (a free port stands for 8000 here) and is scraped by the
    static target once, sums equal; its process exits once a scrape read the end, and that end is quiet; the same
    set-up killed with SIGKILL pages."""
    import deploy_training as dt

    prometheus, sink, port = stack["prometheus"], stack["sink"], stack["static_port"]
    static = f"127.0.0.1:{port}"
    defaults = ("--targets-dir", "default", "--port", "default", "--addr", "default", "--default-port", str(port))
    ending = Child(*defaults, "--epochs", "3", "--hold")
    try:
        assert ending.serving().target.endswith(f":{port}")
        ending.release_once_scraped(prometheus, f'instance="{static}"')
        samples = ending.done()  # returns once the process has exited: its endpoint is gone
        _outcome_scraped(prometheus, f'instance="{static}"', "completed")
        assert _targets_ever(prometheus, f'job="{dt.JOB}"') == 1
        assert _scraped_total(prometheus, f'instance="{static}"') == samples == 32 * 3
        _gone_quietly(prometheus, sink, f'instance="{static}"', instance=static)
    finally:
        ending.kill()

    # The same defaults in a process killed mid-run.
    child = Child(*defaults)
    try:
        child.serving()
        assert child.target.endswith(f":{port}")
        _outcome_scraped(prometheus, f'instance="{static}"', "running")
        child.kill()
        alert = _wait_for_down_alert(sink, instance=static)
        # The static target's series carry no run id; the page names the run all the same.
        assert alert["labels"]["run_id"] == child.run_id and alert["labels"]["rank"] == "0"
        assert alert["annotations"]["summary"] == f"Run {child.run_id}: rank 0 on {static} died"
        assert f"run {child.run_id} " in alert["annotations"]["description"]
    finally:
        child.kill()


def test_discovered_runs_on_one_node_with_default_ports_any_host_each_scraped_once(stack):
    """Three runs at once on one node with a discovery directory and default ports: one with the default host (this
    machine's name), two with the Docker recipe's host.docker.internal. No clash, each scraped once (never also by
    the static target), sums equal; the one that ends is quiet and its file goes; the killed ones page."""
    prometheus, sink, targets = stack["prometheus"], stack["sink"], stack["targets"]
    common = ("--targets-dir", str(targets), "--port", "default", "--addr", "default")
    killed = Child(*common, "--targets-host", "default")
    killed_docker = Child(*common, "--targets-host", "host.docker.internal")
    ending = Child(*common, "--targets-host", "host.docker.internal", "--epochs", "12", "--hold")
    children = (killed, killed_docker, ending)
    try:
        for child in children:
            child.serving()
        ports = {int(child.target.rsplit(":", 1)[1]) for child in children}
        assert len(ports) == 3 and stack["static_port"] not in ports
        ending.release_once_scraped(prometheus, f'run_id="{ending.run_id}"')
        samples = ending.done()
        _outcome_scraped(prometheus, f'run_id="{ending.run_id}"', "completed")
        assert not list(targets.glob(f"*{ending.run_id}.json")), "a run that ended left its discovery file"
        assert _targets_ever(prometheus, f'run_id="{ending.run_id}"') == 1
        assert _scraped_total(prometheus, f'run_id="{ending.run_id}"') == samples == 32 * 12
        _gone_quietly(prometheus, sink, f'run_id="{ending.run_id}"', run_id=ending.run_id)

        for child in (killed, killed_docker):
            wait_until(
                lambda child=child: prometheus.query(f'dgdn_last_step_timestamp_seconds{{run_id="{child.run_id}"}}'),
                60,
                what="the run scraped after a step",
            )
            assert _targets_ever(prometheus, f'run_id="{child.run_id}"') == 1
        instance = prometheus.query(f'up{{run_id="{killed.run_id}"}}')[0]["metric"]["instance"]
        assert instance == f"{socket.gethostname()}:{killed.target.rsplit(':', 1)[1]}"  # the default host
        docker_instance = prometheus.query(f'up{{run_id="{killed_docker.run_id}"}}')[0]["metric"]["instance"]
        assert docker_instance == f"127.0.0.1:{killed_docker.target.rsplit(':', 1)[1]}"  # derived: on loopback
        killed.kill()
        killed_docker.kill()
        assert _wait_for_down_alert(sink, run_id=killed.run_id)["labels"]["instance"] == instance
        assert _wait_for_down_alert(sink, run_id=killed_docker.run_id)["labels"]["instance"] == docker_instance
        assert not _loud_about(sink, prometheus, run_id=ending.run_id)  # still quiet after those pages
    finally:
        for child in children:
            child.kill()
        for child in (killed, killed_docker):  # killed runs' files; the next run would expire them
            for leftover in targets.glob(f"*{child.run_id}.json"):
                leftover.unlink()


def test_two_ddp_ranks_are_scraped_once_each_end_quietly_and_page_when_killed(stack, tmp_path):
    """2-rank DDP with a discovery directory and default ports: one file lists both ranks, each scraped once with
    the samples it trained; a normal end is quiet, also when rank 1 ends several scrapes after rank 0 (the file
    lists it until a scrape has read its end too); the same run killed (its process group) pages for both ranks."""
    prometheus, sink, targets = stack["prometheus"], stack["sink"], stack["targets"]
    script = ROOT / "tests" / "ddp_train.py"

    def start(out: Path, *late: str) -> subprocess.Popen:
        out.mkdir()
        return subprocess.Popen(
            [sys.executable, str(script), "--out", str(out), "--targets-dir", str(targets), "--default-port",
             "--trace-ranks", "none", "--hold", *late],
            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def reports(out: Path) -> list[dict[str, Any]]:
        """What each rank trained, once both hold at their end and each was scraped regularly (a real run lasts
        several scrapes; the end of one scraped fewer than twice is not waited for)."""
        wait_until(lambda: len(list(out.glob("ready-rank*.json"))) == 2, START_TIMEOUT_S, what="both ranks trained")
        ranks = sorted((json.loads(p.read_text()) for p in out.glob("ready-rank*.json")), key=lambda r: r["rank"])
        wait_until(
            lambda: (_value(prometheus, f'min(count_over_time(up{{run_id="{ranks[0]["run_id"]}"}}[1m]))') or 0) >= 3,
            30,
            what="three scrapes of each rank",
        )
        return ranks

    ended = start(tmp_path / "ended", "--late-rank", "1", "--late-s", "4")  # 4 scrape intervals after rank 0
    try:
        ranks = reports(tmp_path / "ended")
        run_id = ranks[0]["run_id"]
        for report in ranks:
            wait_until(
                lambda report=report: _value(prometheus, f'dgdn_samples_processed_total{{run_id="{run_id}", '
                                            f'rank="{report["rank"]}"}}') == report["samples"],
                30,
                what=f"rank {report['rank']}'s last samples scraped",
            )  # fmt: skip
        (tmp_path / "ended" / "release").write_text("")
        assert ended.wait(timeout=START_TIMEOUT_S) == 0
        _outcome_scraped(prometheus, f'run_id="{run_id}", rank="1"', "completed")
        _outcome_scraped(prometheus, f'run_id="{run_id}", rank="0"', "completed")
        assert _targets_ever(prometheus, f'run_id="{run_id}"') == 2
        assert _scraped_total(prometheus, f'run_id="{run_id}"') == sum(r["samples"] for r in ranks) == 40 * 2
        assert not list(targets.glob(f"*{run_id}.json"))
        _gone_quietly(prometheus, sink, f'run_id="{run_id}"', run_id=run_id)
    finally:
        if ended.poll() is None:
            os.killpg(ended.pid, signal.SIGKILL)
            ended.wait(timeout=30)

    killed = start(tmp_path / "killed")
    try:
        killed_id = reports(tmp_path / "killed")[0]["run_id"]
        _outcome_scraped(prometheus, f'run_id="{killed_id}", rank="1"', "running")
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
        _wait_for_down_alert(sink, run_id=killed_id)
        sink.wait_for(
            lambda r: len({a["labels"]["instance"] for _, a in _alerts(r, "DGDNRunDown")
                           if a["labels"].get("run_id") == killed_id}) == 2,
            ALERT_TIMEOUT_S,
            "DGDNRunDown for both ranks",
        )  # fmt: skip
        assert not _loud_about(sink, prometheus, run_id=run_id)  # the ended run: still quiet after those pages
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait(timeout=30)
        for leftover in targets.glob("*.json"):
            leftover.unlink()


def test_a_stale_file_is_removed_by_the_next_run_and_a_never_reachable_target_warns(stack):
    """A discovery file left by a run that died long ago is removed when the next run writes its own; a listed
    target Prometheus never reaches raises DGDNTargetNeverScraped naming its address, never DGDNRunDown."""
    import deploy_training as dt

    from dgdn_lightning_monitor import MonitoringCallback
    from dgdn_lightning_monitor.distributed import EXPIRE_S

    prometheus, sink, targets = stack["prometheus"], stack["sink"], stack["targets"]
    stale_target, ghost_target = f"127.0.0.1:{free_port()}", "unresolvable-node.invalid:9100"
    stale = targets / f"{dt.JOB}-deadnode-node0-stale1.json"
    ghost = targets / f"{dt.JOB}-ghost-node0-ghost1.json"
    for path, target, run_id in ((stale, stale_target, "stale1"), (ghost, ghost_target, "ghost1")):
        path.write_text(json.dumps([{"targets": [target], "labels": {"job": dt.JOB, "run_id": run_id}}]))
    old = time.time() - EXPIRE_S - 60
    os.utime(stale, (old, old))
    try:
        path, alert = sink.wait_for(
            lambda r: [a for a in _alerts(r, "DGDNTargetNeverScraped") if a[1]["labels"]["instance"] == ghost_target],
            ALERT_TIMEOUT_S,
            "DGDNTargetNeverScraped for the unreachable target",
        )[0]
        assert path == "/alerts" and alert["labels"]["severity"] == "warning"
        assert ghost_target in alert["annotations"]["description"]
        assert "targets_host" in alert["annotations"]["description"]

        # The next run: defaults but for the directory (a free port, this machine's name), in this process.
        monitor = MonitoringCallback(targets_dir=targets, tracing=False)
        seen: dict[str, Any] = {}

        def start(trainer) -> None:
            seen["stale_left"] = stale.exists()
            wait_until(
                lambda: not prometheus.query(f'up{{instance="{stale_target}"}}'), 30, what="the stale target dropped"
            )

        def end(trainer) -> None:
            wait_until(
                lambda: (
                    (_value(prometheus, f'count_over_time(up{{run_id="{monitor.run_id}"}}[1m])') or 0) >= 3
                    and prometheus.query(f'dgdn_global_step{{run_id="{monitor.run_id}"}} == {trainer.global_step}')
                ),
                30,
                what="the run scraped regularly and after its last step",
            )

        train, val = dt.loaders()
        dt.trainer([dt.Hooks(start, lambda t: None, end), monitor], max_epochs=2).fit(
            dt.LiveGCN(step_sleep_s=0.0), train, val
        )
        assert seen["stale_left"] is False, "the next run did not remove the expired discovery file"
        _outcome_scraped(prometheus, f'run_id="{monitor.run_id}"', "completed")
        assert _targets_ever(prometheus, f'run_id="{monitor.run_id}"') == 1
        assert _scraped_total(prometheus, f'run_id="{monitor.run_id}"') == 32 * 2
        # Its endpoint serves on in this process; its discovery file goes once a scrape read the end.
        wait_until(lambda: not list(targets.glob(f"*{monitor.run_id}.json")), 30, what="the discovery file removed")
        _gone_quietly(prometheus, sink, f'run_id="{monitor.run_id}"', run_id=monitor.run_id)
        assert ghost.exists(), "a fresh file of another run was removed"
        down = {alert["labels"].get("instance") for _, alert in _alerts(sink.snapshot(), "DGDNRunDown")}
        assert not down & {stale_target, ghost_target}
    finally:
        stale.unlink(missing_ok=True)
        ghost.unlink(missing_ok=True)


def test_a_failed_run_pages_with_its_exception_and_the_rank_killed_after_it_does_not(stack):
    """One rank of a discovered run raises; the launcher then kills the run's rank on another node (SIGKILL, as
    torchrun or srun do), whose node's discovery file stays. The failed rank's last scrape says failed with the
    exception's class, and DGDNRunFailed reaches the critical webhook naming it; the killed rank's death, which the
    failure caused, pages nobody."""
    import deploy_training as dt
    import lightning.pytorch as pl

    from dgdn_lightning_monitor import MonitoringCallback

    prometheus, sink, targets = stack["prometheus"], stack["sink"], stack["targets"]
    run_id = f"failing-{os.getpid()}"
    other_rank = Child("--port", "0", "--addr", "127.0.0.1", "--run-id", run_id)
    other_node_file = targets / f"{dt.JOB}-othernode-node1-{run_id}.json"
    monitor = MonitoringCallback(
        addr="127.0.0.1", targets_dir=targets, targets_host="127.0.0.1", run_id=run_id, tracing=False
    )

    class Fail(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 1:
                wait_until(
                    lambda: (
                        (_value(prometheus, f'min(count_over_time(up{{run_id="{run_id}"}}[1m]))') or 0) >= 3
                        and _value(prometheus, f'count(up{{run_id="{run_id}"}} == 1)') == 2
                    ),
                    30,
                    what="three scrapes of both ranks of the run",
                )
            if trainer.global_step == 2:
                raise ValueError("a broken batch")

    try:
        other_rank.serving()
        other_node_file.write_text(
            json.dumps([{"targets": [other_rank.target], "labels": {"job": dt.JOB, "run_id": run_id}}])
        )
        train, val = dt.loaders()
        with pytest.raises(ValueError, match="a broken batch"):
            dt.trainer([Fail(), monitor], max_epochs=5).fit(dt.LiveGCN(step_sleep_s=0.0), train, val)
        path, alert = sink.wait_for(
            lambda r: [a for a in _alerts(r, "DGDNRunFailed") if a[1]["labels"].get("run_id") == run_id],
            ALERT_TIMEOUT_S,
            "DGDNRunFailed for the failed run",
        )[0]
        assert path == "/alerts/critical" and alert["labels"]["severity"] == "critical"
        assert alert["labels"]["exception"] == "ValueError"
        assert alert["annotations"]["summary"].startswith(f"Run {run_id} failed with ValueError on rank 0")
        # The failed rank serves on in this process; its discovery file goes once a scrape read its end.
        wait_until(lambda: not list(targets.glob(f"*-node0-{run_id}.json")), 30, what="the discovery file removed")

        other_rank.kill()
        killed = other_rank.target
        wait_until(
            lambda: (_value(prometheus, f'count_over_time((up{{instance="{killed}"}} == 0)[30s:1s])') or 0) >= 5,
            30,
            what=f"the killed rank at {killed} down for 5 scrapes",
        )
        rules_evaluated_after(prometheus, time.time() + 5)  # past the shortened `for` of DGDNRunDown
        assert prometheus.query(f'last_over_time(dgdn_run_outcome{{instance="{killed}", outcome="running"}}[1m]) == 1')
        assert not prometheus.query(f'ALERTS{{alertname=~"DGDNRun(Down|Unreachable)", run_id="{run_id}"}}')
        assert not [a for _, a in _alerts(sink.snapshot(), "DGDNRunDown") if a["labels"].get("run_id") == run_id]
    finally:
        other_rank.kill()
        other_node_file.unlink(missing_ok=True)
        for leftover in targets.glob(f"*{run_id}.json"):
            leftover.unlink()


def test_a_suspended_run_warns_that_it_does_not_answer_and_never_pages_as_died(stack):
    """A run whose processes are stopped (SIGSTOP: SLURM's scontrol suspend, preemption in suspend mode, Ctrl-Z)
    keeps its port open without answering: its scrapes time out. It warns with DGDNRunUnreachable, never pages
    DGDNRunDown, and answers again when continued (SIGCONT)."""
    prometheus, sink, targets = stack["prometheus"], stack["sink"], stack["targets"]
    child = Child("--targets-dir", str(targets), "--targets-host", "127.0.0.1")
    try:
        child.serving()
        _outcome_scraped(prometheus, f'run_id="{child.run_id}"', "running")
        os.killpg(child.process.pid, signal.SIGSTOP)
        path, alert = sink.wait_for(
            lambda r: [a for a in _alerts(r, "DGDNRunUnreachable") if a[1]["labels"].get("run_id") == child.run_id],
            ALERT_TIMEOUT_S,
            "DGDNRunUnreachable for the suspended run",
        )[0]
        assert path == "/alerts" and alert["labels"]["severity"] == "warning"
        assert alert["labels"]["instance"] == child.target and alert["labels"]["rank"] == "0"
        assert alert["annotations"]["summary"].startswith(f"Run {child.run_id}: rank 0 on {child.target}")
        # Its scrapes wait for their timeout (1 s here) rather than being refused.
        assert (_value(prometheus, f'scrape_duration_seconds{{instance="{child.target}"}}') or 0) >= 1
        assert not prometheus.query(f'ALERTS{{alertname="DGDNRunDown", run_id="{child.run_id}"}}')
        assert not [a for _, a in _alerts(sink.snapshot(), "DGDNRunDown") if a["labels"].get("run_id") == child.run_id]

        os.killpg(child.process.pid, signal.SIGCONT)
        wait_until(
            lambda: prometheus.query(f'up{{run_id="{child.run_id}"}} == 1'), 30, what="the continued run answering"
        )
        wait_until(
            lambda: not prometheus.query(f'ALERTS{{alertname="DGDNRunUnreachable", run_id="{child.run_id}"}}'),
            30,
            what="DGDNRunUnreachable resolved once the run answers",
        )
    finally:
        if child.process.poll() is None:
            os.killpg(child.process.pid, signal.SIGCONT)
        child.kill()
        for leftover in targets.glob(f"*{child.run_id}.json"):
            leftover.unlink()
