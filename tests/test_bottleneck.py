"""BottleneckJudge: runs drawn step by step through a real TimeLedger, one cause injected at a drawn share above
the threshold (named at the 20th step, not before) or none (always ``compute``); hysteresis against a share
oscillating around the threshold; stalls; the hints; and RunSettings read from real Trainers and PyG loaders."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch.utils.data import DataLoader, TensorDataset
from torch_geometric.datasets import FakeDataset, FakeHeteroDataset
from torch_geometric.loader import LinkNeighborLoader, NeighborLoader

from dgdn_lightning_monitor.bottleneck import (
    BOTTLENECK_SHARE,
    CAUSES,
    HOLD_EVALUATIONS,
    MIN_STEPS,
    BottleneckJudge,
    RunSettings,
    Verdict,
    hint,
)
from dgdn_lightning_monitor.time_ledger import CATEGORIES, TimeLedger
from dgdn_testing.sampling import use_pure_torch_sampler

SETTINGS = RunSettings(
    loader="NeighborLoader",
    batch_size=512,
    num_workers=3,
    pin_memory=False,
    persistent_workers=False,
    prefetch_factor=2,
    num_neighbors=(10, 25),
    device="cuda",
    val_check_interval=0.25,
    check_val_every_n_epoch=1,
    limit_val_batches=1.0,
    checkpoint_every_n_train_steps=50,
    checkpoint_every_n_epochs=0,
    save_top_k=3,
    async_checkpoint=False,
    log_every_n_steps=1,
    stall_after_s=10.0,
)


@dataclass
class Step:
    """Seconds of one training step's parts, as the hooks would see them."""

    data_wait: float = 0.0
    compute: float = 0.1  # fetch end to batch end, the copy to the device included
    between_steps: float = 0.0
    validation: float = 0.0
    checkpoint: float = 0.0
    transfer: float = 0.0  # part of compute
    sampling: float = 0.0  # part of data_wait
    edges: tuple[int, ...] = ()  # sampled edges per hop


@dataclass
class Run:
    """A rank's run fed step by step through a real ledger, the judge evaluated after every step."""

    judge: BottleneckJudge
    ledger: TimeLedger = field(default_factory=lambda: TimeLedger(10.0, now=0.0))
    now: float = 5.0  # 5 s of set-up: left out of every window
    steps: int = 0
    transfer: float = 0.0
    sampling: float = 0.0
    edges: list[int] = field(default_factory=list)
    peers: Optional[dict[int, dict[str, float]]] = None

    def __post_init__(self) -> None:
        self.judge.evaluate(self.now, 0, self.ledger.totals(self.now))

    def step(self, step: Step) -> Verdict:
        ledger = self.ledger
        ledger.fetch_started(self.now)
        self.now += step.data_wait
        ledger.fetch_ended(self.now)
        self.now += step.compute
        ledger.step_ended(self.now)
        self.now += step.between_steps
        for category in ("validation", "checkpoint"):
            if getattr(step, category):
                previous = ledger.enter(category, self.now)
                self.now += getattr(step, category)
                ledger.progress(self.now)
                ledger.enter(previous, self.now)
        self.steps += 1
        self.transfer += step.transfer
        self.sampling += step.sampling
        self.edges = [a + b for a, b in zip(self.edges, step.edges)] if self.edges else list(step.edges)
        return self.evaluate()

    def evaluate(self) -> Verdict:
        return self.judge.evaluate(
            self.now,
            self.steps,
            self.ledger.totals(self.now),
            transfer_s=self.transfer,
            sampling_s=self.sampling or None,
            sampled_edges=self.edges or None,
            peers=self.peers,
        )


def judge(**kwargs: Any) -> BottleneckJudge:
    return BottleneckJudge(SETTINGS, **{"window_steps": 100, "window_s": 300.0, "min_interval_s": 0.0, **kwargs})


def noisy(rng: random.Random, noise: float) -> Step:
    """A healthy step: 50-150 ms of compute, a drawn part of each other category up to ``noise`` of it."""
    compute = rng.uniform(0.05, 0.15)
    return Step(
        data_wait=rng.uniform(0, noise) * compute,
        compute=compute,
        between_steps=rng.uniform(0, noise) * compute,
        validation=rng.uniform(0, noise) * compute,
        checkpoint=rng.uniform(0, noise) * compute,
        transfer=rng.uniform(0, noise) * compute,
    )


INJECTED = ("input", "sampling", "host_to_device", "validation", "checkpoint", "between_steps", "straggler")
#: What each cause's hint must name, with SETTINGS' value.
NAMED = {
    "compute": "batch_size=512",
    "input": "num_workers=3",
    "sampling": "num_neighbors=[10, 25] (hop 2: 25)",
    "host_to_device": "pin_memory=False",
    "validation": "val_check_interval=0.25",
    "checkpoint": "every_n_train_steps=50",
    "between_steps": "log_every_n_steps=1",
    "straggler": "batch_size=512",  # this rank is the straggler (a peer is: see the test)
    "stall": "stall_dump_after_s=10.0",
}


def inject(step: Step, cause: str, share: float) -> Step:
    """``step`` with ``cause`` taking ``share`` of its wall time (for ``straggler``: nothing; see the test)."""
    rest = step.data_wait + step.compute + step.between_steps + step.validation + step.checkpoint
    extra = share / (1 - share) * rest
    if cause in ("input", "sampling"):
        step.data_wait += extra
        if cause == "sampling":
            step.sampling, step.edges = 0.7 * step.data_wait, (300, 2400)
    elif cause == "host_to_device":
        step.compute += extra
        step.transfer += extra
    elif cause in ("validation", "checkpoint", "between_steps"):
        setattr(step, cause, getattr(step, cause) + extra)
    return step


@settings(max_examples=60, deadline=None)
@given(cause=st.sampled_from(INJECTED), margin=st.floats(0.03, 0.6), seed=st.integers(0, 2**32 - 1))
def test_a_dominant_cause_is_named_at_the_20th_step(cause, margin, seed):
    """One cause takes BOTTLENECK_SHARE + margin of every step's wall time, the others a drawn bit of noise: the
    verdict is compute before the 20th step (too little evidence) and that cause from it on, its hint naming the
    setting to change with its value."""
    rng = random.Random(seed)
    share = min(BOTTLENECK_SHARE + margin, 0.8)
    steps = [inject(noisy(rng, 0.02), cause, share) for _ in range(30)]
    run = Run(judge())
    waits = cause == "straggler" and rng.random() < 0.5  # this rank waits for a slower peer, else it is the slow one
    if cause == "straggler":
        # The peers' own work per step is this rank's over the first 20 steps; their forward shorter by `share` of
        # its step time (they wait for it in each all-reduce), or rank 2's longer by as much (this rank waits).
        first = steps[:MIN_STEPS]
        own = {
            "data_wait": sum(s.data_wait for s in first) / MIN_STEPS,
            "forward": sum(s.compute for s in first) / MIN_STEPS,  # no phase samples: all compute is forward
            "between_steps": sum(s.between_steps for s in first) / MIN_STEPS,
        }
        wall = sum(s.data_wait + s.compute + s.between_steps + s.validation + s.checkpoint for s in first) / MIN_STEPS
        if waits:
            run.peers = {0: own, 2: {**own, "forward": own["forward"] + share * wall}, 3: own}
        else:
            run.peers = {r: {**own, "forward": own["forward"] - share * wall} for r in (0, 2, 3)}
    verdicts = [run.step(step) for step in steps]
    assert [v.cause for v in verdicts[: MIN_STEPS - 1]] == ["compute"] * (MIN_STEPS - 1)
    named = verdicts[MIN_STEPS - 1]
    assert named.cause == cause, named
    assert named.window_steps == MIN_STEPS
    assert named.shares[cause] >= BOTTLENECK_SHARE
    assert (NAMED[cause] if not waits else "rank 2's own work") in named.hint
    assert all(v.cause == cause for v in verdicts[MIN_STEPS:])


@settings(max_examples=40, deadline=None)
@given(noise=st.floats(0.0, 0.09), seed=st.integers(0, 2**32 - 1))
def test_clean_runs_are_always_compute(noise, seed):
    """Compute dominant, every other category a drawn part below the warning share: compute at every step."""
    rng = random.Random(seed)
    run = Run(judge(window_steps=50, window_s=0.0))
    factors = {rank: rng.uniform(0.95, 1.05) for rank in (0, 2, 3)}  # peers as fast as this rank within 5 %
    verdicts = []
    for _ in range(150):
        own = run.judge.own_work
        run.peers = {r: {k: v * f for k, v in own.items()} for r, f in factors.items()} if own else None
        verdicts.append(run.step(noisy(rng, noise)))
    assert {v.cause for v in verdicts} == {"compute"}
    assert verdicts[-1].shares["compute"] >= 1 - 5 * noise / (1 + 4 * noise) - 1e-9
    assert NAMED["compute"] in verdicts[-1].hint


def test_setup_is_left_out_of_the_window():
    """A 100 s set-up before 30 steps of 40 % data wait: the window's wall time is the steps' alone."""
    run = Run(judge(), ledger=TimeLedger(None, now=0.0), now=0.0)  # no stall threshold: a long set-up is fine
    run.now = 100.0  # the first evaluation was at the start, before the set-up
    verdicts = [run.step(Step(data_wait=0.04, compute=0.06)) for _ in range(30)]
    assert verdicts[-1].cause == "input"
    assert verdicts[-1].shares["input"] == pytest.approx(0.4)
    assert verdicts[-1].window_s == pytest.approx(3.0)
    assert "num_workers=3" in verdicts[-1].hint and "persistent_workers=False" in verdicts[-1].hint


def test_a_bottleneck_that_appears_and_goes_is_followed_through_the_window():
    """Healthy, then the loader slows to 40 % of the step: named once it fills the window past the threshold and
    held for HOLD_EVALUATIONS; when it recovers, compute again once its share fell below threshold - margin."""
    run = Run(judge(window_steps=50, window_s=0.0))
    for _ in range(100):
        assert run.step(Step(compute=0.1)).cause == "compute"
    slow = [run.step(Step(data_wait=0.045, compute=0.055)).cause for _ in range(60)]
    first = slow.index("input")
    # The window's data-wait share is 0.45 * k / 50 after k slow steps: 20 % from k = 23 (index 22) on, named
    # HOLD_EVALUATIONS evaluations in.
    assert first == 22 + HOLD_EVALUATIONS - 1
    assert set(slow[first:]) == {"input"}
    healed = [run.step(Step(compute=0.1)).cause for _ in range(60)]
    back = healed.index("compute")
    # Share below 15 % once fewer than 16.7 of the 50 steps in the window are slow: from 34 healthy steps on.
    assert back == 33 + HOLD_EVALUATIONS - 1
    assert set(healed[back:]) == {"compute"}


def test_a_share_oscillating_around_the_threshold_does_not_flip_the_verdict():
    """The data-wait share of the window alternates between 18 % and 22 % at every evaluation: a bare threshold
    would flip the verdict every time; the judge never changes it."""
    judge_ = judge(window_steps=1, window_s=0.0)
    totals, now = dict.fromkeys(CATEGORIES, 0.0), 0.0
    judge_.evaluate(now, 0, totals)
    raw, verdicts = [], []
    for index in range(200):
        wait = 0.22 if index % 2 else 0.18
        totals = {**totals, "data_wait": totals["data_wait"] + wait, "forward": totals["forward"] + 1 - wait}
        now += 1.0
        verdict = judge_.evaluate(now, (index + 1) * 50, totals)
        raw.append(verdict.shares["input"] >= BOTTLENECK_SHARE)
        verdicts.append(verdict.cause)
    assert sum(a != b for a, b in zip(raw, raw[1:])) == 199  # the share crosses the threshold every evaluation
    assert set(verdicts) == {"compute"}


@settings(max_examples=60, deadline=None)
@given(
    shares=st.lists(st.floats(BOTTLENECK_SHARE - 0.045, BOTTLENECK_SHARE + 0.045), min_size=50, max_size=200),
)
def test_a_share_within_the_margin_changes_the_verdict_at_most_once(shares):
    """Any drawn sequence of window shares within ±4.5 points of the threshold: once named, ``input`` holds (its
    share never falls below threshold - margin), so the verdict changes at most once."""
    judge_ = judge(window_steps=1, window_s=0.0)
    totals, now = dict.fromkeys(CATEGORIES, 0.0), 0.0
    judge_.evaluate(now, 0, totals)
    verdicts = []
    for index, share in enumerate(shares):
        totals = {**totals, "data_wait": totals["data_wait"] + share, "forward": totals["forward"] + 1 - share}
        now += 1.0
        verdicts.append(judge_.evaluate(now, (index + 1) * 50, totals).cause)
    assert sum(a != b for a, b in zip(verdicts, verdicts[1:])) <= 1
    assert set(verdicts) <= {"compute", "input"}


def test_a_stall_is_said_at_once_and_ends_with_the_window():
    run = Run(judge(window_steps=50, window_s=0.0))
    for _ in range(60):
        run.step(Step(compute=0.1))
    run.ledger.fetch_started(run.now)
    run.now += 12.0  # the loader hangs: 2 s past the 10 s threshold
    verdict = run.evaluate()
    assert verdict.cause == "stall" and verdict.window_steps == 50
    assert NAMED["stall"] in verdict.hint
    run.now += 0.1
    run.ledger.fetch_ended(run.now)
    run.now += 0.1
    run.ledger.step_ended(run.now)
    run.steps += 1
    causes = [run.step(Step(compute=0.1)).cause for _ in range(60)]
    assert causes[0] == "stall"  # the stall still fills the window
    assert causes[-1] == "compute"


def test_without_peers_there_is_no_straggler():
    run = Run(judge())
    verdicts = [run.step(Step(compute=0.1)) for _ in range(30)]
    assert verdicts[-1].shares["straggler"] == 0.0
    # what its peers compare against
    assert run.judge.own_work == pytest.approx({"data_wait": 0.0, "forward": 0.1, "between_steps": 0.0})


def test_evaluations_closer_than_the_interval_count_once():
    """Two scrapers a second apart: only the evaluations min_interval_s apart count toward the hysteresis."""
    run = Run(judge(min_interval_s=5.0))
    verdicts = []
    for _ in range(300):
        verdicts.append(run.step(Step(data_wait=0.03125, compute=0.03125)))  # binary fractions: exact sums
    first = next(i for i, v in enumerate(verdicts) if v.cause == "input")
    # 1/16 s per step: an evaluation counts every 80 steps; the third counted one (at 240 steps) names it.
    assert first == 239
    assert verdicts[0] is verdicts[1]  # not counted: the same verdict


def test_warnings_list_causes_above_the_warning_share():
    run = Run(judge())
    verdict = [run.step(Step(compute=0.075, between_steps=0.012, checkpoint=0.013)) for _ in range(30)][-1]
    assert verdict.cause == "compute"
    assert verdict.warnings == ("checkpoint", "between_steps")


@pytest.mark.parametrize("cause", CAUSES)
def test_each_hint_names_the_setting_and_its_value(cause):
    facts = {"sampling_part": 0.7, "hop": 2, "hop_part": 0.9, "own": 0.2, "peer": 0.1}
    text = hint(cause, SETTINGS, dict.fromkeys(CAUSES, 0.3), facts)
    assert NAMED[cause] in text and "30%" in text


def test_hints_follow_the_settings():
    assert "num_workers=0" in hint("input", RunSettings(num_workers=0))
    assert "or sample in worker processes (num_workers=0)" in hint("sampling", RunSettings(num_workers=0))
    assert "pin_memory=True" in hint("host_to_device", RunSettings(pin_memory=True, device="cuda"))
    assert "transfer_batch_to_device" in hint("host_to_device", RunSettings(pin_memory=False, device="cpu"))
    waits = hint("straggler", RunSettings(num_workers=2), {"straggler": 0.3}, {"own": 0.1, "peer": 0.2, "slow_rank": 5})
    assert "rank 5's own work" in waits and "waits 30% of the time" in waits and "num_workers=2" in waits
    assert "which one is slower" in hint("straggler", RunSettings(), {"straggler": 0.0}, {})  # no peers' figures
    assert "async_checkpoint=False" in hint("checkpoint", RunSettings(async_checkpoint=False, save_top_k=1))
    assert "pass plugins" not in hint("checkpoint", RunSettings(async_checkpoint=True))
    assert "no ModelCheckpoint" in hint("checkpoint", RunSettings())
    with pytest.raises(ValueError, match="cause"):
        hint("weather", RunSettings())


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"settings": object()}, "settings"),
        ({"window_steps": 0}, "window_steps"),
        ({"window_s": -1.0}, "window_s"),
        ({"min_interval_s": float("nan")}, "min_interval_s"),
    ],
)
def test_bad_arguments_name_themselves(arguments, name):
    with pytest.raises(ValueError, match=name):
        BottleneckJudge(**arguments)


# --------------------------------------------------------------------------------------------- RunSettings
class Squares(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.weight.pow(2).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ReadSettings(pl.Callback):
    """Builds RunSettings in setup (no loader yet) and in on_train_start (the loader is there)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.at_setup = RunSettings.from_trainer(trainer, stall_after_s=600.0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.settings = RunSettings.from_trainer(trainer, stall_after_s=600.0)


def fit(loader: Any, tmp_path: Any, **trainer_args: Any) -> ReadSettings:
    probe = ReadSettings()
    options: dict[str, Any] = dict(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    options.update(trainer_args)
    options["callbacks"] = [probe, *options.get("callbacks", [])]
    pl.Trainer(**options).fit(Squares(), loader)
    return probe


def test_settings_of_a_dataloader_and_the_trainer(tmp_path):
    rows = TensorDataset(torch.randn(16, 2))
    loader = DataLoader(rows, batch_size=4, num_workers=1, persistent_workers=True, pin_memory=True, prefetch_factor=3)
    probe = fit(
        loader,
        tmp_path,
        val_check_interval=0.5,
        check_val_every_n_epoch=1,
        limit_val_batches=3,
        log_every_n_steps=7,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)],
        plugins=[AsyncCheckpointIO()],
    )
    assert probe.at_setup.loader == "" and probe.at_setup.num_workers is None  # fit sets up its data later
    assert probe.settings == RunSettings(
        loader="DataLoader",
        batch_size=4,
        num_workers=1,
        pin_memory=True,
        persistent_workers=True,
        prefetch_factor=3,
        device="cpu",
        val_check_interval=0.5,
        check_val_every_n_epoch=1,
        limit_val_batches=3,
        checkpoint_every_n_train_steps=5,
        checkpoint_every_n_epochs=0,
        save_top_k=-1,
        async_checkpoint=True,
        log_every_n_steps=7,
        stall_after_s=600.0,
    )


def test_settings_of_a_checkpoint_on_a_time_interval(tmp_path):
    every = timedelta(minutes=30)
    probe = fit(
        DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4),
        tmp_path,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, train_time_interval=every)],
    )
    settings_ = probe.settings
    assert settings_.checkpoint_train_time_interval == every and settings_.async_checkpoint is False
    assert settings_.num_workers == 0 and settings_.persistent_workers is False and settings_.pin_memory is False
    assert "train_time_interval=0:30:00" in hint("checkpoint", settings_)


def _graph() -> Any:
    random.seed(0)
    torch.manual_seed(0)
    return FakeDataset(num_graphs=1, avg_num_nodes=60, avg_degree=4, num_channels=4)[0]


def test_settings_of_a_neighbor_loader(tmp_path):
    with use_pure_torch_sampler():
        loader = NeighborLoader(_graph(), num_neighbors=[5, 3], batch_size=8)
        settings_ = fit(loader, tmp_path).settings
    assert (settings_.loader, settings_.batch_size, settings_.num_neighbors) == ("NeighborLoader", 8, (5, 3))
    assert "num_neighbors=[5, 3] (hop 1: 5)" in hint("sampling", settings_, {}, {"hop": 1, "hop_part": 0.6})


def test_settings_of_a_hetero_neighbor_loader(tmp_path):
    random.seed(0)
    torch.manual_seed(0)
    data = FakeHeteroDataset(num_node_types=2, num_edge_types=2, avg_num_nodes=40, avg_degree=3)[0]
    fan_out = {edge_type: [4, 2] for edge_type in data.edge_types}
    with use_pure_torch_sampler():
        loader = NeighborLoader(data, num_neighbors=fan_out, batch_size=8, input_nodes=data.node_types[0])
        settings_ = fit(loader, tmp_path).settings
    assert settings_.num_neighbors == {"__".join(edge_type): (4, 2) for edge_type in data.edge_types}


def test_settings_of_a_link_neighbor_loader(tmp_path):
    data = _graph()
    with use_pure_torch_sampler():
        loader = LinkNeighborLoader(data, num_neighbors=[3, 2], batch_size=16, edge_label_index=data.edge_index)
        settings_ = fit(loader, tmp_path).settings
    assert (settings_.loader, settings_.num_neighbors) == ("LinkNeighborLoader", (3, 2))
