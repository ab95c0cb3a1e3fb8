"""A small pure-torch stand-in for the compiled sampling kernels of pyg-lib (neighbour sampling) and torch-sparse
(HGT sampling), so that PyG's own ``NeighborLoader``, ``LinkNeighborLoader`` (negative sampling included),
``HGTLoader`` and their Lightning data modules run where neither library can be installed.

Only the compiled kernels are replaced: :func:`use_pure_torch_sampler` answers ``torch.ops.pyg.neighbor_sample``,
``torch.ops.pyg.hetero_neighbor_sample`` and ``torch.ops.torch_sparse.hgt_sample`` with the functions below and
tells PyG that the libraries are there, so PyG's samplers (also ``HGTLoader``'s), negative sampling, subgraph
filtering and batch assembly all run unchanged. The kernels follow
pyg-lib's contract for what PyG asks of them here: a CSC graph (``colptr``, ``row``), directed sampling without
time, node ids deduplicated across hops, and the per-hop counts ``num_sampled_nodes`` (seeds first) and
``num_sampled_edges`` that PyG puts on every batch. Disjoint and temporal sampling are not implemented.

Example::

    with use_pure_torch_sampler():
        for batch in NeighborLoader(data, num_neighbors=[5, 3], batch_size=16):
            batch.num_sampled_nodes  # [16, ..., ...]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
import torch_geometric.typing
from torch import Tensor
from torch_geometric.sampler import hgt_sampler


def _pick(start: int, stop: int, fanout: int, replace: bool) -> list[int]:
    """Positions in ``row`` of the neighbours drawn for one node: all of them for ``fanout < 0`` or a node with
    no more than ``fanout`` (without replacement), else ``fanout`` uniform draws."""
    degree = stop - start
    if degree == 0:
        return []
    if fanout < 0 or (not replace and fanout >= degree):
        return list(range(start, stop))
    if replace:
        return (torch.randint(degree, (fanout,)) + start).tolist()
    return (torch.randperm(degree)[:fanout] + start).tolist()


class _Nodes:
    """The sampled nodes of one type: global ids in order of discovery, and global -> local."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.local: dict[int, int] = {}

    def add(self, node: int) -> int:
        index = self.local.get(node)
        if index is None:
            index = self.local[node] = len(self.ids)
            self.ids.append(node)
        return index


def _check(disjoint: bool, node_time: Any, seed_time: Any) -> None:
    if disjoint or node_time is not None or seed_time is not None:
        raise NotImplementedError("the pure-torch sampler does neither disjoint nor temporal sampling")


def neighbor_sample(
    colptr: Tensor,
    row: Tensor,
    seed: Tensor,
    num_neighbors: Sequence[int],
    node_time: Optional[Tensor] = None,
    seed_time: Optional[Tensor] = None,
    csc: bool = True,
    replace: bool = False,
    directed: bool = True,
    disjoint: bool = False,
    temporal_strategy: str = "uniform",
    return_edge_id: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int], list[int]]:
    """Homogeneous sampling with pyg-lib's arguments and results: ``(row, col, node, edge, num_sampled_nodes,
    num_sampled_edges)``, where ``row``/``col`` are local indices of each sampled edge's neighbour and of the
    node it was sampled for, and ``edge`` its position in the CSC ``row``."""
    _check(disjoint, node_time, seed_time)
    pointers, sources = colptr.tolist(), row.tolist()
    nodes = _Nodes()
    for node in seed.tolist():
        nodes.add(node)
    rows: list[int] = []
    cols: list[int] = []
    edges: list[int] = []
    sampled_nodes: list[int] = [len(nodes.ids)]
    sampled_edges: list[int] = []
    begin, end = 0, len(nodes.ids)
    for fanout in num_neighbors:
        for target in range(begin, end):
            node = nodes.ids[target]
            for position in _pick(pointers[node], pointers[node + 1], fanout, replace):
                rows.append(nodes.add(sources[position]))
                cols.append(target)
                edges.append(position)
        sampled_edges.append(len(edges) - sum(sampled_edges))
        begin, end = end, len(nodes.ids)
        sampled_nodes.append(end - begin)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return as_long(rows), as_long(cols), as_long(nodes.ids), as_long(edges), sampled_nodes, sampled_edges


def hetero_neighbor_sample(
    node_types: Sequence[str],
    edge_types: Sequence[tuple[str, str, str]],
    colptr_dict: dict[str, Tensor],
    row_dict: dict[str, Tensor],
    seed_dict: dict[str, Tensor],
    num_neighbors_dict: dict[str, Sequence[int]],
    node_time_dict: Any = None,
    seed_time_dict: Any = None,
    csc: bool = True,
    replace: bool = False,
    directed: bool = True,
    disjoint: bool = False,
    temporal_strategy: str = "uniform",
    return_edge_id: bool = True,
) -> tuple[dict, dict, dict, dict, dict, dict]:
    """Heterogeneous sampling with pyg-lib's arguments and results. Edge types are keyed ``"src__rel__dst"``;
    every hop samples from the nodes the previous hop found, for each edge type into its source type."""
    _check(disjoint, node_time_dict, seed_time_dict)
    relations = {"__".join(edge_type): edge_type for edge_type in edge_types}
    nodes = {node_type: _Nodes() for node_type in node_types}
    for node_type, seed in seed_dict.items():
        for node in seed.tolist():
            nodes[node_type].add(node)
    graphs = {rel: (colptr_dict[rel].tolist(), row_dict[rel].tolist()) for rel in relations if rel in colptr_dict}
    sampled: dict[str, tuple[list[int], list[int], list[int]]] = {rel: ([], [], []) for rel in graphs}
    sampled_nodes = {node_type: [len(nodes[node_type].ids)] for node_type in node_types}
    sampled_edges: dict[str, list[int]] = {rel: [] for rel in graphs}
    frontier = {node_type: (0, len(nodes[node_type].ids)) for node_type in node_types}
    hops = max((len(fanouts) for fanouts in num_neighbors_dict.values()), default=0)
    for hop in range(hops):
        for rel, (pointers, sources) in graphs.items():
            source_type, _, target_type = relations[rel]
            fanouts = num_neighbors_dict.get(rel, ())
            rows, cols, edges = sampled[rel]
            before = len(edges)
            if hop < len(fanouts):
                targets = nodes[target_type]
                for target in range(*frontier[target_type]):
                    node = targets.ids[target]
                    for position in _pick(pointers[node], pointers[node + 1], fanouts[hop], replace):
                        rows.append(nodes[source_type].add(sources[position]))
                        cols.append(target)
                        edges.append(position)
            sampled_edges[rel].append(len(edges) - before)
        for node_type in node_types:
            begin, end = frontier[node_type][1], len(nodes[node_type].ids)
            frontier[node_type] = (begin, end)
            sampled_nodes[node_type].append(end - begin)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return (
        {rel: as_long(rows) for rel, (rows, _, _) in sampled.items()},
        {rel: as_long(cols) for rel, (_, cols, _) in sampled.items()},
        {node_type: as_long(found.ids) for node_type, found in nodes.items()},
        {rel: as_long(edges) for rel, (_, _, edges) in sampled.items()},
        sampled_nodes,
        sampled_edges,
    )


def hgt_sample(
    colptr_dict: dict[str, Tensor],
    row_dict: dict[str, Tensor],
    input_node_dict: dict[str, Tensor],
    num_samples_dict: dict[str, Sequence[int]],
    num_hops: int,
) -> tuple[dict, dict, dict, dict]:
    """HGT's layer-wise sampling with torch-sparse's arguments and results ``(node, row, col, edge)``: at each hop,
    for every node type, up to ``num_samples_dict[type][hop]`` nodes drawn uniformly from the not yet sampled
    neighbours of the sampled nodes (HGT weighs that budget by degree; the weighting does not matter here), then
    every edge among the sampled nodes."""
    graphs = {rel: (rel.split("__"), colptr.tolist(), row_dict[rel].tolist()) for rel, colptr in colptr_dict.items()}
    node_types = {t for (source, _, target), _, _ in graphs.values() for t in (source, target)} | set(input_node_dict)
    nodes = {node_type: _Nodes() for node_type in node_types}
    for node_type, seed in input_node_dict.items():
        for node in seed.tolist():
            nodes[node_type].add(node)
    for hop in range(num_hops):
        budget: dict[str, set[int]] = {node_type: set() for node_type in node_types}
        for (source, _, target), pointers, sources in graphs.values():
            for node in nodes[target].ids:
                budget[source].update(sources[pointers[node] : pointers[node + 1]])
        for node_type, candidates in budget.items():
            fanouts = num_samples_dict.get(node_type, ())
            fresh = sorted(candidates.difference(nodes[node_type].local))
            if hop < len(fanouts) and fresh:
                for index in torch.randperm(len(fresh))[: fanouts[hop]].tolist():
                    nodes[node_type].add(fresh[index])
    rows: dict[str, list[int]] = {}
    cols: dict[str, list[int]] = {}
    edges: dict[str, list[int]] = {}
    for rel, ((source, _, target), pointers, sources) in graphs.items():
        rows[rel], cols[rel], edges[rel] = [], [], []
        for local, node in enumerate(nodes[target].ids):
            for position in range(pointers[node], pointers[node + 1]):
                found = nodes[source].local.get(sources[position])
                if found is not None:
                    rows[rel].append(found)
                    cols[rel].append(local)
                    edges[rel].append(position)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return (
        {node_type: as_long(found.ids) for node_type, found in nodes.items()},
        {rel: as_long(values) for rel, values in rows.items()},
        {rel: as_long(values) for rel, values in cols.items()},
        {rel: as_long(values) for rel, values in edges.items()},
    )


@contextlib.contextmanager
def use_pure_torch_sampler() -> Iterator[None]:
    """Within the block, PyG's ``NeighborSampler`` and ``HGTSampler`` sample with the pure-torch kernels above
    (everything is restored after)."""
    kernels = [
        (torch.ops.pyg, "neighbor_sample", neighbor_sample),
        (torch.ops.pyg, "hetero_neighbor_sample", hetero_neighbor_sample),
        (torch.ops.torch_sparse, "hgt_sample", hgt_sample),
    ]
    saved = [namespace.__dict__.get(name) for namespace, name, _ in kernels]
    # What tells PyG the compiled libraries are there: read at sampling time, and by HGTSampler at import.
    flags = [(torch_geometric.typing, "WITH_PYG_LIB"), (hgt_sampler, "WITH_TORCH_SPARSE")]
    saved_flags = [getattr(module, name) for module, name in flags]
    for namespace, name, kernel in kernels:
        setattr(namespace, name, kernel)
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved_flags):
            setattr(module, name, value)
        for (namespace, name, _), value in zip(kernels, saved):
            if value is None:
                namespace.__dict__.pop(name, None)
            else:
                setattr(namespace, name, value)
