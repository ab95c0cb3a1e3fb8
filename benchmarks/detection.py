"""Detection latency: from the moment a failure starts until the monitor says so, on real runs on this machine.

* ``hang``: a single-rank training step that blocks (waits on an event) -> the watchdog's first stack dump, for each
  ``stall_dump_after_s`` setting measured (an explicit one, the default when it is short enough to wait for,
  ``"auto"`` when the callback accepts it); a default too long to wait for is reported from its own rule.
* ``collective``: a 2-rank gloo DDP run in which one rank never enters a collective the other waits in (the model of
  ``tests/ddp_train.py``) -> the stack dumps of both ranks.
* ``straggler``: rank 1 of a 2-rank synchronous DDP run made 1.3x (then, after a return to normal, 2x) slower ->
  ``DGDNRankStraggler`` firing on a real Prometheus running the shipped rules, time-compressed by
  :data:`STRAGGLER_SCALE` with steps as much shorter than the shipped rule's 1 s (:data:`STRAGGLER_STEP_S`).
* ``killed``: that run killed with SIGKILL -> ``DGDNRunDown`` firing for both ranks.
* ``nan_loss``: a training loss that is NaN from one step on -> ``DGDNTrainingLossNotFinite`` firing.

Prometheus runs the shipped ``dgdn-training`` job as ``make stack-native`` derives it (file discovery), scraping and
evaluating every second, with the shipped rules divided in time by :data:`SCALE` (``prom_helpers.scaled_rules``:
``for:``, range windows, offsets). Each alert's latency is also given for the shipped rules: the measured time less
the shortened ``for:`` plus the shipped one; for the straggler, whose condition waits for its 20-second window to
fill with slow steps, the time until the condition held is also multiplied back by :data:`STRAGGLER_SCALE`.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import ROOT, free_port, percentile, summarize

if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))  # the live tests' Prometheus helpers and the DDP model

#: The shipped rules' durations are divided by this: ``for: 5m`` -> 5 s, ``[5m]`` -> 5 s.
SCALE = 60
#: Training steps before the hang (a learned threshold needs the run's own step intervals first).
HANG_AFTER_STEPS = 60
#: Sleep of every training step: the compute a real step would do (and, for a slowed rank, what is slowed).
STEP_S = 0.03
#: The explicit watchdog threshold measured.
EXPLICIT_AFTER_S = 10.0
#: Slowdowns of the straggler case: the one asked about, and a gross one.
SLOWDOWNS = (1.3, 2.0)
#: The straggler's time compression: the shipped 5 s scrape and evaluation interval is 1 s here, so its 20 s window
#: holds as many scrapes as it would, and its steps sleep a fifth of a 1 s step (the rule's target step time).
STRAGGLER_SCALE = 5
STRAGGLER_STEP_S = 0.2
#: Targets (see docs/benchmarks.md): a hung collective dumped on every rank within this; a straggler flagged within
#: this many steps of its onset, plus the rule's ``for:``.
COLLECTIVE_TARGET_S = 30.0
STRAGGLER_TARGET_STEPS = 20
#: Default-threshold waits longer than this are not measured, only reported from the threshold.
LONGEST_WAIT_S = 60.0
START_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------------------------------- helpers
def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _first_dump(directory: Path, rank: Optional[int] = None) -> Optional[float]:
    """Modification time (Unix seconds) of the earliest stall dump in ``directory`` (of ``rank``), if any."""
    pattern = f"stall-*-rank{rank}.txt" if rank is not None else "stall-*.txt"
    times = [path.stat().st_mtime for path in directory.glob(pattern)] if directory.is_dir() else []
    return min(times) if times else None


def default_after_s() -> Any:
    """MonitoringCallback's default ``stall_dump_after_s``."""
    from dgdn_lightning_monitor import MonitoringCallback

    return inspect.signature(MonitoringCallback.__init__).parameters["stall_dump_after_s"].default


def unsupported(after_s: Any) -> Optional[str]:
    """Why MonitoringCallback rejects ``stall_dump_after_s=after_s``, or ``None`` when it accepts it."""
    from dgdn_lightning_monitor import MonitoringCallback

    try:
        MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, gpu_devices=None, stall_dump_after_s=after_s)
    except (ValueError, TypeError) as error:
        return f"MonitoringCallback(stall_dump_after_s={after_s!r}) raises {type(error).__name__}: {error}"
    return None


def poll_s(after_s: float) -> Optional[float]:
    """How often the watchdog reads the progress time for a fixed threshold (a dump is late by up to that)."""
    try:
        from dgdn_lightning_monitor.watchdog import StallWatchdog
    except ImportError:
        return None
    return float(StallWatchdog(after_s, None).poll_s)


def _unix(stamp: str) -> float:
    """Prometheus's RFC 3339 time (nanoseconds, ``Z``) as Unix seconds."""
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", stamp).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def _steps_between(step_ends: list[float], start: float, end: Optional[float]) -> Optional[int]:
    return None if end is None else sum(1 for t in step_ends if start < t <= end)


# ---------------------------------------------------------------------------------------------- in-process runs
def _gcn(hang: Optional[threading.Event] = None, nan_from: Optional[threading.Event] = None) -> Any:
    """The tests' GCN graph classifier sleeping :data:`STEP_S` per step; after :data:`HANG_AFTER_STEPS` steps it
    blocks on ``hang`` (when given) until that is set; once ``nan_from`` is set its loss is NaN."""
    import torch

    from dgdn_testing.models import GraphClassifier

    class Probe(GraphClassifier):
        def __init__(self) -> None:
            super().__init__(step_sleep_s=STEP_S)
            self.step_ends: list[float] = []
            self.hang_started: Optional[float] = None
            self.onset: Optional[tuple[float, int]] = None
            self.stop = False

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if hang is not None and self.steps == HANG_AFTER_STEPS and self.hang_started is None:
                self.hang_started = time.time()
                hang.wait()  # the user's step that never returns (released by the benchmark once it has measured)
            loss = super().training_step(batch, batch_idx)
            if nan_from is not None and nan_from.is_set():
                if self.onset is None:
                    self.onset = (time.time(), len(self.step_ends))
                loss = loss * torch.tensor(float("nan"))
            return loss

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.step_ends.append(time.time())
            if self.stop:
                self.trainer.should_stop = True

    return Probe()


def _trainer(callbacks: list[Any], root: Path) -> Any:
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="cpu", devices=1, max_epochs=1000, logger=False, callbacks=callbacks, default_root_dir=str(root),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, log_every_n_steps=1,
    )  # fmt: skip


def _graphs(n: int = 1000) -> Any:
    from torch_geometric.loader import DataLoader

    from dgdn_testing.models import fake_graphs

    return DataLoader(fake_graphs(n), batch_size=4, shuffle=True)


def hang_once(after_s: Any, bound_s: float) -> dict[str, Any]:
    """One run whose step blocks after :data:`HANG_AFTER_STEPS` steps: seconds from the block to the first dump."""
    from dgdn_lightning_monitor import MonitoringCallback

    release = threading.Event()
    model = _gcn(hang=release)
    with tempfile.TemporaryDirectory() as tmp:
        dumps = Path(tmp) / "dgdn-dumps"
        found: dict[str, Optional[float]] = {"dump": None}

        def watch() -> None:
            _wait(lambda: model.hang_started, START_TIMEOUT_S, "the hang", 0.01)
            deadline = time.time() + bound_s
            while found["dump"] is None and time.time() < deadline:
                found["dump"] = _first_dump(dumps)
                time.sleep(0.01)
            model.stop = True
            release.set()

        watcher = threading.Thread(target=watch, name="detection-hang-watch", daemon=True)
        watcher.start()
        monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, gpu_devices=None,
                                     stall_dump_after_s=after_s)  # fmt: skip
        try:
            _trainer([monitor], Path(tmp)).fit(model, _graphs())
        finally:
            release.set()
            watcher.join(timeout=bound_s + 10)
    assert model.hang_started is not None
    steps = [b - a for a, b in zip(model.step_ends, model.step_ends[1:HANG_AFTER_STEPS])]
    dump = found["dump"]
    return {
        "seconds": None if dump is None else dump - model.hang_started,
        "p99_step_s": percentile(steps, 99) if steps else None,
    }


def nan_once(stack: _Stack) -> dict[str, Any]:
    """One run whose loss is NaN from a step on (once Prometheus scrapes it regularly): seconds and steps from the
    first NaN step to ``DGDNTrainingLossNotFinite`` firing."""
    from dgdn_lightning_monitor import MonitoringCallback

    onset = threading.Event()
    model = _gcn(nan_from=onset)
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, gpu_devices=None,
                                 targets_dir=stack.targets, targets_host="127.0.0.1")  # fmt: skip
    result: dict[str, Any] = {}

    def observe() -> None:
        try:
            stack.wait_scraped(f'run_id="{monitor.run_id}"', 1)
            onset.set()
            _wait(lambda: model.onset, 30, "the first NaN step")
            result.update(stack.watch("DGDNTrainingLossNotFinite", [{"run_id": monitor.run_id}], 60)[0])
        except Exception as error:  # said in the result; the run is stopped all the same
            result["error"] = f"{type(error).__name__}: {error}"
        finally:
            model.stop = True

    with tempfile.TemporaryDirectory() as tmp:
        observer = threading.Thread(target=observe, name="detection-nan-observe", daemon=True)
        observer.start()
        _trainer([monitor], Path(tmp)).fit(model, _graphs())
        observer.join(timeout=90)
    if "error" in result:
        raise RuntimeError(result["error"])
    start, step = model.onset
    return {
        "seconds": None if result["firing"] is None else result["firing"] - start,
        "condition_s": None if result["active"] is None else result["active"] - start,
        "steps_to_condition": _steps_between(model.step_ends, start, result["active"]),
        "steps_to_firing": _steps_between(model.step_ends, start, result["firing"]),
        "onset_step": step,
    }


# ---------------------------------------------------------------------------------------------- Prometheus
class _Stack:
    """A real Prometheus: the shipped training job (file discovery) with the time-compressed shipped rules."""

    def __init__(self, workdir: Path, scale: int = SCALE) -> None:
        import deploy_training as dt
        from prom_helpers import RULES_FILE, Prometheus, scaled_rules

        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed")
        workdir = workdir / f"scale-{scale}"
        self.scale, self.targets = scale, workdir / "targets"
        self.targets.mkdir(parents=True)
        rules = scaled_rules(workdir, scale)
        self.for_s = {name: _for_s(RULES_FILE, name) for name in ALERTS}
        self.short_for_s = {name: _for_s(rules, name) for name in ALERTS}
        config = dt.shipped_training_config(workdir / "prometheus.yml", f"127.0.0.1:{free_port()}", self.targets,
                                            rule_files=[rules])  # fmt: skip
        self.prometheus = Prometheus(binary, config, workdir, free_port())
        self.prometheus.wait_ready()

    def close(self) -> None:
        self.prometheus.stop()

    def value(self, expr: str) -> Optional[float]:
        result = self.prometheus.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_scraped(self, selector: str, ranks: int, scrapes: int = 3) -> None:
        """Until every one of ``ranks`` targets matching ``selector`` has answered ``scrapes`` scrapes."""
        _wait(
            lambda: len([r for r in self.prometheus.query(f"count_over_time(up{{{selector}}}[1m]) >= {scrapes}")])
            >= ranks,
            START_TIMEOUT_S,
            f"{scrapes} scrapes of {ranks} target(s) {selector}",
            0.2,
        )

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.prometheus.api("alerts")["alerts"] if a["labels"].get("alertname") == name]

    def watch(self, name: str, label_sets: list[dict[str, str]], bound_s: float) -> list[dict[str, Any]]:
        """For each label set, when alert ``name`` became active (its condition first held, Prometheus's
        ``activeAt``) and when it was first seen firing, polling every 0.1 s for at most ``bound_s``."""
        seen: list[dict[str, Any]] = [{"active": None, "firing": None} for _ in label_sets]
        deadline = time.time() + bound_s
        while time.time() < deadline and any(s["firing"] is None for s in seen):
            now = time.time()
            for alert in self.alerts(name):
                for labels, state in zip(label_sets, seen):
                    if all(alert["labels"].get(k) == v for k, v in labels.items()):
                        state["active"] = state["active"] or _unix(alert["activeAt"])
                        if alert["state"] == "firing" and state["firing"] is None:
                            state["firing"] = now
            time.sleep(0.1)
        return seen


#: The alerts measured.
ALERTS = ("DGDNRankStraggler", "DGDNRunDown", "DGDNTrainingLossNotFinite")


def _for_s(rules_file: Path, alert: str) -> float:
    import yaml

    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for group in yaml.safe_load(rules_file.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", rule.get("for", "0s")))
    raise KeyError(alert)


# ---------------------------------------------------------------------------------------------- DDP runs
@contextlib.contextmanager
def _ddp_child(out: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m benchmarks.detection ddp-child`` (2 gloo ranks, Lightning's launcher) in its own process group,
    killed with it at the end."""
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "child.log", "wb")  # noqa: SIM115 - closed below
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.detection", "ddp-child", "--out", str(out), *args],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        yield child
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        log.close()


def _marks(path: Path) -> list[list[float]]:
    return [[float(x) for x in line.split()] for line in path.read_text().splitlines()] if path.exists() else []


def _slowest(seconds: list[Optional[float]]) -> Optional[float]:
    """The last of the ranks' times, ``None`` when one never came."""
    return None if None in seconds else max(s for s in seconds if s is not None)


def _steps(out: Path, rank: int = 1) -> list[float]:
    """End times of the training steps rank ``rank`` has finished so far."""
    return [t[0] for t in _marks(out / f"steps-rank{rank}.txt")]


def _started(child: subprocess.Popen[bytes], out: Path) -> str:
    """The run id of the DDP run writing to ``out``, once it has made :data:`HANG_AFTER_STEPS` steps."""

    def started() -> bool:
        if child.poll() is not None:
            raise RuntimeError(f"the DDP run exited with {child.returncode}: "
                               f"{(out / 'child.log').read_text()[-3000:]}")  # fmt: skip
        return (out / "run_id").exists() and len(_steps(out)) >= HANG_AFTER_STEPS

    _wait(started, START_TIMEOUT_S, "the DDP run's first steps", 0.1)
    return (out / "run_id").read_text().strip()


def straggler_once(stack: _Stack) -> list[dict[str, Any]]:
    """One 2-rank run of :data:`STRAGGLER_STEP_S` steps: rank 1 slowed by each of :data:`SLOWDOWNS` in turn (back to
    normal in between), each measured to ``DGDNRankStraggler`` on rank 1 (its condition and its firing, in seconds
    and steps, and the highest own-work ratio Prometheus recorded)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        options = ["--trigger", str(out / "trigger"), "--step-s", str(STRAGGLER_STEP_S)]
        with _ddp_child(out, *options, "--targets-dir", str(stack.targets)) as child:
            return _straggle(stack, out, _started(child, out))


def ddp_once(stack: Optional[_Stack], after_s: Any, bound_s: float) -> dict[str, Any]:
    """One 2-rank run. The hang: rank 0 enters an all_reduce rank 1 never enters (rank 1 waits in one of its own),
    measured from the first rank blocking to the first stack dump of each rank. With ``stack`` the run is then killed
    with SIGKILL, measured to ``DGDNRunDown`` on each rank."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        trigger = out / "trigger"
        options = ["--after", str(after_s), "--trigger", str(trigger)]
        with _ddp_child(out, *options, *(["--targets-dir", str(stack.targets)] if stack else [])) as child:
            run_id = _started(child, out)
            result: dict[str, Any] = {}
            # Both ranks must skip the same step's collectives: hang at a step well ahead of the current one.
            trigger.write_text(f"hang {len(_steps(out)) + 25}\n")
            _wait(lambda: len(list(out.glob("hang-rank*.txt"))) == 2, 60, "both ranks in the hang")
            start = min(_marks(out / f"hang-rank{rank}.txt")[0][0] for rank in (0, 1))
            dumps = out / "dgdn-dumps"
            deadline = time.time() + bound_s
            while time.time() < deadline and any(_first_dump(dumps, rank) is None for rank in (0, 1)):
                time.sleep(0.02)
            seconds = [None if t is None else t - start for t in (_first_dump(dumps, rank) for rank in (0, 1))]
            result["collective"] = {"seconds": _slowest(seconds), "per_rank_s": seconds}
            if stack is not None:
                killed_at = time.time()
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=30)
                down = stack.watch("DGDNRunDown", [{"run_id": run_id, "rank": str(rank)} for rank in (0, 1)], 60)
                per_rank = [None if d["firing"] is None else d["firing"] - killed_at for d in down]
                result["killed"] = {"seconds": _slowest(per_rank), "per_rank_s": per_rank}
    return result


def _straggle(stack: _Stack, out: Path, run_id: str) -> list[dict[str, Any]]:
    """The slowdowns of rank 1 (see :func:`ddp_once`)."""
    window_s = 20 / stack.scale
    for_s = stack.short_for_s["DGDNRankStraggler"]
    ratio = "dgdn_rank:step_own_work_seconds:ratio_to_other_ranks_recent"
    selector = f'run_id="{run_id}"'
    trigger, onsets = out / "trigger", out / "onsets.txt"
    stack.wait_scraped(selector, 2)
    _wait(lambda: len(stack.prometheus.query(f"{ratio}{{{selector}}}")) == 2, 60, "both ranks' ratio", 0.2)
    time.sleep(window_s + 1)  # the rate window holds steady steps only
    slowdowns = []
    for factor in SLOWDOWNS:
        seen_onsets = len(_marks(onsets))
        trigger.write_text(f"{factor}\n")
        _wait(lambda n=seen_onsets: len(_marks(onsets)) > n, 30, f"the {factor}x onset")
        start = _marks(onsets)[-1][0]
        # Past a full window of slow steps the ratio is as high as it gets: if the condition has not held by then
        # it never will; if it has, the alert fires `for:` later.
        labels = [{"run_id": run_id, "rank": "1"}]
        seen = stack.watch("DGDNRankStraggler", labels, window_s + 3)[0]
        if seen["active"] is not None and seen["firing"] is None:
            seen = stack.watch("DGDNRankStraggler", labels, for_s + 5)[0]
        held = time.time() - start
        highest = stack.value(f'max_over_time({ratio}{{{selector}, rank="1"}}[{int(held)}s])')
        steps = _steps(out)
        slowdowns.append({
            "factor": factor,
            "seconds": None if seen["firing"] is None else seen["firing"] - start,
            "condition_s": None if seen["active"] is None else seen["active"] - start,
            "steps_to_condition": _steps_between(steps, start, seen["active"]),
            "steps_to_firing": _steps_between(steps, start, seen["firing"]),
            "watched_s": held,
            "highest_ratio": highest,
            "step_s": held / max(1, _steps_between(steps, start, start + held) or 1),
        })  # fmt: skip
        trigger.write_text("1.0\n")  # back to normal until the window and the alert have forgotten the slowdown
        _wait(lambda n=seen_onsets: len(_marks(onsets)) > n + 1, 30, "the return to normal")
        _wait(lambda: (stack.value(f"max({ratio}{{{selector}}})") or 9) < 1.15
              and not stack.alerts("DGDNRankStraggler"), 60, "the ratio back to normal", 0.2)  # fmt: skip
    return slowdowns


def ddp_child(argv: list[str]) -> None:
    """A rank of the DDP runs (Lightning's launcher starts the other with the same arguments). Every step both ranks
    read the trigger file: a number is rank 1's slowdown factor from now on, ``hang N`` makes step N the hang."""
    parser = argparse.ArgumentParser(prog="benchmarks.detection ddp-child")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--after", default="600")
    parser.add_argument("--targets-dir")
    parser.add_argument("--trigger", required=True, type=Path)
    parser.add_argument("--step-s", default=STEP_S, type=float)
    args = parser.parse_args(argv)

    import ddp_train
    import lightning.pytorch as pl
    import torch
    from torch_geometric.datasets import FakeDataset
    from torch_geometric.loader import DataLoader

    from benchmarks.common import quiet, set_threads
    from dgdn_lightning_monitor import MonitoringCallback

    quiet()
    set_threads()
    out, trigger, step_s = args.out, args.trigger, args.step_s
    after: Any = args.after if args.after == "auto" else float(args.after)

    class Bench(ddp_train.TinyGCN):
        """tests/ddp_train.py's GCN sleeping ``--step-s`` per step (times the slowdown factor on rank 1); at the
        hang step it enters the collectives of ``tests/ddp_train.py``'s stall."""

        def setup(self, stage: str) -> None:
            super().setup(stage)
            self.side_group = torch.distributed.new_group(backend="gloo")  # every rank takes part in creating it
            self.factor, self.hang_at, self.trigger_mtime, self.steps = 1.0, -1, 0, 0
            self.log_file = open(out / f"steps-rank{self.global_rank}.txt", "w", buffering=1)  # noqa: SIM115

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            rank = self.global_rank
            mtime = trigger.stat().st_mtime_ns if trigger.exists() else 0
            if mtime != self.trigger_mtime:
                self.trigger_mtime, said = mtime, trigger.read_text().split()
                if said[0] == "hang":
                    self.hang_at = int(said[1])
                elif rank == 1:
                    self.factor = float(said[0])
                    with open(out / "onsets.txt", "a") as onsets:
                        onsets.write(f"{time.time()} {self.steps} {self.factor}\n")
            if self.steps == self.hang_at:
                (out / f"hang-rank{rank}.txt").write_text(f"{time.time()}\n")
                ddp_train.skip_the_collective(self.side_group) if rank == 1 else ddp_train.enter_collective_alone()
            time.sleep(step_s * (self.factor if rank == 1 else 1.0))
            self.steps += 1
            return super().training_step(batch, batch_idx)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.log_file.write(f"{time.time()}\n")

    class Started(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.global_rank == 0:
                (out / "run_id").write_text(monitor.run_id)

    torch.manual_seed(0)
    dataset = FakeDataset(num_graphs=400, avg_num_nodes=12, avg_degree=3, num_channels=8, num_classes=2)
    monitor = MonitoringCallback(
        port=0, addr="127.0.0.1", tracing=False, gpu_devices=None, trace_every_n_steps=1, stall_dump_after_s=after,
        targets_dir=args.targets_dir, targets_host="127.0.0.1",
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=100_000, callbacks=[monitor, Started()],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=str(out),
    )  # fmt: skip
    trainer.fit(Bench(), DataLoader(dataset, batch_size=4, shuffle=True))


# ---------------------------------------------------------------------------------------------- the benchmark
def _stats(values: list[Optional[float]]) -> dict[str, Any]:
    measured = [v for v in values if v is not None]
    return {**summarize(measured), "missed": len(values) - len(measured)}


def _why_not(setting: Any) -> Optional[str]:
    """Why a ``stall_dump_after_s`` setting is not measured (rejected, or a fixed wait too long), or ``None``."""
    reason = unsupported(setting)
    if reason is None and _fixed(setting) and setting > LONGEST_WAIT_S:
        poll = poll_s(setting)
        reason = (
            f"a fixed {setting:g} s threshold: a dump comes {setting:g} s after the last progress"
            + (f", read every {poll:g} s, so within {setting + poll:g} s" if poll else "")
            + "; not waited for here"
        )
    return reason


def _fixed(setting: Any) -> bool:
    return isinstance(setting, (int, float)) and not isinstance(setting, bool)


def _bound_s(setting: Any) -> float:
    return setting + (poll_s(setting) or 0.0) + 20.0 if _fixed(setting) else LONGEST_WAIT_S


def run(quick: bool = False, reps: Optional[int] = None, settings: Optional[tuple[Any, ...]] = None,
        cases: tuple[str, ...] = ("hang", "ddp", "straggler", "nan_loss")) -> dict[str, Any]:  # fmt: skip
    """Measure every case ``reps`` times (2 by default, 1 with ``quick``).

    Args:
        settings: the ``stall_dump_after_s`` values of the hang cases; by default :data:`EXPLICIT_AFTER_S`, the
            callback's default and ``"auto"``. The first is the one of the DDP run that also measures the kill.
        cases: which of ``hang`` (one rank), ``ddp`` (hung collective, killed run), ``straggler`` and
            ``nan_loss``.
    """
    reps = reps if reps is not None else (1 if quick else 2)
    default = default_after_s()
    settings = settings or tuple(dict.fromkeys((EXPLICIT_AFTER_S, default, "auto")))
    result: dict[str, Any] = {
        "name": "detection",
        "what": "Seconds from a failure's start to the monitor saying so (a stack dump, an alert firing on a real "
        "Prometheus) on real CPU runs of a small GCN",
        "config": {
            "reps": reps, "step_s": STEP_S, "hang_after_steps": HANG_AFTER_STEPS, "scale": SCALE,
            "default_stall_dump_after_s": default, "scrape_and_evaluation_interval_s": 1.0,
            "slowdowns": list(SLOWDOWNS), "straggler_scale": STRAGGLER_SCALE, "straggler_step_s": STRAGGLER_STEP_S,
        },
        "cases": {},
        "skipped": {},
    }  # fmt: skip
    measured = []
    for setting in settings:
        reason = _why_not(setting)
        if reason is None:
            measured.append(setting)
        else:
            for kind in ("hang", "collective"):
                result["skipped"][f"{kind}:{setting}"] = reason
    if "hang" in cases:
        for setting in measured:
            runs = [hang_once(setting, _bound_s(setting)) for _ in range(reps)]
            p99 = max(r["p99_step_s"] for r in runs)
            result["cases"][f"hang:{setting}"] = _dump_case(setting, runs, max(3 * p99, 10.0), p99_step_s=p99)
    stack: Optional[_Stack] = None
    workdir = Path(tempfile.mkdtemp(prefix="dgdn-detection-"))
    try:
        if "ddp" in cases or "nan_loss" in cases:
            try:
                stack = _Stack(workdir)
            except FileNotFoundError as error:
                if os.environ.get("DGDN_MONITOR_REQUIRE_TOOLS"):
                    raise
                for case in ("killed", "nan_loss"):
                    result["skipped"][case] = str(error)
            if stack is not None:
                result["config"]["shipped_for_s"] = stack.for_s
                result["config"]["shortened_for_s"] = stack.short_for_s
        if "ddp" in cases:
            for i, setting in enumerate(measured):
                with_stack = stack if i == 0 else None  # the kill once, in the first setting's runs
                runs = [ddp_once(with_stack, setting, _bound_s(setting)) for _ in range(reps)]
                result["cases"][f"collective:{setting}"] = _dump_case(
                    setting, [r["collective"] for r in runs], COLLECTIVE_TARGET_S,
                    per_rank_s=[r["collective"]["per_rank_s"] for r in runs],
                )  # fmt: skip
                if with_stack is not None:
                    killed = [r["killed"] for r in runs]
                    result["cases"]["killed"] = _alert_case(with_stack, "DGDNRunDown", killed, False)
                    result["cases"]["killed"]["per_rank_s"] = [r["per_rank_s"] for r in killed]
        if "nan_loss" in cases and stack is not None:
            runs = [nan_once(stack) for _ in range(reps)]
            result["cases"]["nan_loss"] = _alert_case(stack, "DGDNTrainingLossNotFinite", runs, False)
            result["cases"]["nan_loss"]["onset_step"] = [r["onset_step"] for r in runs]
        if "straggler" in cases:
            try:
                straggler_stack = _Stack(workdir, STRAGGLER_SCALE)
            except FileNotFoundError as error:
                if os.environ.get("DGDN_MONITOR_REQUIRE_TOOLS"):
                    raise
                result["skipped"]["straggler"] = str(error)
            else:
                try:
                    runs_of = [straggler_once(straggler_stack) for _ in range(reps)]
                    _straggler_cases(result["cases"], straggler_stack, runs_of)
                finally:
                    straggler_stack.close()
    finally:
        if stack is not None:
            stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _dump_case(setting: Any, runs: list[dict[str, Any]], target_s: float, **extra: Any) -> dict[str, Any]:
    seconds = _stats([r["seconds"] for r in runs])
    met = seconds["missed"] == 0 and seconds["max"] <= target_s
    return {"setting": setting, "bound_s": _bound_s(setting), "seconds": seconds, "target_s": target_s, "met": met,
            **extra}  # fmt: skip


def _straggler_cases(cases: dict[str, Any], stack: _Stack, runs: list[list[dict[str, Any]]]) -> None:
    for i, factor in enumerate(SLOWDOWNS):
        each = [r[i] for r in runs]
        case = cases[f"straggler:{factor:g}x"] = _alert_case(stack, "DGDNRankStraggler", each, True)
        steps = case["steps_to_condition"]
        case.update(
            factor=factor, highest_ratio=[r["highest_ratio"] for r in each], target_steps=STRAGGLER_TARGET_STEPS,
            step_s=summarize([r["step_s"] for r in each])["median"],
            met=None not in steps and max(steps) <= STRAGGLER_TARGET_STEPS, scale=stack.scale,
        )  # fmt: skip


def _alert_case(stack: _Stack, alert: str, runs: list[dict[str, Any]], window: bool) -> dict[str, Any]:
    """Measured seconds to firing, and what they mean with the shipped ``for:`` (and, with ``window``, the shipped
    window: the time until the condition held, multiplied back by the stack's time compression)."""
    short, shipped = stack.short_for_s[alert], stack.for_s[alert]
    estimates: list[Optional[float]] = []
    for r in runs:
        if r["seconds"] is None:
            estimates.append(None)
        elif window:
            estimates.append(r["condition_s"] * stack.scale + (r["seconds"] - r["condition_s"]) - short + shipped)
        else:
            estimates.append(r["seconds"] - short + shipped)
    data: dict[str, Any] = {
        "alert": alert,
        "seconds": _stats([r["seconds"] for r in runs]),
        "shortened_for_s": short,
        "shipped_for_s": shipped,
        "shipped_estimate_s": _stats(estimates),
    }
    if "steps_to_condition" in runs[0]:
        data["condition_s"] = _stats([r["condition_s"] for r in runs])
        data["steps_to_condition"] = [r["steps_to_condition"] for r in runs]
        data["steps_to_firing"] = [r["steps_to_firing"] for r in runs]
    return data


# ---------------------------------------------------------------------------------------------- report
ROW = "Detection"
LABELS = {
    "hang": "one rank's step blocks → its first stack dump",
    "collective": "a collective one rank never enters (2-rank gloo DDP) → the stack dumps of both ranks",
}


def _s(summary: dict[str, Any]) -> str:
    if not summary.get("n"):
        return "never"
    text = f"{summary['median']:.1f} s (max {summary['max']:.1f})"
    return text + (f", missed {summary['missed']} of {summary['n'] + summary['missed']}" if summary["missed"] else "")


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary rows of ``benchmarks/report.py``: one per case, measured or skipped."""
    out: list[dict[str, Any]] = []
    cases, skipped = result["cases"], result.get("skipped", {})
    settings = list(dict.fromkeys([n.split(":", 1)[1] for n in [*cases, *skipped] if n.split(":")[0] in LABELS]))
    for kind, label in LABELS.items():
        for setting in settings:
            name = f"{kind}:{setting}"
            default = str(result["config"]["default_stall_dump_after_s"]) == setting
            figure = f"{label}, stall_dump_after_s={_number(setting)}" + (" (the default)" if default else "")
            target = "≤ max(3 × p99 step, 10 s)" if kind == "hang" else f"≤ {COLLECTIVE_TARGET_S:g} s"
            if name in cases:
                data = cases[name]
                value = _s(data["seconds"])
                if kind == "hang":
                    value += f"; p99 step {data['p99_step_s'] * 1000:.0f} ms"
                else:
                    value += "; per rank " + ", ".join("/".join(f"{x:.1f}" for x in r if x is not None)
                                                       for r in data["per_rank_s"]) + " s"  # fmt: skip
                out.append({"benchmark": ROW, "figure": figure, "value": value, "target": target + (
                    f" = {data['target_s']:.0f} s" if kind == "hang" else ""), "met": data["met"]})  # fmt: skip
            elif name in skipped:
                # A fixed threshold above the target cannot meet it (the dump comes after the threshold).
                floor = 10.0 if kind == "hang" else COLLECTIVE_TARGET_S
                late = _fixed(_number(setting)) and float(setting) > floor
                out.append({"benchmark": ROW, "figure": figure, "value": f"not measured: {skipped[name]}",
                            "target": target, "met": False if late else None})  # fmt: skip
    for name, data in cases.items():
        if name.startswith("straggler:"):
            for_s, shipped = data["shortened_for_s"], data["shipped_for_s"]
            scale = data.get("scale", result["config"]["scale"])
            figure = (f"rank 1 of 2-rank DDP {data['factor']:g}× slower → DGDNRankStraggler firing "
                      f"(rules ÷{scale}: {20 / scale:g} s window, for: {for_s:g} s; "
                      f"{data['step_s']:.2f} s steps)")  # fmt: skip
            ratios = "/".join(f"{r:.2f}" for r in data["highest_ratio"] if r is not None)
            if data["seconds"]["n"]:
                value = (f"{_s(data['seconds'])}; condition after {_step_range(data['steps_to_condition'])} steps "
                         f"({_s(data['condition_s'])}); own-work ratio {ratios}; with the shipped rules (20 s window, "
                         f"for: {shipped / 60:g} m) ≈ {_s(data['shipped_estimate_s'])}")  # fmt: skip
            else:
                value = f"not flagged: own-work ratio reached {ratios}, under the rule's threshold"
            out.append({"benchmark": ROW, "figure": figure, "value": value,
                        "target": f"≤ {data['target_steps']} steps + for:", "met": data["met"]})  # fmt: skip
    titles = {"killed": "2-rank DDP run killed (SIGKILL) → DGDNRunDown firing for both ranks",
              "nan_loss": "training loss NaN from one step on → DGDNTrainingLossNotFinite firing"}  # fmt: skip
    for name, title in titles.items():
        if name in cases:
            data = cases[name]
            value = f"{_s(data['seconds'])} with for: {data['shortened_for_s']:g} s"
            if "steps_to_firing" in data:
                value += f" ({_step_range(data['steps_to_firing'])} steps)"
            value += f"; with the shipped for: {data['shipped_for_s']:g} s ≈ {_s(data['shipped_estimate_s'])}"
            out.append({"benchmark": ROW, "figure": title, "value": value, "target": "(reference)", "met": None})
        elif name in skipped:
            out.append({"benchmark": ROW, "figure": title, "value": f"not measured: {skipped[name]}",
                        "target": "(reference)", "met": None})  # fmt: skip
    return out


def _number(text: str) -> Any:
    """A setting as the key of its case wrote it (``"10.0"``, ``"auto"``), as a number where it is one."""
    try:
        return float(text) if float(text) != int(float(text)) else int(float(text))
    except ValueError:
        return text


def _step_range(values: list[Optional[int]]) -> str:
    measured = sorted(v for v in values if v is not None)
    return "–".join(str(v) for v in dict.fromkeys([measured[0], measured[-1]])) if measured else "n/a"


def details(result: dict[str, Any]) -> list[str]:
    """The section of ``results.md``: how it was measured, and the repetitions of each case."""
    c = result["config"]
    out = [
        "## Detection latency",
        "",
        result["what"] + f"; {c['reps']} repetitions per case. Training steps sleep {c['step_s'] * 1000:.0f} ms; the "
        f"hangs start after {c['hang_after_steps']} steps. Prometheus scrapes and evaluates every "
        f"{c['scrape_and_evaluation_interval_s']:g} s, the shipped rules divided in time by {c['scale']} (for:, "
        f"windows)" + (f", the straggler's by {c['straggler_scale']} on steps of {c['straggler_step_s']:g} s"
                       if "straggler_scale" in c else "") + f"; the default stall_dump_after_s is "
        f"{c['default_stall_dump_after_s']}.",
        "",
        "| Case | seconds per repetition | steps to the condition / to firing |",
        "|---|---|---|",
    ]
    for name, data in result["cases"].items():
        summary = data["seconds"]
        if "per_rank_s" in data:
            per_rank = data["per_rank_s"]
            text = "; ".join("ranks " + "/".join("—" if x is None else f"{x:.2f}" for x in r) for r in per_rank)
        elif summary["n"]:
            text = f"median {summary['median']:.2f}, max {summary['max']:.2f}"
        else:
            text = "never"
        steps = (f"{_step_range(data['steps_to_condition'])} / {_step_range(data['steps_to_firing'])}"
                 if "steps_to_condition" in data else "—")  # fmt: skip
        out.append(f"| {name} | {text} | {steps} |")
    out += [f"| {name} | not measured: {why} | — |" for name, why in result.get("skipped", {}).items()]
    return [*out, ""]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "ddp-child":
        ddp_child(sys.argv[2:])
    else:
        cli = argparse.ArgumentParser(prog="benchmarks.detection")
        cli.add_argument("--quick", action="store_true", help="one repetition per case")
        cli.add_argument("--cases", default="hang,ddp,straggler,nan_loss", help="comma-separated cases to measure")
        options = cli.parse_args()
        print(json.dumps(run(quick=options.quick, cases=tuple(options.cases.split(","))), indent=2))
