"""Event loader: past-only neighbourhoods, exact recent history, negatives, pair features, batch layout."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import TemporalData

from dgdn_lightning_monitor.dgdn import RecentNeighborLoader, SyntheticTemporalGraph, TemporalEventLoader


def _brute_force_recent(src, dst, upto: int, node: int, size: int) -> list[tuple[int, int]]:
    """(event id, neighbour) of the ``size`` latest events of ``node`` among events ``< upto``."""
    found = []
    for e in range(upto - 1, -1, -1):
        if src[e] == node:
            found.append((e, int(dst[e])))
        if dst[e] == node:
            found.append((e, int(src[e])))
        if len(found) >= size:
            break
    return sorted(found[:size])


def test_recent_neighbor_loader_is_exact_under_bursts():
    gen = torch.Generator().manual_seed(1)
    # Node 0 fires in bursts: many events in one insertion, more than the history size.
    src = torch.where(torch.rand(300, generator=gen) < 0.5, torch.zeros(300, dtype=torch.long),
                      torch.randint(0, 15, (300,), generator=gen))
    dst = torch.randint(15, 25, (300,), generator=gen)
    history = RecentNeighborLoader(num_nodes=25, size=5)
    for first in range(0, 300, 50):
        history.insert(src[first:first + 50], dst[first:first + 50])
        for node in (0, 3, 17, 24):
            neighbors, e_id = history.recent(torch.tensor([node]))
            got = sorted((int(e), int(n)) for e, n in zip(e_id[0], neighbors[0]) if e >= 0)
            assert got == _brute_force_recent(src.tolist(), dst.tolist(), first + 50, node, 5)


def test_recent_neighbor_loader_checks_arguments():
    with pytest.raises(ValueError, match="size"):
        RecentNeighborLoader(10, 0)
    with pytest.raises(ValueError, match="num_nodes"):
        RecentNeighborLoader(0, 3)


@pytest.fixture(scope="module")
def graph() -> SyntheticTemporalGraph:
    return SyntheticTemporalGraph(num_nodes=80, num_events=1500, num_communities=4, seed=5)


def test_batches_only_see_the_past(graph):
    data = graph.data
    loader = TemporalEventLoader(data, 1000, 1500, graph.num_nodes, batch_size=100, num_neighbors=6,
                                 fixed_negatives_seed=0)
    for index, batch in enumerate(loader):
        first = 1000 + index * 100
        count = batch.src.numel()
        assert isinstance(batch, TemporalData) and count == 100
        assert bool((batch.nbr_e_id < first).all())
        instance = batch.nbr_index[1]
        query_time = batch.t.repeat(3)[instance]
        assert bool((data.t[batch.nbr_e_id] <= query_time).all())
        assert torch.allclose(batch.nbr_dt, (query_time - data.t[batch.nbr_e_id]).float())
        assert torch.equal(batch.nbr_msg, data.msg[batch.nbr_e_id])
        # The neighbours of each source are exactly its latest events before the batch.
        src_list, dst_list = data.src.tolist(), data.dst.tolist()
        for i in (0, 37, 99):
            node = int(batch.src[i])
            mine = instance == i
            got = sorted(zip(batch.nbr_e_id[mine].tolist(), batch.n_id[batch.nbr_index[0, mine]].tolist()))
            assert got == _brute_force_recent(src_list, dst_list, first, node, 6)


def test_batch_layout_and_node_ids(graph):
    loader = TemporalEventLoader(graph.data, 0, 500, graph.num_nodes, batch_size=128, num_negatives=2)
    batches = list(loader)
    assert [b.src.numel() for b in batches] == [128, 128, 128, 116]
    batch = batches[1]
    count = batch.src.numel()
    assert batch.neg_dst.shape == (2 * count,)
    queries = torch.cat([batch.src, batch.dst, batch.neg_dst])
    assert torch.equal(batch.n_id[batch.query_index], queries)
    assert torch.equal(batch.n_id, batch.n_id.unique())  # distinct, host-side
    neighbours = batch.n_id[batch.nbr_index[0]]
    assert set(batch.n_id.tolist()) == set(queries.tolist()) | set(neighbours.tolist())
    assert batch.pair_count.shape == (3 * count, 3) and batch.pair_dt.shape == (3 * count,)
    assert all(b.n_id.device.type == "cpu" for b in batches)


def test_pair_features_match_the_history(graph):
    data = graph.data
    loader = TemporalEventLoader(data, 600, 900, graph.num_nodes, batch_size=100, num_neighbors=8,
                                 fixed_negatives_seed=1)
    src_list, dst_list = data.src.tolist(), data.dst.tolist()
    for index, batch in enumerate(loader):
        first = 600 + index * 100
        count = batch.src.numel()
        candidates = torch.cat([batch.dst, batch.neg_dst])
        for p in (0, 5, count + 3, count + 50):
            s, c = int(batch.src[p % count]), int(candidates[p])
            s_hist = _brute_force_recent(src_list, dst_list, first, s, 8)
            c_hist = _brute_force_recent(src_list, dst_list, first, c, 8)
            in_s = sum(1 for _, n in s_hist if n == c)
            in_c = sum(1 for _, n in c_hist if n == s)
            shared = len({n for _, n in s_hist} & {n for _, n in c_hist})
            assert batch.pair_count[p].tolist() == [in_s, in_c, shared]
            latest = max([e for e, n in s_hist if n == c] + [e for e, n in c_hist if n == s], default=-1)
            assert bool(batch.pair_seen[p]) == (latest >= 0)
            if latest >= 0:
                assert batch.pair_dt[p].item() == float(batch.t[p % count] - data.t[latest])


def test_fixed_negatives_are_stable_and_training_negatives_vary(graph):
    evaluation = TemporalEventLoader(graph.data, 1000, 1300, graph.num_nodes, batch_size=100,
                                     fixed_negatives_seed=7)
    first = [b.neg_dst for b in evaluation]
    second = [b.neg_dst for b in evaluation]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    training = TemporalEventLoader(graph.data, 0, 300, graph.num_nodes, batch_size=100)
    torch.manual_seed(0)
    one = torch.cat([b.neg_dst for b in training])
    two = torch.cat([b.neg_dst for b in training])
    assert not torch.equal(one, two)
    assert int(one.min()) >= 0 and int(one.max()) < graph.num_nodes


def test_every_pass_restarts_from_the_same_history(graph):
    loader = TemporalEventLoader(graph.data, 1000, 1200, graph.num_nodes, batch_size=100, fixed_negatives_seed=0)
    first = [b.nbr_e_id for b in loader]
    second = [b.nbr_e_id for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert int(first[0].max()) == 999  # the history holds the events right before the range


def test_node_classification_layout(graph):
    loader = TemporalEventLoader(graph.data, 0, 200, graph.num_nodes, batch_size=100, num_negatives=0)
    batch = list(loader)[1]
    assert "neg_dst" not in batch and "pair_count" not in batch
    assert torch.equal(batch.n_id[batch.query_index], batch.src)


def test_loader_argument_checks(graph):
    with pytest.raises(ValueError, match="start and end"):
        TemporalEventLoader(graph.data, 10, 5, graph.num_nodes)
    with pytest.raises(ValueError, match="batch_size"):
        TemporalEventLoader(graph.data, 0, 100, graph.num_nodes, batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        TemporalEventLoader(graph.data, 0, 100, graph.num_nodes, num_workers=2)
    with pytest.raises(ValueError, match="num_negatives"):
        TemporalEventLoader(graph.data, 0, 100, graph.num_nodes, num_negatives=-1)
