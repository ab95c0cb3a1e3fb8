"""Shared pieces of the benchmarks: statistics, machine facts, quiet Trainers, hook clocks, OTLP receivers."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]

#: Hooks Lightning calls on every training step (and the epoch hooks around them).
PER_STEP_HOOKS: tuple[str, ...] = (
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_train_epoch_end",
)


# ---------------------------------------------------------------------------------------------- statistics
def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, extremes and count of ``values``."""
    data = sorted(float(v) for v in values)
    if not data:
        return {"n": 0, "median": None, "q1": None, "q3": None, "min": None, "max": None}
    if len(data) >= 2:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    else:
        q1 = q3 = data[0]
    return {"n": len(data), "median": statistics.median(data), "q1": q1, "q3": q3, "min": data[0], "max": data[-1]}


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by linear interpolation between closest ranks."""
    data = sorted(values)
    if not data:
        raise ValueError("no values")
    k = (len(data) - 1) * p / 100.0
    low = int(k)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (k - low)


def rotations(cases: Sequence[str], reps: int) -> Iterator[tuple[int, str]]:
    """``(rep, case)`` in interleaved order, the case order rotated each repetition (ABC, BCA, CAB, ...)."""
    n = len(cases)
    for rep in range(reps):
        for i in range(n):
            yield rep, cases[(rep + i) % n]


# ---------------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    import lightning
    import opentelemetry.sdk.version as otel_version
    import prometheus_client
    import torch
    import torch_geometric

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count()
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        memory_gib = None
    cuda = torch.cuda.is_available()
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "dgdn_lightning_monitor")
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "memory_gib": memory_gib,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "lightning": lightning.__version__,
        "torch_geometric": torch_geometric.__version__,
        "prometheus_client": getattr(prometheus_client, "__version__", None) or _dist_version("prometheus_client"),
        "opentelemetry_sdk": otel_version.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "git_commit": (commit + ("+local changes" if dirty else "")) if commit else None,
    }


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # pragma: no cover
        return None


# ---------------------------------------------------------------------------------------------- quiet runs
def quiet() -> None:
    """Silence the one-line notices and warnings that every short benchmark fit would otherwise print.

    The packages are imported first: each sets its logger's level when imported, which would undo ours.
    """
    import lightning.pytorch  # noqa: F401

    import dgdn_lightning_monitor  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                 "dgdn_lightning_monitor", "opentelemetry"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def set_threads() -> None:
    """One intra-op thread: steadier timings on a small shared machine, and a core left for background threads."""
    import torch

    torch.set_num_threads(1)


def null_logger() -> Any:
    """A Lightning logger that drops everything (Lightning's monitors need a logger; all cases get this one)."""
    from lightning.pytorch.loggers.logger import Logger

    class NullLogger(Logger):
        @property
        def name(self) -> str:
            return "null"

        @property
        def version(self) -> int:
            return 0

        def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
            pass

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

    return NullLogger()


def make_trainer(callbacks: list[Any], max_epochs: int = 1, limit_train_batches: Optional[int] = None,
                 accelerator: str = "cpu", **kwargs: Any) -> Any:
    """A Trainer with nothing beyond what is measured: no progress bar, checkpoints, summary or sanity check."""
    from lightning.pytorch import Trainer

    options: dict[str, Any] = dict(
        accelerator=accelerator, devices=1, max_epochs=max_epochs, logger=null_logger(), callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50,
    )
    if limit_train_batches is not None:
        options["limit_train_batches"] = limit_train_batches
    options.update(kwargs)
    return Trainer(**options)


# ---------------------------------------------------------------------------------------------- hook clocks
def overridden_hooks(callback: Any, hooks: Sequence[str] = PER_STEP_HOOKS) -> list[str]:
    """The hooks in ``hooks`` that the callback's class implements (the others are Lightning's no-ops)."""
    from lightning.pytorch import Callback

    return [name for name in hooks if getattr(type(callback), name) is not getattr(Callback, name)]


class HookClock:
    """Accumulates the wall time spent inside chosen hooks of callback instances.

    Wrapping is per instance (Lightning looks hooks up with ``getattr`` on the instance), so the class and other
    instances are untouched. Only hooks the class overrides are wrapped: calling an inherited no-op is Lightning's
    cost, the same with or without the callback.
    """

    def __init__(self) -> None:
        self.ns: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.step_ns: list[int] = []  # hook time of each training step, when a StepMarker closes the steps
        self._step_start_total = 0

    def attach(self, callback: Any, hooks: Sequence[str] = PER_STEP_HOOKS, prefix: str = "") -> list[str]:
        wrapped = overridden_hooks(callback, hooks)
        for name in wrapped:
            setattr(callback, name, self._wrap(prefix + name, getattr(callback, name)))
        return wrapped

    def _wrap(self, key: str, function: Callable[..., Any]) -> Callable[..., Any]:
        ns, calls, clock = self.ns, self.calls, time.perf_counter_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return function(*args, **kwargs)
            finally:
                ns[key] += clock() - start
                calls[key] += 1

        return timed

    def end_step(self) -> None:
        total = self.total_ns
        self.step_ns.append(total - self._step_start_total)
        self._step_start_total = total

    def marker(self) -> Any:
        """A callback to place after the timed ones: it closes each step's hook-time tally."""
        from lightning.pytorch import Callback

        clock = self

        class StepMarker(Callback):
            def on_train_batch_end(self, *args: Any) -> None:
                clock.end_step()

        return StepMarker()

    @property
    def total_ns(self) -> int:
        return sum(self.ns.values())

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


def timer_floor_ns(calls: int = 200_000) -> float:
    """Mean time a :class:`HookClock` measures around a hook that does nothing (the harness's own floor)."""
    clock = HookClock()

    class Target:
        def hook(self, *args: Any) -> None:
            pass

    target = Target()
    timed = clock._wrap("noop", target.hook)
    for _ in range(calls):
        timed(None, None, None, 0)
    return clock.ns["noop"] / calls


# ---------------------------------------------------------------------------------------------- memory
_LIBC: Any = None


def rss_bytes() -> int:
    """Resident set size of this process, from ``/proc/self/status``."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def settle_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS readings compare like with like."""
    global _LIBC
    gc.collect()
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


# ---------------------------------------------------------------------------------------------- OTLP receivers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Receiver:
    """An OTLP/HTTP trace receiver on loopback, run in a child process so it never competes for our GIL.

    Modes: ``live`` answers every ``POST /v1/traces`` with 200 and counts spans; ``hang`` accepts connections
    and never answers; ``closed`` is a port nothing listens on (the collector is down).
    """

    def __init__(self, mode: str) -> None:
        if mode not in ("live", "hang", "closed"):
            raise ValueError(f"unknown receiver mode {mode!r}")
        self.mode = mode
        self._process: Optional[subprocess.Popen[str]] = None
        self.port = 0

    def __enter__(self) -> "Receiver":
        if self.mode == "closed":
            self.port = free_port()
            return self
        self._process = subprocess.Popen(
            [sys.executable, "-m", "dgdn_testing.otlp_receiver", "ok" if self.mode == "live" else self.mode], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.__exit__(None, None, None)
            raise RuntimeError(f"the {self.mode} OTLP receiver did not start (said {line!r})")
        self.port = int(line)
        return self

    def __exit__(self, *exc: Any) -> None:
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(Exception):
                assert process.stdin is not None
                process.stdin.close()  # the receiver exits when its stdin closes
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def stats(self) -> dict[str, int]:
        """Requests and spans the live receiver accepted so far."""
        if self.mode != "live":
            return {}
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as response:
            return json.loads(response.read())


@contextlib.contextmanager
def otlp_env(endpoint: Optional[str]) -> Iterator[None]:
    """Point OpenTelemetry's OTLP trace exporter at ``endpoint`` (or clear the OTLP settings) for the block."""
    names = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER",
             "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_SDK_DISABLED")
    saved = {name: os.environ.pop(name, None) for name in names}
    if endpoint is not None:
        os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = endpoint
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def monitoring_callback(**kwargs: Any) -> Any:
    """A MonitoringCallback serving on a free loopback port (so parallel runs never clash)."""
    from dgdn_lightning_monitor import MonitoringCallback

    options: dict[str, Any] = dict(port=0, addr="127.0.0.1")
    options.update(kwargs)
    return MonitoringCallback(**options)
