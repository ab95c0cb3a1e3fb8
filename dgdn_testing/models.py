"""Small real models and data for tests and benchmarks: GCN graph classifiers on PyG's FakeDataset, and a linear
regressor on plain tensors (tiny, so that Lightning's loop and the hooks are all there is)."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader as TensorLoader
from torch.utils.data import TensorDataset
from torch_geometric.datasets import FakeDataset
from torch_geometric.loader import DataLoader
from torch_geometric.nn import GCNConv, global_mean_pool


def fake_graphs(num_graphs: int = 48, seed: int = 0) -> FakeDataset:
    torch.manual_seed(seed)
    return FakeDataset(num_graphs=num_graphs, avg_num_nodes=16, avg_degree=3, num_channels=8, num_classes=2)


class GraphClassifier(pl.LightningModule):
    """A two-layer GCN that logs train/val loss and accuracy, and remembers what it logged last.

    Args:
        nan_after: the training loss is NaN from this many training steps on.
        step_sleep_s: sleep in every training step, so that a run spans several scrapes.
        loss_offset: added to the training loss (a constant leaves the gradients alone), to push it past a
            threshold.
    """

    def __init__(self, in_channels: int = 8, hidden: int = 16, lr: float = 0.01, nan_after: Optional[int] = None,
                 step_sleep_s: float = 0.0, loss_offset: float = 0.0) -> None:
        super().__init__()
        self.conv1 = GCNConv(in_channels, hidden)
        self.conv2 = GCNConv(hidden, hidden)
        self.head = torch.nn.Linear(hidden, 2)
        self.lr = lr
        self.nan_after = nan_after
        self.step_sleep_s = step_sleep_s
        self.loss_offset = loss_offset
        self.last_logged: dict[str, float] = {}
        self.steps = 0

    def forward(self, batch: Any) -> torch.Tensor:
        h = self.conv1(batch.x, batch.edge_index).relu()
        h = self.conv2(h, batch.edge_index).relu()
        return self.head(global_mean_pool(h, batch.batch))

    def _loss_acc(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = self(batch)
        loss = F.cross_entropy(out, batch.y)
        acc = (out.argmax(-1) == batch.y).float().mean()
        return loss, acc

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, acc = self._loss_acc(batch)
        loss = loss + self.loss_offset
        self.steps += 1
        if self.nan_after is not None and self.steps > self.nan_after:
            loss = loss * float("nan")
        if self.step_sleep_s:
            import time

            time.sleep(self.step_sleep_s)
        self.log("train_loss", loss, batch_size=batch.num_graphs)
        self.log("train_acc", acc, batch_size=batch.num_graphs)
        self.last_logged["train_loss"] = loss.item()
        self.last_logged["train_acc"] = acc.item()
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, acc = self._loss_acc(batch)
        self.log("val_loss", loss, batch_size=batch.num_graphs)
        self.log("val_acc", acc, batch_size=batch.num_graphs)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss, _ = self._loss_acc(batch)
        self.log("test_loss", loss, batch_size=batch.num_graphs)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch).argmax(-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def graph_loaders(num_graphs: int = 48, batch_size: int = 8, val_fraction: float = 0.25, seed: int = 0):
    data = fake_graphs(num_graphs, seed)
    split = int(math.ceil(len(data) * (1 - val_fraction)))
    train, val = data[:split], data[split:]
    return DataLoader(train, batch_size=batch_size), DataLoader(val, batch_size=batch_size), train, val


class TensorRegressor(pl.LightningModule):
    """A linear model on plain tensors (no graph): the callback must still count rows.

    Args:
        features: input columns.
        lr: SGD learning rate.
    """

    def __init__(self, features: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(features, 1)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def tensor_loader(rows: int = 40, batch_size: int = 8, features: int = 4, seed: int = 0) -> TensorLoader:
    g = torch.Generator().manual_seed(seed)
    return TensorLoader(TensorDataset(torch.randn(rows, features, generator=g), torch.randn(rows, 1, generator=g)),
                        batch_size=batch_size)


def tiny_loader(steps: int, batch_size: int = 32, features: int = 8, seed: int = 0) -> TensorLoader:
    """``steps`` batches of random rows, for :class:`TensorRegressor` ``(features=8)``."""
    return tensor_loader(steps * batch_size, batch_size, features, seed)


def tiny_batch_size(batch: Any) -> int:
    return int(batch[0].shape[0])


class GCNModule(pl.LightningModule):
    """Graph classification: two GCN layers, mean pooling, a linear classifier."""

    def __init__(self, in_channels: int = 32, hidden: int = 64, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = GCNConv(in_channels, hidden)
        self.conv2 = GCNConv(hidden, hidden)
        self.head = torch.nn.Linear(hidden, num_classes)

    def forward(self, batch: Any) -> torch.Tensor:
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
    torch.manual_seed(seed)
    dataset = FakeDataset(num_graphs=num_graphs, avg_num_nodes=40, avg_degree=5, num_channels=32,
                          num_classes=4, task="graph")
    graphs = [dataset[i] for i in range(len(dataset))]  # materialise once: every epoch yields the same batches
    return DataLoader(graphs, batch_size=batch_size, shuffle=False)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   accelerator="cpu", devices=1)
    options.update(kwargs)
    return pl.Trainer(**options)
