"""The ``dgdn-monitor`` command: demo and train runs, the summary, argument errors."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import urllib.request

import pytest

from dgdn_lightning_monitor import cli

TINY = ["--num-nodes", "150", "--num-events", "2000", "--batch-size", "100", "--hidden-dim", "32",
        "--num-layers", "1", "--port", "0", "--no-progress-bar", "--tracing", "off", "--trace-every", "2"]


class _ScrapeOnAnnounce(io.StringIO):
    """Collects the messages; when the metrics URL is announced, reads the endpoint right away."""

    def __init__(self) -> None:
        super().__init__()
        self.scraped = ""

    def write(self, text: str) -> int:
        match = re.search(r"Prometheus metrics: (http://\S+)", text)
        if match:
            with urllib.request.urlopen(match.group(1), timeout=10) as response:
                self.scraped = response.read().decode()
        return super().write(text)


def test_demo_trains_serves_metrics_and_summarises(capsys):
    args = cli.build_parser().parse_args(["demo", "--epochs", "2", *TINY])
    out = _ScrapeOnAnnounce()
    result = cli.run(args, out=out)

    messages = out.getvalue()
    assert re.search(r"Prometheus metrics: http://localhost:\d+/metrics", messages)
    assert "dgdn_samples_processed_total" in out.scraped  # served from setup on
    assert result["epochs"] == 2 and result["metrics"]["val_ap"] > 0.6
    assert result["monitor"]["samples"] == 2 * 1400

    summary = cli.format_summary(result)
    for needle in ("train_loss=", "val_loss=", "val_ap=", "val_auc=", "events/s", "data_fetch", "forward",
                   "backward", "optimizer_step", "http://localhost:3000", "http://localhost:16686",
                   "http://localhost:9090", result["metrics_url"]):
        assert needle in summary, needle


def test_main_prints_the_summary(capsys):
    assert cli.main(["demo", "--epochs", "1", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "Prometheus metrics: http://" in printed
    assert re.search(r"val_ap=0\.\d{4}", printed) and re.search(r"val_auc=0\.\d{4}", printed)
    assert "Grafana" in printed and "Jaeger" in printed and "Prometheus " in printed


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
    code = cli.main(["train", "--dataset", "lastfm", "--root", str(tmp_path), "--epochs", "1", "--batch-size", "100",
                     "--hidden-dim", "16", "--num-layers", "1", "--port", "0", "--no-progress-bar",
                     "--tracing", "off"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dataset: lastfm" in printed and "val_ap=" in printed


def test_failed_download_exits_with_where_to_put_the_file(tmp_path, capsys, monkeypatch):
    import torch_geometric.datasets.jodie as jodie

    def offline(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(jodie, "download_url", offline)
    code = cli.main(["train", "--dataset", "reddit", "--root", str(tmp_path), "--port", "0", "--tracing", "off"])
    assert code == 1
    err = capsys.readouterr().err
    assert os.path.join(str(tmp_path), "reddit", "raw", "reddit.csv") in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["demo", "--epochs", "0"], "--epochs"),
        (["demo", "--port", "70000"], "--port"),
        (["demo", "--num-events", "many"], "--num-events"),
        (["demo", "--devices", "x"], "--devices"),
        (["demo", "--lr", "-1"], "--lr"),
        (["train", "--dataset", "cora"], "invalid choice"),
        (["demo", "--num-nodes", "1"], "num_nodes"),
        (["demo", "--hidden-dim", "30"], "hidden_dim"),
        ([], "COMMAND"),
    ],
)
def test_argument_errors_exit_with_a_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_taken_port_is_reported(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        argv = ["demo", "--epochs", "1", *TINY]
        argv[argv.index("--port") + 1] = str(port)
        assert cli.main(argv) == 1
    assert "--port 0" in capsys.readouterr().err


def test_module_and_console_script_entry_points():
    done = subprocess.run([sys.executable, "-m", "dgdn_lightning_monitor", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout and "train" in done.stdout
    script = os.path.join(os.path.dirname(sys.executable), "dgdn-monitor")
    if os.path.exists(script):
        done = subprocess.run([script, "demo", "--epochs", "0"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "--epochs" in done.stderr
