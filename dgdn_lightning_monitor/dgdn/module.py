"""Lightning wrappers around :class:`~dgdn_lightning_monitor.dgdn.model.DGDN`.

* :class:`TemporalGraphDataModule`: chronological train/validation/test split of a
  :class:`~dgdn_lightning_monitor.dgdn.data.TemporalGraph`, served by
  :class:`~dgdn_lightning_monitor.dgdn.loader.TemporalEventLoader` (past-only neighbourhoods).
* :class:`DGDNLinkPredictor`: temporal link prediction (does this event happen?) against sampled negatives.
* :class:`DGDNNodeClassifier`: predicts the label ``y`` of each event's source node at the event time.

Batches are :class:`~torch_geometric.data.TemporalData` event batches carrying ``n_id`` (distinct nodes
involved), so a monitoring callback can count events and nodes from host-side shapes.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import TemporalData
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryAveragePrecision,
    MulticlassAccuracy,
    MulticlassAUROC,
)

from dgdn_lightning_monitor.dgdn.data import TemporalGraph
from dgdn_lightning_monitor.dgdn.loader import TemporalEventLoader
from dgdn_lightning_monitor.dgdn.model import DGDN, DGDNOutput, EdgePredictor, NodeClassifier

__all__ = ["DGDNLinkPredictor", "DGDNNodeClassifier", "TemporalGraphDataModule"]


def _check_positive_float(name: str, value: Any, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return float(value)


class TemporalGraphDataModule(pl.LightningDataModule):
    """Chronological split of a temporal graph into event-batch loaders.

    Training events come first, then validation, then test. Each loader starts from the history of all
    events before its range, so validation sees the training events as past neighbours and test sees both.
    Validation and test negatives are drawn once from ``seed`` so that scores compare across epochs.

    Args:
        graph: the graph to split.
        batch_size: events per batch.
        num_neighbors: most recent events kept per node.
        num_negatives: negatives per event (``0`` for node classification).
        val_ratio: share of events for validation.
        test_ratio: share of events for test.
        seed: seed of the fixed evaluation negatives.

    Example::

        dm = TemporalGraphDataModule(SyntheticTemporalGraph(seed=0), batch_size=200)
        trainer.fit(DGDNLinkPredictor.from_graph(dm.graph), datamodule=dm)
    """

    def __init__(
        self,
        graph: TemporalGraph,
        batch_size: int = 200,
        num_neighbors: int = 20,
        num_negatives: int = 1,
        val_ratio: float = 0.15,
        test_ratio: float = 0.15,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(graph, TemporalGraph):
            raise ValueError(f"graph must be a TemporalGraph, got {type(graph).__name__}")
        for name, value, low in (("batch_size", batch_size, 1), ("num_neighbors", num_neighbors, 1),
                                 ("num_negatives", num_negatives, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.graph = graph
        self.batch_size = batch_size
        self.num_neighbors = num_neighbors
        self.num_negatives = num_negatives
        self.seed = seed
        self.val_start, self.test_start = graph.split_points(val_ratio, test_ratio)
        self._loaders: dict[str, TemporalEventLoader] = {}

    def _loader(self, stage: str, start: int, end: int, fixed_seed: Optional[int]) -> TemporalEventLoader:
        if stage not in self._loaders:
            self._loaders[stage] = TemporalEventLoader(
                self.graph.data, start, end, self.graph.num_nodes, batch_size=self.batch_size,
                num_neighbors=self.num_neighbors, num_negatives=self.num_negatives,
                fixed_negatives_seed=fixed_seed, dst_range=self.graph.dst_range,
            )
        return self._loaders[stage]

    def train_dataloader(self) -> TemporalEventLoader:
        return self._loader("train", 0, self.val_start, None)

    def val_dataloader(self) -> TemporalEventLoader:
        return self._loader("val", self.val_start, self.test_start, self.seed + 1)

    def test_dataloader(self) -> TemporalEventLoader:
        return self._loader("test", self.test_start, self.graph.num_events, self.seed + 2)

    @property
    def num_train_events(self) -> int:
        """Events in the training split."""
        return self.val_start


class _DGDNModule(pl.LightningModule):
    """Shared parts: the encoder, node features as a buffer, the optimiser."""

    def __init__(
        self,
        num_nodes: int,
        node_dim: int,
        edge_dim: int,
        node_features: Optional[Tensor],
        use_node_embeddings: bool,
        lr: float,
        weight_decay: float,
        model_kwargs: dict[str, Any],
    ) -> None:
        super().__init__()
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes <= 0:
            raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
        if node_features is not None:
            if not isinstance(node_features, Tensor) or node_features.dim() != 2 \
                    or tuple(node_features.shape) != (num_nodes, node_dim):
                shape = tuple(node_features.shape) if isinstance(node_features, Tensor) else node_features
                raise ValueError(f"node_features must have shape [num_nodes, node_dim] = [{num_nodes}, {node_dim}], "
                                 f"got {shape}")
        elif node_dim != 0:
            raise ValueError(f"node_dim is {node_dim} but node_features is None; pass the features or node_dim=0")
        self.lr = _check_positive_float("lr", lr)
        self.weight_decay = _check_positive_float("weight_decay", weight_decay, allow_zero=True)
        self.model = DGDN(node_dim, edge_dim, num_nodes=num_nodes if use_node_embeddings else None, **model_kwargs)
        self.register_buffer("node_features", None if node_features is None else node_features.float())

    def encode(self, batch: TemporalData) -> DGDNOutput:
        """Embed the batch's query instances (see :class:`TemporalEventLoader` for the layout)."""
        x = self.node_features[batch.n_id] if self.node_features is not None else None
        msg = batch.nbr_msg if "nbr_msg" in batch else None
        return self.model(x, batch.n_id, batch.query_index, batch.nbr_index, batch.nbr_dt, msg)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class DGDNLinkPredictor(_DGDNModule):
    """Temporal link prediction with DGDN: score each event against sampled negative destinations.

    Loss is binary cross-entropy over positives and negatives plus ``beta_kl`` times the KL term. Logs
    ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``val_ap`` and ``val_auc`` (and ``test_*``),
    with the number of events as batch size.

    Args:
        num_nodes: number of node ids.
        node_dim: node feature size (``0`` without features).
        edge_dim: event message size.
        node_features: ``[num_nodes, node_dim]`` features, or ``None``.
        use_node_embeddings: add a learnable embedding per node (required without node features).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        **model_kwargs: further :class:`~dgdn_lightning_monitor.dgdn.model.DGDN` arguments (``hidden_dim``,
            ``num_layers``, ``num_heads``, ``diffusion_steps``, ``dropout``, ``beta_kl``, ``time_dim``...).

    Example::

        graph = SyntheticTemporalGraph(seed=0)
        module = DGDNLinkPredictor.from_graph(graph, hidden_dim=64)
        Trainer(max_epochs=3).fit(module, datamodule=TemporalGraphDataModule(graph))
    """

    def __init__(
        self,
        num_nodes: int,
        node_dim: int,
        edge_dim: int,
        node_features: Optional[Tensor] = None,
        use_node_embeddings: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        **model_kwargs: Any,
    ) -> None:
        super().__init__(num_nodes, node_dim, edge_dim, node_features, use_node_embeddings, lr, weight_decay,
                         model_kwargs)
        self.save_hyperparameters(ignore=["node_features"])
        self.predictor = EdgePredictor(self.model.latent_dim, pair_dim=self.model.pair_dim)
        self.val_acc, self.val_ap, self.val_auc = BinaryAccuracy(), BinaryAveragePrecision(), BinaryAUROC()
        self.test_acc, self.test_ap, self.test_auc = BinaryAccuracy(), BinaryAveragePrecision(), BinaryAUROC()

    @classmethod
    def from_graph(cls, graph: TemporalGraph, **kwargs: Any) -> DGDNLinkPredictor:
        """Build a module sized for ``graph`` (node features, message size, number of nodes)."""
        return cls(graph.num_nodes, graph.node_dim, graph.edge_dim, node_features=graph.x, **kwargs)

    def forward(self, batch: TemporalData) -> tuple[Tensor, Tensor, DGDNOutput]:
        """Logits of the true events ``[B]``, of the negatives ``[B * num_negatives]`` and the encoder output."""
        out = self.encode(batch)
        count = batch.src.size(0)
        z_src, z_dst, z_neg = out.z[:count], out.z[count:2 * count], out.z[2 * count:]
        if z_neg.size(0) == 0:
            raise ValueError("link prediction needs negatives: build the loader with num_negatives >= 1")
        pair = self.model.encode_pairs(batch.pair_count, batch.pair_dt, batch.pair_seen)
        pos = self.predictor(z_src, z_dst, pair[:count])
        neg = self.predictor(z_src.repeat(z_neg.size(0) // count, 1), z_neg, pair[count:])
        return pos, neg, out

    def _step(self, batch: TemporalData) -> tuple[Tensor, Tensor, Tensor, int]:
        pos, neg, out = self(batch)
        logits = torch.cat([pos, neg])
        target = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
        loss = F.binary_cross_entropy_with_logits(logits, target) + self.model.kl_loss(out)
        return loss, logits, target, int(batch.src.size(0))

    def training_step(self, batch: TemporalData, batch_idx: int) -> Tensor:
        loss, logits, target, count = self._step(batch)
        # Plain tensor ops: torchmetrics' input checks would synchronise a GPU on every step.
        accuracy = ((logits > 0).to(target.dtype) == target).float().mean()
        self.log("train_loss", loss, batch_size=count, prog_bar=True)
        self.log("train_acc", accuracy, batch_size=count, prog_bar=True)
        return loss

    def validation_step(self, batch: TemporalData, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val", self.val_acc, self.val_ap, self.val_auc)

    def test_step(self, batch: TemporalData, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test", self.test_acc, self.test_ap, self.test_auc)

    def _evaluate(self, batch: TemporalData, stage: str, acc: Any, ap: Any, auc: Any) -> Tensor:
        loss, logits, target, count = self._step(batch)
        labels = target.long()
        acc.update(logits, labels)
        ap.update(logits, labels)
        auc.update(logits, labels)
        self.log(f"{stage}_loss", loss, batch_size=count, prog_bar=True)
        self.log(f"{stage}_acc", acc, batch_size=count)
        self.log(f"{stage}_ap", ap, batch_size=count, prog_bar=True)
        self.log(f"{stage}_auc", auc, batch_size=count)
        return loss


class DGDNNodeClassifier(_DGDNModule):
    """Dynamic node classification with DGDN: predict the label ``y`` of each event's source at its time.

    Use with a loader built with ``num_negatives=0``. Logs ``train_loss``, ``train_acc``, ``val_loss``,
    ``val_acc`` and ``val_auc`` (and ``test_*``).

    Args:
        num_nodes: number of node ids.
        node_dim: node feature size (``0`` without features).
        edge_dim: event message size.
        num_classes: label classes (``>= 2``).
        node_features: ``[num_nodes, node_dim]`` features, or ``None``.
        use_node_embeddings: add a learnable embedding per node.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        **model_kwargs: further :class:`~dgdn_lightning_monitor.dgdn.model.DGDN` arguments.

    Example::

        graph = SyntheticTemporalGraph(seed=0)
        module = DGDNNodeClassifier.from_graph(graph)
        Trainer(max_epochs=2).fit(module, datamodule=TemporalGraphDataModule(graph, num_negatives=0))
    """

    def __init__(
        self,
        num_nodes: int,
        node_dim: int,
        edge_dim: int,
        num_classes: int = 2,
        node_features: Optional[Tensor] = None,
        use_node_embeddings: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        **model_kwargs: Any,
    ) -> None:
        super().__init__(num_nodes, node_dim, edge_dim, node_features, use_node_embeddings, lr, weight_decay,
                         model_kwargs)
        self.save_hyperparameters(ignore=["node_features"])
        self.classifier = NodeClassifier(self.model.latent_dim, num_classes, dropout=self.model.dropout)
        self.num_classes = num_classes

        def metrics() -> tuple[Any, Any]:
            if num_classes == 2:
                return BinaryAccuracy(), BinaryAUROC()
            return MulticlassAccuracy(num_classes), MulticlassAUROC(num_classes)

        self.val_acc, self.val_auc = metrics()
        self.test_acc, self.test_auc = metrics()

    @classmethod
    def from_graph(cls, graph: TemporalGraph, **kwargs: Any) -> DGDNNodeClassifier:
        """Build a module sized for ``graph``; needs event labels (``graph.num_classes``)."""
        if graph.num_classes is None:
            raise ValueError(f"graph {graph.name!r} has no event labels (num_classes is None)")
        return cls(graph.num_nodes, graph.node_dim, graph.edge_dim, num_classes=graph.num_classes,
                   node_features=graph.x, **kwargs)

    def forward(self, batch: TemporalData) -> tuple[Tensor, DGDNOutput]:
        """Logits for each event's source (``[B]`` for two classes, else ``[B, C]``) and the encoder output."""
        out = self.encode(batch)
        return self.classifier(out.z[: batch.src.size(0)]), out

    def _step(self, batch: TemporalData) -> tuple[Tensor, Tensor, Tensor, int]:
        logits, out = self(batch)
        if "y" not in batch:
            raise ValueError("node classification needs event labels: the batch has no 'y'")
        y = batch.y
        if self.num_classes == 2:
            task = F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
        else:
            task = F.cross_entropy(logits, y)
        return task + self.model.kl_loss(out), logits, y, int(batch.src.size(0))

    def training_step(self, batch: TemporalData, batch_idx: int) -> Tensor:
        loss, logits, y, count = self._step(batch)
        # Plain tensor ops: torchmetrics' input checks would synchronise a GPU on every step.
        predicted = (logits > 0).long() if self.num_classes == 2 else logits.argmax(dim=-1)
        self.log("train_loss", loss, batch_size=count, prog_bar=True)
        self.log("train_acc", (predicted == y).float().mean(), batch_size=count, prog_bar=True)
        return loss

    def validation_step(self, batch: TemporalData, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val", self.val_acc, self.val_auc)

    def test_step(self, batch: TemporalData, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test", self.test_acc, self.test_auc)

    def _evaluate(self, batch: TemporalData, stage: str, acc: Any, auc: Any) -> Tensor:
        loss, logits, y, count = self._step(batch)
        acc.update(logits, y)
        auc.update(logits, y)
        self.log(f"{stage}_loss", loss, batch_size=count, prog_bar=True)
        self.log(f"{stage}_acc", acc, batch_size=count, prog_bar=True)
        self.log(f"{stage}_auc", auc, batch_size=count)
        return loss
