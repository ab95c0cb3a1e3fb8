"""Graph sizes come from stored counts and shapes only: proven with tensors on the meta device, whose values
cannot be read at all (any .item(), max() or unique() would raise)."""

import pytest
import torch
from torch_geometric.data import Batch, Data, HeteroData, TemporalData

from dgdn_lightning_monitor.graph_size import GraphSize, GraphSizer, extract_graph_size, sampled_per_hop

META = torch.device("meta")


def graph(nodes: int, edges: int, device: torch.device = META) -> Data:
    return Data(x=torch.empty(nodes, 4, device=device),
                edge_index=torch.empty(2, edges, dtype=torch.long, device=device))


def test_single_graph_without_seeds_counts_its_nodes():
    # ClusterLoader, GraphSAINT, RandomNodeLoader and full-batch training yield one (sub)graph trained as a whole.
    assert extract_graph_size(graph(7, 12)) == GraphSize(7, 7, 12)


def test_batch_counts_graphs_nodes_edges():
    batch = Batch.from_data_list([graph(5, 8, torch.device("cpu")), graph(3, 2, torch.device("cpu"))])
    assert extract_graph_size(batch) == GraphSize(2, 8, 10)


def test_neighbor_sampled_subgraph_counts_seed_nodes():
    data = graph(30, 90)
    data.batch_size = 4  # what NeighborLoader sets: the seed nodes are the samples
    assert extract_graph_size(data) == GraphSize(4, 30, 90)


def test_stored_num_nodes_wins_without_node_features():
    data = Data(edge_index=torch.empty(2, 6, dtype=torch.long, device=META), num_nodes=11)
    assert extract_graph_size(data) == GraphSize(11, 11, 6)


def test_edges_only_graph_leaves_nodes_unknown_instead_of_reading_edge_index():
    data = Data(edge_index=torch.empty(2, 6, dtype=torch.long, device=META))
    assert extract_graph_size(data) == GraphSize(None, None, 6)


def test_link_sampled_subgraph_counts_seed_edges_without_negatives():
    data = graph(30, 90)
    data.input_id = torch.empty(8, dtype=torch.long, device=META)  # what LinkNeighborLoader sets: the seed edges
    data.edge_label_index = torch.empty(2, 24, dtype=torch.long, device=META)  # seeds and 2 negatives each
    assert extract_graph_size(data) == GraphSize(8, 30, 90)
    del data.edge_label_index  # triplet negatives: src_index / dst_pos_index / dst_neg_index instead
    data.dst_neg_index = torch.empty(8, 3, dtype=torch.long, device=META)
    assert extract_graph_size(data) == GraphSize(8, 30, 90)


def test_full_batch_link_graph_counts_its_labelled_pairs():
    data = graph(30, 90)
    data.edge_label_index = torch.empty(2, 40, dtype=torch.long, device=META)
    assert extract_graph_size(data) == GraphSize(40, 30, 90)


def test_batch_built_from_parts_counts_graphs_from_its_offsets():
    # ShaDowKHopSampler (it needs torch-sparse) assembles Batch(batch=..., ptr=...) itself, one graph per root.
    index = dict(dtype=torch.long, device=META)
    batch = Batch(x=torch.empty(12, 2, device=META), edge_index=torch.empty(2, 20, **index),
                  batch=torch.empty(12, **index), ptr=torch.empty(4, **index), root_n_id=torch.empty(3, **index))
    assert extract_graph_size(batch) == GraphSize(3, 12, 20)
    del batch.ptr  # nothing host-side tells the graphs: unknown rather than batch.max()
    assert extract_graph_size(batch) == GraphSize(None, 12, 20)


def test_hetero_data_sums_over_types():
    data = HeteroData()
    data["paper"].x = torch.empty(10, 3, device=META)
    data["author"].x = torch.empty(4, 3, device=META)
    data["author", "writes", "paper"].edge_index = torch.empty(2, 15, dtype=torch.long, device=META)
    data["paper", "cites", "paper"].edge_index = torch.empty(2, 5, dtype=torch.long, device=META)
    assert extract_graph_size(data) == GraphSize(14, 14, 20)  # no seeds: the nodes of every type
    data["paper"].batch_size = 6  # a hetero node loader: the input type's seeds
    assert extract_graph_size(data) == GraphSize(6, 14, 20)
    del data["paper"].batch_size
    data["author", "writes", "paper"].input_id = torch.empty(5, dtype=torch.long, device=META)  # a link loader
    data["author", "writes", "paper"].edge_label_index = torch.empty(2, 10, dtype=torch.long, device=META)
    assert extract_graph_size(data) == GraphSize(5, 14, 20)


def hetero_graph(papers: int, authors: int, writes: int) -> HeteroData:
    data = HeteroData()
    data["paper"].x = torch.empty(papers, 3, device=META)
    data["author"].x = torch.empty(authors, 3, device=META)
    data["author", "writes", "paper"].edge_index = torch.empty(2, writes, dtype=torch.long, device=META)
    return data


def test_batch_of_hetero_graphs_counts_graphs_and_sums_over_types():
    # DataLoader / LightningDataset over HeteroData yield a HeteroDataBatch, a class PyG builds at run time from
    # Batch and HeteroData; it keeps a global store and per-type stores, no _store. Collated on the meta device.
    batch = Batch.from_data_list([hetero_graph(5, 2, 7), hetero_graph(1, 3, 2), hetero_graph(4, 4, 0)])
    assert type(batch).__name__ == "HeteroDataBatch"
    assert extract_graph_size(batch) == GraphSize(3, 19, 9)
    assert extract_graph_size((batch, torch.empty(3))) == GraphSize(3, 19, 9)  # also inside a container
    assert sampled_per_hop(batch) is None  # whole graphs, not a sampled subgraph
    del batch._global_store._num_graphs  # assembled from parts: the graphs are told by a node type's ptr
    assert extract_graph_size(batch) == GraphSize(3, 19, 9)


def test_every_batch_class_pyg_builds_is_sized_by_its_own_rule():
    class Molecule(Data):  # a Data subclass: its batches are "MoleculeBatch"
        pass

    molecules = Batch.from_data_list([Molecule(x=torch.empty(4, 1, device=META),
                                               edge_index=torch.empty(2, 6, dtype=torch.long, device=META))] * 2)
    assert type(molecules).__name__ == "MoleculeBatch" and extract_graph_size(molecules) == GraphSize(2, 8, 12)


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
    assert extract_graph_size(container(graph(6, 4))) == GraphSize(6, 6, 4)


def test_tensor_batches_count_rows():
    assert extract_graph_size(torch.empty(17, 3, device=META)) == GraphSize(17, None, None)
    assert extract_graph_size((torch.empty(5, 2), torch.empty(5))) == GraphSize(5, None, None)


def test_tensor_batches_of_ever_new_lengths_keep_their_own_rows():
    """Sizes of tensor batches are reused per row count up to a bound; lengths past it are still exact."""
    for rows in range(3000):
        assert extract_graph_size([torch.empty(rows, 1, device=META), torch.empty(rows)]).samples == rows
        assert extract_graph_size(torch.empty(rows, device=META)).samples == rows


@pytest.mark.parametrize("batch", ["text", 3, None, object(), [1, 2]])
def test_unknown_batches_are_unknown(batch):
    assert extract_graph_size(batch) == GraphSize(None, None, None)


def test_overrides():
    sizer = GraphSizer(batch_size_fn=lambda b: 42)
    assert sizer(graph(6, 4)) == GraphSize(42, 6, 4)
    sizer = GraphSizer(graph_size_fn=lambda b: (100, 200))
    assert sizer(graph(6, 4)) == GraphSize(6, 100, 200)
    sizer = GraphSizer(batch_size_fn=lambda b: 3, graph_size_fn=lambda b: (1, 2))
    assert sizer("anything") == GraphSize(3, 1, 2)


def test_per_hop_counts_of_sampled_batches():
    data = graph(30, 90)
    assert sampled_per_hop(data) is None
    data.num_sampled_nodes, data.num_sampled_edges = [4, 10, 16], [40, 50]  # as PyG's samplers store them
    assert sampled_per_hop(data) == ([4, 10, 16], [40, 50])
    data.num_sampled_nodes = torch.tensor([4, 10, 16])  # a host tensor is read on the host
    assert sampled_per_hop(data) == ([4, 10, 16], [40, 50])
    data.num_sampled_nodes = torch.empty(3, dtype=torch.long, device=META)  # a device tensor is never read
    assert sampled_per_hop(data) == (None, [40, 50])
    data.num_sampled_edges = [torch.tensor(40), torch.tensor(50)]  # not plain ints: left alone
    assert sampled_per_hop(data) == (None, None)


def test_per_hop_counts_of_hetero_batches_are_summed_over_types():
    data = HeteroData()
    data["paper"].x = torch.empty(10, 3, device=META)
    data["author"].x = torch.empty(4, 3, device=META)
    assert sampled_per_hop(data) is None
    data["paper"].num_sampled_nodes, data["author"].num_sampled_nodes = [3, 2, 5], [0, 4]
    data["author", "writes", "paper"].num_sampled_edges = [4, 1]
    data["paper", "cites", "paper"].num_sampled_edges = [2, 6]
    assert sampled_per_hop(data) == ([3, 6, 5], [6, 7])


def test_batches_of_whole_graphs_have_no_hops():
    batch = Batch.from_data_list([graph(5, 8, torch.device("cpu")), graph(3, 2, torch.device("cpu"))])
    assert sampled_per_hop(batch) is None
    assert sampled_per_hop(torch.zeros(3)) is None and sampled_per_hop((batch, 1)) is None
