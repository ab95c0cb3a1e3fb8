"""Prometheus metrics and OpenTelemetry traces for PyTorch Lightning GNN training.

Example::

    from lightning.pytorch import Trainer
    from dgdn_lightning_monitor import MonitoringCallback

    Trainer(callbacks=[MonitoringCallback()])
"""

import logging as _logging

# Like Lightning's own logger: the one-line notices (where metrics are served, whether tracing is on) are shown
# when the application has not configured logging, and left to its configuration when it has.
_logger = _logging.getLogger(__name__)
if not _logging.getLogger().hasHandlers() and not _logger.handlers:
    _logger.setLevel(_logging.INFO)
    _logger.addHandler(_logging.StreamHandler())
    _logger.propagate = False

from dgdn_lightning_monitor.callback import MonitoringCallback  # noqa: E402
from dgdn_lightning_monitor.graph_size import GraphSize, extract_graph_size  # noqa: E402
from dgdn_lightning_monitor.server import PortInUseError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["GraphSize", "MonitoringCallback", "PortInUseError", "__version__", "extract_graph_size"]
