"""Temporal interaction graphs for DGDN: a synthetic generator and the JODIE benchmarks.

A :class:`TemporalGraph` bundles the time-ordered events (a PyG :class:`~torch_geometric.data.TemporalData`
with ``src``, ``dst``, ``t``, ``msg`` and ``y``) with what lives outside the event list: the number of node
ids, optional node features and the number of event label classes.
"""

from __future__ import annotations

import math
import os
import os.path as osp
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import TemporalData
from torch_geometric.datasets import JODIEDataset

__all__ = [
    "DATASETS",
    "JODIE_DATASETS",
    "SyntheticTemporalGraph",
    "TemporalGraph",
    "load_dataset",
    "load_jodie",
]

#: Names of the JODIE benchmarks (lower case), as accepted by :func:`load_jodie`.
JODIE_DATASETS = ("wikipedia", "reddit", "mooc", "lastfm")
#: Every name :func:`load_dataset` accepts.
DATASETS = ("synthetic",) + JODIE_DATASETS


class TemporalGraph:
    """Time-ordered events plus node-level facts.

    Args:
        data: events sorted by ``t``; ``msg`` (``[E, edge_dim]``) and ``y`` (``[E]``) are optional.
        num_nodes: number of node ids (all ids in ``src``/``dst`` are below it).
        x: ``[num_nodes, node_dim]`` node features, or ``None``.
        num_classes: classes of ``data.y`` (``None`` when events carry no labels).
        name: a short name for reports.
        bipartite: whether sources and destinations are disjoint id ranges (JODIE's users and items).

    Example::

        graph = TemporalGraph(TemporalData(src=src, dst=dst, t=t, msg=msg), num_nodes=100)
        graph.num_events, graph.edge_dim
    """

    def __init__(
        self,
        data: TemporalData,
        num_nodes: int,
        x: Optional[Tensor] = None,
        num_classes: Optional[int] = None,
        name: str = "graph",
        bipartite: bool = False,
    ) -> None:
        if not isinstance(data, TemporalData):
            raise ValueError(f"data must be a torch_geometric.data.TemporalData, got {type(data).__name__}")
        if data.num_events == 0:
            raise ValueError("data must hold at least one event")
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes <= 0:
            raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
        if int(max(data.src.max(), data.dst.max())) >= num_nodes:
            raise ValueError(f"num_nodes ({num_nodes}) must exceed every node id in data.src and data.dst")
        if data.num_events > 1 and bool((data.t[1:] < data.t[:-1]).any()):
            raise ValueError("data must be sorted by time (data.t non-decreasing)")
        if x is not None and (x.dim() != 2 or x.size(0) != num_nodes):
            raise ValueError(f"x must have shape [num_nodes, node_dim] = [{num_nodes}, *], got {tuple(x.shape)}")
        self.data = data
        self.num_nodes = num_nodes
        self.x = x
        self.num_classes = num_classes
        self.name = name
        self.bipartite = bipartite

    @property
    def num_events(self) -> int:
        """Number of events."""
        return int(self.data.num_events)

    @property
    def node_dim(self) -> int:
        """Size of node features (``0`` without features)."""
        return 0 if self.x is None else int(self.x.size(1))

    @property
    def edge_dim(self) -> int:
        """Size of event messages (``0`` without messages)."""
        msg = self.data.msg if "msg" in self.data else None
        return 0 if msg is None else int(msg.size(1))

    @property
    def dst_range(self) -> tuple[int, int]:
        """Inclusive id range that destinations are drawn from (for negative sampling)."""
        if self.bipartite:
            return int(self.data.dst.min()), int(self.data.dst.max())
        return 0, self.num_nodes - 1

    def split_points(self, val_ratio: float = 0.15, test_ratio: float = 0.15) -> tuple[int, int]:
        """Chronological split: event indices ``(val_start, test_start)``.

        Training gets the first ``1 - val_ratio - test_ratio`` of the events, validation the next
        ``val_ratio`` and test the rest. Every split is non-empty.
        """
        for name, value in (("val_ratio", val_ratio), ("test_ratio", test_ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be a float in (0, 1), got {value!r}")
        if val_ratio + test_ratio >= 1.0:
            raise ValueError(f"val_ratio + test_ratio must be below 1, got {val_ratio + test_ratio}")
        total = self.num_events
        if total < 3:
            raise ValueError(f"need at least 3 events to split, got {total}")
        val_start = min(max(int(round(total * (1.0 - val_ratio - test_ratio))), 1), total - 2)
        test_start = min(max(int(round(total * (1.0 - test_ratio))), val_start + 1), total - 1)
        return val_start, test_start

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, num_nodes={self.num_nodes}, num_events={self.num_events}, "
            f"node_dim={self.node_dim}, edge_dim={self.edge_dim}, num_classes={self.num_classes})"
        )


class SyntheticTemporalGraph(TemporalGraph):
    """A temporal interaction graph with planted, learnable structure; the same ``seed`` gives the same graph.

    Nodes belong to ``num_communities`` communities and each has a few recurring partners, mostly in its own
    community. Activity comes in sessions (bursts): a node wakes up and fires several events in quick
    succession, often at the same partner. Destinations are a recurring partner with probability
    ``p_partner``, another member of the community with probability ``p_community``, and any node otherwise;
    within a session the previous destination is repeated with probability ``p_repeat``.
    Per-node activity rates are heavy-tailed.

    Node features hold a noisy community indicator and a random per-node signature. Event messages are a
    noisy code of the destination's community plus the time since the source's previous event. The event
    label ``y`` is ``1`` when the event continues a burst (the source's previous event was recent).

    Args:
        num_nodes: number of nodes.
        num_events: number of events.
        num_communities: number of communities.
        partners_per_node: recurring partners per node.
        p_partner: probability that a destination is a recurring partner.
        p_community: probability that it is another member of the source's community.
        p_repeat: probability that an event of a session goes to the same destination as the one before.
        mean_burst: mean events per session.
        node_dim: node feature size (at least ``num_communities``).
        edge_dim: message size (at least 2).
        seed: random seed.

    Example::

        graph = SyntheticTemporalGraph(num_nodes=500, num_events=20_000, seed=0)
        graph.data  # TemporalData(src, dst, t, msg, y)
    """

    def __init__(
        self,
        num_nodes: int = 1000,
        num_events: int = 20_000,
        num_communities: int = 10,
        partners_per_node: int = 4,
        p_partner: float = 0.6,
        p_community: float = 0.3,
        p_repeat: float = 0.35,
        mean_burst: float = 4.0,
        node_dim: int = 32,
        edge_dim: int = 16,
        seed: int = 0,
    ) -> None:
        checks = (
            ("num_nodes", num_nodes, 2), ("num_events", num_events, 3), ("num_communities", num_communities, 1),
            ("partners_per_node", partners_per_node, 1), ("node_dim", node_dim, 1), ("edge_dim", edge_dim, 2),
        )
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if num_communities > num_nodes:
            raise ValueError(f"num_communities ({num_communities}) must not exceed num_nodes ({num_nodes})")
        if node_dim < num_communities:
            raise ValueError(f"node_dim ({node_dim}) must be at least num_communities ({num_communities})")
        for name, value in (("p_partner", p_partner), ("p_community", p_community), ("p_repeat", p_repeat)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if p_partner + p_community > 1.0:
            raise ValueError(f"p_partner + p_community must not exceed 1, got {p_partner + p_community}")
        if isinstance(mean_burst, bool) or not isinstance(mean_burst, (int, float)) or mean_burst < 1.0:
            raise ValueError(f"mean_burst must be a number >= 1, got {mean_burst!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        rng = np.random.default_rng(seed)

        # Communities and partners.
        community = rng.permutation(np.arange(num_nodes) % num_communities)
        members = [np.flatnonzero(community == c) for c in range(num_communities)]
        partners = np.empty((num_nodes, partners_per_node), dtype=np.int64)
        for node in range(num_nodes):
            pool = members[community[node]]
            pool = pool[pool != node]
            if pool.size == 0 or rng.random() < 0.15:
                pool = np.delete(np.arange(num_nodes), node)
            partners[node] = rng.choice(pool, partners_per_node, replace=pool.size < partners_per_node)
        activity = rng.lognormal(mean=0.0, sigma=1.0, size=num_nodes)
        cumulative = np.cumsum(activity / activity.sum())

        # Sessions: a start time, a length, short gaps between their events.
        horizon = 1_000_000.0
        # Gaps inside a session, counted in events of the whole graph: about 150 (so a session spans several
        # batches) but well below a node's typical gap between sessions (about num_nodes * mean_burst events).
        mean_gap = horizon / num_events * min(150.0, num_nodes * mean_burst / 20.0)
        src_list, dst_list, t_list = [], [], []
        produced = 0
        while produced < num_events:
            length = int(min(rng.geometric(1.0 / mean_burst), num_events - produced))
            source = min(int(np.searchsorted(cumulative, rng.random())), num_nodes - 1)
            start = rng.uniform(0.0, horizon)
            gaps = rng.exponential(mean_gap, size=length)
            gaps[0] = 0.0
            times = start + np.cumsum(gaps)
            previous = -1
            for position in range(length):
                if previous >= 0 and rng.random() < p_repeat:
                    target = previous  # keep talking to the same partner within a burst
                else:
                    draw = rng.random()
                    if draw < p_partner:
                        target = int(partners[source, rng.integers(partners_per_node)])
                    elif draw < p_partner + p_community:
                        pool = members[community[source]]
                        target = int(pool[rng.integers(pool.size)])
                    else:
                        target = int(rng.integers(num_nodes))
                    if target == source:
                        target = int(partners[source, 0])
                src_list.append(source)
                dst_list.append(target)
                t_list.append(times[position])
                previous = target
            produced += length

        src = np.asarray(src_list, dtype=np.int64)
        dst = np.asarray(dst_list, dtype=np.int64)
        t = np.floor(np.asarray(t_list)).astype(np.int64)
        order = np.argsort(t, kind="stable")
        src, dst, t = src[order], dst[order], t[order]

        # Label: the source's previous event happened within a few session gaps.
        last_seen = np.full(num_nodes, -np.inf)
        since = np.empty(num_events)
        for i in range(num_events):
            since[i] = t[i] - last_seen[src[i]]
            last_seen[src[i]] = t[i]
        y = (since <= 2.0 * mean_gap).astype(np.int64)

        # Node features: noisy community one-hot, then a random signature.
        x = rng.normal(0.0, 0.3, size=(num_nodes, node_dim))
        x[np.arange(num_nodes), community] += 1.0
        # Messages: noisy code of the destination's community, then the log time since the source's last event.
        codes = rng.normal(0.0, 1.0, size=(num_communities, edge_dim - 1))
        msg = codes[community[dst]] + rng.normal(0.0, 0.5, size=(num_events, edge_dim - 1))
        gap_feature = np.where(np.isfinite(since), np.log1p(np.maximum(since, 0.0)), 0.0)
        gap_feature = gap_feature / max(math.log1p(horizon), 1.0)
        msg = np.concatenate([msg, gap_feature[:, None]], axis=1)

        data = TemporalData(
            src=torch.from_numpy(src),
            dst=torch.from_numpy(dst),
            t=torch.from_numpy(t),
            msg=torch.from_numpy(msg).to(torch.float),
            y=torch.from_numpy(y),
        )
        self.community = torch.from_numpy(community)
        self.partners = torch.from_numpy(partners)
        super().__init__(
            data, num_nodes, x=torch.from_numpy(x).to(torch.float), num_classes=2, name="synthetic", bipartite=False
        )


class _JODIE(JODIEDataset):
    """PyG's JODIE dataset with a download error that says where to put the file."""

    def download(self) -> None:
        try:
            super().download()
        except Exception as error:  # no network, proxy, HTTP error: all end the same way for the user
            target = osp.join(self.raw_dir, self.raw_file_names)
            raise RuntimeError(
                f"could not download the JODIE dataset {self.name!r} ({error}). Fetch "
                f"{self.url.format(self.name)} by other means and place it at {target}, then run again."
            ) from error


def load_jodie(name: str, root: str = "data") -> TemporalGraph:
    """Load a JODIE benchmark (Wikipedia, Reddit, MOOC, LastFM) via PyG, downloading it when needed.

    The CSV goes to ``<root>/<name>/raw/<name>.csv``; without internet, put it there by hand.

    Args:
        name: one of :data:`JODIE_DATASETS` (case-insensitive).
        root: data folder.

    Example::

        graph = load_jodie("wikipedia", root="data")
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in JODIE_DATASETS:
        raise ValueError(f"unknown JODIE dataset {name!r}; choose one of: {', '.join(JODIE_DATASETS)}")
    os.makedirs(root, exist_ok=True)
    data = _JODIE(root, key)[0]
    order = torch.argsort(data.t, stable=True)
    if not bool((order == torch.arange(order.numel())).all()):
        data = data[order]
    num_nodes = int(max(data.src.max(), data.dst.max())) + 1
    labels = data.y if "y" in data else None
    num_classes = None if labels is None else max(int(labels.max()) + 1, 2)
    return TemporalGraph(data, num_nodes, x=None, num_classes=num_classes, name=key, bipartite=True)


def load_dataset(name: str, root: str = "data", **synthetic_kwargs: Any) -> TemporalGraph:
    """Load a graph by name: ``"synthetic"`` (keyword arguments go to :class:`SyntheticTemporalGraph`) or a
    JODIE benchmark (see :func:`load_jodie`).

    Args:
        name: one of :data:`DATASETS` (case-insensitive).
        root: data folder for the JODIE benchmarks.
        **synthetic_kwargs: arguments of :class:`SyntheticTemporalGraph`.

    Example::

        graph = load_dataset("synthetic", num_nodes=200, num_events=5000, seed=1)
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if key == "synthetic":
        return SyntheticTemporalGraph(**synthetic_kwargs)
    if synthetic_kwargs:
        raise ValueError(f"options {sorted(synthetic_kwargs)} only apply to the synthetic dataset")
    return load_jodie(key, root)
