"""DGDN building blocks: shapes, argument checks, variational behaviour, gradients."""

from __future__ import annotations

import pytest
import torch

from dgdn_lightning_monitor.dgdn import (
    DGDN,
    DGDNLayer,
    EdgePredictor,
    EdgeTimeEncoder,
    NodeClassifier,
    VariationalHead,
)


def _inputs(num_nodes: int = 12, queries: int = 6, edges: int = 20, node_dim: int = 5, edge_dim: int = 3):
    gen = torch.Generator().manual_seed(0)
    n_id = torch.arange(num_nodes)
    x = torch.randn(num_nodes, node_dim, generator=gen)
    query_index = torch.randint(0, num_nodes, (queries,), generator=gen)
    # The last query instance has no neighbour event at all.
    edge_index = torch.stack([
        torch.randint(0, num_nodes, (edges,), generator=gen),
        torch.randint(0, queries - 1, (edges,), generator=gen),
    ])
    edge_dt = torch.rand(edges, generator=gen) * 1000
    edge_msg = torch.randn(edges, edge_dim, generator=gen)
    return x, n_id, query_index, edge_index, edge_dt, edge_msg


def test_time_encoder_shapes_and_range():
    enc = EdgeTimeEncoder(8)
    out = enc(torch.tensor([[0.0, 10.0], [1e5, 3.0]]))
    assert out.shape == (2, 2, 8)
    assert torch.all(out.abs() <= 1.0)
    assert torch.allclose(enc(torch.zeros(1)), torch.ones(1, 8))  # cos(0) with zero phase
    assert enc.frequency.requires_grad and enc.phase.requires_grad


def test_forward_shapes_train_and_eval():
    model = DGDN(node_dim=5, edge_dim=3, time_dim=8, hidden_dim=16, num_heads=4, num_layers=2, diffusion_steps=2)
    x, n_id, query_index, edge_index, edge_dt, edge_msg = _inputs()
    out = model(x, n_id, query_index, edge_index, edge_dt, edge_msg)
    assert out.z.shape == out.mu.shape == out.logvar.shape == (6, 16)
    assert out.kl.dim() == 0 and out.kl.item() >= 0
    model.eval()
    with torch.no_grad():
        out = model(x, n_id, query_index, edge_index, edge_dt, edge_msg)
    assert torch.equal(out.z, out.mu)  # no sampling in evaluation
    assert torch.isfinite(out.z).all()  # the instance without neighbours too


def test_embeddings_only_and_latent_dim():
    model = DGDN(node_dim=0, edge_dim=0, hidden_dim=8, num_heads=2, num_nodes=12, latent_dim=4)
    _, n_id, query_index, edge_index, edge_dt, _ = _inputs()
    out = model(None, n_id, query_index, edge_index, edge_dt)
    assert out.z.shape == (6, 4)


def test_gradients_reach_every_parameter():
    model = DGDN(node_dim=5, edge_dim=3, time_dim=8, hidden_dim=16, num_heads=4, num_nodes=12, dropout=0.0)
    predictor = EdgePredictor(16, pair_dim=model.pair_dim)
    x, n_id, query_index, edge_index, edge_dt, edge_msg = _inputs()
    out = model(x, n_id, query_index, edge_index, edge_dt, edge_msg)
    pair = model.encode_pairs(torch.ones(3, 3), torch.tensor([1.0, 50.0, 0.0]), torch.tensor([True, True, False]))
    logits = predictor(out.z[:3], out.z[3:], pair)
    (logits.sum() + model.kl_loss(out)).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_variational_head_kl():
    head = VariationalHead(4, 3)
    with torch.no_grad():
        head.mean.weight.zero_()
        head.mean.bias.zero_()
        head.logvar.bias.zero_()
    z, mu, logvar, kl = head(torch.randn(5, 4))
    assert torch.allclose(kl, torch.tensor(0.0))  # posterior equals the prior
    assert not torch.equal(z, mu)  # sampled in training mode
    with torch.no_grad():
        head.mean.bias.fill_(1.0)
    _, _, _, kl = head(torch.randn(5, 4))
    assert torch.allclose(kl, torch.tensor(1.5))  # 0.5 * sum(mu^2) over 3 dims


def test_kl_is_weighted_by_beta():
    model = DGDN(node_dim=5, edge_dim=3, hidden_dim=8, num_heads=2, beta_kl=0.5)
    x, n_id, query_index, edge_index, edge_dt, edge_msg = _inputs()
    out = model(x, n_id, query_index, edge_index, edge_dt, edge_msg)
    assert torch.allclose(model.kl_loss(out), 0.5 * out.kl)


def test_heads():
    z = torch.randn(7, 10)
    assert EdgePredictor(10)(z, z).shape == (7,)
    assert NodeClassifier(10, 2)(z).shape == (7,)
    assert NodeClassifier(10, 5)(z).shape == (7, 5)
    with pytest.raises(ValueError, match="pair"):
        EdgePredictor(10, pair_dim=4)(z, z)


def test_layer_without_diffusion_matches_shapes():
    layer = DGDNLayer(hidden_dim=8, edge_feature_dim=3, num_heads=2, diffusion_steps=0)
    out = layer(torch.randn(4, 8), torch.randn(6, 8), torch.randn(5, 3), torch.tensor([[0, 1, 2, 3, 5], [0, 0, 1, 2, 2]]))
    assert out.shape == (4, 8)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"hidden_dim": 130, "num_heads": 4}, "hidden_dim"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"num_heads": 0}, "num_heads"),
        ({"num_layers": 0}, "num_layers"),
        ({"time_dim": -1}, "time_dim"),
        ({"diffusion_steps": -1}, "diffusion_steps"),
        ({"dropout": 1.0}, "dropout"),
        ({"beta_kl": -1.0}, "beta_kl"),
        ({"node_dim": -2}, "node_dim"),
        ({"edge_dim": -1}, "edge_dim"),
        ({"node_dim": 0}, "num_nodes"),
        ({"num_nodes": 0}, "num_nodes"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"hidden_dim": 2.5}, "hidden_dim"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    args = {"node_dim": 4, "edge_dim": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        DGDN(**args)


def test_component_argument_checks():
    with pytest.raises(ValueError, match="time_dim"):
        EdgeTimeEncoder(0)
    with pytest.raises(ValueError, match="num_heads"):
        DGDNLayer(hidden_dim=10, edge_feature_dim=2, num_heads=3)
    with pytest.raises(ValueError, match="num_classes"):
        NodeClassifier(4, 1)
    with pytest.raises(ValueError, match="in_dim"):
        EdgePredictor(0)
