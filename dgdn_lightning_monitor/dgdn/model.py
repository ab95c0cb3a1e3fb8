"""DGDN: a variational temporal-graph network for continuous-time dynamic graphs.

The model embeds *query instances*: a node asked about at a given time (the source, the true destination
or a sampled negative destination of an event). Each instance attends over the node's most recent past
events. An event seen from the instance is described by the neighbour node on its other end, the time elapsed
since it happened (:class:`EdgeTimeEncoder`) and its message features. Attention is followed by a few residual
diffusion steps in which the instance repeatedly re-attends over the same neighbourhood, a LayerNorm and
dropout (:class:`DGDNLayer`). A variational head turns the result into a Gaussian latent; its KL divergence to
a standard normal prior regularises training.

For link prediction, :class:`EdgePredictor` also reads features of the (source, candidate) pair's shared
recent history (:meth:`DGDN.encode_pairs`): how often each end appears among the other's recent events, how
many recent neighbours they share and how long ago they last interacted.

Instances never exchange information with one another: the embedding of a node at a time depends only on the
node, that time and events strictly before the batch, never on which other nodes happen to be queried in the
same batch. That keeps link prediction free of leakage from the batch composition.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import scatter, softmax

__all__ = [
    "DGDN",
    "DGDNLayer",
    "DGDNOutput",
    "EdgePredictor",
    "EdgeTimeEncoder",
    "NodeClassifier",
    "VariationalHead",
]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _check_dropout(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


class EdgeTimeEncoder(nn.Module):
    r"""Learnable Fourier features of the time elapsed since a neighbour event.

    :math:`\phi(\Delta t) = \cos(\omega \cdot \Delta t + \varphi)` with learnable frequencies :math:`\omega`
    and phases :math:`\varphi`. Frequencies start on a geometric grid from ``1`` down to ``1 / max_period``
    so that both seconds and months are resolved from the first step.

    Args:
        time_dim: number of features per time delta.
        max_period: the longest period, in the unit of the timestamps, covered at initialisation.

    Example::

        enc = EdgeTimeEncoder(time_dim=16)
        feats = enc(torch.tensor([0.0, 3600.0, 86400.0]))  # shape [3, 16]
    """

    def __init__(self, time_dim: int, max_period: float = 1e8) -> None:
        super().__init__()
        self.time_dim = _check_positive_int("time_dim", time_dim)
        if not isinstance(max_period, (int, float)) or isinstance(max_period, bool) or max_period <= 1:
            raise ValueError(f"max_period must be a number > 1, got {max_period!r}")
        self.max_period = float(max_period)
        self.frequency = nn.Parameter(torch.empty(time_dim))
        self.phase = nn.Parameter(torch.empty(time_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        exponents = torch.linspace(0.0, math.log10(self.max_period), self.time_dim)
        with torch.no_grad():
            self.frequency.copy_(10.0 ** -exponents)
            self.phase.zero_()

    def forward(self, delta_t: Tensor) -> Tensor:
        """Encode time deltas of any shape ``[*]`` into ``[*, time_dim]`` features."""
        return torch.cos(delta_t.to(self.frequency.dtype).unsqueeze(-1) * self.frequency + self.phase)


class DGDNLayer(nn.Module):
    r"""Multi-head temporal attention over each query instance's recent events, then residual diffusion.

    For instance :math:`i` with neighbour events :math:`e = (j, \Delta t, m)` the keys and values are computed
    from :math:`[h_j \,\|\, \phi(\Delta t) \,\|\, m]`, the query from the instance state :math:`h_i`. After
    the attention update, ``diffusion_steps`` residual propagation steps let the state settle:
    :math:`h \leftarrow h + \sigma(\gamma_s)\,(\mathrm{Attn}(h) - h)`, each step re-attending with the new
    state. LayerNorm, a feed-forward block and dropout close the layer.

    Args:
        hidden_dim: size of instance and neighbour states.
        edge_feature_dim: size of the per-event features (time encoding plus message).
        num_heads: attention heads; must divide ``hidden_dim``.
        diffusion_steps: residual propagation steps after the attention update (``0`` disables them).
        dropout: dropout probability on attention weights and updates.

    Example::

        layer = DGDNLayer(hidden_dim=64, edge_feature_dim=40, num_heads=4, diffusion_steps=2)
        out = layer(h, neighbour_states, edge_features, edge_index)  # h: [Q, 64]
    """

    def __init__(
        self,
        hidden_dim: int,
        edge_feature_dim: int,
        num_heads: int = 4,
        diffusion_steps: int = 3,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        _check_positive_int("hidden_dim", hidden_dim)
        _check_non_negative_int("edge_feature_dim", edge_feature_dim)
        _check_positive_int("num_heads", num_heads)
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.diffusion_steps = _check_non_negative_int("diffusion_steps", diffusion_steps)
        self.dropout = _check_dropout("dropout", dropout)

        self.query = nn.Linear(hidden_dim, hidden_dim)
        self.key = nn.Linear(hidden_dim + edge_feature_dim, hidden_dim)
        self.value = nn.Linear(hidden_dim + edge_feature_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, hidden_dim)
        # Step sizes of the diffusion steps, through a sigmoid; start at about 0.5.
        self.step_logits = nn.Parameter(torch.zeros(self.diffusion_steps))
        self.norm = nn.LayerNorm(hidden_dim)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_dim, 2 * hidden_dim), nn.GELU(), nn.Linear(2 * hidden_dim, hidden_dim)
        )
        self.ffn_norm = nn.LayerNorm(hidden_dim)

    def _attend(self, h: Tensor, key: Tensor, value: Tensor, target: Tensor) -> Tensor:
        q = self.query(h).view(-1, self.num_heads, self.head_dim)
        score = (q.index_select(0, target) * key).sum(dim=-1) / math.sqrt(self.head_dim)  # [E, heads]
        alpha = softmax(score, target, num_nodes=h.size(0))
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        message = (alpha.unsqueeze(-1) * value).reshape(-1, self.hidden_dim)
        # Instances without any past event receive zeros.
        return self.out(scatter(message, target, dim=0, dim_size=h.size(0), reduce="sum"))

    def forward(self, h: Tensor, neighbour_states: Tensor, edge_features: Tensor, edge_index: Tensor) -> Tensor:
        """Update instance states.

        Args:
            h: ``[Q, hidden_dim]`` instance states.
            neighbour_states: ``[N, hidden_dim]`` states of the neighbour nodes.
            edge_features: ``[E, edge_feature_dim]`` features of each neighbour event.
            edge_index: ``[2, E]``; row 0 indexes ``neighbour_states``, row 1 indexes ``h``.

        Returns:
            ``[Q, hidden_dim]`` new instance states.
        """
        source, target = edge_index[0], edge_index[1]
        # index_select: its backward (index_add) is much cheaper on CPU than that of advanced indexing.
        kv_input = torch.cat([neighbour_states.index_select(0, source), edge_features], dim=-1)
        key = self.key(kv_input).view(-1, self.num_heads, self.head_dim)
        value = self.value(kv_input).view(-1, self.num_heads, self.head_dim)

        h = h + F.dropout(self._attend(h, key, value, target), p=self.dropout, training=self.training)
        for step in range(self.diffusion_steps):
            rate = torch.sigmoid(self.step_logits[step])
            update = self._attend(h, key, value, target)
            h = h + rate * F.dropout(update - h, p=self.dropout, training=self.training)
        h = self.norm(h)
        h = self.ffn_norm(h + F.dropout(self.ffn(h), p=self.dropout, training=self.training))
        return h


class VariationalHead(nn.Module):
    r"""Gaussian latent: mean and log-variance, the reparameterisation trick and the KL term.

    In training mode ``z = mu + eps * exp(logvar / 2)``; in evaluation mode ``z = mu``. The KL divergence to
    :math:`\mathcal{N}(0, I)` is summed over latent dimensions and averaged over instances.

    Args:
        in_dim: input size.
        latent_dim: latent size.

    Example::

        head = VariationalHead(128, 64)
        z, mu, logvar, kl = head(h)
    """

    def __init__(self, in_dim: int, latent_dim: int) -> None:
        super().__init__()
        _check_positive_int("in_dim", in_dim)
        _check_positive_int("latent_dim", latent_dim)
        self.mean = nn.Linear(in_dim, latent_dim)
        self.logvar = nn.Linear(in_dim, latent_dim)
        # Start with a small posterior variance so that early training is not drowned in sampling noise.
        nn.init.zeros_(self.logvar.weight)
        nn.init.constant_(self.logvar.bias, -6.0)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mu = self.mean(h)
        logvar = self.logvar(h).clamp(min=-10.0, max=10.0)
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        if mu.size(0) == 0:
            kl = mu.sum()
        else:
            kl = (-0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1)).mean()
        return z, mu, logvar, kl


class EdgePredictor(nn.Module):
    r"""Scores a (source, destination) pair: a logit that the interaction happens.

    Combines both embeddings, their element-wise product and, optionally, features of the pair's shared
    history (see :meth:`DGDN.encode_pairs`).

    Args:
        in_dim: size of each embedding.
        hidden_dim: width of the scoring MLP.
        pair_dim: size of the pair features (``0``: none).

    Example::

        predictor = EdgePredictor(64)
        logits = predictor(z_src, z_dst)  # shape [B]
    """

    def __init__(self, in_dim: int, hidden_dim: Optional[int] = None, pair_dim: int = 0) -> None:
        super().__init__()
        _check_positive_int("in_dim", in_dim)
        hidden_dim = in_dim if hidden_dim is None else _check_positive_int("hidden_dim", hidden_dim)
        self.pair_dim = _check_non_negative_int("pair_dim", pair_dim)
        self.src = nn.Linear(in_dim, hidden_dim)
        self.dst = nn.Linear(in_dim, hidden_dim, bias=False)
        self.product = nn.Linear(in_dim, hidden_dim, bias=False)
        self.pair = nn.Linear(pair_dim, hidden_dim, bias=False) if pair_dim > 0 else None
        self.final = nn.Sequential(nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))

    def forward(self, z_src: Tensor, z_dst: Tensor, pair: Optional[Tensor] = None) -> Tensor:
        h = self.src(z_src) + self.dst(z_dst) + self.product(z_src * z_dst)
        if self.pair is not None:
            if pair is None:
                raise ValueError(f"pair must hold pair features of size {self.pair_dim}, got None")
            h = h + self.pair(pair)
        return self.final(h).squeeze(-1)


class NodeClassifier(nn.Module):
    r"""Predicts a node's class from its embedding (one logit for two classes, else one per class).

    Args:
        in_dim: embedding size.
        num_classes: number of classes (``>= 2``).
        hidden_dim: width of the hidden layer.
        dropout: dropout before the output layer.

    Example::

        head = NodeClassifier(64, num_classes=2)
        logits = head(z)  # shape [B] for two classes
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: Optional[int] = None, dropout: float = 0.1) -> None:
        super().__init__()
        _check_positive_int("in_dim", in_dim)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        hidden_dim = in_dim if hidden_dim is None else _check_positive_int("hidden_dim", hidden_dim)
        self.num_classes = num_classes
        out = 1 if num_classes == 2 else num_classes
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(_check_dropout("dropout", dropout)),
            nn.Linear(hidden_dim, out),
        )

    def forward(self, z: Tensor) -> Tensor:
        logits = self.net(z)
        return logits.squeeze(-1) if self.num_classes == 2 else logits


class DGDNOutput(NamedTuple):
    """What :class:`DGDN` returns for a set of query instances."""

    z: Tensor  #: ``[Q, latent_dim]`` sampled latents (the means in evaluation mode)
    mu: Tensor  #: ``[Q, latent_dim]`` latent means
    logvar: Tensor  #: ``[Q, latent_dim]`` latent log-variances
    kl: Tensor  #: scalar KL divergence to the prior, averaged over instances (not yet weighted)


class DGDN(nn.Module):
    r"""Dynamic graph diffusion network for continuous-time dynamic graphs.

    Node inputs are a projection of node features, a learnable per-node embedding, or the sum of both. A query
    instance starts from its node's input and goes through ``num_layers`` :class:`DGDNLayer`\ s over the node's
    recent events; a :class:`VariationalHead` produces the latent used by the task heads
    (:class:`EdgePredictor`, :class:`NodeClassifier`).

    Args:
        node_dim: size of node features; ``0`` when nodes have none (then ``num_nodes`` is required).
        edge_dim: size of event message features (``0`` when events have none).
        time_dim: size of the time encoding.
        hidden_dim: state size; must be divisible by ``num_heads``.
        num_layers: number of :class:`DGDNLayer`\ s.
        num_heads: attention heads.
        diffusion_steps: residual propagation steps per layer.
        dropout: dropout probability.
        beta_kl: weight of the KL term in the loss (see :meth:`kl_loss`).
        num_nodes: when given, adds a learnable embedding per node id (transductive).
        latent_dim: size of the variational latent; defaults to ``hidden_dim``.
        max_time_period: longest period resolved by the time encoder at initialisation.

    Example::

        model = DGDN(node_dim=16, edge_dim=8, hidden_dim=64, num_heads=4, num_nodes=1000)
        out = model(x, n_id, query_index, edge_index, edge_dt, edge_msg)
        loss = task_loss + model.kl_loss(out)
    """

    def __init__(
        self,
        node_dim: int,
        edge_dim: int,
        time_dim: int = 32,
        hidden_dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        diffusion_steps: int = 3,
        dropout: float = 0.1,
        beta_kl: float = 1e-3,
        *,
        num_nodes: Optional[int] = None,
        latent_dim: Optional[int] = None,
        max_time_period: float = 1e8,
    ) -> None:
        super().__init__()
        self.node_dim = _check_non_negative_int("node_dim", node_dim)
        self.edge_dim = _check_non_negative_int("edge_dim", edge_dim)
        self.time_dim = _check_positive_int("time_dim", time_dim)
        self.hidden_dim = _check_positive_int("hidden_dim", hidden_dim)
        self.num_layers = _check_positive_int("num_layers", num_layers)
        self.num_heads = _check_positive_int("num_heads", num_heads)
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        self.diffusion_steps = _check_non_negative_int("diffusion_steps", diffusion_steps)
        self.dropout = _check_dropout("dropout", dropout)
        if isinstance(beta_kl, bool) or not isinstance(beta_kl, (int, float)) or not math.isfinite(beta_kl) \
                or beta_kl < 0:
            raise ValueError(f"beta_kl must be a finite number >= 0, got {beta_kl!r}")
        self.beta_kl = float(beta_kl)
        if num_nodes is not None:
            _check_positive_int("num_nodes", num_nodes)
        if node_dim == 0 and num_nodes is None:
            raise ValueError("node_dim is 0 (no node features), so num_nodes must be given for node embeddings")
        self.num_nodes = num_nodes
        self.latent_dim = hidden_dim if latent_dim is None else _check_positive_int("latent_dim", latent_dim)

        self.node_proj = nn.Linear(node_dim, hidden_dim) if node_dim > 0 else None
        self.node_emb = nn.Embedding(num_nodes, hidden_dim) if num_nodes is not None else None
        if self.node_emb is not None:
            nn.init.normal_(self.node_emb.weight, std=0.1)
        self.input_norm = nn.LayerNorm(hidden_dim)
        self.time_encoder = EdgeTimeEncoder(time_dim, max_period=max_time_period)
        self.layers = nn.ModuleList(
            DGDNLayer(hidden_dim, time_dim + edge_dim, num_heads, diffusion_steps, dropout)
            for _ in range(num_layers)
        )
        self.head = VariationalHead(hidden_dim, self.latent_dim)

    def encode_nodes(self, x: Optional[Tensor], n_id: Tensor) -> Tensor:
        """Input states ``[N, hidden_dim]`` of nodes ``n_id`` with features ``x`` (``[N, node_dim]`` or None)."""
        h: Optional[Tensor] = None
        if self.node_proj is not None:
            if x is None:
                raise ValueError(f"x must hold node features of size {self.node_dim}, got None")
            h = self.node_proj(x)
        if self.node_emb is not None:
            emb = self.node_emb(n_id)
            h = emb if h is None else h + emb
        assert h is not None
        return self.input_norm(h)

    def forward(
        self,
        x: Optional[Tensor],
        n_id: Tensor,
        query_index: Tensor,
        edge_index: Tensor,
        edge_dt: Tensor,
        edge_msg: Optional[Tensor] = None,
    ) -> DGDNOutput:
        """Embed query instances.

        Args:
            x: ``[N, node_dim]`` features of the nodes ``n_id`` (``None`` when ``node_dim == 0``).
            n_id: ``[N]`` global ids of the nodes in the batch subgraph.
            query_index: ``[Q]`` position in ``n_id`` of each query instance's node.
            edge_index: ``[2, E]`` neighbour events; row 0 is a position in ``n_id`` (the neighbour), row 1 a
                query instance.
            edge_dt: ``[E]`` time from each neighbour event to its instance's query time (``>= 0``).
            edge_msg: ``[E, edge_dim]`` message features of each neighbour event.

        Returns:
            :class:`DGDNOutput` for the ``Q`` instances.
        """
        nodes = self.encode_nodes(x, n_id)
        features = [self.time_encoder(edge_dt)]
        if self.edge_dim > 0:
            if edge_msg is None:
                raise ValueError(f"edge_msg must hold event features of size {self.edge_dim}, got None")
            features.append(edge_msg.to(nodes.dtype))
        edge_features = torch.cat(features, dim=-1)
        h = nodes.index_select(0, query_index)
        for layer in self.layers:
            h = layer(h, nodes, edge_features, edge_index)
        z, mu, logvar, kl = self.head(h)
        return DGDNOutput(z, mu, logvar, kl)

    @property
    def pair_dim(self) -> int:
        """Size of the features :meth:`encode_pairs` returns."""
        return 4 + self.time_dim

    def encode_pairs(self, count: Tensor, delta_t: Tensor, seen: Tensor) -> Tensor:
        """Features of the shared history of (source, candidate) pairs, for :class:`EdgePredictor`.

        Args:
            count: ``[P, 3]`` times the candidate is among the source's recent neighbours, the source among
                the candidate's, and recent neighbours they share.
            delta_t: ``[P]`` time since the pair's latest interaction.
            seen: ``[P]`` whether the pair interacted within that history.

        Returns:
            ``[P, pair_dim]``: log-counts, the seen flag and the time encoding of ``delta_t`` (zero if unseen).
        """
        flag = seen.to(self.time_encoder.frequency.dtype).unsqueeze(-1)
        return torch.cat([torch.log1p(count.to(flag.dtype)), flag, self.time_encoder(delta_t) * flag], dim=-1)

    def kl_loss(self, output: DGDNOutput) -> Tensor:
        """The KL term of ``output`` weighted by ``beta_kl``."""
        return self.beta_kl * output.kl
