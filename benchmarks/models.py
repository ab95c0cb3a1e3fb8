"""The models the benchmarks train: a tiny Linear (so the hooks dominate) and a small PyG GCN."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyModule(LightningModule):
    """One ``Linear(8, 1)`` on random rows: a training step that costs almost nothing but Lightning's loop."""

    def __init__(self, features: int = 8) -> None:
        super().__init__()
        self.layer = nn.Linear(features, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def tiny_loader(steps: int, batch_size: int = 32, features: int = 8, seed: int = 0) -> DataLoader:
    """``steps`` batches of random rows."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * batch_size, features, generator=generator)
    y = torch.randn(steps * batch_size, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def tiny_batch_size(batch: Any) -> int:
    return int(batch[0].shape[0])


class GCNModule(LightningModule):
    """Graph classification: two GCN layers, mean pooling, a linear classifier."""

    def __init__(self, in_channels: int = 32, hidden: int = 64, num_classes: int = 4) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.conv1 = GCNConv(in_channels, hidden)
        self.conv2 = GCNConv(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, batch: Any) -> torch.Tensor:
        from torch_geometric.nn import global_mean_pool

        h = F.relu(self.conv1(batch.x, batch.edge_index))
        h = F.relu(self.conv2(h, batch.edge_index))
        return self.head(global_mean_pool(h, batch.batch, size=batch.num_graphs))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits, batch.y)
        acc = (logits.argmax(dim=-1) == batch.y).float().mean()
        self.log("train_loss", loss, batch_size=batch.num_graphs)
        self.log("train_acc", acc, batch_size=batch.num_graphs)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def gcn_loader(num_graphs: int = 1024, batch_size: int = 32, seed: int = 0) -> Any:
    """Batches of ``FakeDataset`` graphs (about 40 nodes and 200 edges each, 32 features, 4 classes)."""
    from torch_geometric.datasets import FakeDataset
    from torch_geometric.loader import DataLoader as GraphLoader

    torch.manual_seed(seed)
    dataset = FakeDataset(num_graphs=num_graphs, avg_num_nodes=40, avg_degree=5, num_channels=32,
                          num_classes=4, task="graph")
    graphs = [dataset[i] for i in range(len(dataset))]  # materialise once: every epoch yields the same batches
    return GraphLoader(graphs, batch_size=batch_size, shuffle=False)
