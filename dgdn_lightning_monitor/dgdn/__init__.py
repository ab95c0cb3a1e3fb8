"""DGDN, an example temporal-graph model trained under monitoring.

This subpackage uses the monitoring plugin; the plugin never imports it.
"""

from dgdn_lightning_monitor.dgdn.data import (
    DATASETS,
    JODIE_DATASETS,
    SyntheticTemporalGraph,
    TemporalGraph,
    load_dataset,
    load_jodie,
)
from dgdn_lightning_monitor.dgdn.loader import RecentNeighborLoader, TemporalEventLoader
from dgdn_lightning_monitor.dgdn.model import (
    DGDN,
    DGDNLayer,
    DGDNOutput,
    EdgePredictor,
    EdgeTimeEncoder,
    NodeClassifier,
    VariationalHead,
)
from dgdn_lightning_monitor.dgdn.module import DGDNLinkPredictor, DGDNNodeClassifier, TemporalGraphDataModule

__all__ = [
    "DATASETS",
    "DGDN",
    "DGDNLayer",
    "DGDNLinkPredictor",
    "DGDNNodeClassifier",
    "DGDNOutput",
    "EdgePredictor",
    "EdgeTimeEncoder",
    "JODIE_DATASETS",
    "NodeClassifier",
    "RecentNeighborLoader",
    "SyntheticTemporalGraph",
    "TemporalEventLoader",
    "TemporalGraph",
    "TemporalGraphDataModule",
    "VariationalHead",
    "load_dataset",
    "load_jodie",
]
