"""Every private attribute the monitor reads (``dgdn_lightning_monitor.compat``), checked on real objects of the
installed Lightning, PyG, PyTorch and CPython: a release that renames, moves or changes one fails here, naming the
library, its version and the attribute, instead of silently degrading the monitor."""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import threading
from importlib.metadata import version
from types import FrameType

import lightning.pytorch as pl
import pytest
import torch
from lit_models import TensorRegressor, quiet_trainer, tensor_loader
from torch_geometric.data import Batch, Data, HeteroData, TemporalData

from dgdn_lightning_monitor import compat


def changed(library: str, attribute: str, what: str) -> str:
    """The failure message: which library, at which version, changed which attribute."""
    installed = version(library) if library != "python" else sys.version.split()[0]
    checked = compat.CHECKED_AGAINST[library]
    return f"{library} {installed} changed {attribute} (compat.py was read against {checked}): {what}"


def graph(nodes: int, edges: int) -> Data:
    return Data(x=torch.randn(nodes, 3), edge_index=torch.randint(0, nodes, (2, edges)))


# ---------------------------------------------------------------------------------------------- PyG
def test_a_pyg_data_keeps_its_attributes_in_the_dict_of_its_store():
    data = graph(5, 7)
    mapping = compat.data_mapping(data)
    assert compat.data_store(data) is data.stores[0], changed("torch-geometric", "Data._store", "not its storage")
    assert type(mapping) is dict and set(mapping) == {"x", "edge_index"}, changed(
        "torch-geometric", "Data._store._mapping", f"not a dict of its attributes: {mapping!r}"
    )
    data.batch_size = 4  # what a node loader sets: the dict is the storage itself, not a copy
    assert mapping.get("batch_size") == 4, changed("torch-geometric", "Data._store._mapping", "a copy")


def test_a_pyg_batch_records_its_graph_count_in_its_store():
    batch = Batch.from_data_list([graph(3, 2), graph(4, 6), graph(2, 1)])
    store = compat.data_store(batch)
    assert store.__dict__.get(compat.NUM_GRAPHS_KEY) == 3, changed(
        "torch-geometric", f"Batch._store.__dict__[{compat.NUM_GRAPHS_KEY!r}]", f"{sorted(store.__dict__)}"
    )
    mapping = compat.store_mapping(store)
    assert mapping["ptr"].tolist() == [0, 3, 7, 9], changed("torch-geometric", "Batch._store._mapping['ptr']", "")


def test_a_pyg_hetero_graph_and_its_batch_keep_global_and_per_type_stores():
    hetero = HeteroData()
    hetero["paper"].x = torch.randn(4, 2)
    hetero["author"].x = torch.randn(3, 2)
    hetero["author", "writes", "paper"].edge_index = torch.tensor([[0, 1, 2], [0, 1, 3]])
    mappings = [compat.store_mapping(store) for store in hetero.node_stores]
    assert all(type(m) is dict and "x" in m for m in mappings), changed(
        "torch-geometric", "HeteroData node store ._mapping", f"{mappings!r}"
    )
    assert "edge_index" in compat.store_mapping(hetero.edge_stores[0])
    batch = Batch.from_data_list([hetero, hetero])
    assert isinstance(batch, HeteroData), "torch-geometric: a batch of HeteroData is no longer a HeteroData"
    graphs = compat.global_store(batch).__dict__.get(compat.NUM_GRAPHS_KEY)
    assert graphs == 2, changed(
        "torch-geometric", f"HeteroDataBatch._global_store.__dict__[{compat.NUM_GRAPHS_KEY!r}]", f"{graphs!r}"
    )


def test_a_pyg_temporal_data_keeps_its_events_in_the_dict_of_its_store():
    events = TemporalData(src=torch.arange(6), dst=torch.arange(6), t=torch.arange(6), msg=torch.randn(6, 2))
    mapping = compat.data_mapping(events)
    assert type(mapping) is dict and mapping["src"].shape[0] == 6, changed(
        "torch-geometric", "TemporalData._store._mapping", f"{mapping!r}"
    )


# ---------------------------------------------------------------------------------------------- torch
def test_a_sparse_tensor_tells_its_stored_entries_on_the_host():
    indices = torch.tensor([[0, 1, 2], [1, 2, 0]])
    sparse = torch.sparse_coo_tensor(indices, torch.ones(3), (3, 3), check_invariants=True)  # an adj_t's layout
    assert sparse.is_sparse and compat.sparse_nnz(sparse) == 3, changed("torch", "Tensor._nnz()", "not its entries")


@pytest.mark.parametrize(
    "attribute, parameters",
    [("_record_memory_history", ("enabled", "stacks", "max_entries")), ("_dump_snapshot", ("filename",))],
)
def test_the_cuda_memory_history_functions_take_what_the_monitor_passes(attribute, parameters):
    """Without a GPU these cannot run; their signatures are what a release would change."""
    function = getattr(torch.cuda.memory, attribute, None)
    assert callable(function), changed("torch", f"torch.cuda.memory.{attribute}", "it is gone")
    signature = inspect.signature(function)
    missing = [name for name in parameters if name not in signature.parameters]
    assert not missing, changed("torch", f"torch.cuda.memory.{attribute}", f"no parameter {missing}: {signature}")
    if attribute == "_record_memory_history":
        assert signature.parameters["enabled"].default == "all", changed("torch", attribute, f"{signature}")


def test_the_flight_recorder_dump_of_this_build_is_found():
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    from torch._C import _distributed_c10d as c10d

    assert compat.flight_recorder_dump(nccl=False) is getattr(c10d, "_dump_fr_trace", None), changed(
        "torch", "torch._C._distributed_c10d._dump_fr_trace", "it is gone"
    )
    if torch.distributed.is_nccl_available():
        assert compat.flight_recorder_dump(nccl=True) is getattr(c10d, "_dump_nccl_trace", None), changed(
            "torch", "torch._C._distributed_c10d._dump_nccl_trace", "it is gone from a build with NCCL"
        )


# ---------------------------------------------------------------------------------------------- Lightning
def test_lightning_calls_the_fetch_hooks_of_its_training_epoch_loop_around_every_batch():
    """A real fit: the hooks set on this Trainer's epoch loop run once before and once after each batch's fetch."""
    calls: list[str] = []

    class Watch(pl.Callback):
        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            loop = trainer.fit_loop.epoch_loop
            hooks = compat.fetch_hooks(loop)
            assert hooks is not None, changed("lightning", f"{type(loop).__name__}.{compat.FETCH_HOOKS}", "gone")
            before, after = hooks

            def watched_before() -> None:
                calls.append("before")
                before()

            def watched_after() -> None:
                after()
                calls.append("after")

            compat.set_fetch_hooks(loop, watched_before, watched_after)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            calls.append("batch")

        def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            compat.restore_fetch_hooks(trainer.fit_loop.epoch_loop)

    trainer = quiet_trainer(max_epochs=1, callbacks=[Watch()], num_sanity_val_steps=0)
    trainer.fit(TensorRegressor(), tensor_loader(rows=24, batch_size=8))  # 3 batches
    # The fetcher looks one batch ahead: a fetch precedes each batch, and one more finds the end.
    assert calls[:3] == ["before", "after", "batch"] and calls.count("batch") == 3, changed(
        "lightning", f"{compat.FETCH_HOOKS}", f"not called around each fetch: {calls}"
    )
    loop = trainer.fit_loop.epoch_loop
    assert not any(name in loop.__dict__ for name in compat.FETCH_HOOKS), "restore_fetch_hooks left an override"


# ---------------------------------------------------------------------------------------------- OpenTelemetry
@pytest.mark.parametrize("module", compat.OTLP_EXPORTER_LOGGERS)
def test_each_otlp_exporter_module_logs_on_the_logger_named_after_it(module):
    library = "opentelemetry-exporter-otlp-proto-http"
    try:
        loaded = importlib.import_module(module)
    except ImportError as error:
        raise AssertionError(changed(library, module, f"the module is gone ({error})")) from error
    loggers = [value.name for value in vars(loaded).values() if isinstance(value, logging.Logger)]
    assert loggers == [module], changed(library, module, f"it logs on {loggers}, not on a logger named after it")


# ---------------------------------------------------------------------------------------------- CPython
def test_current_frames_maps_every_thread_to_its_top_frame():
    started, stop = threading.Event(), threading.Event()

    def wait() -> None:
        started.set()
        stop.wait(10)

    thread = threading.Thread(target=wait, name="compat-probe")
    thread.start()
    try:
        started.wait(10)
        frames = compat.current_frames()
        assert isinstance(frames.get(threading.get_ident()), FrameType), changed("python", "sys._current_frames", "")
        assert isinstance(frames.get(thread.ident), FrameType), changed("python", "sys._current_frames", "")
    finally:
        stop.set()
        thread.join()
