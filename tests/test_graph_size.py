"""Graph sizes come from stored counts and shapes only: proven with tensors on the meta device, whose values
cannot be read at all (any .item(), max() or unique() would raise)."""

import pytest
import torch
from torch_geometric.data import Batch, Data, HeteroData, TemporalData

from dgdn_lightning_monitor.graph_size import GraphSize, GraphSizer, extract_graph_size

META = torch.device("meta")


def graph(nodes: int, edges: int, device: torch.device = META) -> Data:
    return Data(x=torch.empty(nodes, 4, device=device),
                edge_index=torch.empty(2, edges, dtype=torch.long, device=device))


def test_single_graph_counts_one_sample():
    assert extract_graph_size(graph(7, 12)) == GraphSize(1, 7, 12)


def test_batch_counts_graphs_nodes_edges():
    batch = Batch.from_data_list([graph(5, 8, torch.device("cpu")), graph(3, 2, torch.device("cpu"))])
    assert extract_graph_size(batch) == GraphSize(2, 8, 10)


def test_neighbor_sampled_subgraph_counts_seed_nodes():
    data = graph(30, 90)
    data.batch_size = 4  # what NeighborLoader sets: the seed nodes are the samples
    assert extract_graph_size(data) == GraphSize(4, 30, 90)


def test_stored_num_nodes_wins_without_node_features():
    data = Data(edge_index=torch.empty(2, 6, dtype=torch.long, device=META), num_nodes=11)
    assert extract_graph_size(data) == GraphSize(1, 11, 6)


def test_edges_only_graph_leaves_nodes_unknown_instead_of_reading_edge_index():
    data = Data(edge_index=torch.empty(2, 6, dtype=torch.long, device=META))
    assert extract_graph_size(data) == GraphSize(1, None, 6)


def test_hetero_data_sums_over_types():
    data = HeteroData()
    data["paper"].x = torch.empty(10, 3, device=META)
    data["author"].x = torch.empty(4, 3, device=META)
    data["author", "writes", "paper"].edge_index = torch.empty(2, 15, dtype=torch.long, device=META)
    data["paper", "cites", "paper"].edge_index = torch.empty(2, 5, dtype=torch.long, device=META)
    assert extract_graph_size(data) == GraphSize(1, 14, 20)


def test_temporal_data_counts_events_as_samples_and_edges():
    events = TemporalData(src=torch.empty(9, dtype=torch.long, device=META),
                          dst=torch.empty(9, dtype=torch.long, device=META),
                          t=torch.empty(9, dtype=torch.long, device=META),
                          msg=torch.empty(9, 2, device=META))
    assert extract_graph_size(events) == GraphSize(9, None, 9)
    events.n_id = torch.empty(13, dtype=torch.long, device=META)
    assert extract_graph_size(events) == GraphSize(9, 13, 9)


@pytest.mark.parametrize("container", [lambda g: (g, torch.zeros(3)), lambda g: [torch.zeros(2), g],
                                       lambda g: {"label": torch.zeros(2), "graph": g}])
def test_graph_inside_containers_is_found(container):
    assert extract_graph_size(container(graph(6, 4))) == GraphSize(1, 6, 4)


def test_tensor_batches_count_rows():
    assert extract_graph_size(torch.empty(17, 3, device=META)) == GraphSize(17, None, None)
    assert extract_graph_size((torch.empty(5, 2), torch.empty(5))) == GraphSize(5, None, None)


@pytest.mark.parametrize("batch", ["text", 3, None, object(), [1, 2]])
def test_unknown_batches_are_unknown(batch):
    assert extract_graph_size(batch) == GraphSize(None, None, None)


def test_overrides():
    sizer = GraphSizer(batch_size_fn=lambda b: 42)
    assert sizer(graph(6, 4)) == GraphSize(42, 6, 4)
    sizer = GraphSizer(graph_size_fn=lambda b: (100, 200))
    assert sizer(graph(6, 4)) == GraphSize(1, 100, 200)
    sizer = GraphSizer(batch_size_fn=lambda b: 3, graph_size_fn=lambda b: (1, 2))
    assert sizer("anything") == GraphSize(3, 1, 2)
