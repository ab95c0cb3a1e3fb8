"""The injected-fault matrix of the bottleneck verdict: three models (a GCN on PyG graph batches, GraphSAGE on a
``NeighborLoader``, the DGDN example model on its temporal event loader) under each situation (a clean run, a slow
collate, an expensive sampling hop, a slow logger, a long validation, a slow checkpoint, a stall), scraped over
HTTP while they train. Each run reports whether its ledger summed to its wall time and when its verdict first
named the injected cause.

``python -m dgdn_testing.fault_matrix [--seeds N] [--out FILE]`` runs it and prints the Markdown table (also
written to ``build/bottleneck-matrix.md``, as ``tests/test_bottleneck_matrix.py`` writes it for the same cases);
``--print`` prints the last table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch_geometric.datasets import FakeDataset
from torch_geometric.loader import DataLoader, NeighborLoader
from torch_geometric.nn import GCNConv, SAGEConv, global_mean_pool

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.dgdn import DGDNLinkPredictor, SyntheticTemporalGraph, TemporalGraphDataModule
from dgdn_testing.sampling import use_pure_torch_sampler
from dgdn_testing.time_runs import TEST_WINDOW, Watched, watch_fit

MODELS = ("gcn", "graphsage", "dgdn")
#: where the last matrix run's table is (``--print`` prints it)
TABLE = Path(__file__).resolve().parents[1] / "build" / "bottleneck-matrix.md"
#: situation -> the cause the verdict must name
SITUATIONS: dict[str, str] = {
    "clean": "compute",
    "slow_collate": "input",
    "sampling_hop": "sampling",
    "slow_logger": "between_steps",
    "long_validation": "validation",
    "slow_checkpoint": "checkpoint",
    "slow_transfer": "host_to_device",
    "stall": "stall",
}
#: situation -> the cause every rank's verdict must name, for each model in 2-rank gloo DDP (one process per rank)
DDP_SITUATIONS: dict[str, str] = {"ddp_clean": "compute", "ddp_slower_rank": "straggler"}
#: what each fault costs: comparable to a clean step (~20-40 ms of compute on one CPU thread)
COLLATE_S, LOG_S, VALIDATION_S, CHECKPOINT_S, TRANSFER_S, STRAGGLE_S = 0.05, 0.05, 0.06, 0.12, 0.05, 0.05
#: the slower rank of a DDP run, and its steps (every rank stops at the same step)
SLOW_RANK, DDP_STEPS = 1, 80
STALL_AFTER_S, STALL_S, STALL_AT = 0.5, 1.5, 6
MAX_STEPS = 90  # a run that has not named its cause by then fails
NAMED_WITHIN_S, NAMED_WITHIN_STEPS = 30.0, 20  # the verdict's promise: 20 steps in its window, or 30 s


def cases(seeds: int = 2) -> list[tuple[str, str, int]]:
    """Every (model, situation, seed); an expensive sampling hop only where a neighbour sampler samples."""
    return [
        (model, situation, seed)
        for model in MODELS
        for situation in SITUATIONS
        for seed in range(seeds)
        if situation != "sampling_hop" or model == "graphsage"
    ]


# ---------------------------------------------------------------------------------------------- models
class _Dense(torch.nn.Module):
    """A dense block on a fixed input: the step's compute, so that it dominates a clean step on a CPU."""

    def __init__(self, width: int = 256, depth: int = 6) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        self.block = torch.nn.Sequential(*layers)
        self.register_buffer("probe", torch.randn(256, width))

    def forward(self) -> torch.Tensor:
        return self.block(self.probe).pow(2).mean() * 1e-3


class GCN(pl.LightningModule):
    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1, self.conv2 = GCNConv(channels, 32), GCNConv(32, 32)
        self.head, self.dense = torch.nn.Linear(32, 2), _Dense()

    def _loss(self, batch: Any) -> torch.Tensor:
        h = self.conv2(self.conv1(batch.x, batch.edge_index).relu(), batch.edge_index).relu()
        return F.cross_entropy(self.head(global_mean_pool(h, batch.batch)), batch.y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch) + self.dense()
        self.log("train_loss", loss, batch_size=batch.num_graphs)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), batch_size=batch.num_graphs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class SAGE(pl.LightningModule):
    def __init__(self, channels: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.conv1, self.conv2 = SAGEConv(channels, 32), SAGEConv(32, 32)
        self.head, self.dense = torch.nn.Linear(32, classes), _Dense()

    def _loss(self, batch: Any) -> torch.Tensor:
        h = self.conv2(self.conv1(batch.x, batch.edge_index).relu(), batch.edge_index).relu()
        seeds = batch.batch_size
        return F.cross_entropy(self.head(h[:seeds]), batch.y[:seeds])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch) + self.dense()
        self.log("train_loss", loss, batch_size=batch.batch_size)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), batch_size=batch.batch_size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _gcn(seed: int, situation: str) -> tuple[pl.LightningModule, Any, Any]:
    torch.manual_seed(seed)
    graphs = list(
        FakeDataset(num_graphs=(MAX_STEPS + 4) * 8, avg_num_nodes=16, avg_degree=3, num_channels=8, num_classes=2)
    )
    return GCN(), DataLoader(graphs[: MAX_STEPS * 8], batch_size=8), DataLoader(graphs[MAX_STEPS * 8 :], batch_size=8)


def _graphsage(seed: int, situation: str) -> tuple[pl.LightningModule, Any, Any]:
    torch.manual_seed(seed)
    data = FakeDataset(num_graphs=1, avg_num_nodes=300, avg_degree=120, num_channels=16, num_classes=4, task="node")[0]
    fan_out = [8, 120] if situation == "sampling_hop" else [4, 3]  # the expensive hop: all of hop 2's neighbours
    nodes = torch.randperm(data.num_nodes)
    train = NeighborLoader(data, num_neighbors=fan_out, batch_size=16, input_nodes=nodes[: MAX_STEPS * 16 // 2])
    val = NeighborLoader(data, num_neighbors=[4, 3], batch_size=16, input_nodes=nodes[-64:])
    # A few epochs' worth of batches: MAX_STEPS steps whatever the split.
    return SAGE(), train, val


class DGDN(DGDNLinkPredictor):
    """The DGDN example model with the same dense block as the others: on a CPU its event loader's collate alone
    takes about 12 % of a clean step, close enough to the 20 % bar that a loaded machine could tip it over in the
    tests' one-second window."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dense = _Dense()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + self.dense()


def _dgdn(seed: int, situation: str) -> tuple[pl.LightningModule, Any, Any]:
    torch.manual_seed(seed)
    graph = SyntheticTemporalGraph(num_nodes=200, num_events=MAX_STEPS * 30 * 2, seed=seed)
    module = TemporalGraphDataModule(graph, batch_size=30, num_neighbors=10, val_ratio=0.1, test_ratio=0.1)
    model = DGDN.from_graph(graph, hidden_dim=32, time_dim=16, num_layers=1, diffusion_steps=2)
    return model, module.train_dataloader(), module.val_dataloader()


_BUILD = {"gcn": _gcn, "graphsage": _graphsage, "dgdn": _dgdn}


# ---------------------------------------------------------------------------------------------- faults
class SlowLogger(Logger):
    """A logger whose every write takes LOG_S."""

    name, version = "slow", "0"

    def log_metrics(self, metrics: dict[str, float], step: Any = None) -> None:
        time.sleep(LOG_S)

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


class SlowCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a slow disk: each save takes CHECKPOINT_S longer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        time.sleep(CHECKPOINT_S)
        super().save_checkpoint(checkpoint, path, storage_options)


class SlowValidation(pl.Callback):
    """Each validation batch takes VALIDATION_S longer."""

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(VALIDATION_S)


class StallOnce(pl.Callback):
    """Training stops making progress for STALL_S after its STALL_AT-th step."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == STALL_AT:
            time.sleep(STALL_S)


def _slower_rank(module: pl.LightningModule) -> None:
    """On SLOW_RANK every training step takes STRAGGLE_S longer inside the model's forward (a slower device, larger
    batches): after DDP's own work at the forward's start (broadcasting buffers), before the backward's all-reduce."""
    step = module.training_step

    def slower(*args: Any, **kwargs: Any) -> Any:
        if module.global_rank == SLOW_RANK:
            time.sleep(STRAGGLE_S)
        return step(*args, **kwargs)

    module.training_step = slower  # type: ignore[method-assign]


def _slow_transfer(module: pl.LightningModule) -> None:
    """Moving each batch to the device takes TRANSFER_S longer (a large batch copied from pageable memory)."""
    transfer = module.transfer_batch_to_device

    def slow(batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        time.sleep(TRANSFER_S)
        return transfer(batch, device, dataloader_idx)

    module.transfer_batch_to_device = slow  # type: ignore[method-assign]


def _slow_collate(loader: Any) -> None:
    """Each batch's collate (PyG's batching, a neighbour loader's sampling, DGDN's event batch) sleeps COLLATE_S
    longer, on the training thread (0 workers)."""
    collate = loader.collate_fn

    def slow(items: Any) -> Any:
        time.sleep(COLLATE_S)
        return collate(items)

    loader.collate_fn = slow


# ---------------------------------------------------------------------------------------------- one run
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine more threads only make step times erratic
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_case(model: str, situation: str, seed: int, root: Path) -> dict[str, Any]:
    """Train ``model`` under ``situation`` with a monitor scraped over HTTP; what the run showed."""
    expect = SITUATIONS[situation]
    with _one_thread(), use_pure_torch_sampler():
        module, train, val = _BUILD[model](seed, situation)
        monitor = MonitoringCallback(
            port=0,
            addr="127.0.0.1",
            tracing=False,
            gpu_devices=None,
            stall_dump_after_s=STALL_AFTER_S if situation == "stall" else 600.0,
        )
        monitor.bottleneck_window = TEST_WINDOW
        options: dict[str, Any] = dict(
            max_epochs=-1, max_steps=MAX_STEPS, default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0
        )
        callbacks: list[pl.Callback] = []
        if situation == "slow_collate":
            _slow_collate(train)
        elif situation == "slow_logger":
            options.update(logger=SlowLogger(), log_every_n_steps=1)
        elif situation == "long_validation":
            options.update(limit_val_batches=2, val_check_interval=4, check_val_every_n_epoch=None)
            callbacks.append(SlowValidation())
        elif situation == "slow_checkpoint":
            options.update(enable_checkpointing=True, plugins=[SlowCheckpointIO()])
            callbacks.append(ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=2))
        elif situation == "slow_transfer":
            _slow_transfer(module)
        elif situation == "stall":
            callbacks.append(StallOnce())
        options["callbacks"] = callbacks
        watched = watch_fit(monitor, options, module, train, val, expect=expect, then_steps=2)
    return _row(model, situation, seed, expect, watched)


def ddp_cases(seeds: int = 2) -> list[tuple[str, str, int]]:
    """Every (model, DDP situation, seed)."""
    return [(model, situation, seed) for model in MODELS for situation in DDP_SITUATIONS for seed in range(seeds)]


def run_ddp_case(model: str, situation: str, seed: int, root: Path, timeout_s: float = 240.0) -> list[dict[str, Any]]:
    """Train ``model`` in 2-rank gloo DDP under ``situation`` (a process per rank: this module run as a script, whose
    second rank Lightning launches); one row per rank."""
    root.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "dgdn_testing.fault_matrix", "--ddp-rank", situation, "--model", model]
    command += ["--seed", str(seed)]
    command += ["--out", str(root)]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    with open(root / "run.log", "wb") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    rows = [
        json.loads((root / f"rank{rank}.json").read_text()) for rank in range(2) if (root / f"rank{rank}.json").exists()
    ]
    if done.returncode != 0 or len(rows) != 2:
        raise RuntimeError(f"the DDP run failed ({done.returncode}): {(root / 'run.log').read_text()[-3000:]}")
    return rows


def _ddp_rank(model: str, situation: str, seed: int, out: Path) -> None:
    """One rank of :func:`run_ddp_case` (both run this: Lightning starts the second with the same command). Every
    rank trains on the same batches (no distributed sampler: a neighbour or event loader cannot take one)."""
    expect = DDP_SITUATIONS[situation]
    with _one_thread(), use_pure_torch_sampler():
        module, train, _ = _BUILD[model](seed, "clean")
        monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, gpu_devices=None, trace_every_n_steps=5)
        monitor.bottleneck_window = TEST_WINDOW
        monitor.verdict_every_s = TEST_WINDOW[2]
        options: dict[str, Any] = dict(
            max_epochs=-1,
            max_steps=DDP_STEPS,
            default_root_dir=out,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            strategy="ddp",
            devices=2,
            use_distributed_sampler=False,
        )
        if situation == "ddp_slower_rank":
            _slower_rank(module)
        watched = watch_fit(monitor, options, module, train, expect=expect, stop_when_named=False)
        rank = int(os.environ.get("LOCAL_RANK", "0"))
    row = _row(f"{model}, DDP rank {rank}", situation, seed, expect, watched)
    (out / f"rank{rank}.json").write_text(json.dumps(row))


def _row(model: str, situation: str, seed: int, expect: str, watched: Watched) -> dict[str, Any]:
    judged = [scrape for scrape in watched.scrapes if scrape["cause"] is not None]
    named_at = watched.named_at
    return {
        "model": model,
        "situation": situation,
        "seed": seed,
        "expected": expect,
        "verdict": watched.summary["bottleneck"],
        "named_at_s": named_at[0] if named_at else None,
        "named_at_step": named_at[1] if named_at else None,
        "other_verdicts": sorted({s["cause"] for s in judged if s["cause"] != expect}),
        "judged_past_gate": sum(1 for s in judged if s["steps"] >= NAMED_WITHIN_STEPS),
        "wall_s": watched.wall_s,
        "ledger_s": watched.ledger_sum,
        "ledger_error": abs(watched.ledger_sum - watched.wall_s) / watched.wall_s,
        "goodput": watched.final["goodput"],
        "hint": watched.summary["hint"],
    }


def passed(row: dict[str, Any]) -> bool:
    """The matrix's promise for one run: the ledger within 1 %, the cause named within 30 s (a clean run: compute
    at every scrape)."""
    if row["ledger_error"] > 0.01:
        return False
    if row["expected"] == "compute":  # and the run went on past the gate for the hysteresis to turn, 5 scrapes
        return row["verdict"] == "compute" and not row["other_verdicts"] and row["judged_past_gate"] >= 5
    return row["named_at_s"] is not None and row["named_at_s"] <= NAMED_WITHIN_S


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of a matrix run."""
    lines = [
        "| Model | Situation | Seed | Expected | Named at (s / step) | Ledger vs wall | Goodput | Result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        named = f"{r['named_at_s']:.1f} s / {r['named_at_step']}" if r["named_at_s"] is not None else "never"
        if r["expected"] == "compute":
            named = "compute throughout" if not r["other_verdicts"] else f"also {', '.join(r['other_verdicts'])}"
        ledger = f"{r['ledger_s']:.2f} / {r['wall_s']:.2f} s ({r['ledger_error']:.2%})"
        lines.append(
            f"| {r['model']} | {r['situation']} | {r['seed']} | {r['expected']} | {named} | {ledger} | "
            f"{r['goodput']:.0%} | {'pass' if passed(r) else 'FAIL'} |"
        )
    good = sum(passed(r) for r in rows)
    lines.append("")
    lines.append(f"{good} of {len(rows)} runs pass.")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=TABLE)
    parser.add_argument("--print", action="store_true", help="print the table of the last run and exit")
    parser.add_argument("--ddp-rank", choices=sorted(DDP_SITUATIONS), help=argparse.SUPPRESS)  # run_ddp_case's ranks
    parser.add_argument("--model", choices=MODELS, default="gcn", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_rank:
        _ddp_rank(args.model, args.ddp_rank, args.seed, args.out)
        return
    if args.print:
        print(args.out.read_text(), end="")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (model, situation, seed) in enumerate(cases(args.seeds)):
            rows.append(run_case(model, situation, seed, Path(tmp) / str(index)))
        for index, (model, situation, seed) in enumerate(ddp_cases(args.seeds)):
            rows.extend(run_ddp_case(model, situation, seed, Path(tmp) / f"ddp{index}"))
    text = table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
