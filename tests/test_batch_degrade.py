"""Each part of a batch hook degrades on its own: a batch that cannot be sized, or a traced step whose record fails,
still counts its step, its progress and its time, and the error is counted under the part that failed."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from exposition import exposition, samples, value
from torch.utils.data import DataLoader
from torch_geometric.data import Data

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_lightning_monitor.tracing import BatchRecord
from dgdn_testing.models import quiet_trainer

STEPS_PER_EPOCH, EPOCHS, STEP_S = 15, 4, 0.05


class LazyAdjacency:
    """A sparse adjacency (like torch-sparse's ``SparseTensor``) that fails when asked its size."""

    def nnz(self) -> int:
        raise RuntimeError("the adjacency's storage is gone")


def unsized_graphs(count: int) -> DataLoader:
    """Graphs whose sizing raises inside the built-in rules (not in a user's ``batch_size_fn``)."""
    graphs = [Data(x=torch.randn(5, 3), adj_t=LazyAdjacency()) for _ in range(count)]
    return DataLoader(graphs, batch_size=None)  # each graph is a batch


class NodeRegressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.validated = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        import time

        time.sleep(STEP_S)  # the run outlasts stall_dump_after_s several times over
        return self.layer(batch.x).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.validated += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_batch_that_cannot_be_sized_still_counts_its_step_progress_and_time(tmp_path):
    callback = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, gpu_devices=None, stall_dump_after_s=1.5,
                                  trace_every_n_steps=5)  # fmt: skip
    module = NodeRegressor()
    trainer = quiet_trainer(max_epochs=EPOCHS, callbacks=[callback], default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, unsized_graphs(STEPS_PER_EPOCH), unsized_graphs(2))
    text = exposition(callback.registry)
    steps = STEPS_PER_EPOCH * EPOCHS
    assert trainer.global_step == steps and module.validated == 2 * EPOCHS
    assert value(text, "dgdn_progress_total", stage="train") == steps
    assert value(text, "dgdn_batch_processing_seconds_count") == steps
    assert value(text, "dgdn_batch_processing_seconds_sum") >= steps * STEP_S  # each step's own time
    assert value(text, "dgdn_progress_total", stage="validate") == 2 * EPOCHS
    assert callback.summary()["steps"] == steps
    counted = {labels["part"]: v for labels, v in samples(text)["dgdn_monitor_errors_total"]}
    assert counted["graph_size"] == steps + 2 * EPOCHS  # every training and validation batch
    assert sum(counted.values()) == counted["graph_size"]
    assert value(text, "dgdn_samples_processed_total") == 0  # unknown sizes are not guessed
    # Steps of 50 ms kept the run progressing for several seconds: no stall was reported.
    assert callback.summary()["stall_dumps"] == [] and value(text, "dgdn_stall_dumps_total") == 0
    assert not list(tmp_path.rglob("stall-*.txt"))


def test_a_traced_step_whose_record_fails_counts_as_tracing_and_still_as_a_step(monkeypatch):
    mark = BatchRecord.mark

    def failing_mark(self: BatchRecord, name: str, ns: Any = None) -> None:
        if name == "batch_end":  # e.g. a CUDA event that cannot be recorded
            raise RuntimeError("cannot record the event")
        mark(self, name, ns)

    monkeypatch.setattr(BatchRecord, "mark", failing_mark)
    callback = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, gpu_devices=None, trace_every_n_steps=1)
    graphs = [Data(x=torch.randn(4, 3), edge_index=torch.tensor([[0, 1], [1, 2]])) for _ in range(6)]
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], limit_val_batches=0)
    trainer.fit(NodeRegressor(), DataLoader(graphs, batch_size=None))
    text = exposition(callback.registry)
    assert value(text, "dgdn_monitor_errors_total", part="tracing") == 6
    assert value(text, "dgdn_monitor_errors_total", part="metrics") == 0
    assert value(text, "dgdn_progress_total", stage="train") == 6 == callback.summary()["steps"]
    assert value(text, "dgdn_samples_processed_total") == 6 * 4  # sized as usual: nodes of each graph
