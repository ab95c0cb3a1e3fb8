"""Every kind of training batch the monitor sizes, in one list: the "What counts as a sample" table of
docs/metrics.md is rendered from it (:func:`sample_table`) and the batch-exactness test draws its cases from it.

Each :class:`BatchKind` is one row of the table (which loaders, what a sample is, what it is read from) with the
:class:`Case`\\ s that make such batches: a Hypothesis ``draw`` picks a random graph (PyG's ``FakeDataset`` /
``FakeHeteroDataset``, random temporal events, random tensors) and the loader's settings, and :attr:`Case.build`
returns the loader or Lightning data module PyG ships for it. :attr:`Case.counts` tells what one batch holds with
PyG's public API only (``num_graphs``, ``num_nodes``, ``num_edges``, ``batch_size``, ``input_id``,
``num_sampled_nodes``...), so that a test can compare the monitor's figures with counts computed independently.

Neighbour and HGT sampling run inside :func:`~dgdn_testing.sampling.use_pure_torch_sampler` (the test enters it);
``ClusterData``'s METIS step is replaced by contiguous parts. ``GraphSAINT*Sampler`` and ``ShaDowKHopSampler`` are
built on torch-sparse's ``SparseTensor`` throughout: the ShaDow case builds its batches the way the sampler does
(one ``k_hop_subgraph`` per root, joined into a ``Batch`` by its ``ptr``), and a GraphSAINT batch is a plain
subgraph, the same kind as ``RandomNodeLoader``'s.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any, NamedTuple, Optional
from unittest import mock

import torch
from hypothesis import strategies as st
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import TensorDataset, default_collate
from torch_geometric.data import Batch, Data, HeteroData, TemporalData
from torch_geometric.data.lightning import LightningDataset, LightningLinkData, LightningNodeData
from torch_geometric.datasets import FakeDataset, FakeHeteroDataset
from torch_geometric.loader import (
    ClusterData,
    ClusterLoader,
    DataLoader,
    DynamicBatchSampler,
    HGTLoader,
    LinkNeighborLoader,
    NeighborLoader,
    RandomNodeLoader,
    TemporalDataLoader,
)
from torch_geometric.transforms import RandomLinkSplit
from torch_geometric.utils import k_hop_subgraph

#: ``draw(strategy) -> value``: Hypothesis's ``st.data().draw``.
Draw = Callable[[st.SearchStrategy], Any]
#: PyG keyword arguments every Lightning data module here gets (no worker processes, no pinned memory on a CPU).
QUIET = {"num_workers": 0, "pin_memory": False}


class Counts(NamedTuple):
    """What one batch holds, by PyG's own counts; ``None``: the batch does not tell (the monitor leaves it out)."""

    samples: int
    nodes: Optional[int]
    edges: Optional[int]
    hop_nodes: Optional[list[int]] = None  # per hop, seeds first
    hop_edges: Optional[list[int]] = None  # per hop, from the first


@dataclass(frozen=True)
class Case:
    """One way of making a kind of batch: ``build(draw)`` returns a loader or a ``LightningDataModule``;
    ``counts(batch)`` what a batch holds."""

    name: str
    build: Callable[[Draw], Any]
    counts: Callable[[Any], Counts]


@dataclass(frozen=True)
class BatchKind:
    """A row of the sample table and the cases that make its batches."""

    loaders: str
    sample: str
    read_from: str
    cases: tuple[Case, ...]


# --------------------------------------------------------------------------------------------- drawn data
def _seeded(draw: Draw) -> None:
    """Seed Python's and torch's generators from the draw: FakeDataset draws with both, samplers with torch."""
    seed = draw(st.integers(0, 2**31 - 1))
    random.seed(seed)
    torch.manual_seed(seed)


def _graphs(draw: Draw, count: int, hetero: bool) -> list[Any]:
    """``count`` random graphs of PyG's fake data sets (heterogeneous: several node and edge types)."""
    _seeded(draw)
    nodes, degree = draw(st.integers(2, 24)), draw(st.floats(1.0, 4.0))
    if hetero:
        types = dict(num_node_types=draw(st.integers(1, 3)), num_edge_types=draw(st.integers(1, 4)))
        dataset: Any = FakeHeteroDataset(count, avg_num_nodes=nodes, avg_degree=degree, avg_num_channels=3, **types)
    else:
        dataset = FakeDataset(count, avg_num_nodes=nodes, avg_degree=degree, num_channels=3,
                              edge_dim=draw(st.integers(0, 2)))  # fmt: skip
    return [dataset[i] for i in range(len(dataset))]


def _graph(draw: Draw, hetero: bool = False) -> Any:
    """One random graph to sample from (at least a few dozen nodes)."""
    _seeded(draw)
    nodes, degree = draw(st.integers(20, 80)), draw(st.floats(1.0, 5.0))
    if hetero:
        return FakeHeteroDataset(num_node_types=draw(st.integers(1, 3)), num_edge_types=draw(st.integers(1, 4)),
                                 avg_num_nodes=nodes, avg_degree=degree, avg_num_channels=3)[0]  # fmt: skip
    return FakeDataset(avg_num_nodes=nodes, avg_degree=degree, num_channels=3)[0]


def _fanout(draw: Draw) -> list[int]:
    return draw(st.lists(st.integers(-1, 4), min_size=1, max_size=3))  # -1: every neighbour


def _node_subset(draw: Draw, count: int) -> Optional[torch.Tensor]:
    """Seed nodes: all (``None``), or a drawn boolean mask with at least one node."""
    if draw(st.booleans()):
        return None
    mask = torch.rand(count) < draw(st.floats(0.2, 1.0))
    mask[0] = True
    return mask


def _negatives(draw: Draw) -> Optional[dict[str, Any]]:
    mode = draw(st.sampled_from([None, "binary", "triplet"]))
    return None if mode is None else {"mode": mode, "amount": draw(st.integers(1, 3))}


# --------------------------------------------------------------------------------------------- counts
def _graph_counts(batch: Any) -> Counts:
    return Counts(batch.num_graphs, batch.num_nodes, batch.num_edges)


def _subgraph_counts(batch: Any) -> Counts:
    return Counts(batch.num_nodes, batch.num_nodes, batch.num_edges)


def _per_hop(per_type: Sequence[Sequence[int]]) -> list[int]:
    return [sum(counts) for counts in zip_longest(*per_type, fillvalue=0)]


def _sampled(batch: Any, samples: int) -> Counts:
    """A neighbour-sampled subgraph: ``samples`` seeds, and the sampler's per-hop counts (summed over types)."""
    if isinstance(batch, HeteroData):
        hop_nodes = _per_hop(list(batch.num_sampled_nodes_dict.values()))
        hop_edges = _per_hop(list(batch.num_sampled_edges_dict.values()))
    else:
        hop_nodes, hop_edges = list(batch.num_sampled_nodes), list(batch.num_sampled_edges)
    return Counts(samples, batch.num_nodes, batch.num_edges, hop_nodes, hop_edges)


def _seed_node_counts(batch: Any) -> Counts:
    return _sampled(batch, batch.batch_size)


def _hetero_seed_node_counts(batch: HeteroData) -> Counts:
    (input_type,) = [t for t in batch.node_types if "batch_size" in batch[t]]
    return _sampled(batch, batch[input_type].batch_size)


def _seed_edge_counts(batch: Any) -> Counts:
    return _sampled(batch, batch.input_id.numel())


def _hetero_seed_edge_counts(batch: HeteroData) -> Counts:
    (input_type,) = [t for t in batch.edge_types if "input_id" in batch[t]]
    return _sampled(batch, batch[input_type].input_id.numel())


def _hgt_counts(batch: HeteroData) -> Counts:
    (input_type,) = [t for t in batch.node_types if "batch_size" in batch[t]]
    return Counts(batch[input_type].batch_size, batch.num_nodes, batch.num_edges)  # HGT tells no hops


def _labelled_pair_counts(batch: Data) -> Counts:
    return Counts(batch.edge_label_index.size(1), batch.num_nodes, batch.num_edges)


def _event_counts(batch: TemporalData) -> Counts:
    return Counts(batch.num_events, batch.n_id.numel(), batch.num_events)  # n_id: the loader's batch nodes


def _row_counts(batch: Any) -> Counts:
    first = batch if isinstance(batch, torch.Tensor) else batch[0]
    return Counts(first.size(0), None, None)


# --------------------------------------------------------------------------------------------- loaders
def _graph_loader(hetero: bool) -> Callable[[Draw], Any]:
    def build(draw: Draw) -> Any:
        graphs = _graphs(draw, draw(st.integers(1, 12)), hetero)
        follow = ["x"] if draw(st.booleans()) else None
        return DataLoader(graphs, batch_size=draw(st.integers(1, 6)), shuffle=draw(st.booleans()),
                          follow_batch=follow)  # fmt: skip

    return build


def _lightning_dataset(hetero: bool) -> Callable[[Draw], Any]:
    def build(draw: Draw) -> Any:
        graphs = _graphs(draw, draw(st.integers(1, 12)), hetero)
        follow = ["x"] if draw(st.booleans()) else None
        return LightningDataset(graphs, batch_size=draw(st.integers(1, 6)), follow_batch=follow, **QUIET)

    return build


def _dynamic_batches(draw: Draw) -> Any:
    hetero, mode = draw(st.booleans()), draw(st.sampled_from(["node", "edge"]))
    graphs = _graphs(draw, draw(st.integers(2, 12)), hetero)
    largest = max(g.num_nodes if mode == "node" else g.num_edges for g in graphs)
    budget = largest + draw(st.integers(0, 3 * largest + 1))  # one to several graphs per batch
    # Lightning needs a length: num_steps batches
    sampler = DynamicBatchSampler(graphs, max_num=budget, mode=mode, shuffle=draw(st.booleans()),
                                  num_steps=draw(st.integers(1, 6)))  # fmt: skip
    return DataLoader(graphs, batch_sampler=sampler)


def _shadow_like(draw: Draw) -> Any:
    """Batches as ``ShaDowKHopSampler`` assembles them: each root's k-hop subgraph, joined by ``ptr``."""
    data, depth = _graph(draw), draw(st.integers(1, 2))

    def collate(roots: list[int]) -> Batch:
        parts = [k_hop_subgraph(root, depth, data.edge_index, relabel_nodes=True, num_nodes=data.num_nodes)
                 for root in roots]  # fmt: skip
        sizes = torch.tensor([subset.numel() for subset, *_ in parts])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        return Batch(
            x=torch.cat([data.x[subset] for subset, *_ in parts]),
            edge_index=torch.cat([edges + offset for (_, edges, _, _), offset in zip(parts, offsets)], dim=1),
            batch=torch.repeat_interleave(torch.arange(len(parts)), sizes),
            ptr=offsets,
            root_n_id=torch.stack([mapping[0] + offset for (_, _, mapping, _), offset in zip(parts, offsets)]),
        )

    return TorchLoader(range(data.num_nodes), batch_size=draw(st.integers(1, 8)), collate_fn=collate)


def _neighbor_loader(hetero: bool) -> Callable[[Draw], Any]:
    def build(draw: Draw) -> Any:
        data, fanout, batch_size = _graph(draw, hetero), _fanout(draw), draw(st.integers(1, 16))
        if hetero:
            node_type = draw(st.sampled_from(data.node_types))
            seeds = (node_type, _node_subset(draw, data[node_type].num_nodes))
        else:
            seeds = _node_subset(draw, data.num_nodes)
        if draw(st.booleans()):  # the Lightning data module that wraps the same loader
            return LightningNodeData(data, input_train_nodes=seeds, loader="neighbor", num_neighbors=fanout,
                                     batch_size=batch_size, **QUIET)  # fmt: skip
        return NeighborLoader(data, num_neighbors=fanout, input_nodes=seeds, batch_size=batch_size,
                              replace=draw(st.booleans()), shuffle=draw(st.booleans()))  # fmt: skip

    return build


def _hgt_loader(draw: Draw) -> Any:
    data = _graph(draw, hetero=True)
    node_type = draw(st.sampled_from(data.node_types))
    budget = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
    return HGTLoader(data, num_samples=budget, input_nodes=(node_type, _node_subset(draw, data[node_type].num_nodes)),
                     batch_size=draw(st.integers(1, 12)))  # fmt: skip


def _link_loader(hetero: bool) -> Callable[[Draw], Any]:
    def build(draw: Draw) -> Any:
        data, fanout, negatives = _graph(draw, hetero), _fanout(draw), _negatives(draw)
        edge_type = draw(st.sampled_from(data.edge_types)) if hetero else None
        edges = (data[edge_type] if hetero else data).edge_index[:, :: draw(st.integers(1, 4))]  # these supervise
        seeds = (edge_type, edges) if hetero else edges
        batch_size = draw(st.integers(1, 16))
        if draw(st.booleans()):
            return LightningLinkData(data, input_train_edges=seeds, loader="neighbor", num_neighbors=fanout,
                                     batch_size=batch_size, neg_sampling=negatives, **QUIET)  # fmt: skip
        return LinkNeighborLoader(data, num_neighbors=fanout, edge_label_index=seeds, batch_size=batch_size,
                                  neg_sampling=negatives, shuffle=draw(st.booleans()))  # fmt: skip

    return build


def _full_link_graph(draw: Draw) -> Any:
    split = RandomLinkSplit(num_val=0.1, num_test=0.1, neg_sampling_ratio=draw(st.sampled_from([0.0, 1.0, 2.0])))
    train, _, _ = split(_graph(draw))
    return LightningLinkData(train, input_train_edges=train.edge_label_index, loader="full", batch_size=1, **QUIET)


def _full_node_graph(draw: Draw) -> Any:
    hetero = draw(st.booleans())
    data = _graph(draw, hetero)
    seeds = (data.node_types[0], None) if hetero else None
    return LightningNodeData(data, input_train_nodes=seeds, loader="full", batch_size=1, **QUIET)


def _contiguous_parts(self: ClusterData, edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """METIS stand-in: consecutive node ranges (the partition's quality does not matter here)."""
    return torch.arange(num_nodes) * self.num_parts // num_nodes


def _cluster_loader(draw: Draw) -> Any:
    data = _graph(draw)
    with mock.patch.object(ClusterData, "_metis", _contiguous_parts):
        clusters = ClusterData(data, num_parts=draw(st.integers(2, 8)), log=False)
    return ClusterLoader(clusters, batch_size=draw(st.integers(1, 3)), shuffle=draw(st.booleans()))


def _random_node_loader(draw: Draw) -> Any:
    data = _graph(draw, hetero=draw(st.booleans()))
    return RandomNodeLoader(data, num_parts=draw(st.integers(1, 6)), shuffle=draw(st.booleans()))


def _temporal_loader(draw: Draw) -> Any:
    _seeded(draw)
    events, nodes = draw(st.integers(1, 120)), draw(st.integers(2, 30))
    data = TemporalData(src=torch.randint(nodes, (events,)), dst=torch.randint(nodes, (events,)),
                        t=torch.arange(events), msg=torch.randn(events, 2))  # fmt: skip
    ratio = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))  # negatives: neg_dst on every batch
    return TemporalDataLoader(data, batch_size=draw(st.integers(1, 40)), neg_sampling_ratio=ratio)


def _tensor_loader(draw: Draw) -> Any:
    _seeded(draw)
    rows, layout = draw(st.integers(1, 60)), draw(st.sampled_from(["tensor", "list", "tuple"]))
    x, y = torch.randn(rows, 3), torch.randn(rows, 1)
    batch_size = draw(st.integers(1, 16))
    if layout == "tensor":
        return TorchLoader(x, batch_size=batch_size)  # each batch one tensor
    collate = (lambda items: tuple(default_collate(items))) if layout == "tuple" else None
    return TorchLoader(TensorDataset(x, y), batch_size=batch_size, collate_fn=collate)  # (x, y) as list or tuple


# --------------------------------------------------------------------------------------------- the list
BATCH_KINDS: tuple[BatchKind, ...] = (
    BatchKind(
        "`DataLoader` or `LightningDataset` of graphs, `Data` or `HeteroData` (`follow_batch` too); with "
        "`DynamicBatchSampler` graphs per batch vary",
        "a graph",
        "the `Batch`'s graph count",
        (
            Case("graph-dataloader", _graph_loader(hetero=False), _graph_counts),
            Case("hetero-graph-dataloader", _graph_loader(hetero=True), _graph_counts),
            Case("lightning-dataset", _lightning_dataset(hetero=False), _graph_counts),
            Case("hetero-lightning-dataset", _lightning_dataset(hetero=True), _graph_counts),
            Case("dynamic-batch-sampler", _dynamic_batches, _graph_counts),
        ),
    ),
    BatchKind(
        "`ShaDowKHopSampler`",
        "a graph (one per root node)",
        "the `Batch`'s `ptr`",
        (Case("shadow-k-hop-batches", _shadow_like, _graph_counts),),
    ),
    BatchKind(
        "`NeighborLoader`, `HGTLoader`, `LightningNodeData`; hetero inputs",
        "a seed node (of the input node type)",
        "`batch_size`",
        (
            Case("neighbor-loader", _neighbor_loader(hetero=False), _seed_node_counts),
            Case("hetero-neighbor-loader", _neighbor_loader(hetero=True), _hetero_seed_node_counts),
            Case("hgt-loader", _hgt_loader, _hgt_counts),
        ),
    ),
    BatchKind(
        "`LinkNeighborLoader`, `LinkLoader`, `LightningLinkData`, with or without negative sampling",
        "a seed edge (of the input edge type); negatives do not count: `binary` negatives add `amount` columns per "
        "seed edge to `edge_label_index`, `triplet` negatives fill `dst_neg_index`",
        "`input_id`",
        (
            Case("link-neighbor-loader", _link_loader(hetero=False), _seed_edge_counts),
            Case("hetero-link-neighbor-loader", _link_loader(hetero=True), _hetero_seed_edge_counts),
        ),
    ),
    BatchKind(
        "a full graph with `edge_label_index` and no `input_id` (full-batch link prediction)",
        "a column of `edge_label_index` (negatives you placed there included)",
        "`edge_label_index`",
        (Case("full-batch-link", _full_link_graph, _labelled_pair_counts),),
    ),
    BatchKind(
        '`ClusterLoader`, `GraphSAINT*Sampler`, `RandomNodeLoader`, full-batch training (`loader="full"`)',
        "a node of the subgraph (all types for `HeteroData`)",
        "node features / `num_nodes`",
        (
            Case("cluster-loader", _cluster_loader, _subgraph_counts),
            Case("random-node-loader", _random_node_loader, _subgraph_counts),
            Case("full-batch-node", _full_node_graph, _subgraph_counts),
        ),
    ),
    BatchKind(
        "`TemporalDataLoader`, with or without negatives (`neg_sampling_ratio`)",
        "an event",
        "`src`",
        (Case("temporal-data-loader", _temporal_loader, _event_counts),),
    ),
    BatchKind(
        "plain tensors or tuples of them",
        "a row",
        "the first tensor",
        (Case("tensors", _tensor_loader, _row_counts),),
    ),
)

#: Every case of every kind, by name.
CASES: dict[str, Case] = {case.name: case for kind in BATCH_KINDS for case in kind.cases}


def sample_table() -> str:
    """The "What counts as a sample" table of docs/metrics.md, rendered from :data:`BATCH_KINDS`."""
    rows = ["| loader (PyG) | a sample is | read from |", "|---|---|---|"]
    rows += [f"| {kind.loaders} | {kind.sample} | {kind.read_from} |" for kind in BATCH_KINDS]
    return "\n".join(rows)
