"""The ``dgdn-monitor`` command on LightningCLI: runs, the summary, configs, one-line errors."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import urllib.request

import pytest
import torch

from dgdn_lightning_monitor import cli
from dgdn_testing.otlp_receiver import OTLPReceiver

TINY = ["--data.num_nodes", "150", "--data.num_events", "2000", "--data.batch_size", "100", "--model.hidden_dim",
        "32", "--model.num_layers", "1", "--monitor.port", "0", "--trainer.enable_progress_bar", "false",
        "--monitor.tracing", "false", "--monitor.trace_every_n_steps", "2"]  # fmt: skip
TRAIN_EVENTS = 1400  # the first 70% of 2000 events


class _ScrapeOnAnnounce(io.StringIO):
    """Collects the start-up lines; when the metrics URL is announced, reads the endpoint right away."""

    def __init__(self) -> None:
        super().__init__()
        self.scraped = ""

    def write(self, text: str) -> int:
        match = re.search(r"metrics at (http://\S+)", text)
        if match:
            with urllib.request.urlopen(match.group(1), timeout=10) as response:
                self.scraped = response.read().decode()
        return super().write(text)


def _tracing_line(printed: str) -> str:
    (line,) = [line for line in printed.splitlines() if line.startswith("tracing:")]
    return line


def test_demo_trains_serves_metrics_and_summarises():
    out = _ScrapeOnAnnounce()
    result = cli.run_training(cli.build_cli(["--trainer.max_epochs", "2", *TINY], command="demo"), out=out)

    messages = out.getvalue()
    assert re.search(r"Serving training metrics at http://localhost:\d+/metrics", messages)
    assert "dgdn_samples_processed_total" in out.scraped  # served from setup on
    assert result["epochs"] == 2 and result["metrics"]["val_ap"] > 0.6
    assert result["monitor"]["samples"] == 2 * TRAIN_EVENTS
    assert result["monitor"]["steps"] == 2 * 14
    # A progress line after each epoch: the share of the run's 28 optimizer steps, and the time left until the last.
    progress = [line for line in messages.splitlines() if line.startswith("epoch ")]
    assert len(progress) == 2, messages
    assert re.fullmatch(r"epoch 1/2 done: 50% of the run, about \d+\.\d+ m?s left", progress[0]), progress[0]
    assert progress[1] == "epoch 2/2 done: 100% of the run"
    assert result["monitor"]["progress_ratio"] == 1.0 and result["monitor"]["eta_seconds"] is None

    quiet = cli.format_summary(result, probe=lambda url: False)
    for needle in ("train_loss=", "val_loss=", "val_ap=", "val_auc=", "events/s", "data_fetch", "forward",
                   "backward", "optimizer_step", "make stack", "make stack-native", "make notebooks",
                   "tracing: was off, no spans sent (--monitor.tracing false)"):  # fmt: skip
        assert needle in quiet, needle
    verdict = result["monitor"]["bottleneck"]  # the run's verdict and its hint close the report
    assert f"limited by {verdict}:" in quiet and result["monitor"]["hint"] in quiet
    assert "http://" not in quiet  # nothing answers: no URL is offered, and the closed endpoint is not a link
    port = result["metrics_url"].rsplit(":", 1)[1].split("/")[0]
    assert f"served on port {port}" in quiet

    live = cli.format_summary(result, probe=lambda url: True)
    for needle in ("http://localhost:3000", "login admin", "http://localhost:16686", "http://localhost:9090"):
        assert needle in live, needle
    assert result["metrics_url"] not in live


def test_summary_says_how_to_turn_tracing_on():
    result = {"dataset": "synthetic", "num_events": 10, "num_nodes": 5, "epochs": 1, "metrics": {},
              "monitor": {}, "train_events": 7, "fit_seconds": 1.0, "prepare_seconds": 0.1, "total_seconds": 1.1,
              "metrics_url": None,
              "tracing": None, "tracing_option": None}  # fmt: skip
    summary = cli.format_summary(result, probe=lambda url: False)
    assert "tracing: was off, no spans sent; to turn it on" in summary and "OTEL_EXPORTER_OTLP_ENDPOINT" in summary
    assert "metrics: were served" not in summary


def test_main_prints_each_fact_once(capsys):
    assert cli.main(["demo", "--trainer.max_epochs", "1", *TINY]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    url = re.search(r"Serving training metrics at (http://\S+)", printed).group(1)
    assert printed.count(url) == 1 and url not in captured.err
    assert re.search(r"val_ap=0\.\d{4}", printed) and re.search(r"val_auc=0\.\d{4}", printed)
    assert printed.count("Training DGDN on synthetic: 2000 events, 150 nodes, 1 epoch\n") == 1
    assert "Tip:" not in printed + captured.err
    assert "args parameter" not in captured.err
    assert _tracing_line(printed).startswith("tracing: was off, no spans sent (--monitor.tracing false)")


@pytest.mark.parametrize("receiver_state", ["answering", "closed"])
def test_summary_says_whether_spans_were_delivered_or_dropped(receiver_state, monkeypatch, capsys):
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_BSP_SCHEDULE_DELAY"):
        monkeypatch.delenv(name, raising=False)
    argv = ["demo", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches",
            "1", *TINY]  # fmt: skip
    argv[argv.index("--monitor.tracing") + 1] = "true"
    with OTLPReceiver() as receiver:
        if receiver_state == "closed":
            with socket.socket() as sock:  # a port nothing listens on
                sock.bind(("127.0.0.1", 0))
                endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/traces"
        else:
            endpoint = receiver.endpoint
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
        assert cli.main(argv) == 0
        received = len(receiver.spans)
    line = _tracing_line(capsys.readouterr().out)
    if receiver_state == "answering":
        assert received > 0 and line == f"tracing: {received} spans delivered to {endpoint}"
    else:
        match = re.fullmatch(rf"tracing: spans dropped: {re.escape(endpoint)} did not accept (\d+) of (\d+)", line)
        assert match and int(match.group(1)) == int(match.group(2)) > 0, line


def test_print_config_is_accepted_by_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.build_cli(["--trainer.max_epochs", "1", *TINY, "--print_config"])
    assert info.value.code in (0, None)
    config = capsys.readouterr().out
    for needle in ("trainer:", "max_epochs: 1", "model:", "hidden_dim: 32", "data:", "num_events: 2000",
                   "monitor:", "trace_every_n_steps: 2"):  # fmt: skip
        assert needle in config, needle
    path = tmp_path / "run.yaml"
    path.write_text(config)

    assert cli.main(["train", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "dataset: synthetic  (2000 events, 150 nodes, 1 epoch)" in printed
    assert f"{TRAIN_EVENTS} events)" in printed


def _write_jodie_csv(path, users=30, items=20, events=900):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write("user_id,item_id,timestamp,state_label,comma_separated_list_of_features\n")
        for i in range(events):
            user = i % users
            item = (user * 3 + (i // users) % 2) % items  # each user returns to two favourite items
            handle.write(f"{user},{item},{float(i * 5)},{int(i % 50 == 0)},{user / users:.3f},{item / items:.3f}\n")


def test_train_on_a_jodie_file_placed_offline(tmp_path, capsys):
    _write_jodie_csv(str(tmp_path / "lastfm" / "raw" / "lastfm.csv"))
    code = cli.main(["train", "--data.dataset", "lastfm", "--data.root", str(tmp_path), "--trainer.max_epochs", "1",
                     "--data.batch_size", "100", "--model.hidden_dim", "16", "--model.num_layers", "1",
                     "--monitor.port", "0", "--monitor.tracing", "false"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "dataset: lastfm" in printed and "val_ap=" in printed


def test_failed_download_exits_with_where_to_put_the_file(tmp_path, capsys, monkeypatch):
    import torch_geometric.datasets.jodie as jodie

    def offline(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(jodie, "download_url", offline)
    code = cli.main(["train", "--data.dataset", "reddit", "--data.root", str(tmp_path), "--monitor.port", "0"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and os.path.join(str(tmp_path), "reddit", "raw", "reddit.csv") in err[0]


ERRORS = [
    (["train", "--trainer.max_epochs", "zero"], "--trainer.max_epochs"),
    (["train", "--monitor.port", "70000"], "port"),
    (["train", "--monitor.tracing", "maybe"], "--monitor.tracing"),
    (["demo", "--data.num_events", "many"], "--data.num_events"),
    (["train", "--trainer.accelerator", "quantum"], "accelerator"),
    (["train", "--trainer.devices", "x"], "devices"),
    (["train", "--model.lr", "-1"], "lr"),
    (["train", "--data.dataset", "cora"], "cora"),
    (["demo", "--data.num_nodes", "1"], "num_nodes"),
    (["demo", "--model.hidden_dim", "30"], "hidden_dim"),
    (["train", "--no-such-option", "1"], "--no-such-option"),
    (["fit"], "COMMAND"),
]
if not torch.cuda.is_available():
    ERRORS.append((["train", "--trainer.accelerator", "gpu"], "gpu"))


@pytest.mark.parametrize(("argv", "needle"), ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_impossible_options_exit_with_one_line(argv, needle, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, captured.err
    assert err[0].startswith("dgdn-monitor") and "error:" in err[0] and needle in err[0]
    assert "Traceback" not in captured.out + captured.err


def test_no_command_prints_the_usage(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "demo" in err and "train" in err and "--print_config" in err


def test_taken_port_is_reported_once(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        argv = ["demo", "--trainer.max_epochs", "1", *TINY]
        argv[argv.index("--monitor.port") + 1] = str(port)
        assert cli.main(argv) == 1
    # Lightning's own hint on a machine with SLURM's srun installed ("The `srun` command is available ...") is not ours.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "srun" not in line]
    assert len(err) == 1 and f"port {port} is already in use" in err[0] and "--monitor.port 0" in err[0]
    assert ".." not in err[0]


def test_module_and_console_script_entry_points():
    done = subprocess.run([sys.executable, "-m", "dgdn_lightning_monitor", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0 and "demo" in done.stdout and "train" in done.stdout
    script = os.path.join(os.path.dirname(sys.executable), "dgdn-monitor")
    if os.path.exists(script):
        done = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0
        for needle in ("--trainer.max_epochs", "--model.hidden_dim", "--data.dataset", "--monitor.port", "--config",
                       "--print_config"):  # fmt: skip
            assert needle in done.stdout, needle
        done = subprocess.run([script, "demo", "--trainer.max_epochs", "-5"], capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
        assert done.returncode == 2 and "max_epochs" in done.stderr, done.stderr
