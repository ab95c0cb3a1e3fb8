"""Samples and per-hop sampling figures for PyG's own loaders and Lightning data modules, in real Trainer runs.

Each run's ground truth is counted independently, by the LightningModule from the batches it received (or from
the data set itself), and compared with what MonitoringCallback exported. Neighbour and HGT sampling run PyG's
own samplers with only their compiled kernels replaced by the pure-torch ones in ``dgdn_testing.sampling``
(pyg-lib and torch-sparse cannot be installed here); METIS is replaced the same way for ``ClusterData``.
``GraphSAINT*Sampler`` and ``ShaDowKHopSampler`` are built on torch-sparse's ``SparseTensor`` throughout: the
batches they yield are covered in ``test_graph_size.py`` (a plain subgraph, and a ``Batch`` with ``ptr``).
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import require_tool
from exposition import exposition, samples, scrape, value
from lit_models import quiet_trainer
from torch_geometric.data import Data, HeteroData, TemporalData
from torch_geometric.data.lightning import LightningDataset, LightningLinkData, LightningNodeData
from torch_geometric.datasets import FakeDataset, FakeHeteroDataset
from torch_geometric.loader import (
    ClusterData,
    ClusterLoader,
    DataLoader,
    DynamicBatchSampler,
    HGTLoader,
    NeighborLoader,
    RandomNodeLoader,
    TemporalDataLoader,
)
from torch_geometric.transforms import RandomLinkSplit

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_testing.sampling import use_pure_torch_sampler

EPOCHS = 2


class Recorder(pl.LightningModule):
    """Records ``truth(batch)`` (and the batch's own per-hop counts) for every training batch it receives."""

    def __init__(self, truth: Callable[[Any], int]) -> None:
        super().__init__()
        self.truth = truth
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen: list[int] = []
        self.hops: list[tuple[list[int], list[int]]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(int(self.truth(batch)))
        if isinstance(batch, HeteroData) and "num_sampled_nodes" in batch[batch.node_types[0]]:
            self.hops.append((_summed(batch.num_sampled_nodes_dict), _summed(batch.num_sampled_edges_dict)))
        elif "num_sampled_nodes" in getattr(batch, "keys", lambda: ())():
            self.hops.append((list(batch.num_sampled_nodes), list(batch.num_sampled_edges)))
        return self.weight.pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _summed(per_type: dict[Any, list[int]]) -> list[int]:
    return [int(sum(counts)) for counts in zip(*per_type.values())]


class ScrapeAtEnd(pl.Callback):
    """Scrapes the live endpoint once training has ended (the endpoint serves until teardown)."""

    def __init__(self, monitor: MonitoringCallback) -> None:
        self.monitor, self.text = monitor, ""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.text = scrape(self.monitor.metrics_url)


def fit(module: Recorder, data: Any, *extra: pl.Callback, callback: Any = None) -> MonitoringCallback:
    callback = callback or MonitoringCallback(port=0, addr="127.0.0.1")
    trainer = quiet_trainer(max_epochs=EPOCHS, callbacks=[callback, *extra], log_every_n_steps=1,
                            limit_val_batches=0)
    if isinstance(data, pl.LightningDataModule):
        trainer.fit(module, datamodule=data)
    else:
        trainer.fit(module, data)
    assert len(module.seen) > EPOCHS  # several batches per epoch
    return callback


def _seed(seed: int) -> None:
    random.seed(seed)  # FakeDataset draws sizes and edge types with Python's random
    torch.manual_seed(seed)


def graph(num_nodes: int = 120, seed: int = 0) -> Any:
    _seed(seed)
    return FakeDataset(num_graphs=1, avg_num_nodes=num_nodes, avg_degree=4, num_channels=4)[0]


def hetero_graph(seed: int = 0) -> HeteroData:
    _seed(seed)
    return FakeHeteroDataset(num_node_types=2, num_edge_types=3, avg_num_nodes=60, avg_degree=4)[0]


# --------------------------------------------------------------------------------------------- graphs
def test_dataloader_of_graphs_counts_graphs():
    torch.manual_seed(0)
    graphs = list(FakeDataset(num_graphs=30, avg_num_nodes=10, num_channels=4))
    module = Recorder(lambda batch: len(batch.to_data_list()))
    callback = fit(module, DataLoader(graphs, batch_size=8))
    text = exposition(callback.registry)
    assert value(text, "dgdn_samples_processed_total") == sum(module.seen) == EPOCHS * len(graphs)
    assert "dgdn_sampled_nodes_total" not in samples(text)  # no sampler, no per-hop series


def test_lightning_dataset_of_hetero_graphs_counts_graphs_nodes_edges_and_progress():
    # Graph classification over heterogeneous graphs: every batch is a HeteroDataBatch, validation included.
    _seed(0)
    graphs = list(FakeHeteroDataset(num_graphs=26, num_node_types=2, num_edge_types=3, avg_num_nodes=12))
    nodes_edges: list[tuple[int, int]] = []
    validated: list[int] = []

    class Classifier(Recorder):
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            nodes_edges.append((batch.num_nodes, batch.num_edges))

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            validated.append(batch.num_graphs)

    module = Classifier(lambda batch: batch.num_graphs)
    callback = MonitoringCallback(port=0, addr="127.0.0.1", stall_dump_after_s=30)
    trainer = quiet_trainer(max_epochs=EPOCHS, callbacks=[callback], log_every_n_steps=1, num_sanity_val_steps=0)
    datamodule = LightningDataset(graphs[:20], graphs[20:], batch_size=6, num_workers=0, pin_memory=False)
    trainer.fit(module, datamodule=datamodule)
    text = exposition(callback.registry)
    assert value(text, "dgdn_samples_processed_total") == sum(module.seen) == EPOCHS * 20
    assert value(text, "dgdn_nodes_processed_total") == sum(nodes for nodes, _ in nodes_edges)
    assert value(text, "dgdn_edges_processed_total") == sum(edges for _, edges in nodes_edges)
    steps = len(module.seen)
    assert value(text, "dgdn_progress_total", stage="train") == steps == callback.summary()["steps"] == 4 * EPOCHS
    assert value(text, "dgdn_progress_total", stage="validate") == len(validated) == EPOCHS
    assert value(text, "dgdn_inference_time_seconds_count", stage="validate") == len(validated)
    assert sum(v for _, v in samples(text)["dgdn_monitor_errors_total"]) == 0


def test_dynamic_batch_sampler_counts_the_varying_graphs_of_each_batch():
    sizes = [5, 31, 9, 22, 14, 40, 7, 18] * 5  # nodes per graph: so that 60 nodes hold 1 to 7 graphs
    graphs = [Data(x=torch.randn(n, 4), edge_index=torch.stack([torch.arange(n), torch.arange(n).roll(1)]))
              for n in sizes]
    # Lightning needs a length: num_steps batches of at most 60 nodes each
    sampler = DynamicBatchSampler(graphs, max_num=60, mode="node", shuffle=False, num_steps=6)
    module = Recorder(lambda batch: len(batch.to_data_list()))
    callback = fit(module, DataLoader(graphs, batch_sampler=sampler))
    assert len(module.seen) == EPOCHS * 6
    assert len(set(module.seen)) > 1  # the point of the sampler: graphs per batch vary
    assert callback.metrics.samples_total == sum(module.seen)


def test_temporal_data_loader_counts_events():
    torch.manual_seed(0)
    events = TemporalData(src=torch.randint(0, 20, (103,)), dst=torch.randint(0, 20, (103,)),
                          t=torch.arange(103), msg=torch.randn(103, 3))
    module = Recorder(lambda batch: batch.t.numel())
    callback = fit(module, TemporalDataLoader(events, batch_size=25))
    assert callback.metrics.samples_total == sum(module.seen) == EPOCHS * 103


# --------------------------------------------------------------------------------------------- seed nodes
def test_lightning_node_data_neighbor_loader_counts_seed_nodes_and_hops():
    data = graph()
    train = torch.arange(data.num_nodes) % 3 == 0
    module = Recorder(lambda batch: batch.input_id.numel())
    with use_pure_torch_sampler():
        datamodule = LightningNodeData(data, input_train_nodes=train, loader="neighbor", num_neighbors=[4, 3],
                                       batch_size=10, num_workers=0)
        callback = MonitoringCallback(port=0, addr="127.0.0.1")
        scraper = ScrapeAtEnd(callback)
        fit(module, datamodule, scraper, callback=callback)
    text = scraper.text  # a real scrape of /metrics
    assert value(text, "dgdn_samples_processed_total") == sum(module.seen) == EPOCHS * int(train.sum())
    assert callback.summary()["samples"] == sum(module.seen)
    hops = len(module.hops[0][0])
    assert hops == 3 and len(module.hops) == len(module.seen)
    for hop in range(hops):  # nodes from hop 0 (the seeds), edges from hop 1
        assert value(text, "dgdn_sampled_nodes_total", hop=str(hop)) == sum(n[hop] for n, _ in module.hops)
    for hop in range(1, hops):
        assert value(text, "dgdn_sampled_edges_total", hop=str(hop)) == sum(e[hop - 1] for _, e in module.hops)
    assert value(text, "dgdn_sampled_nodes_total", hop="0") == sum(module.seen)
    assert value(text, "dgdn_sampled_edges_total", hop="0") is None
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_hetero_neighbor_loader_counts_seed_nodes_of_the_input_type_and_sums_hops_over_types():
    data = hetero_graph()
    node_type = data.node_types[0]
    train = torch.arange(data[node_type].num_nodes) % 2 == 0
    module = Recorder(lambda batch: batch[node_type].input_id.numel())
    with use_pure_torch_sampler():
        datamodule = LightningNodeData(data, input_train_nodes=(node_type, train), loader="neighbor",
                                       num_neighbors=[3, 2], batch_size=8, num_workers=0)
        callback = fit(module, datamodule)
    text = exposition(callback.registry)
    assert value(text, "dgdn_samples_processed_total") == sum(module.seen) == EPOCHS * int(train.sum())
    for hop in range(3):
        assert value(text, "dgdn_sampled_nodes_total", hop=str(hop)) == sum(n[hop] for n, _ in module.hops)
    for hop in (1, 2):
        assert value(text, "dgdn_sampled_edges_total", hop=str(hop)) == sum(e[hop - 1] for _, e in module.hops)


# --------------------------------------------------------------------------------------------- seed edges
def _train_edges(data: Any) -> torch.Tensor:
    return data.edge_index[:, ::3]  # a third of the edges supervise


@pytest.mark.parametrize(
    ("neg_sampling", "positives"),
    [
        (None, lambda batch: batch.edge_label_index.size(1)),
        # binary negatives sit in edge_label_index with label 0: only the label-1 columns are seed edges
        (dict(mode="binary", amount=2), lambda batch: int((batch.edge_label == 1).sum())),
        (dict(mode="triplet", amount=3), lambda batch: batch.src_index.numel()),
    ],
    ids=["no-negatives", "binary", "triplet"],
)
def test_lightning_link_data_counts_seed_edges_without_negatives(neg_sampling, positives):
    data = graph()
    edges = _train_edges(data)
    module = Recorder(positives)
    with use_pure_torch_sampler():
        datamodule = LightningLinkData(data, input_train_edges=edges, loader="neighbor", num_neighbors=[3, 2],
                                       batch_size=16, neg_sampling=neg_sampling, num_workers=0)
        callback = fit(module, datamodule)
    text = exposition(callback.registry)
    assert value(text, "dgdn_samples_processed_total") == sum(module.seen) == EPOCHS * edges.size(1)
    for hop in range(3):
        assert value(text, "dgdn_sampled_nodes_total", hop=str(hop)) == sum(n[hop] for n, _ in module.hops)
    assert callback.summary()["samples"] == sum(module.seen)  # samples_per_second is a rate of these samples


def test_hetero_link_neighbor_loader_counts_seed_edges_of_the_input_type():
    data = hetero_graph()
    edge_type = data.edge_types[0]
    edges = data[edge_type].edge_index[:, ::2]
    module = Recorder(lambda batch: int((batch[edge_type].edge_label == 1).sum()))
    with use_pure_torch_sampler():
        datamodule = LightningLinkData(data, input_train_edges=(edge_type, edges), loader="neighbor",
                                       num_neighbors=[3, 2], batch_size=12, neg_sampling="binary", num_workers=0)
        callback = fit(module, datamodule)
    assert callback.metrics.samples_total == sum(module.seen) == EPOCHS * edges.size(1)


# --------------------------------------------------------------------------------------------- no seeds
def _contiguous_parts(self: ClusterData, edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """METIS stand-in: consecutive node ranges (the partition's quality does not matter here)."""
    return torch.arange(num_nodes) * self.num_parts // num_nodes


def test_cluster_loader_counts_the_nodes_of_each_subgraph(monkeypatch, tmp_path):
    monkeypatch.setattr(ClusterData, "_metis", _contiguous_parts)
    data = graph()
    module = Recorder(lambda batch: batch.x.size(0))
    clusters = ClusterData(data, num_parts=6, save_dir=str(tmp_path))
    callback = fit(module, ClusterLoader(clusters, batch_size=2))
    assert callback.metrics.samples_total == sum(module.seen) == EPOCHS * data.num_nodes


def test_random_node_loader_counts_the_nodes_of_each_subgraph():
    data = graph()
    module = Recorder(lambda batch: batch.y.numel())
    callback = fit(module, RandomNodeLoader(data, num_parts=4))
    assert callback.metrics.samples_total == sum(module.seen) == EPOCHS * data.num_nodes


def test_full_batch_node_data_counts_every_node_per_step():
    data = graph()
    data.train_mask = torch.ones(data.num_nodes, dtype=torch.bool)
    module = Recorder(lambda batch: batch.y.numel())
    callback = MonitoringCallback(port=0, addr="127.0.0.1")
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback], limit_val_batches=0)
    trainer.fit(module, datamodule=LightningNodeData(data, loader="full", batch_size=1, num_workers=0))
    assert callback.metrics.samples_total == sum(module.seen) == 3 * data.num_nodes


# --------------------------------------------------------------------------------------------- the stand-in kernel
def test_pure_torch_kernel_samples_real_edges_within_the_fan_out():
    data, fanout = graph(), [4, 3]
    in_degree = torch.bincount(data.edge_index[1], minlength=data.num_nodes)
    with use_pure_torch_sampler():
        for batch in NeighborLoader(data, num_neighbors=fanout, batch_size=16):
            # every sampled edge is an edge of the graph, at its own id
            ends = torch.stack([batch.n_id[batch.edge_index[0]], batch.n_id[batch.edge_index[1]]])
            assert torch.equal(ends, data.edge_index[:, batch.e_id])
            assert sum(batch.num_sampled_nodes) == batch.num_nodes == batch.n_id.unique().numel()
            assert sum(batch.num_sampled_edges) == batch.edge_index.size(1)
            seeds = batch.n_id[:batch.batch_size]
            assert batch.num_sampled_edges[0] == int(in_degree[seeds].clamp(max=fanout[0]).sum())


def test_pure_torch_kernel_samples_real_hetero_edges():
    data = hetero_graph()
    with use_pure_torch_sampler():
        batch = next(iter(NeighborLoader(data, num_neighbors=[3, 2], batch_size=8, input_nodes=data.node_types[0])))
    for src, rel, dst in batch.edge_types:
        store = batch[src, rel, dst]
        ends = torch.stack([batch[src].n_id[store.edge_index[0]], batch[dst].n_id[store.edge_index[1]]])
        assert torch.equal(ends, data[src, rel, dst].edge_index[:, store.e_id])
        assert sum(store.num_sampled_edges) == store.edge_index.size(1)
    for node_type in batch.node_types:
        assert sum(batch[node_type].num_sampled_nodes) == batch[node_type].n_id.numel()


def test_hgt_loader_counts_seed_nodes_of_the_input_type():
    data = hetero_graph()
    node_type = data.node_types[0]
    train = torch.arange(data[node_type].num_nodes) % 2 == 1
    module = Recorder(lambda batch: batch[node_type].input_id.numel())
    with use_pure_torch_sampler():
        loader = HGTLoader(data, num_samples=[6, 4], input_nodes=(node_type, train), batch_size=7)
        callback = fit(module, loader)
    assert callback.metrics.samples_total == sum(module.seen) == EPOCHS * int(train.sum())
    assert not module.hops and not callback.metrics.sampled_nodes  # HGT sampling reports no per-hop counts


def test_pure_torch_hgt_kernel_samples_real_edges_within_the_budget():
    data = hetero_graph()
    with use_pure_torch_sampler():
        batch = next(iter(HGTLoader(data, num_samples=[5, 3], input_nodes=data.node_types[0], batch_size=4)))
    for node_type in batch.node_types:  # seeds plus at most 5 + 3 nodes of each type
        seeds = 4 if node_type == data.node_types[0] else 0
        assert seeds <= batch[node_type].n_id.numel() <= seeds + 8
    assert sum(batch[node_type].n_id.numel() for node_type in batch.node_types) > 4 + 5  # more than one hop
    for src, rel, dst in batch.edge_types:
        store = batch[src, rel, dst]
        ends = torch.stack([batch[src].n_id[store.edge_index[0]], batch[dst].n_id[store.edge_index[1]]])
        assert torch.equal(ends, data[src, rel, dst].edge_index[:, store.e_id])


def test_full_batch_link_data_counts_every_labelled_pair_per_step():
    train, _, _ = RandomLinkSplit(num_val=0.1, num_test=0.1)(graph())  # edge_label_index: positives + negatives
    module = Recorder(lambda batch: batch.edge_label.numel())
    callback = MonitoringCallback(port=0, addr="127.0.0.1")
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback], limit_val_batches=0)
    datamodule = LightningLinkData(train, input_train_edges=train.edge_label_index, loader="full", batch_size=1,
                                   num_workers=0)
    trainer.fit(module, datamodule=datamodule)
    assert callback.metrics.samples_total == sum(module.seen) == 3 * train.edge_label_index.size(1)
