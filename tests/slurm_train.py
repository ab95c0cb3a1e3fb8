"""One task of a SLURM job's DDP training (gloo, CPU) with MonitoringCallback, driven by tests/test_slurm.py.

Started by ``srun`` in every task of a batch job with ``--ntasks-per-node=2``: Lightning picks its
SLURMEnvironment (ranks from ``SLURM_PROCID``/``SLURM_LOCALID``, auto-requeue on), every rank serves its own
endpoint on a free port, local rank 0 writes the node's discovery file. The run id is not given: the callback
takes the job's. Each training step sleeps 0.2 s, so a long run costs little CPU while it waits to be ended.

A signal must find the ranks outside a collective: Lightning 2.x broadcasts from inside its SIGTERM handler, and
a rank waiting in another collective (the gradient all-reduce, for the rank behind it) never runs its handler, so
both wait until SLURM's SIGKILL. On a loaded machine the rank behind is often tens of milliseconds behind; with an
all-reduce in every 0.2 s step about one signal in ten hung. Gradients are therefore accumulated over the epoch (50
steps), which leaves one all-reduce every 10 s; the per-step broadcast Lightning adds pairs with the handler's.

Example (in a batch script)::

    srun python tests/slurm_train.py --targets-dir /shared/targets --epochs 3
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import lightning.pytorch as pl
import torch
from ddp_train import TinyGCN
from torch_geometric.datasets import FakeDataset
from torch_geometric.loader import DataLoader

from dgdn_lightning_monitor import MonitoringCallback

GRAPHS, BATCH, RANKS = 400, 4, 2  # per epoch: 400 graphs, split over the ranks by Lightning's DistributedSampler
STEPS_PER_EPOCH = GRAPHS // RANKS // BATCH


class SlowGCN(TinyGCN):
    def __init__(self, step_sleep_s: float) -> None:
        super().__init__()
        self.step_sleep_s = step_sleep_s

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        time.sleep(self.step_sleep_s)
        return super().training_step(batch, batch_idx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets-dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epochs-after-requeue", type=int, help="epochs once SLURM_RESTART_COUNT > 0")
    parser.add_argument("--step-sleep", type=float, default=0.2)
    args = parser.parse_args()
    restarted = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    epochs = args.epochs_after_requeue if restarted and args.epochs_after_requeue else args.epochs

    torch.manual_seed(0)
    dataset = FakeDataset(num_graphs=GRAPHS, avg_num_nodes=12, avg_degree=3, num_channels=8, num_classes=2)
    monitor = MonitoringCallback(
        port=0, addr="127.0.0.1", targets_dir=args.targets_dir, targets_host="127.0.0.1", tracing=False,
        gpu_devices=None,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=RANKS, num_nodes=1, strategy="ddp", max_epochs=epochs, callbacks=[monitor],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, accumulate_grad_batches=STEPS_PER_EPOCH,
    )
    trainer.fit(SlowGCN(args.step_sleep), DataLoader(dataset, batch_size=BATCH, shuffle=True))
    print(f"rank {trainer.global_rank} finished run {monitor.run_id}", flush=True)


if __name__ == "__main__":
    main()
