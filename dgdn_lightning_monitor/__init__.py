"""Prometheus metrics and OpenTelemetry traces for PyTorch Lightning GNN training."""

__version__ = "0.1.0"
