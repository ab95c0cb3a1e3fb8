"""Synthetic graph generator and JODIE loading (offline, from a small CSV in the raw folder)."""

from __future__ import annotations

import os

import pytest
import torch

from dgdn_lightning_monitor.dgdn import DATASETS, SyntheticTemporalGraph, TemporalGraph, load_dataset, load_jodie


def _small(**kwargs) -> SyntheticTemporalGraph:
    args = {"num_nodes": 120, "num_events": 2000, "num_communities": 4, "seed": 3, **kwargs}
    return SyntheticTemporalGraph(**args)


def test_synthetic_is_deterministic_by_seed():
    a, b, c = _small(), _small(), _small(seed=4)
    for key in ("src", "dst", "t", "msg", "y"):
        assert torch.equal(a.data[key], b.data[key])
    assert torch.equal(a.x, b.x)
    assert not torch.equal(a.data.dst, c.data.dst)


def test_synthetic_layout():
    graph = _small(node_dim=8, edge_dim=5)
    data = graph.data
    assert graph.num_events == data.num_events == 2000
    assert graph.num_nodes == 120 and graph.x.shape == (120, 8)
    assert graph.node_dim == 8 and graph.edge_dim == 5 and graph.num_classes == 2
    assert data.msg.shape == (2000, 5) and data.msg.dtype == torch.float
    assert data.t.dtype == torch.long and bool((data.t[1:] >= data.t[:-1]).all())
    assert int(data.src.max()) < 120 and int(data.dst.max()) < 120
    assert bool((data.src != data.dst).all())
    assert set(data.y.unique().tolist()) <= {0, 1}
    assert graph.dst_range == (0, 119)


def test_synthetic_has_planted_structure():
    graph = _small()
    src, dst = graph.data.src, graph.data.dst
    same_community = (graph.community[src] == graph.community[dst]).float().mean().item()
    assert same_community > 0.7  # far above the 1/4 of random pairs
    is_partner = (graph.partners[src] == dst.view(-1, 1)).any(dim=1).float().mean().item()
    assert is_partner > 0.5
    # Bursts: many events follow the source's previous event closely.
    assert 0.4 < graph.data.y.float().mean().item() < 0.95


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_nodes": 1}, "num_nodes"),
        ({"num_events": 0}, "num_events"),
        ({"num_communities": 500}, "num_communities"),
        ({"p_partner": 1.5}, "p_partner"),
        ({"p_partner": 0.8, "p_community": 0.5}, "p_partner"),
        ({"mean_burst": 0.5}, "mean_burst"),
        ({"node_dim": 2}, "node_dim"),
        ({"edge_dim": 1}, "edge_dim"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _small(**kwargs)


def test_split_points_are_chronological_and_non_empty():
    graph = _small()
    val_start, test_start = graph.split_points(0.15, 0.15)
    assert (val_start, test_start) == (1400, 1700)
    with pytest.raises(ValueError, match="val_ratio"):
        graph.split_points(0.0, 0.1)
    with pytest.raises(ValueError, match="below 1"):
        graph.split_points(0.6, 0.5)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError) as info:
        load_dataset("citeseer")
    for name in DATASETS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="wikipedia"):
        load_jodie("synthetic")


def _write_jodie_csv(path: str, users: int = 6, items: int = 4, events: int = 30, features: int = 3) -> None:
    gen = torch.Generator().manual_seed(0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = "user_id,item_id,timestamp,state_label,comma_separated_list_of_features\n"
    lines = [header]
    for i in range(events):
        user, item = i % users, int(torch.randint(items, (1,), generator=gen))
        label = 1 if i % 7 == 0 else 0
        feats = ",".join(f"{v:.3f}" for v in torch.randn(features, generator=gen).tolist())
        lines.append(f"{user},{item},{float(i * 10)},{label},{feats}\n")
    with open(path, "w") as handle:
        handle.writelines(lines)


def test_jodie_loads_from_a_csv_in_the_raw_folder(tmp_path):
    _write_jodie_csv(str(tmp_path / "wikipedia" / "raw" / "wikipedia.csv"))
    graph = load_dataset("Wikipedia", root=str(tmp_path))
    assert isinstance(graph, TemporalGraph) and graph.name == "wikipedia" and graph.bipartite
    data = graph.data
    assert data.num_events == 30
    assert data.msg.shape == (30, 3) and graph.edge_dim == 3 and graph.x is None
    assert int(data.src.max()) == 5 and int(data.dst.min()) >= 6  # items come after the users
    assert graph.num_nodes == 10 and graph.dst_range == (int(data.dst.min()), int(data.dst.max()))
    assert graph.num_classes == 2 and int(data.y.sum()) == 5
    assert os.path.exists(tmp_path / "wikipedia" / "processed" / "data.pt")
    # A second load reads the processed file.
    again = load_jodie("wikipedia", root=str(tmp_path))
    assert torch.equal(again.data.dst, data.dst)


def test_failed_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    import torch_geometric.datasets.jodie as jodie

    def offline(url, folder, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(jodie, "download_url", offline)
    with pytest.raises(RuntimeError) as info:
        load_jodie("mooc", root=str(tmp_path))
    message = str(info.value)
    assert "network unreachable" in message
    assert os.path.join(str(tmp_path), "mooc", "raw", "mooc.csv") in message
    assert "mooc.csv" in message and "place it" in message


def test_temporal_graph_checks():
    graph = _small()
    with pytest.raises(ValueError, match="num_nodes"):
        TemporalGraph(graph.data, num_nodes=10)
    with pytest.raises(ValueError, match="x must"):
        TemporalGraph(graph.data, num_nodes=120, x=torch.zeros(3, 2))
    shuffled = graph.data[torch.randperm(graph.num_events)]
    with pytest.raises(ValueError, match="sorted"):
        TemporalGraph(shuffled, num_nodes=120)
