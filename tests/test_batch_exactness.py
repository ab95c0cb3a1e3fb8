"""Every kind of batch in docs/metrics.md's sample table is counted exactly, batch by batch, in real Trainer runs.

Hypothesis draws the graphs and the loader settings of each case of ``dgdn_testing.batch_kinds.BATCH_KINDS`` (the
list that table is rendered from); the LightningModule counts each batch it receives with PyG's public API,
and after every step the samples, nodes, edges and per-hop figures the callback exports must have grown by exactly
that, with no monitor error. Neighbour and HGT sampling run PyG's own loaders, on the pure-torch kernels of
``dgdn_testing.sampling`` where pyg-lib or torch-sparse is missing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch_geometric.typing
from exposition import exposition, samples
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dgdn_lightning_monitor import MonitoringCallback
from dgdn_testing.batch_kinds import BATCH_KINDS, CASES, Case, Counts, sample_table
from dgdn_testing.models import quiet_trainer
from dgdn_testing.sampling import use_pure_torch_sampler

METRICS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
#: Examples drawn per case; with up to 10 steps each, a few hundred batches over all cases.
EXAMPLES = 5


class Recorder(pl.LightningModule):
    """Counts every training batch it receives with PyG's own API."""

    def __init__(self, counts: Any) -> None:
        super().__init__()
        self.counts = counts
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen: list[Counts] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(self.counts(batch))
        return self.weight.pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def exported(text: str) -> dict[str, Any]:
    """The training-batch figures of one exposition, hop series keyed by (family, hop)."""
    found = samples(text)
    figures: dict[str, Any] = {}
    for name in ("samples_processed", "nodes_processed", "edges_processed", "sampled_nodes", "sampled_edges"):
        for labels, value in found.get(f"dgdn_{name}_total", []):
            figures[(name, labels["hop"]) if "hop" in labels else name] = value
    for name in ("dgdn_graph_nodes", "dgdn_graph_edges", "dgdn_batch_processing_seconds_count"):
        figures[name] = found.get(name, [({}, None)])[0][1]
    figures["progress"] = next(v for labels, v in found["dgdn_progress_total"] if labels["stage"] == "train")
    figures["errors"] = sum(value for _, value in found["dgdn_monitor_errors_total"])
    return figures


class Tally(pl.Callback):
    """After the monitor's own hook, reads what it exports at the end of every training batch."""

    def __init__(self, monitor: MonitoringCallback) -> None:
        self.monitor = monitor
        self.after: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.after.append(exported(exposition(self.monitor.registry)))


def grew_by(expected: Counts) -> dict[Any, int]:
    """What one batch of ``expected`` counts adds to the exported figures."""
    growth: dict[Any, int] = {"samples_processed": expected.samples}
    growth["nodes_processed"] = expected.nodes or 0
    growth["edges_processed"] = expected.edges or 0
    for hop, count in enumerate(expected.hop_nodes or ()):
        growth["sampled_nodes", str(hop)] = count
    for hop, count in enumerate(expected.hop_edges or (), start=1):
        growth["sampled_edges", str(hop)] = count
    return growth


def sampling_kernels() -> Any:
    have = torch_geometric.typing.WITH_PYG_LIB and torch_geometric.typing.WITH_TORCH_SPARSE
    return contextlib.nullcontext() if have else use_pure_torch_sampler()


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
# Derandomised (the same examples on every run, no example database) and without shrinking, which can take
# minutes of Trainer runs: a failure reports the drawn example as it was, and reproduces.
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))  # fmt: skip
@given(data=st.data())
def test_every_batch_is_counted_exactly(case: Case, data: st.DataObject) -> None:
    traced = data.draw(st.integers(1, 4), label="trace_every_n_steps")  # traced steps size their records too
    monitor = MonitoringCallback(port=0, addr="127.0.0.1", tracing=False, gpu_devices=None,
                                 trace_every_n_steps=traced)  # fmt: skip
    tally = Tally(monitor)
    module = Recorder(case.counts)
    with sampling_kernels():
        loader = case.build(data.draw)
        trainer = quiet_trainer(max_steps=data.draw(st.integers(1, 10), label="max_steps"), max_epochs=-1,
                                limit_val_batches=0, num_sanity_val_steps=0, callbacks=[monitor, tally])  # fmt: skip
        if isinstance(loader, pl.LightningDataModule):
            trainer.fit(module, datamodule=loader)
        else:
            trainer.fit(module, loader)

    assert module.seen and len(tally.after) == len(module.seen) == trainer.global_step
    before: dict[Any, float] = {}
    for step, (expected, after) in enumerate(zip(module.seen, tally.after), start=1):
        for key, count in grew_by(expected).items():
            assert after.get(key, 0) - before.get(key, 0) == count, (step, key, expected)
        keys = {key for key in after if isinstance(key, tuple)}  # no hop series beyond the batch's own hops
        assert keys <= set(grew_by(expected)) | {key for key in before if isinstance(key, tuple)}, (step, keys)
        if expected.nodes is not None:
            assert after["dgdn_graph_nodes"] == expected.nodes and after["dgdn_graph_edges"] == expected.edges
        assert after["progress"] == after["dgdn_batch_processing_seconds_count"] == step
        assert after["errors"] == 0, step
        before = after
    assert monitor.summary()["steps"] == len(module.seen)
    assert monitor.summary()["samples"] == sum(expected.samples for expected in module.seen)


def test_the_docs_sample_table_is_rendered_from_the_batch_kinds():
    text = METRICS_PAGE.read_text()
    differs = "docs/metrics.md's sample table differs from BATCH_KINDS; it should read:\n"
    assert sample_table() in text, differs + sample_table()
    header = sample_table().splitlines()[0]
    assert text.count(header) == 1


def test_every_batch_kind_has_cases():
    assert all(kind.cases for kind in BATCH_KINDS)
    assert len(CASES) == sum(len(kind.cases) for kind in BATCH_KINDS)  # case names are unique
