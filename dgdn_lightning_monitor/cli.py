"""``dgdn-monitor``: train DGDN under :class:`~dgdn_lightning_monitor.MonitoringCallback`.

``dgdn-monitor demo`` trains on a synthetic temporal graph (no download), ``dgdn-monitor train --dataset
wikipedia`` on a JODIE benchmark. Both serve Prometheus metrics while training, send traces to an OTLP receiver
when one runs, and end with a summary: final losses and scores, throughput, time per training phase and where
to look in Grafana, Jaeger and Prometheus.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

GRAFANA_URL = "http://localhost:3000"
JAEGER_URL = "http://localhost:16686"
PROMETHEUS_URL = "http://localhost:9090"

_PHASES = ("data_fetch", "forward", "backward", "optimizer_step")


def _checked(convert: Callable[[str], Any], accept: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that converts the text and checks the value, with one message for both failures."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda value: value > 0, "a positive integer")
_port = _checked(int, lambda value: 0 <= value <= 65535, "a TCP port (0-65535, 0 = any free port)")
_positive_float = _checked(float, lambda value: value > 0, "a positive number")


def _devices(text: str) -> Any:
    """``auto``, a count (``2``) or a list of indices (``0,1``), as Lightning takes them."""
    if text == "auto":
        return text
    try:
        if "," in text:
            indices = [int(part) for part in text.split(",") if part.strip()]
            if not indices or min(indices) < 0:
                raise ValueError
            return indices
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto', a device count or a comma-separated list of indices, got {text!r}") from None
    if value <= 0 and value != -1:
        raise argparse.ArgumentTypeError(f"expected a positive device count (or -1 for all), got {text!r}")
    return value


def _add_common(parser: argparse.ArgumentParser, epochs: int) -> None:
    run = parser.add_argument_group("training")
    run.add_argument("--epochs", type=_positive_int, default=epochs, help="training epochs (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="random seed of data and model (default: %(default)s)")
    run.add_argument("--batch-size", type=_positive_int, default=200, help="events per batch (default: %(default)s)")
    run.add_argument("--num-neighbors", type=_positive_int, default=20,
                     help="recent events kept per node (default: %(default)s)")
    run.add_argument("--hidden-dim", type=_positive_int, default=64, help="DGDN state size (default: %(default)s)")
    run.add_argument("--num-layers", type=_positive_int, default=2, help="DGDN layers (default: %(default)s)")
    run.add_argument("--lr", type=_positive_float, default=3e-3, help="learning rate (default: %(default)s)")
    run.add_argument("--accelerator", default="auto",
                     help="Lightning accelerator: auto, cpu, gpu, cuda, mps (default: %(default)s)")
    run.add_argument("--devices", type=_devices, default=1,
                     help="Lightning devices: a count, indices like 0,1, or auto (default: %(default)s)")
    run.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=None,
                     help="show Lightning's progress bar (default: when the output is a terminal)")

    monitoring = parser.add_argument_group("monitoring")
    monitoring.add_argument("--port", type=_port, default=8000,
                            help="port of the /metrics endpoint, 0 for any free port (default: %(default)s)")
    monitoring.add_argument("--trace-every", type=_positive_int, default=50,
                            help="trace one training step in this many (default: %(default)s)")
    monitoring.add_argument("--tracing", choices=("auto", "on", "off"), default="auto",
                            help="auto: send spans when OTEL_* variables are set or a receiver answers on "
                                 "localhost:4318 (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The ``dgdn-monitor`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="dgdn-monitor",
        description="Train the DGDN temporal graph network with Prometheus metrics and OpenTelemetry traces.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", help="train on a synthetic temporal graph (no download)",
        description="Train DGDN for temporal link prediction on a synthetic graph with planted communities, "
                    "recurring partners and bursts, under MonitoringCallback.",
    )
    graph = demo.add_argument_group("synthetic graph")
    graph.add_argument("--num-nodes", type=_positive_int, default=1000, help="nodes (default: %(default)s)")
    graph.add_argument("--num-events", type=_positive_int, default=20_000, help="events (default: %(default)s)")
    _add_common(demo, epochs=5)

    from dgdn_lightning_monitor.dgdn.data import DATASETS

    train = commands.add_parser(
        "train", help="train on a benchmark (JODIE datasets are downloaded into --root)",
        description="Train DGDN for temporal link prediction on a dataset under MonitoringCallback.",
    )
    data = train.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="synthetic", help="dataset (default: %(default)s)")
    data.add_argument("--root", default="data", help="data folder for the JODIE datasets (default: %(default)s)")
    data.add_argument("--num-nodes", type=_positive_int, default=1000,
                      help="synthetic dataset only: nodes (default: %(default)s)")
    data.add_argument("--num-events", type=_positive_int, default=20_000,
                      help="synthetic dataset only: events (default: %(default)s)")
    _add_common(train, epochs=5)
    return parser


def _format_seconds(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms"


def _metric(metrics: dict[str, Any], key: str) -> Optional[float]:
    value = metrics.get(key)
    return None if value is None else float(value)


def format_summary(result: dict[str, Any]) -> str:
    """The closing report of a run (see :func:`run`)."""
    metrics = result["metrics"]
    lines = ["", "=== DGDN run summary ==="]
    lines.append(f"dataset: {result['dataset']}  ({result['num_events']} events, {result['num_nodes']} nodes, "
                 f"{result['epochs']} epoch{'' if result['epochs'] == 1 else 's'})")
    scores = []
    for key in ("train_loss", "val_loss", "val_ap", "val_auc", "val_acc"):
        value = _metric(metrics, key)
        scores.append(f"{key}={value:.4f}" if value is not None else f"{key}=n/a")
    lines.append("final:   " + "  ".join(scores))

    monitor = result["monitor"]
    rate = monitor.get("samples_per_second")
    overall = result["train_events"] / result["fit_seconds"] if result["fit_seconds"] > 0 else 0.0
    recent = f"{rate:,.0f} events/s recently, " if rate else ""
    lines.append(f"throughput: {recent}{overall:,.0f} events/s over the whole fit "
                 f"({monitor.get('steps', 0)} training steps, {monitor.get('samples', 0)} events)")

    lines.append(f"time: preparation {_format_seconds(result['prepare_seconds'])}, "
                 f"fit (training + validation) {_format_seconds(result['fit_seconds'])}, "
                 f"total {_format_seconds(result['total_seconds'])}")
    phases = monitor.get("phase_seconds") or {}
    known = [(name, phases[name]) for name in _PHASES if name in phases]
    known += [(name, value) for name, value in phases.items() if name not in _PHASES]
    step_total = sum(value for _, value in known)
    if known and step_total > 0:
        lines.append("per training step (mean of traced steps):")
        for name, value in known:
            lines.append(f"  {name:<15} {_format_seconds(value):>10}  {100.0 * value / step_total:5.1f}%")
    else:
        lines.append("per training step: no step was traced (fewer steps than --trace-every)")

    lines.append("")
    lines.append(f"metrics: {result['metrics_url'] or 'not served'}")
    lines.append("with the monitoring stack running (make stack):")
    lines.append(f"  Grafana     {GRAFANA_URL}  (dashboard 'DGDN training')")
    lines.append(f"  Jaeger      {JAEGER_URL}  (service 'dgdn-training')")
    lines.append(f"  Prometheus  {PROMETHEUS_URL}  (e.g. query dgdn_training_loss)")
    return "\n".join(lines)


def prepare(args: argparse.Namespace, out: Any = None) -> tuple[Any, Any, Any]:
    """Build ``(graph, datamodule, module)`` from ``args``; bad combinations raise ``ValueError``.

    Args:
        args: parsed ``dgdn-monitor`` arguments.
        out: stream for progress messages (default: ``sys.stdout``).
    """
    out = sys.stdout if out is None else out
    import lightning.pytorch as pl

    from dgdn_lightning_monitor.dgdn import DGDNLinkPredictor, TemporalGraphDataModule, load_dataset

    pl.seed_everything(args.seed, verbose=False)
    dataset = getattr(args, "dataset", "synthetic")
    if dataset == "synthetic":
        graph = load_dataset("synthetic", num_nodes=args.num_nodes, num_events=args.num_events, seed=args.seed)
    else:
        print(f"Loading {dataset} from {args.root} (downloaded on first use) ...", file=out, flush=True)
        graph = load_dataset(dataset, root=args.root)
    datamodule = TemporalGraphDataModule(graph, batch_size=args.batch_size, num_neighbors=args.num_neighbors,
                                         seed=args.seed)
    module = DGDNLinkPredictor.from_graph(graph, hidden_dim=args.hidden_dim, num_layers=args.num_layers, lr=args.lr)
    return graph, datamodule, module


def run(args: argparse.Namespace, out: Any = None, prepared: Optional[tuple[Any, Any, Any]] = None,
        ) -> dict[str, Any]:
    """Train as ``args`` say and return the figures of the summary (see :func:`format_summary`).

    Args:
        args: parsed ``dgdn-monitor`` arguments.
        out: stream for messages (default: ``sys.stdout``).
        prepared: what :func:`prepare` returned; built here when ``None``.

    Example::

        result = run(build_parser().parse_args(["demo", "--epochs", "1", "--port", "0"]))
        print(format_summary(result))
    """
    out = sys.stdout if out is None else out
    started = time.perf_counter()
    import lightning.pytorch as pl

    from dgdn_lightning_monitor import MonitoringCallback

    graph, datamodule, module = prepare(args, out) if prepared is None else prepared
    prepare_seconds = time.perf_counter() - started

    tracing = {"auto": None, "on": True, "off": False}[args.tracing]
    monitor = MonitoringCallback(port=args.port, trace_every_n_steps=args.trace_every, tracing=tracing)

    class _Announce(pl.Callback):
        url: Optional[str] = None

        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            self.url = monitor.metrics_url
            if trainer.is_global_zero:
                print(f"Prometheus metrics: {self.url}", file=out, flush=True)

    announce = _Announce()
    progress = args.progress_bar
    if progress is None:
        progress = sys.stdout.isatty() or sys.stderr.isatty()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=args.devices,
        callbacks=[monitor, announce],  # in this order: the endpoint is up when the URL is announced
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,  # how often the training loss reaches the progress bar and the metrics
        # Events must stay in time order: no distributed sampler reshuffling them.
        use_distributed_sampler=False,
    )
    print(f"Training DGDN on {graph.name}: {graph.num_events} events, {graph.num_nodes} nodes, "
          f"{args.epochs} epoch{'' if args.epochs == 1 else 's'}", file=out, flush=True)
    with warnings.catch_warnings():
        # The event loader keeps neighbour history in this process, so it deliberately has no workers.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")  # Lightning internals
        fit_start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        fit_seconds = time.perf_counter() - fit_start

    return {
        "dataset": graph.name,
        "num_events": graph.num_events,
        "num_nodes": graph.num_nodes,
        "train_events": datamodule.num_train_events * trainer.current_epoch,
        "epochs": trainer.current_epoch,
        "metrics": {key: float(value) for key, value in trainer.callback_metrics.items()},
        "monitor": monitor.summary(),
        "metrics_url": announce.url,
        "prepare_seconds": prepare_seconds,
        "fit_seconds": fit_seconds,
        "total_seconds": time.perf_counter() - started,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dgdn-monitor`` console script (also ``python -m dgdn_lightning_monitor``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        prepared = prepare(args)
    except ValueError as error:  # a combination of options the data or the model cannot take
        parser.error(str(error))
    except RuntimeError as error:  # e.g. a JODIE download that failed: the message says where to put the file
        print(f"dgdn-monitor: error: {error}", file=sys.stderr)
        return 1

    from dgdn_lightning_monitor import PortInUseError

    try:
        result = run(args, prepared=prepared)
    except PortInUseError as error:
        print(f"dgdn-monitor: error: {error}. Pass --port 0 for any free port.", file=sys.stderr)
        return 1
    result["total_seconds"] = time.perf_counter() - started
    result["prepare_seconds"] = result["total_seconds"] - result["fit_seconds"]
    print(format_summary(result), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
