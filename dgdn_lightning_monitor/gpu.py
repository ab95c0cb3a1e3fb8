"""GPU figures for Prometheus that cost the training step nothing.

:class:`GPUMonitor` is a ``prometheus_client`` custom collector with two sources:

* **Allocator figures** (``<ns>_gpu_memory_allocated_bytes``, ``<ns>_gpu_memory_reserved_bytes``,
  ``<ns>_gpu_max_memory_allocated_bytes``) come from the host-side counters of PyTorch's CUDA caching
  allocator (``torch.cuda.memory_stats``). They are read when Prometheus scrapes, never per step, and
  reading them does not synchronise the device. They cover the CUDA devices this rank trains on; when
  CUDA is not initialised in this process there are no such series.
* **NVML figures** (utilisation, memory used/total, temperature, power) come from nvidia-ml-py
  (``pynvml``). One daemon thread, named :data:`THREAD_NAME`, does every NVML call: ``nvmlInit``,
  the device look-ups (cached after the first success), one sample of each watched GPU every
  ``poll_interval_s`` seconds, and ``nvmlShutdown``. :meth:`GPUMonitor.collect` only reads the last
  sample, so a scrape never waits for NVML and the training thread never calls it. nvidia-ml-py calls
  the library through ctypes, which releases the GIL, so a slow NVML answer does not hold up training.

Run lifecycle
    :meth:`GPUMonitor.start` starts the thread and waits at most :attr:`GPUMonitor.FIRST_SAMPLE_TIMEOUT_S`
    for the first sample (at setup, not during training), so the first scrape already has figures; the
    ``up`` gauge is absent until that first sample ends. :meth:`GPUMonitor.stop` wakes the thread at
    once, joins it (it calls ``nvmlShutdown`` on its way out) and drops every GPU series: figures from a
    run that ended would be stale.

Which GPU is which
    The ``gpu`` label is the CUDA device index as the training code sees it (``cuda:N``); an explicit
    ``devices`` list holds such indices too. NVML numbers devices in PCI order and ignores
    ``CUDA_VISIBLE_DEVICES``, so its index can name another GPU. A CUDA index is therefore mapped to an
    NVML handle by the device UUID that PyTorch reports (``torch.cuda.get_device_properties(i).uuid``,
    tried as ``GPU-<uuid>`` and ``MIG-<uuid>``), then by its PCI bus id (for a MIG instance whose UUID
    NVML does not take, that finds the parent GPU). PyTorch is asked only when CUDA is already
    initialised in this process or when ``devices="auto"`` (the rank trains on those devices, so
    nothing new is initialised); a process that trains on CPU never initialises CUDA because of this
    module. Otherwise ``CUDA_VISIBLE_DEVICES`` is read: an integer entry at position ``i`` is taken as
    NVML index (right when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or all GPUs are alike), a full
    ``GPU-``/``MIG-`` UUID entry as UUID. With none of these, the index is used as the NVML index (the
    ``nvidia-smi`` numbering). When PyTorch gave a UUID or bus id and NVML knows neither, the GPU counts
    as not found, rather than guessing by index and reporting another GPU's figures.

Failures
    Nothing here raises into training. A missing ``pynvml`` package, a missing NVML library
    (``NVMLError_LibraryNotFound``), a failing ``nvmlInit``, a GPU NVML cannot find, or an NVML error
    while sampling (e.g. GPU lost) each log ONE warning per monitor (per kind, across runs) on the
    logger ``dgdn_lightning_monitor.gpu``, and ``<ns>_gpu_monitoring_up`` says 0. The NVML series of a
    GPU whose sample failed disappear until a later sample succeeds (sampling goes on every interval,
    and ``up`` returns to 1 when every watched GPU is sampled again); other GPUs keep updating. A
    figure a GPU does not support (``NVMLError_NotSupported``, e.g. power on some boards) is left out
    for that GPU without a warning and is not asked for again. A failing allocator read also logs one
    warning; that GPU's allocator series are left out of the scrape (``up`` is about NVML only).

Example:
    >>> from prometheus_client import CollectorRegistry
    >>> monitor = GPUMonitor(namespace="dgdn", devices="auto", poll_interval_s=5.0)
    >>> registry = CollectorRegistry()
    >>> registry.register(monitor)  # describe() is empty, so this samples nothing
    >>> monitor.start(cuda_devices=[], labels={"rank": "0"})  # CPU run: nothing to watch
    >>> list(monitor.collect())
    []
    >>> monitor.stop()
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

import torch
from prometheus_client.core import GaugeMetricFamily, Metric

from dgdn_lightning_monitor.guards import NAMESPACE, WarnOnce, check_namespace, forget_threads_after_fork

__all__ = ["GPUMonitor", "THREAD_NAME", "LOGGER_NAME"]

#: Name of the sampling thread (one per running monitor).
THREAD_NAME = "dgdn-gpu-monitor"
#: Logger that receives the one-per-kind failure warnings.
LOGGER_NAME = "dgdn_lightning_monitor.gpu"

logger = logging.getLogger(LOGGER_NAME)

_FULL_UUID_RE = re.compile(r"^(GPU|MIG)-[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")
_GPU_LABELS = ("gpu", "uuid", "name")

# Families in exposition order: (suffix, HELP) of the up gauge, (figure or allocator key, suffix, HELP) of the rest.
_UP = (
    "gpu_monitoring_up",
    "1 while NVML sampling of the GPUs this rank watches works, 0 when it failed or NVML is unavailable.",
)
_NVML_FIGURES = (
    (
        "utilization",
        "gpu_utilization_ratio",
        "Fraction of the last NVML sample period during which a kernel ran on the GPU (0 to 1).",
    ),
    ("memory_used", "gpu_memory_used_bytes", "GPU memory in use by all processes on the device, as reported by NVML."),
    ("memory_total", "gpu_memory_total_bytes", "Total GPU memory of the device, as reported by NVML."),
    ("temperature", "gpu_temperature_celsius", "GPU core temperature, as reported by NVML."),
    ("power", "gpu_power_watts", "GPU power draw, as reported by NVML."),
)
_ALLOCATOR_FIGURES = (
    (
        "allocated_bytes.all.current",
        "gpu_memory_allocated_bytes",
        "Memory held by tensors in this process's PyTorch CUDA caching allocator.",
    ),
    (
        "reserved_bytes.all.current",
        "gpu_memory_reserved_bytes",
        "Memory reserved by this process's PyTorch CUDA caching allocator (held by tensors plus cached).",
    ),
    (
        "allocated_bytes.all.peak",
        "gpu_max_memory_allocated_bytes",
        "Peak memory held by tensors in this process's PyTorch CUDA caching allocator since start or the last "
        "peak reset.",
    ),
)


class _Stopped(Exception):
    """Raised inside the sampling thread when stop() was requested; never leaves the thread."""


@dataclass(frozen=True)
class _DeviceSample:
    """One GPU's figures from one sampling round; ``None`` marks a figure the GPU does not support."""

    gpu: str
    uuid: str
    name: str
    figures: dict[str, float | None]


@dataclass(frozen=True)
class _Snapshot:
    """What collect() exports: ``up`` is None until the first round ended."""

    up: int | None
    devices: tuple[_DeviceSample, ...] = ()


@dataclass
class _Target:
    """A watched GPU: its CUDA index, how to find it in NVML, and the cached handle once found."""

    gpu: int
    keys: tuple[tuple[str, Any], ...]
    handle: Any = None
    uuid: str = ""
    name: str = ""
    unsupported: set[str] = field(default_factory=set)


def _as_text(value: Any) -> str:
    """NVML strings are ``str`` in current nvidia-ml-py and ``bytes`` in old releases."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, for the warnings."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _validate_indices(value: Any, argument: str) -> tuple[int, ...]:
    """Return ``value`` as a tuple of distinct non-negative ints, or raise ValueError naming ``argument``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{argument} must be a list of non-negative GPU indices, got {value!r}")
    indices: list[int] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral) or int(item) < 0:
            raise ValueError(f"{argument} must hold non-negative ints, got {item!r} in {value!r}")
        indices.append(int(item))
    if len(set(indices)) != len(indices):
        raise ValueError(f"{argument} must not repeat an index, got {value!r}")
    return tuple(indices)


def _torch_properties(index: int) -> Any | None:
    """``torch.cuda.get_device_properties(index)``, or None where CUDA cannot answer."""
    try:
        return torch.cuda.get_device_properties(index)
    except Exception:  # CPU build, no driver, bad index: fall back to other ways of finding the GPU
        return None


def _uuid_keys(raw: Any) -> list[tuple[str, Any]]:
    """NVML UUID look-up keys for the UUID PyTorch reports (hex, with or without dashes or prefix)."""
    if raw is None:
        return []
    text = _as_text(raw).strip()
    if _FULL_UUID_RE.match(text):
        return [("uuid", text.lower().replace("gpu-", "GPU-").replace("mig-", "MIG-"))]
    digits = text.replace("-", "").lower()
    if len(digits) != 32 or any(c not in "0123456789abcdef" for c in digits) or set(digits) == {"0"}:
        return []
    dashed = f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
    return [("uuid", f"GPU-{dashed}"), ("uuid", f"MIG-{dashed}")]


def _pci_key(props: Any) -> list[tuple[str, Any]]:
    """NVML PCI bus id look-up key (``DDDDDDDD:BB:DD.0``) from PyTorch's device properties, if it has them."""
    bus = getattr(props, "pci_bus_id", None)
    device = getattr(props, "pci_device_id", None)
    domain = getattr(props, "pci_domain_id", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (bus, device, domain)):
        return []
    return [("pci", f"{domain:08X}:{bus:02X}:{device:02X}.0")]


def _lookup_keys(index: int, ask_torch: bool) -> tuple[tuple[str, Any], ...]:
    """Ways to find CUDA device ``index`` in NVML, best first (see the module docstring).

    Args:
        index: CUDA device index.
        ask_torch: whether PyTorch may be asked for the device's UUID and PCI bus id.

    Example:
        >>> _lookup_keys(0, ask_torch=False)  # no CUDA, no CUDA_VISIBLE_DEVICES
        (('index', 0),)
    """
    if ask_torch:
        props = _torch_properties(index)
        if props is not None:
            keys = _uuid_keys(getattr(props, "uuid", None)) + _pci_key(props)
            if keys:
                return tuple(keys)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        entries = [entry.strip() for entry in visible.split(",")]
        if index < len(entries):
            entry = entries[index]
            if entry.isdigit():
                return (("index", int(entry)),)
            if _FULL_UUID_RE.match(entry):
                return (("uuid", entry),)
    return (("index", index),)


class _Sampler:
    """One run's sampling thread: owns every NVML call of that run."""

    def __init__(self, monitor: GPUMonitor, nvml: Any, targets: list[_Target], interval: float) -> None:
        self._monitor = monitor
        self._nvml = nvml
        self._targets = targets
        self._interval = interval
        self.stop_event = threading.Event()
        self.first_round = threading.Event()
        self.snapshot = _Snapshot(up=None)
        self.thread = threading.Thread(target=self._main, name=THREAD_NAME, daemon=True)
        base = getattr(nvml, "NVMLError", None)
        self._nvml_error: type[BaseException] = base if isinstance(base, type) else Exception
        self._library_missing = self._error_class("NVMLError_LibraryNotFound")
        self._not_supported = self._error_class("NVMLError_NotSupported")

    def _error_class(self, name: str) -> tuple[type[BaseException], ...]:
        cls = getattr(self._nvml, name, None)
        return (cls,) if isinstance(cls, type) and issubclass(cls, BaseException) else ()

    def _call(self, function: str, *args: Any) -> Any:
        """Call an NVML function unless stop() was requested (so stop is honoured between calls)."""
        if self.stop_event.is_set():
            raise _Stopped
        return getattr(self._nvml, function)(*args)

    def _main(self) -> None:
        try:
            try:
                self._call("nvmlInit")
            except _Stopped:
                return
            except Exception as exc:
                if self._library_missing and isinstance(exc, self._library_missing):
                    self._monitor._warn_once(
                        "library_not_found",
                        "GPU monitoring is off: the NVML library was not found (%s); is the NVIDIA driver installed?",
                        _describe(exc),
                    )
                else:
                    self._monitor._warn_once(
                        "init_failed", "GPU monitoring is off: nvmlInit failed: %s", _describe(exc)
                    )
                self.snapshot = _Snapshot(up=0)
                return
            try:
                while True:
                    self._round()
                    self.first_round.set()
                    if self.stop_event.wait(self._interval):
                        break
            except _Stopped:
                pass
            finally:
                try:
                    self._nvml.nvmlShutdown()
                except Exception as exc:
                    logger.debug("nvmlShutdown failed: %r", exc)
        finally:
            self.first_round.set()

    def _round(self) -> None:
        """Sample every watched GPU once and publish the result as one snapshot."""
        samples: list[_DeviceSample] = []
        ok = True
        for target in self._targets:
            if target.handle is None:
                try:
                    self._resolve(target)
                except _Stopped:
                    raise
                except Exception as exc:
                    ok = False
                    self._monitor._warn_once(
                        "device_not_found",
                        "GPU monitoring cannot find GPU %d in NVML (looked up by %s): %s",
                        target.gpu,
                        ", ".join(f"{kind} {key}" for kind, key in target.keys),
                        _describe(exc),
                    )
                    continue
            try:
                samples.append(self._sample(target))
            except _Stopped:
                raise
            except Exception as exc:
                ok = False
                self._monitor._warn_once(
                    "sample_failed",
                    "GPU sampling failed for GPU %d (%s): %s; its figures are left out until sampling works again",
                    target.gpu,
                    target.uuid,
                    _describe(exc),
                )
        previous = self.snapshot.up
        self.snapshot = _Snapshot(up=1 if ok else 0, devices=tuple(samples))
        if ok and previous == 0:
            logger.info("GPU sampling works again")

    def _resolve(self, target: _Target) -> None:
        """Find the target's NVML handle by its keys in order and cache it with its UUID and name."""
        functions = {
            "uuid": "nvmlDeviceGetHandleByUUID",
            "pci": "nvmlDeviceGetHandleByPciBusId",
            "index": "nvmlDeviceGetHandleByIndex",
        }
        error: BaseException | None = None
        for kind, key in target.keys:
            try:
                handle = self._call(functions[kind], key)
            except self._nvml_error as exc:
                error = exc
                continue
            target.uuid = _as_text(self._call("nvmlDeviceGetUUID", handle))
            target.name = _as_text(self._call("nvmlDeviceGetName", handle))
            target.handle = handle
            return
        raise error if error is not None else LookupError("no way to look the GPU up")

    def _sample(self, target: _Target) -> _DeviceSample:
        """Read the figures of one GPU; an unsupported figure becomes None and is not asked again."""
        handle = target.handle
        sensor = getattr(self._nvml, "NVML_TEMPERATURE_GPU", 0)
        readers = {
            "utilization": lambda: self._call("nvmlDeviceGetUtilizationRates", handle).gpu / 100.0,
            "memory": lambda: self._call("nvmlDeviceGetMemoryInfo", handle),
            "temperature": lambda: float(self._call("nvmlDeviceGetTemperature", handle, sensor)),
            "power": lambda: self._call("nvmlDeviceGetPowerUsage", handle) / 1000.0,
        }
        values: dict[str, Any] = {}
        for figure, read in readers.items():
            if figure in target.unsupported:
                values[figure] = None
                continue
            try:
                values[figure] = read()
            except Exception as exc:
                if self._not_supported and isinstance(exc, self._not_supported):
                    logger.debug("GPU %d does not support the %s figure", target.gpu, figure)
                    target.unsupported.add(figure)
                    values[figure] = None
                else:
                    raise
        memory = values.pop("memory")
        values["memory_used"] = None if memory is None else float(memory.used)
        values["memory_total"] = None if memory is None else float(memory.total)
        return _DeviceSample(gpu=str(target.gpu), uuid=target.uuid, name=target.name, figures=values)


@dataclass(frozen=True)
class _Run:
    """State of one start()..stop() run."""

    label_names: tuple[str, ...]
    label_values: tuple[str, ...]
    cuda_devices: tuple[int, ...]
    sampler: _Sampler | None
    failed_snapshot: _Snapshot | None = None  # set when NVML could not even be imported


class GPUMonitor:
    """Prometheus collector for per-rank GPU figures, sampled off the training thread.

    Allocator figures are read from PyTorch at scrape time; NVML figures are sampled by one
    background thread every ``poll_interval_s`` seconds (see the module docstring for the mapping
    of CUDA indices to NVML devices and the behaviour on failures).

    Args:
        namespace: Prefix of every metric name (``<namespace>_gpu_...``).
        devices: ``"auto"`` watches the CUDA devices this rank trains on (given to :meth:`start`);
            a list of CUDA device indices watches those GPUs with NVML; ``None`` or ``[]`` switches GPU
            monitoring off entirely (no NVML, no allocator figures).
        poll_interval_s: Seconds between two NVML samples; a real number > 0.
        nvml: The ``pynvml`` module to use; ``None`` imports ``pynvml`` in :meth:`start`.

    Raises:
        ValueError: ``devices`` (``gpu_devices`` on the callback) is neither ``"auto"``, ``None`` nor a
            list of distinct non-negative ints; ``poll_interval_s`` (``gpu_poll_interval_s``) is not a
            finite number > 0; ``namespace`` is not a valid metric name prefix; ``nvml`` has no ``nvmlInit``.

    Example:
        >>> from prometheus_client import CollectorRegistry, generate_latest
        >>> monitor = GPUMonitor(devices=[0], poll_interval_s=2.0)
        >>> registry = CollectorRegistry()
        >>> registry.register(monitor)
        >>> monitor.start(cuda_devices=[0], labels={"rank": "0", "world_size": "1"})  # doctest: +SKIP
        >>> print(generate_latest(registry).decode())  # doctest: +SKIP
        >>> monitor.stop()
    """

    _lock: threading.Lock
    _warn_once: WarnOnce
    _interval: float
    _namespace: str
    _nvml_module: ModuleType | None

    #: Longest time start() waits for the first sample, so the first scrape already has figures.
    FIRST_SAMPLE_TIMEOUT_S = 2.0
    #: Longest time stop() waits for the sampling thread; it only waits this long if an NVML call hangs.
    STOP_TIMEOUT_S = 5.0

    def __init__(
        self,
        namespace: str = "dgdn",
        devices: Literal["auto"] | Sequence[int] | None = "auto",
        poll_interval_s: float = 5.0,
        nvml: ModuleType | None = None,
    ) -> None:
        check_namespace(namespace)
        self._devices: Literal["auto"] | tuple[int, ...] | None
        if devices is None or (isinstance(devices, str) and devices == "auto"):
            self._devices = devices
        elif isinstance(devices, str):
            raise ValueError(f"gpu_devices (devices) must be 'auto', None or a list of GPU indices, got {devices!r}")
        else:
            self._devices = _validate_indices(devices, "gpu_devices (devices)") or None
        if (
            isinstance(poll_interval_s, bool)
            or not isinstance(poll_interval_s, numbers.Real)
            or not math.isfinite(float(poll_interval_s))
            or float(poll_interval_s) <= 0
        ):
            raise ValueError(
                f"gpu_poll_interval_s (poll_interval_s) must be a finite number of seconds > 0, got {poll_interval_s!r}"
            )
        if nvml is not None and not callable(getattr(nvml, "nvmlInit", None)):
            raise ValueError(f"nvml must be the pynvml module or a stand-in with nvmlInit, got {nvml!r}")
        self._namespace = namespace
        self._interval = float(poll_interval_s)
        self._nvml_module = nvml
        self._lock = threading.Lock()
        self._run: _Run | None = None
        self._warn_once = WarnOnce(logger)
        forget_threads_after_fork(self)

    def __getstate__(self) -> dict[str, Any]:
        """Configuration only (for ``ddp_spawn`` and friends): a copy starts without a run or past warnings.

        A monitor built with ``nvml=None`` pickles; a module given as ``nvml`` does not.
        """
        state = self.__dict__.copy()
        state.update(_lock=None, _run=None, _warn_once=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore the configuration with a fresh lock and no run."""
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._warn_once = WarnOnce(logger)
        forget_threads_after_fork(self)

    def after_fork_in_child(self) -> None:
        """The sampling thread does not exist in a forked child: drop the run (its series would never update);
        the child starts its own with :meth:`start`."""
        self._lock = threading.Lock()
        self._run = None

    @property
    def devices(self) -> Literal["auto"] | tuple[int, ...] | None:
        """The watched devices as configured: ``"auto"``, a tuple of indices, or ``None`` (off)."""
        return self._devices

    @property
    def poll_interval_s(self) -> float:
        """Seconds between two NVML samples."""
        return self._interval

    @property
    def running(self) -> bool:
        """Whether a run is active (between :meth:`start` and :meth:`stop`)."""
        return self._run is not None

    def start(self, cuda_devices: Sequence[int], labels: Mapping[str, str]) -> None:
        """Begin a run: start the sampling thread for the watched GPUs (no NVML call happens here).

        Call once per run from the training thread at setup. A run that is still active is stopped
        first, so calling again after :meth:`stop` (a second fit) is fine. With ``devices="auto"`` and
        no CUDA devices this does nothing. Waits at most :attr:`FIRST_SAMPLE_TIMEOUT_S` for the first
        sample so that the first scrape has figures.

        Args:
            cuda_devices: CUDA device indices this rank trains on (``[]`` on CPU).
            labels: Constant labels for every series, e.g. ``{"rank": "0", "world_size": "1"}``; they
                come first, in this order, before ``gpu``/``uuid``/``name``.

        Raises:
            ValueError: ``cuda_devices`` is not a list of distinct non-negative ints, or a label name is
                invalid or one of ``gpu``, ``uuid``, ``name``.

        Example:
            >>> monitor = GPUMonitor(devices="auto")
            >>> monitor.start(cuda_devices=[], labels={"rank": "0"})  # CPU: nothing to do
            >>> monitor.running
            False
        """
        cuda = _validate_indices(cuda_devices, "cuda_devices")
        if not isinstance(labels, Mapping):
            raise ValueError(f"labels must be a mapping of label names to values, got {labels!r}")
        names = tuple(labels)
        for name in names:
            if not isinstance(name, str) or not NAMESPACE.match(name + "x") or name.startswith("__"):
                raise ValueError(f"labels: {name!r} is not a valid Prometheus label name")
            if name in _GPU_LABELS:
                raise ValueError(f"labels: {name!r} is reserved for the GPU series")
        values = tuple(str(labels[name]) for name in names)

        self.stop()
        if self._devices is None:
            return
        watched = cuda if isinstance(self._devices, str) else self._devices
        if not watched:
            return

        nvml = self._nvml_module
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except Exception as exc:
                self._warn_once(
                    "nvml_missing",
                    "GPU monitoring is off: nvidia-ml-py (pynvml) cannot be imported: %s",
                    _describe(exc),
                )
                with self._lock:
                    self._run = _Run(names, values, cuda, None, failed_snapshot=_Snapshot(up=0))
                return
        ask_torch = isinstance(self._devices, str) or _cuda_initialized()
        targets = [_Target(gpu=index, keys=_lookup_keys(index, ask_torch)) for index in watched]
        sampler = _Sampler(self, nvml, targets, self._interval)
        with self._lock:
            self._run = _Run(names, values, cuda, sampler)
        sampler.thread.start()
        sampler.first_round.wait(self.FIRST_SAMPLE_TIMEOUT_S)

    def stop(self) -> None:
        """End the run: wake the sampling thread, wait for it (it calls ``nvmlShutdown``), drop all series.

        Idempotent and safe without :meth:`start`. Returns as soon as the thread has finished its
        current NVML call (at most :attr:`STOP_TIMEOUT_S` if NVML hangs; only in that case can the
        abandoned thread still call ``nvmlShutdown`` later).

        Example:
            >>> monitor = GPUMonitor()
            >>> monitor.stop()
            >>> monitor.stop()
        """
        with self._lock:
            run, self._run = self._run, None
        if run is None or run.sampler is None:
            return
        run.sampler.stop_event.set()
        if run.sampler.thread.ident is not None:
            run.sampler.thread.join(self.STOP_TIMEOUT_S)
            if run.sampler.thread.is_alive():
                logger.warning(
                    "the GPU sampling thread did not finish within %.0f s (an NVML call hangs)", self.STOP_TIMEOUT_S
                )

    def describe(self) -> list:
        """Nothing, so that registering the collector does not call :meth:`collect`.

        Example:
            >>> GPUMonitor().describe()
            []
        """
        return []

    def collect(self) -> Iterable[Metric]:
        """The GPU series of the current run: the last NVML sample and the allocator figures right now.

        Makes no NVML call. Yields nothing outside a run or when GPU monitoring has nothing to watch.

        Example:
            >>> list(GPUMonitor().collect())
            []
        """
        run = self._run
        if run is None:
            return []
        ns = self._namespace
        families: list[Metric] = []
        snapshot = run.failed_snapshot or (run.sampler.snapshot if run.sampler else _Snapshot(up=None))
        if snapshot.up is not None:
            up = GaugeMetricFamily(f"{ns}_{_UP[0]}", _UP[1], labels=list(run.label_names))
            up.add_metric(list(run.label_values), float(snapshot.up))
            families.append(up)
        gpu_label_names = list(run.label_names) + list(_GPU_LABELS)
        for figure, suffix, help_text in _NVML_FIGURES:
            family = GaugeMetricFamily(f"{ns}_{suffix}", help_text, labels=gpu_label_names)
            for device in snapshot.devices:
                value = device.figures.get(figure)
                if value is not None:
                    family.add_metric([*run.label_values, device.gpu, device.uuid, device.name], value)
            if family.samples:
                families.append(family)
        families.extend(self._allocator_families(run))
        return families

    def _allocator_families(self, run: _Run) -> list[Metric]:
        """Allocator figures of the run's CUDA devices; none when CUDA is not initialised here."""
        if not run.cuda_devices or not _cuda_initialized():
            return []
        ns = self._namespace
        label_names = list(run.label_names) + ["gpu"]
        families = [
            GaugeMetricFamily(f"{ns}_{suffix}", text, labels=label_names) for _, suffix, text in _ALLOCATOR_FIGURES
        ]
        for index in run.cuda_devices:
            try:
                stats = torch.cuda.memory_stats(index)
            except Exception as exc:
                self._warn_once(
                    "allocator_failed",
                    "reading the PyTorch CUDA allocator statistics of GPU %d failed: %s",
                    index,
                    _describe(exc),
                )
                continue
            for (key, _, _), family in zip(_ALLOCATOR_FIGURES, families, strict=True):
                if key in stats:
                    family.add_metric([*run.label_values, str(index)], float(stats[key]))
        return [family for family in families if family.samples]


def _cuda_initialized() -> bool:
    """Whether this process initialised CUDA (cheap; never initialises it)."""
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:
        return False
