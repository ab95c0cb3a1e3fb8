"""Lightning modules: a short run learns, logs the documented keys and feeds TemporalData batches."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch_geometric.data import TemporalData

from dgdn_lightning_monitor.dgdn import (
    DGDNLinkPredictor,
    DGDNNodeClassifier,
    SyntheticTemporalGraph,
    TemporalGraphDataModule,
)

SMALL_MODEL = {"hidden_dim": 32, "time_dim": 16, "num_heads": 2, "num_layers": 1, "diffusion_steps": 1, "lr": 3e-3}


class _Recorder(pl.Callback):
    def __init__(self) -> None:
        self.train_batches: list[TemporalData] = []
        self.logged: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if len(self.train_batches) < 3:
            self.train_batches.append(batch)

    def on_validation_epoch_end(self, trainer, pl_module):
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _trainer(epochs: int, recorder: pl.Callback) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
    )


@pytest.fixture(scope="module")
def small_graph() -> SyntheticTemporalGraph:
    return SyntheticTemporalGraph(num_nodes=200, num_events=3000, num_communities=5, seed=11)


def test_link_prediction_learns_and_logs(small_graph):
    pl.seed_everything(0, verbose=False)
    dm = TemporalGraphDataModule(small_graph, batch_size=100, seed=0)
    module = DGDNLinkPredictor.from_graph(small_graph, **SMALL_MODEL)
    recorder = _Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(2, recorder).fit(module, datamodule=dm)

    final = recorder.logged[-1]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_ap", "val_auc"):
        assert key in final
    assert final["val_ap"] > 0.75, final  # chance is 0.5
    assert final["val_auc"] > 0.75, final
    assert final["val_loss"] < 0.69  # below the loss of a constant guess

    batch = recorder.train_batches[1]
    assert isinstance(batch, TemporalData)
    assert batch.src.numel() == 100 and batch.n_id.numel() == batch.n_id.unique().numel()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = _trainer(1, _Recorder()).test(module, datamodule=dm, verbose=False)
    assert results[0]["test_ap"] > 0.75


def test_evaluation_has_no_sampling_noise(small_graph):
    pl.seed_everything(0, verbose=False)
    dm = TemporalGraphDataModule(small_graph, batch_size=100, seed=0)
    module = DGDNLinkPredictor.from_graph(small_graph, **SMALL_MODEL).eval()
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        first, second = module(batch)[0], module(batch)[0]
    assert torch.equal(first, second)


def test_node_classification_runs(small_graph):
    pl.seed_everything(0, verbose=False)
    dm = TemporalGraphDataModule(small_graph, batch_size=150, num_negatives=0, seed=0)
    module = DGDNNodeClassifier.from_graph(small_graph, **SMALL_MODEL)
    recorder = _Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(1, recorder).fit(module, datamodule=dm)
    final = recorder.logged[-1]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc"):
        assert key in final
    assert final["val_auc"] > 0.55, final  # the burst label is readable from the recent event times


def test_multiclass_node_classification_step(small_graph):
    dm = TemporalGraphDataModule(small_graph, batch_size=100, num_negatives=0)
    batch = next(iter(dm.train_dataloader()))
    three = DGDNNodeClassifier(small_graph.num_nodes, small_graph.node_dim, small_graph.edge_dim, num_classes=3,
                               node_features=small_graph.x, **SMALL_MODEL)
    batch.y = batch.y % 3
    loss, logits, _, count = three._step(batch)
    assert logits.shape == (count, 3) and torch.isfinite(loss)


def test_module_argument_checks(small_graph):
    with pytest.raises(ValueError, match="node_features"):
        DGDNLinkPredictor(10, 4, 2, node_features=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="node_dim"):
        DGDNLinkPredictor(10, 4, 2)
    with pytest.raises(ValueError, match="lr"):
        DGDNLinkPredictor.from_graph(small_graph, lr=0)
    with pytest.raises(ValueError, match="hidden_dim"):
        DGDNLinkPredictor.from_graph(small_graph, hidden_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="batch_size"):
        TemporalGraphDataModule(small_graph, batch_size=0)
    module = DGDNLinkPredictor(small_graph.num_nodes, 0, small_graph.edge_dim)  # embeddings only
    assert module.model.node_emb is not None


def test_monitoring_counts_events_and_nodes(small_graph):
    from prometheus_client import generate_latest

    from dgdn_lightning_monitor import MonitoringCallback

    pl.seed_everything(0, verbose=False)
    dm = TemporalGraphDataModule(small_graph, batch_size=100, seed=0)
    module = DGDNLinkPredictor.from_graph(small_graph, **SMALL_MODEL)
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, gpu_devices=None, trace_every_n_steps=5)
    recorder = _Recorder()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor, recorder])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)

    summary = monitor.summary()
    assert summary["steps"] == 21 and summary["samples"] == dm.num_train_events
    assert set(summary["phase_seconds"]) >= {"data_fetch", "forward", "backward", "optimizer_step"}
    text = generate_latest(monitor.registry).decode()
    assert "dgdn_training_loss" in text and "dgdn_validation_loss" in text
    edges = [line for line in text.splitlines() if line.startswith("dgdn_graph_edges{")]
    nodes = [line for line in text.splitlines() if line.startswith("dgdn_graph_nodes{")]
    assert edges and nodes
    assert 0 < float(edges[0].rsplit(" ", 1)[1]) <= 100  # events of a batch
    assert 0 < float(nodes[0].rsplit(" ", 1)[1]) <= small_graph.num_nodes
