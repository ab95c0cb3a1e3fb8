"""A small multi-process CPU training run (gloo) with MonitoringCallback, driven by tests/test_distributed_ddp.py.

Every rank trains a two-layer GCN on PyG's FakeDataset. At ``on_train_end`` each rank writes
``<out>/ready-rank<R>.json`` (its metrics URL, run id and sample count) and, with ``--hold``, waits until
``<out>/release`` exists, so the test can scrape the live endpoints and read the discovery files; with
``--late-rank R --late-s S``, rank R then ends S seconds after the others.

Example::

    python tests/ddp_train.py --out /tmp/run --strategy ddp --devices 2 --port 9400 --hold
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch_geometric.datasets import FakeDataset
from torch_geometric.loader import DataLoader
from torch_geometric.nn import GCNConv, global_mean_pool

from dgdn_lightning_monitor import MonitoringCallback

HOLD_TIMEOUT_S = 90.0


STALL_AT_BATCH = 1


def enter_collective_alone() -> None:
    """An all_reduce the other rank never enters: this rank waits in it (until the process group's timeout)."""
    torch.distributed.all_reduce(torch.ones(1))


def skip_the_collective(group: Any) -> None:
    """This rank skips that all_reduce and waits in another one, on a second process group, that the other rank
    never enters. (Going on to the gradients' all_reduce instead would pair it with the skipped one: gloo aborts
    on the size mismatch rather than hang.)"""
    torch.distributed.all_reduce(torch.ones(2), group=group)


class TinyGCN(pl.LightningModule):
    """Two GCN layers and a linear head over mean-pooled node features; with ``stall_rank``, that rank skips a
    collective the others enter in the second training step (a hang)."""

    def __init__(self, stall_rank: Optional[int] = None) -> None:
        super().__init__()
        self.stall_rank = stall_rank
        self.side_group: Any = None

    def setup(self, stage: str) -> None:
        if self.stall_rank is not None:
            self.side_group = torch.distributed.new_group(backend="gloo")  # every rank takes part in creating it
        self.conv1 = GCNConv(8, 16)
        self.conv2 = GCNConv(16, 16)
        self.head = torch.nn.Linear(16, 2)

    def forward(self, batch: Any) -> torch.Tensor:
        h = self.conv1(batch.x, batch.edge_index).relu()
        h = self.conv2(h, batch.edge_index).relu()
        return self.head(global_mean_pool(h, batch.batch))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == STALL_AT_BATCH and self.current_epoch == 0 and self.stall_rank is not None:
            if self.global_rank == self.stall_rank:
                skip_the_collective(self.side_group)
            else:
                enter_collective_alone()
        loss = F.cross_entropy(self(batch), batch.y)
        self.log("train_loss", loss, batch_size=batch.num_graphs)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch), batch.y), batch_size=batch.num_graphs, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ReportAndHold(pl.Callback):
    """Write what this rank saw at ``on_train_end``; optionally wait for the test's release file."""

    def __init__(self, out: str, hold: bool, late_rank: Optional[int] = None, late_s: float = 0.0) -> None:
        self.out = out
        self.hold = hold
        self.late_rank, self.late_s = late_rank, late_s

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        monitor = next(cb for cb in trainer.callbacks if isinstance(cb, MonitoringCallback))
        report = {"rank": trainer.global_rank, "node_rank": trainer.node_rank, "url": monitor.metrics_url,
                  "run_id": monitor.run_id, "samples": monitor.metrics.samples_total, "pid": os.getpid(),
                  "errors": monitor.metrics.errors.counts}
        out = Path(self.out)
        temporary = out / f".ready-rank{trainer.global_rank}.tmp"
        temporary.write_text(json.dumps(report))
        os.replace(temporary, out / f"ready-rank{trainer.global_rank}.json")
        deadline = time.monotonic() + HOLD_TIMEOUT_S
        while self.hold and not (out / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if trainer.global_rank == self.late_rank:
            time.sleep(self.late_s)  # this rank's run ends (its teardown) that much after the others'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--graphs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--default-port", action="store_true", help="leave the callback's default port")
    parser.add_argument("--targets-dir")
    parser.add_argument("--targets-host")
    parser.add_argument("--pushgateway")
    parser.add_argument("--trace-ranks", default="all", help="'all', 'none' or comma-separated global ranks")
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--late-rank", type=int, help="this global rank ends its run --late-s after the others")
    parser.add_argument("--late-s", type=float, default=0.0)
    parser.add_argument("--fail-exchange-rank", type=int, help="this global rank's part of the set-up exchange raises")
    parser.add_argument("--stall-rank", type=int, help="this rank skips a collective the others enter")
    parser.add_argument("--stall-dump-after-s", type=float, default=600.0)
    args = parser.parse_args()

    # Global rank as Lightning will assign it (its launcher sets these variables for the processes it starts;
    # under ddp_spawn the callback is built once, before the workers exist, so every rank gets rank 0's setting).
    rank = int(os.environ.get("NODE_RANK", "0")) * args.devices + int(os.environ.get("LOCAL_RANK", "0"))
    if args.trace_ranks == "all":
        tracing = None  # auto: follows OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set by the test
    elif args.trace_ranks == "none":
        tracing = False
    else:
        tracing = None if rank in {int(r) for r in args.trace_ranks.split(",")} else False

    if args.fail_exchange_rank == rank:
        import dgdn_lightning_monitor.distributed as distributed

        def broken(*args: Any) -> str:
            raise RuntimeError("injected failure of this rank's exchange")

        distributed.uuid = SimpleNamespace(uuid4=broken)  # this rank's part raises before it enters the collective

    torch.manual_seed(0)
    dataset = FakeDataset(num_graphs=args.graphs, avg_num_nodes=12, avg_degree=3, num_channels=8, num_classes=2)
    train = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    val = DataLoader(dataset[: args.batch_size * 2], batch_size=args.batch_size)
    monitor = MonitoringCallback(
        port=None if args.default_port else args.port, addr="127.0.0.1", trace_every_n_steps=1, tracing=tracing, gpu_devices=None,
        targets_dir=args.targets_dir, targets_host=args.targets_host, pushgateway_url=args.pushgateway,
        stall_dump_after_s=args.stall_dump_after_s,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
        max_epochs=args.epochs, callbacks=[monitor, ReportAndHold(args.out, args.hold, args.late_rank, args.late_s)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, default_root_dir=args.out,
    )
    trainer.fit(TinyGCN(args.stall_rank), train, val)


if __name__ == "__main__":
    main()
