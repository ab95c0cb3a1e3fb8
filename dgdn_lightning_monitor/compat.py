"""Every private attribute of Lightning, PyG, PyTorch, OpenTelemetry and CPython that the monitor reads, in one
place.

None of them is a public API: each is here because the public one would cost the training step (PyG's counts that
fall back to ``edge_index.max()``, a device synchronisation), or because there is none (Lightning's fetch
boundaries, the CUDA memory history, the flight recorder, other threads' stacks). Each item names the versions it
was read against (:data:`CHECKED_AGAINST`, within the ranges ``pyproject.toml`` allows); ``tests/test_compat.py``
checks every one on real objects of the installed versions and fails naming the library, its version and the
attribute when a release changes it.

Hot-path items (graph sizing runs on every training step) are ``operator.attrgetter`` objects and attribute names,
which cost no Python call of their own; the others are small functions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from operator import attrgetter, methodcaller
from types import FrameType
from typing import Any, Literal, Optional

import torch

#: The library versions these items were read against, within the project's ranges (``lightning>=2.2``,
#: ``torch-geometric>=2.5``, ``torch>=2.1``, Python ``>=3.10``).
CHECKED_AGAINST = {
    "lightning": "2.6.6",
    "torch-geometric": "2.8.1",
    "torch": "2.13.0",
    "opentelemetry-exporter-otlp-proto-http": "1.45.2",
    "python": "3.11.7",
}

# ---------------------------------------------------------------------------------------------- PyG
# ``Data``, ``Batch`` and ``TemporalData`` keep their attributes in one storage object (``_store``) whose plain dict
# (``_mapping``) is read directly: PyG's own ``num_nodes`` may compute ``edge_index.max() + 1`` on the device.
# ``HeteroData`` keeps graph-level attributes in ``_global_store``; ``Batch.from_data_list`` records the graph count
# as ``_num_graphs`` in that storage's ``__dict__`` (``Batch.num_graphs`` would fall back to ``batch.max()``).
# torch-geometric 2.8.1.

#: ``data -> data._store``: the storage of a ``Data``, ``Batch`` or ``TemporalData``.
data_store: Callable[[Any], Any] = attrgetter("_store")
#: ``data -> data._store._mapping``: the dict of a ``Data``'s, ``Batch``'s or ``TemporalData``'s attributes.
data_mapping: Callable[[Any], dict[str, Any]] = attrgetter("_store._mapping")
#: ``store -> store._mapping``: the dict of one storage's attributes (a ``HeteroData``'s node or edge store).
store_mapping: Callable[[Any], dict[str, Any]] = attrgetter("_mapping")
#: ``data -> data._global_store``: the graph-level storage of a ``HeteroData`` (and of its batch).
global_store: Callable[[Any], Any] = attrgetter("_global_store")
#: Key in a batch storage's ``__dict__`` under which ``Batch.from_data_list`` records the number of graphs.
NUM_GRAPHS_KEY = "_num_graphs"

# ---------------------------------------------------------------------------------------------- torch
#: ``tensor -> tensor._nnz()``: stored entries of a sparse COO/CSR tensor, kept on the host. torch 2.13.0.
sparse_nnz: Callable[[torch.Tensor], int] = methodcaller("_nnz")


def record_memory_history(enabled: Optional[Literal["state", "all"]] = "all", **options: Any) -> None:
    """Start (``enabled="all"``) or stop (``enabled=None``) the CUDA caching allocator's history of allocations:
    ``torch.cuda.memory._record_memory_history`` (torch 2.13.0; the documented way to take a memory snapshot).

    Args:
        enabled: ``"all"`` (or ``"state"``) to record, ``None`` to stop.
        options: its other arguments, e.g. ``stacks="python"``, ``max_entries=100_000``.
    """
    torch.cuda.memory._record_memory_history(enabled=enabled, **options)


def dump_memory_snapshot(path: str) -> None:
    """Write the recorded history and the allocator's state to ``path`` (a pickle that
    https://pytorch.org/memory_viz opens): ``torch.cuda.memory._dump_snapshot`` (torch 2.13.0)."""
    torch.cuda.memory._dump_snapshot(path)


#: The flight recorder's dump functions in ``torch._C._distributed_c10d``: NCCL's own recorder (CUDA builds), and
#: the one of every other backend. torch 2.13.0.
FLIGHT_RECORDER_DUMPS = ("_dump_nccl_trace", "_dump_fr_trace")


def flight_recorder_dump(nccl: bool) -> Optional[Callable[[], bytes]]:
    """The function that returns the flight recorder's trace (pickled): NCCL's when ``nccl`` and this build has it,
    else the other backends'; ``None`` when this build has neither."""
    from torch._C import _distributed_c10d as c10d

    names = FLIGHT_RECORDER_DUMPS if nccl else FLIGHT_RECORDER_DUMPS[1:]
    return next((getattr(c10d, name) for name in names if hasattr(c10d, name)), None)


# ---------------------------------------------------------------------------------------------- Lightning
#: The training epoch loop's methods around the fetch of each batch (``_TrainingEpochLoop._on_before_fetch`` and
#: ``_on_after_fetch``, which its data fetcher calls as its profiler's boundaries). lightning 2.6.6.
FETCH_HOOKS = ("_on_before_fetch", "_on_after_fetch")
Hook = Callable[[], None]


def fetch_hooks(loop: Any) -> Optional[tuple[Hook, Hook]]:
    """``loop``'s hooks around the fetch of each batch, or ``None`` when it has none (another Lightning)."""
    before, after = (getattr(loop, name, None) for name in FETCH_HOOKS)
    return (before, after) if callable(before) and callable(after) else None


def set_fetch_hooks(loop: Any, before: Hook, after: Hook) -> None:
    """Replace ``loop``'s hooks around the fetch of each batch, on this loop only (instance attributes that the
    loop's data fetcher picks up when an epoch starts)."""
    loop._on_before_fetch, loop._on_after_fetch = before, after


def restore_fetch_hooks(loop: Any) -> None:
    """Undo :func:`set_fetch_hooks`: the loop's own methods again."""
    for name in FETCH_HOOKS:
        loop.__dict__.pop(name, None)


# ---------------------------------------------------------------------------------------------- OpenTelemetry
#: The loggers of the OTLP/HTTP span exporter's modules (each logs through ``logging.getLogger(__name__)``, one of
#: them a private module): a failed export or retry is logged on them, and a logger's filter only sees records
#: created on that very logger. opentelemetry-exporter-otlp-proto-http 1.45.2.
OTLP_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.common.http",
)


# ---------------------------------------------------------------------------------------------- CPython
def current_frames() -> dict[int, FrameType]:
    """The top frame of every thread of this process by thread ident: ``sys._current_frames()`` (CPython 3.10-3.13;
    documented, but named private)."""
    return sys._current_frames()
