"""``dgdn-monitor``: train DGDN under :class:`~dgdn_lightning_monitor.MonitoringCallback`, on Lightning's CLI.

``dgdn-monitor demo`` trains on a synthetic temporal graph (no download, no argument needed); ``dgdn-monitor
train`` takes every option of the Trainer (``--trainer.*``), the model (``--model.*``), the data (``--data.*``)
and the callback (``--monitor.*``), YAML files with ``--config`` and prints its configuration with
``--print_config``, as :class:`~lightning.pytorch.cli.LightningCLI` does. Both serve Prometheus metrics while
training, send traces to an OTLP receiver when one runs, and end with a summary: final losses and scores,
throughput, time per training phase and what to open next.
"""

from __future__ import annotations

import logging
import re
import socket
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn, Optional

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dgdn_lightning_monitor import MonitoringCallback, PortInUseError
from dgdn_lightning_monitor.dgdn import (
    DATASETS,
    DGDNLinkPredictor,
    TemporalGraph,
    TemporalGraphDataModule,
    load_dataset,
)
from dgdn_lightning_monitor.vocabulary import PHASES

PROG = "dgdn-monitor"
GRAFANA_URL = "http://localhost:3000"
JAEGER_URL = "http://localhost:16686"
PROMETHEUS_URL = "http://localhost:9090"

_COMMANDS = {
    "demo": "train on a synthetic temporal graph (no download); the same options as train",
    "train": "train on a dataset (the JODIE benchmarks are downloaded into --data.root)",
}


class DGDNData(TemporalGraphDataModule):
    """The temporal graph, loaded by name, split in time into event-batch loaders.

    Args:
        dataset: ``synthetic`` or a JODIE benchmark (``wikipedia``, ``reddit``, ``mooc``, ``lastfm``).
        root: data folder of the JODIE benchmarks (downloaded there on first use).
        num_nodes: synthetic graph only: nodes.
        num_events: synthetic graph only: events.
        batch_size: events per batch.
        num_neighbors: most recent events kept per node.
        seed: seed of the synthetic graph and of the fixed evaluation negatives.

    Example::

        dgdn-monitor train --data.dataset wikipedia --data.batch_size 500
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        root: str = "data",
        num_nodes: int = 1000,
        num_events: int = 20_000,
        batch_size: int = 200,
        num_neighbors: int = 20,
        seed: int = 0,
    ) -> None:
        if dataset.lower() == "synthetic":
            graph = load_dataset("synthetic", num_nodes=num_nodes, num_events=num_events, seed=seed)
        elif dataset.lower() not in DATASETS:
            raise ValueError(f"dataset: unknown {dataset!r}; choose one of: {', '.join(DATASETS)}")
        else:
            print(f"Loading {dataset} from {root} (downloaded on first use) ...", flush=True)
            graph = load_dataset(dataset, root=root)
        super().__init__(graph, batch_size=batch_size, num_neighbors=num_neighbors, seed=seed)


class DGDNModel(DGDNLinkPredictor):
    """DGDN for temporal link prediction, sized for the data module's graph (linked by the CLI).

    Args:
        graph: the graph (set from ``data.graph``; not an option).
        hidden_dim: state size (divisible by ``num_heads``).
        num_layers: DGDN layers.
        num_heads: attention heads.
        diffusion_steps: residual diffusion steps per layer.
        dropout: dropout probability.
        beta_kl: weight of the KL term of the variational head.
        time_dim: size of the Fourier time features.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Example::

        dgdn-monitor train --model.hidden_dim 128 --model.lr 1e-3
    """

    def __init__(
        self,
        graph: Optional[TemporalGraph] = None,
        hidden_dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        diffusion_steps: int = 3,
        dropout: float = 0.1,
        beta_kl: float = 1e-3,
        time_dim: int = 32,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
    ) -> None:
        if graph is None:
            raise ValueError("graph: DGDNModel is sized from a graph; the CLI links it from data.graph")
        super().__init__(
            graph.num_nodes, graph.node_dim, graph.edge_dim, node_features=graph.x, lr=lr, weight_decay=weight_decay,
            hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads, diffusion_steps=diffusion_steps,
            dropout=dropout, beta_kl=beta_kl, time_dim=time_dim,
        )  # fmt: skip


def _compact(message: str) -> str:
    """jsonargparse's multi-line message about one option, as one line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()] or ["invalid options"]
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0])
    if not match:
        return lines[0]
    key, detail = match.group(1), match.group(2) or (lines[1] if len(lines) > 1 else "")
    given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
    expected = [name for name in re.findall(r"Expected a <class '(\w+)'>", message) if name != "NoneType"]
    if given is not None and expected:
        return f"--{key}: expected {' or '.join(expected)}, got {given!r}"
    return f"--{key}: {detail}"


class _Parser(LightningArgumentParser):
    """Reports a rejected option in one line (the full usage lists hundreds of options)."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        print(f"{self.prog}: error: {_compact(message)} (options: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class DGDNMonitorCLI(LightningCLI):
    """LightningCLI with the monitoring callback as ``--monitor.*`` and the model sized from the data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(MonitoringCallback, "monitor")
        parser.link_arguments("data.graph", "model.graph", apply_on="instantiate")


def trainer_defaults() -> dict[str, Any]:
    """What ``dgdn-monitor`` changes from Lightning's Trainer defaults (each one can be overridden)."""
    return {
        "max_epochs": 5,
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": sys.stdout.isatty() or sys.stderr.isatty(),
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 10,  # how often the training loss reaches the progress bar and the metrics
        # Events must stay in time order: no distributed sampler reshuffling them.
        "use_distributed_sampler": False,
    }


class _Notices(logging.Handler):
    """The package's one-line notices (where metrics are served, whether tracing is on), to ``out``."""

    def __init__(self, out: Any) -> None:
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=self.out, flush=True)


class _LightningTips(logging.Filter):
    """Drops Lightning's advertising tips; its other notices pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def _monitor_of(trainer: pl.Trainer) -> Optional[MonitoringCallback]:
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set on the Trainer by Lightning at construction
    return next((cb for cb in callbacks if isinstance(cb, MonitoringCallback)), None)


def build_cli(argv: Sequence[str], run: bool = False, command: str = "train") -> DGDNMonitorCLI:
    """Parse ``train``/``demo`` options (without the command word) and build the Trainer, model and data.

    Args:
        argv: options such as ``["--trainer.max_epochs", "1", "--monitor.port", "0"]``.
        run: passed to :class:`LightningCLI`; ``False`` builds the objects without running a subcommand.
        command: the command word shown in messages (``train`` or ``demo``).

    Example::

        cli = build_cli(["--trainer.max_epochs", "1", "--monitor.port", "0"])
        result = run_training(cli)
    """
    with warnings.catch_warnings():
        # The options are passed explicitly, so Lightning's reminder that sys.argv differs does not apply.
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return _make_cli(argv, run, command)


def _make_cli(argv: Sequence[str], run: bool, command: str) -> DGDNMonitorCLI:
    return DGDNMonitorCLI(
        DGDNModel,
        DGDNData,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        save_config_callback=None,  # no config.yaml written into the working directory
        parser_class=_Parser,
        parser_kwargs={"prog": f"{PROG} {command}", "description": _COMMANDS[command]},
        args=list(argv),
        run=run,
    )


def run_training(cli: DGDNMonitorCLI, out: Any = None) -> dict[str, Any]:
    """Fit as the CLI was configured and return the figures of the summary (see :func:`format_summary`).

    Args:
        cli: what :func:`build_cli` returned.
        out: stream for the start-up lines (default: ``sys.stdout``).
    """
    out = sys.stdout if out is None else out
    started = time.perf_counter()
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    monitor = _monitor_of(trainer)
    graph = datamodule.graph
    epochs = trainer.max_epochs
    print(
        f"Training DGDN on {graph.name}: {graph.num_events} events, {graph.num_nodes} nodes, "
        f"{epochs} epoch{'' if epochs == 1 else 's'}",
        file=out,
        flush=True,
    )

    package_logger = logging.getLogger("dgdn_lightning_monitor")
    notices = _Notices(out)
    saved = (package_logger.handlers[:], package_logger.propagate, package_logger.level)
    package_logger.handlers = [notices]  # once, on `out`, instead of on stderr too
    package_logger.propagate = False
    package_logger.setLevel(logging.INFO)
    tips = _LightningTips()
    lightning_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    lightning_logger.addFilter(tips)
    url: dict[str, Optional[str]] = {"metrics": None}

    class _Remember(pl.Callback):
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            url["metrics"] = monitor.metrics_url if monitor is not None else None

    class _Progress(pl.Callback):
        """A line after each training epoch (and its validation): how far the run is and the time it still takes,
        as the monitor exports them (``dgdn_progress_ratio``, ``dgdn_eta_seconds``)."""

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            figures = monitor.summary() if monitor is not None else {}
            ratio, eta = figures.get("progress_ratio"), figures.get("eta_seconds")
            if ratio is None:  # nothing bounds the run
                return
            of = f"/{epochs}" if epochs is not None and epochs > 0 else ""
            left = f", about {_format_seconds(eta)} left" if eta is not None and ratio < 1 else ""
            line = f"epoch {trainer.current_epoch + 1}{of} done: {ratio:.0%} of the run{left}"
            bar = trainer.progress_bar_callback
            if bar is not None and out is sys.stdout:
                bar.print(line)  # above the progress bar, not through it
            else:
                print(line, file=out, flush=True)

    trainer.callbacks.extend([_Remember(), _Progress()])  # type: ignore[attr-defined]
    try:
        with warnings.catch_warnings():
            # The event loader keeps neighbour history in this process, so it deliberately has no workers.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")  # Lightning internals
            fit_start = time.perf_counter()
            trainer.fit(module, datamodule=datamodule)
            fit_seconds = time.perf_counter() - fit_start
    finally:
        package_logger.handlers, package_logger.propagate, level = saved
        package_logger.setLevel(level)
        lightning_logger.removeFilter(tips)

    return {
        "dataset": graph.name,
        "num_events": graph.num_events,
        "num_nodes": graph.num_nodes,
        "train_events": datamodule.num_train_events * trainer.current_epoch,
        "epochs": trainer.current_epoch,
        "metrics": {key: float(value) for key, value in trainer.callback_metrics.items()},
        "monitor": monitor.summary() if monitor is not None else {},
        "metrics_url": url["metrics"],
        "tracing": monitor.tracer.delivery if monitor is not None else None,  # what became of spans; None: off
        "tracing_option": monitor.tracer.enabled if monitor is not None else None,
        "prepare_seconds": 0.0,
        "fit_seconds": fit_seconds,
        "total_seconds": time.perf_counter() - started,
    }


def _format_seconds(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms"


def _answers(url: str, timeout: float = 0.2) -> bool:
    """Whether something listens at the URL's host and port (a connect, nothing sent)."""
    host, _, port = url.split("//", 1)[1].split("/", 1)[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def format_summary(result: dict[str, Any], probe: Any = _answers) -> str:
    """The closing report of a run (see :func:`run_training`).

    Args:
        result: what :func:`run_training` returned.
        probe: ``url -> bool``, whether a service answers; only live URLs are shown as places to open.
    """
    metrics = result["metrics"]
    lines = ["", "=== DGDN run summary ==="]
    epochs = result["epochs"]
    lines.append(
        f"dataset: {result['dataset']}  ({result['num_events']} events, {result['num_nodes']} nodes, "
        f"{epochs} epoch{'' if epochs == 1 else 's'})"
    )
    scores = []
    for key in ("train_loss", "val_loss", "val_ap", "val_auc", "val_acc"):
        value = metrics.get(key)
        scores.append(f"{key}={float(value):.4f}" if value is not None else f"{key}=n/a")
    lines.append("final:   " + "  ".join(scores))

    monitor = result["monitor"]
    rate = monitor.get("samples_per_second")
    overall = result["train_events"] / result["fit_seconds"] if result["fit_seconds"] > 0 else 0.0
    recent = f"{rate:,.0f} events/s recently, " if rate else ""
    lines.append(
        f"throughput: {recent}{overall:,.0f} events/s over the whole fit "
        f"({monitor.get('steps', 0)} training steps, {monitor.get('samples', 0)} events)"
    )
    lines.append(
        f"time: preparation {_format_seconds(result['prepare_seconds'])}, "
        f"fit (training + validation) {_format_seconds(result['fit_seconds'])}, "
        f"total {_format_seconds(result['total_seconds'])}"
    )
    phases = monitor.get("phase_seconds") or {}
    known = [(name, phases[name]) for name in PHASES if name in phases]
    known += [(name, value) for name, value in phases.items() if name not in PHASES]
    step_total = sum(value for _, value in known)
    if known and step_total > 0:
        lines.append("per training step (mean of traced steps, the first one, a warm-up, left out):")
        for name, value in known:
            lines.append(f"  {name:<15} {_format_seconds(value):>10}  {100.0 * value / step_total:5.1f}%")
    else:
        lines.append("per training step: no step was traced (fewer steps than --monitor.trace_every_n_steps)")
    if monitor.get("bottleneck"):
        goodput = monitor.get("goodput_ratio") or 0.0
        lines.append(f"where the time goes: {goodput:.0%} in the steps' compute; limited by {monitor['bottleneck']}:")
        lines.append(f"  {monitor.get('hint')}")

    lines.append("")
    if result.get("metrics_url"):  # the endpoint closed with the run: its port, not a link that no longer answers
        port = result["metrics_url"].split("//", 1)[1].split("/", 1)[0].rpartition(":")[2]
        lines.append(f"metrics: were served on port {port} while the run trained (the endpoint closed with it)")
    if result.get("tracing"):  # delivered, dropped or none sent, as the exporter's results said
        lines.append(f"tracing: {result['tracing']}")
    elif result.get("tracing_option") is False:
        lines.append(
            "tracing: was off, no spans sent (--monitor.tracing false); drop that option to send spans to Jaeger"
        )
    else:
        lines.append(
            "tracing: was off, no spans sent; to turn it on, start Jaeger (make stack) or set "
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )

    live = [
        (name, url, hint) for name, url, hint in (
            ("Grafana", GRAFANA_URL, "dashboard 'DGDN training', login admin / $GF_ADMIN_PASSWORD"),
            ("Prometheus", PROMETHEUS_URL, "e.g. query dgdn_training_loss"),
            ("Jaeger", JAEGER_URL, "service 'dgdn-training'"),
        ) if probe(url)
    ]  # fmt: skip
    lines.append("next:")
    for name, url, hint in live:
        lines.append(f"  {name:<11} {url}  ({hint})")
    if not live:
        lines.append(
            "  a monitoring stack keeps the figures after the run: make stack (Docker: Grafana, Prometheus, "
            "Jaeger) or make stack-native (Prometheus and Alertmanager from PATH), then train again"
        )
    lines.append("  notebooks: make notebooks (plots of the exported figures, traces per phase)")
    return "\n".join(lines)


def _usage() -> str:
    commands = "\n".join(f"  {name:<7} {text}" for name, text in _COMMANDS.items())
    return (
        f"usage: {PROG} COMMAND [options]\n\nTrain the DGDN temporal graph network with Prometheus metrics and "
        f"OpenTelemetry traces.\n\ncommands:\n{commands}\n\n"
        f"'{PROG} train --help' lists every option (--trainer.*, --model.*, --data.*, --monitor.*);\n"
        f"'{PROG} train --print_config > run.yaml' writes a config that '{PROG} train --config run.yaml' reads."
    )


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dgdn-monitor`` console script (also ``python -m dgdn_lightning_monitor``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, options = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(f"{PROG}: error: unknown COMMAND {command!r}; choose from {', '.join(_COMMANDS)}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    lightning_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    tips = _LightningTips()
    lightning_logger.addFilter(tips)
    try:
        return _main(command, options, started)
    finally:
        lightning_logger.removeFilter(tips)


def _main(command: str, options: list[str], started: float) -> int:
    try:
        cli = build_cli(options, command=command)
    except SystemExit as done:  # --help, --print_config, or an option the parser rejected (it said why)
        return int(done.code or 0) if not isinstance(done.code, str) else 2
    except (ValueError, TypeError) as error:  # a value the data, model, callback or Trainer cannot take
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - e.g. no GPU for --trainer.accelerator gpu, a failed download
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2 if type(error).__name__ == "MisconfigurationException" else 1

    try:
        result = run_training(cli)
    except PortInUseError:
        monitor = _monitor_of(cli.trainer)
        port = monitor.port if monitor is not None else "?"
        print(
            f"{PROG}: error: port {port} is already in use (another run?); pass --monitor.port 0 for any free port",
            file=sys.stderr,
        )
        return 1
    result["total_seconds"] = time.perf_counter() - started
    result["prepare_seconds"] = result["total_seconds"] - result["fit_seconds"]
    print(format_summary(result), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
