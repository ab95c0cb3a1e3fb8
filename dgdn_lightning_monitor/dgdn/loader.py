"""Chronological event batches with past-only neighbourhoods, prepared on the host.

:class:`TemporalEventLoader` walks a time-ordered range of events in fixed-size batches, like PyG's
``TemporalDataLoader``. For every batch it samples negative destinations, looks up the most recent past
events of every queried node in a :class:`RecentNeighborLoader` (PyG's ``LastNeighborLoader`` with exact
insertion) and only *then* inserts the batch's own events, so a batch never sees itself or the future.

Everything is done in the loader, on CPU tensors, so the training step only moves finished tensors to the
device and the batch carries host-side facts such as ``n_id`` (the distinct nodes involved).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor
from torch_geometric.data import TemporalData
from torch_geometric.loader import TemporalDataLoader
from torch_geometric.nn.models.tgn import LastNeighborLoader

__all__ = ["RecentNeighborLoader", "TemporalEventLoader"]


class RecentNeighborLoader(LastNeighborLoader):
    """Keeps, for every node, its ``size`` most recent events (neighbour node and event id).

    Unlike the parent class, :meth:`insert` stays exact when one insertion holds more than ``size`` events of
    the same node (bursts): the newest ``size`` are kept.

    Args:
        num_nodes: number of nodes.
        size: events remembered per node.

    Example::

        history = RecentNeighborLoader(num_nodes=100, size=10)
        history.insert(src, dst)  # event ids continue from the previous insertion
        neighbors, e_id = history.recent(torch.tensor([3, 7]))  # [2, 10] each, e_id -1 where empty
    """

    def __init__(self, num_nodes: int, size: int) -> None:
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes <= 0:
            raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        super().__init__(num_nodes, size)

    def insert(self, src: Tensor, dst: Tensor) -> None:
        """Record events ``src[i] <-> dst[i]`` with the next consecutive event ids."""
        count = src.numel()
        if count == 0:
            return
        e_id = torch.arange(self.cur_e_id, self.cur_e_id + count, device=src.device).repeat(2)
        self.cur_e_id += count
        nodes = torch.cat([src, dst])
        neighbors = torch.cat([dst, src])

        # Group by node, newest first within a group (both sorts stable).
        order = torch.argsort(e_id, descending=True, stable=True)
        nodes, neighbors, e_id = nodes[order], neighbors[order], e_id[order]
        order = torch.argsort(nodes, stable=True)
        nodes, neighbors, e_id = nodes[order], neighbors[order], e_id[order]

        unique_nodes, group, counts = torch.unique_consecutive(nodes, return_inverse=True, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(nodes.numel(), device=nodes.device) - starts[group]
        keep = rank < self.size
        new_e_id = e_id.new_full((unique_nodes.numel(), self.size), -1)
        new_neighbors = e_id.new_zeros((unique_nodes.numel(), self.size))
        new_e_id[group[keep], rank[keep]] = e_id[keep]
        new_neighbors[group[keep], rank[keep]] = neighbors[keep]

        all_e_id = torch.cat([self.e_id[unique_nodes], new_e_id], dim=1)
        all_neighbors = torch.cat([self.neighbors[unique_nodes], new_neighbors], dim=1)
        top_e_id, perm = all_e_id.topk(self.size, dim=1)
        self.e_id[unique_nodes] = top_e_id
        self.neighbors[unique_nodes] = torch.gather(all_neighbors, 1, perm)

    def recent(self, nodes: Tensor) -> tuple[Tensor, Tensor]:
        """``(neighbors, e_id)``, each ``[len(nodes), size]``; empty slots have ``e_id == -1``."""
        return self.neighbors[nodes], self.e_id[nodes]

    def snapshot(self) -> tuple[Tensor, Tensor, int]:
        """A copy of the state, for :meth:`restore`."""
        return self.neighbors.clone(), self.e_id.clone(), self.cur_e_id

    def restore(self, state: tuple[Tensor, Tensor, int]) -> None:
        """Return to a state taken with :meth:`snapshot`."""
        neighbors, e_id, cur_e_id = state
        self.neighbors.copy_(neighbors)
        self.e_id.copy_(e_id)
        self.cur_e_id = cur_e_id


class TemporalEventLoader(TemporalDataLoader):
    """Batches of consecutive events of ``data[start:end]`` with their past neighbourhoods.

    Each batch is a :class:`~torch_geometric.data.TemporalData` holding the events (``src``, ``dst``, ``t``,
    ``msg`` and ``y`` when present) plus:

    * ``neg_dst`` (``[B * num_negatives]``, link prediction only): negative destinations drawn uniformly from
      the destination id range; fixed per event when ``fixed_negatives_seed`` is given.
    * ``n_id``: distinct global ids of every node the batch involves (queried nodes and their neighbours).
    * ``query_index``: for each query instance, the position of its node in ``n_id``. Instances are
      ``[src, dst, neg_dst]`` for link prediction and ``[src]`` otherwise; each is asked about at the time
      of its event.
    * ``nbr_index`` (``[2, E]``): neighbour events; row 0 is a position in ``n_id``, row 1 an instance.
    * ``nbr_dt`` (``[E]``, float): query time minus event time; ``nbr_msg`` (``[E, edge_dim]``) when events
      carry messages; ``nbr_e_id`` (``[E]``): global event ids.
    * ``pair_count`` (``[P, 3]``), ``pair_dt`` and ``pair_seen`` (``[P]``), link prediction only: the shared
      history of each (source, candidate) pair, candidates being ``[dst, neg_dst]`` (see
      :meth:`_add_pair_features`).

    Every neighbour event precedes the batch: the history holds the events before ``start`` when iteration
    begins and grows by one batch after the batch is built. The state lives in this process, so the loader
    runs without worker processes.

    Args:
        data: all events, sorted by time; event ``i`` has id ``i``.
        start: first event of the range.
        end: one past the last event of the range.
        num_nodes: number of node ids.
        batch_size: events per batch.
        num_neighbors: most recent events remembered per node.
        num_negatives: negatives per event (``0`` for node classification).
        fixed_negatives_seed: draw the negatives once with this seed (stable evaluation); ``None`` draws new
            ones on every pass from the global RNG (training).
        dst_range: ``(low, high)`` inclusive id range of negative destinations; defaults to the range of
            ``data.dst``.

    Example::

        loader = TemporalEventLoader(data, 0, 1000, num_nodes=100, batch_size=200)
        for batch in loader:
            ...  # batch.src, batch.neg_dst, batch.nbr_index, ...
    """

    def __init__(
        self,
        data: TemporalData,
        start: int,
        end: int,
        num_nodes: int,
        batch_size: int = 200,
        num_neighbors: int = 10,
        num_negatives: int = 1,
        fixed_negatives_seed: Optional[int] = None,
        dst_range: Optional[tuple[int, int]] = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(data, TemporalData):
            raise ValueError(f"data must be a torch_geometric.data.TemporalData, got {type(data).__name__}")
        total = data.num_events
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= total):
            raise ValueError(f"start and end must satisfy 0 <= start < end <= {total}, got {start!r}, {end!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 0:
            raise ValueError(f"num_negatives must be a non-negative integer, got {num_negatives!r}")
        if kwargs.get("num_workers", 0):
            raise ValueError("num_workers must be 0: the neighbour history is state kept in this process")
        kwargs.pop("num_workers", None)
        self.history = RecentNeighborLoader(num_nodes, num_neighbors)
        self.full_data = data
        self.start, self.end = start, end
        self.num_negatives = num_negatives
        self.has_msg = isinstance(data.msg, Tensor) if "msg" in data else False
        if dst_range is None:
            dst_range = (int(data.dst.min()), int(data.dst.max()))
        self.dst_low, self.dst_high = int(dst_range[0]), int(dst_range[1])
        if self.dst_low > self.dst_high:
            raise ValueError(f"dst_range must be (low, high) with low <= high, got {dst_range!r}")

        split = data[start:end]
        self.fixed_neg_dst: Optional[Tensor] = None
        if num_negatives > 0 and fixed_negatives_seed is not None:
            generator = torch.Generator().manual_seed(int(fixed_negatives_seed))
            self.fixed_neg_dst = torch.randint(
                self.dst_low, self.dst_high + 1, (end - start, num_negatives), generator=generator
            )
        self._initial_state: Optional[tuple[Tensor, Tensor, int]] = None
        super().__init__(split, batch_size=batch_size, neg_sampling_ratio=0.0, num_workers=0, **kwargs)

    # The history before ``start`` is replayed once, then restored at every new pass.
    def _reset_history(self) -> None:
        if self._initial_state is None:
            self.history.reset_state()
            step = self.events_per_batch
            for first in range(0, self.start, step):
                last = min(first + step, self.start)
                self.history.insert(self.full_data.src[first:last], self.full_data.dst[first:last])
            self._initial_state = self.history.snapshot()
        else:
            self.history.restore(self._initial_state)

    def __iter__(self) -> Iterator[Any]:
        self._reset_history()
        return super().__iter__()

    def __call__(self, arange: list[int]) -> TemporalData:
        offset = arange[0]
        batch = self.data[offset:offset + self.events_per_batch]
        first = self.start + offset
        count = batch.num_events
        if self.history.cur_e_id != first:
            raise RuntimeError(
                f"events must be loaded in order: the history ends at event {self.history.cur_e_id}, "
                f"the batch starts at {first}"
            )

        queries = [batch.src, batch.dst]
        if self.num_negatives > 0:
            if self.fixed_neg_dst is not None:
                neg = self.fixed_neg_dst[offset:offset + count].t().reshape(-1)
            else:
                neg = torch.randint(self.dst_low, self.dst_high + 1, (count * self.num_negatives,))
            batch.neg_dst = neg
            queries.append(neg)
        else:
            queries = [batch.src]
        query_nodes = torch.cat(queries)
        query_time = batch.t.repeat(len(queries) if self.num_negatives == 0 else 2 + self.num_negatives)

        neighbors, e_id = self.history.recent(query_nodes)
        if self.num_negatives > 0:
            self._add_pair_features(batch, neighbors, e_id)
        mask = e_id >= 0
        instance = torch.arange(query_nodes.numel()).view(-1, 1).expand_as(e_id)[mask]
        neighbors, e_id = neighbors[mask], e_id[mask]

        n_id, inverse = torch.unique(torch.cat([query_nodes, neighbors]), return_inverse=True)
        batch.n_id = n_id
        batch.query_index = inverse[: query_nodes.numel()]
        batch.nbr_index = torch.stack([inverse[query_nodes.numel():], instance])
        batch.nbr_dt = (query_time[instance] - self.full_data.t[e_id]).to(torch.float)
        batch.nbr_e_id = e_id
        if self.has_msg:
            batch.nbr_msg = self.full_data.msg[e_id]

        self.history.insert(batch.src, batch.dst)
        return batch

    def _add_pair_features(self, batch: TemporalData, neighbors: Tensor, e_id: Tensor) -> None:
        """Shared history of each (source, candidate) pair, from the recent events of both ends.

        Pairs are ``[(src, dst), (src, neg_dst)...]`` in the order of the candidates. ``pair_count`` holds
        how often the candidate is among the source's recent neighbours, the source among the candidate's,
        and how many distinct recent neighbours they share; ``pair_dt`` the time since their latest interaction
        (``0`` when ``pair_seen`` is false).
        """
        count = batch.src.numel()
        rounds = neighbors.size(0) // count - 1  # candidates per source: the destination and the negatives
        valid = e_id >= 0
        size = neighbors.size(1)
        # Count each distinct neighbour of the source once: drop slots repeating an earlier slot.
        repeats = (neighbors[:count].unsqueeze(2) == neighbors[:count].unsqueeze(1)) & valid[:count].unsqueeze(1)
        earlier = torch.ones(size, size, dtype=torch.bool).tril(-1)
        src_first = valid[:count] & ~(repeats & earlier).any(dim=2)
        src_nbr = neighbors[:count].repeat(rounds, 1)
        src_e = e_id[:count].repeat(rounds, 1)
        src_valid = valid[:count].repeat(rounds, 1)
        src_first = src_first.repeat(rounds, 1)
        cand_nbr, cand_e, cand_valid = neighbors[count:], e_id[count:], valid[count:]
        source = batch.src.repeat(rounds)
        candidate = torch.cat([batch.dst, batch.neg_dst])

        cand_in_src = (src_nbr == candidate.view(-1, 1)) & src_valid
        src_in_cand = (cand_nbr == source.view(-1, 1)) & cand_valid
        same = (src_nbr.unsqueeze(2) == cand_nbr.unsqueeze(1)) & src_valid.unsqueeze(2) & cand_valid.unsqueeze(1)
        shared = (same.any(dim=2) & src_first).sum(dim=1)
        last = torch.maximum(
            torch.where(cand_in_src, src_e, torch.full_like(src_e, -1)).max(dim=1).values,
            torch.where(src_in_cand, cand_e, torch.full_like(cand_e, -1)).max(dim=1).values,
        )
        seen = last >= 0
        query_time = batch.t.repeat(rounds)
        batch.pair_count = torch.stack([cand_in_src.sum(dim=1), src_in_cand.sum(dim=1), shared], dim=1).float()
        batch.pair_seen = seen
        batch.pair_dt = torch.where(seen, query_time - self.full_data.t[last.clamp(min=0)],
                                    torch.zeros_like(query_time)).float()
