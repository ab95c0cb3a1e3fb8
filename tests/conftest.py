"""Shared test fixtures.

Tests that talk to a real tool (promtool, prometheus, amtool, alertmanager, pushgateway, docker-compose) use
:func:`require_tool`. On a laptop without the tool they skip; with ``DGDN_MONITOR_REQUIRE_TOOLS=1`` (set by
``.ci/run``) a missing tool is a failure, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

# The shared test-support package (dgdn_testing) lives at the repository root: importable here and in the
# processes tests start (DDP workers, scripts run in a child).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

# Debian installs some tools under other names.
_ALIASES = {
    "alertmanager": ("alertmanager", "prometheus-alertmanager"),
    "pushgateway": ("pushgateway", "prometheus-pushgateway"),
    "node_exporter": ("node_exporter", "prometheus-node-exporter"),
}


def require_tool(name: str) -> str:
    """Return the path of the executable ``name``; skip (or fail in CI) when it is not installed."""
    for candidate in _ALIASES.get(name, (name,)):
        path = shutil.which(candidate)
        if path:
            return path
    message = f"{name} is not installed (on Debian: apt-get install the package that ships it)"
    if os.environ.get("DGDN_MONITOR_REQUIRE_TOOLS"):
        pytest.fail(message + "; DGDN_MONITOR_REQUIRE_TOOLS is set, so this is a failure", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM cluster (tests/slurm_cluster.py) for the whole session, stopped at its end."""
    from slurm_cluster import TOOLS, SlurmCluster

    for tool in TOOLS:
        require_tool(tool)
    if os.geteuid() != 0:
        message = "starting slurmctld/slurmd needs root"
        if os.environ.get("DGDN_MONITOR_REQUIRE_TOOLS"):
            pytest.fail(message + "; DGDN_MONITOR_REQUIRE_TOOLS is set, so this is a failure", pytrace=False)
        pytest.skip(message)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
