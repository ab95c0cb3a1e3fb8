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
    >>> registry.register(monitor)  # describe() names the families; nothing is sampled
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
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

import torch
from prometheus_client.core import GaugeMetricFamily, Metric

from dgdn_lightning_monitor.capacity import PeaksBeforeReset
from dgdn_lightning_monitor.catalogue import help_text
from dgdn_lightning_monitor.guards import (
    NAMESPACE,
    MonitorErrors,
    WarnOnce,
    check,
    check_namespace,
    describe,
    forget_threads_after_fork,
)

__all__ = ["GPUMonitor", "THREAD_NAME", "LOGGER_NAME"]

#: Name of the sampling thread (one per running monitor).
THREAD_NAME = "dgdn-gpu-monitor"
#: Logger that receives the one-per-kind failure warnings.
LOGGER_NAME = "dgdn_lightning_monitor.gpu"

logger = logging.getLogger(LOGGER_NAME)

_GPU_LABELS = ("gpu", "uuid", "name")
_UP = "gpu_monitoring_up"
# Metric name suffix -> HELP (from the catalogue), in exposition order.
_HELP = {
    name: help_text(name)
    for name in (
        _UP,
        "gpu_utilization_ratio",
        "gpu_memory_used_bytes",
        "gpu_memory_total_bytes",
        "gpu_temperature_celsius",
        "gpu_power_watts",
        "gpu_memory_allocated_bytes",
        "gpu_memory_reserved_bytes",
        "gpu_max_memory_allocated_bytes",
    )
}
# NVML figure -> (NVML function, its answer -> the value); a function giving several figures is called once a sample.
_NVML_FIGURES: dict[str, tuple[str, Callable[[Any], float]]] = {
    "gpu_utilization_ratio": ("nvmlDeviceGetUtilizationRates", lambda rates: rates.gpu / 100.0),
    "gpu_memory_used_bytes": ("nvmlDeviceGetMemoryInfo", lambda memory: float(memory.used)),
    "gpu_memory_total_bytes": ("nvmlDeviceGetMemoryInfo", lambda memory: float(memory.total)),
    "gpu_temperature_celsius": ("nvmlDeviceGetTemperature", float),
    "gpu_power_watts": ("nvmlDeviceGetPowerUsage", lambda milliwatts: milliwatts / 1000.0),
}
# Allocator figure -> its key in torch.cuda.memory_stats.
_ALLOCATOR_FIGURES = {
    "gpu_memory_allocated_bytes": "allocated_bytes.all.current",
    "gpu_memory_reserved_bytes": "reserved_bytes.all.current",
    "gpu_max_memory_allocated_bytes": "allocated_bytes.all.peak",
}
_PEAK_KEY = _ALLOCATOR_FIGURES["gpu_max_memory_allocated_bytes"]
_LOOKUPS = {
    "uuid": "nvmlDeviceGetHandleByUUID",
    "pci": "nvmlDeviceGetHandleByPciBusId",
    "index": "nvmlDeviceGetHandleByIndex",
}

# One sample round: up (None until the first round ended) and, per sampled GPU, its labels and figures.
Snapshot = tuple[int | None, list[tuple[tuple[str, str, str], dict[str, float]]]]


class _Stopped(BaseException):
    """Raised inside the sampling thread when stop() was requested; no ``except Exception`` stops it."""


@dataclass
class _Target:
    """A watched GPU: its CUDA index, how to find it in NVML, and what was learnt once it was found."""

    gpu: int
    keys: tuple[tuple[str, Any], ...]
    handle: Any = None
    labels: tuple[str, str, str] = ("", "", "")  # gpu, uuid, name
    unsupported: set[str] = field(default_factory=set)  # NVML functions the GPU does not support


def _indices(name: str, value: Any, expected: str = "a list of distinct non-negative GPU indices") -> tuple[int, ...]:
    """``value`` as a tuple of distinct non-negative ints, or a ValueError naming ``name``."""
    ok = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    found = [int(i) for i in value if isinstance(i, numbers.Integral) and not isinstance(i, bool)] if ok else []
    check(name, value, ok and len(found) == len(value) == len(set(found)) and min(found, default=0) >= 0, expected)
    return tuple(found)


def _uuid_keys(raw: Any) -> list[tuple[str, Any]]:
    """NVML UUID look-up keys for a UUID (hex, with or without dashes, with or without a ``GPU-``/``MIG-`` prefix)."""
    text = "" if raw is None else str(raw).strip()
    prefix = text[:3].upper() if text[:4].upper() in ("GPU-", "MIG-") else ""
    try:
        value = uuid.UUID(text[4:] if prefix else text)
    except ValueError:
        return []
    return [("uuid", f"{kind}-{value}") for kind in ([prefix] if prefix else ["GPU", "MIG"])] if value.int else []


def _pci_key(props: Any) -> list[tuple[str, Any]]:
    """NVML PCI bus id look-up key (``DDDDDDDD:BB:DD.0``) from PyTorch's device properties, if it has them."""
    bus, device, domain = (getattr(props, f"pci_{part}_id", None) for part in ("bus", "device", "domain"))
    domain = 0 if domain is None else domain
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
        try:
            props = torch.cuda.get_device_properties(index)
        except Exception:  # CPU build, no driver, bad index: fall back to other ways of finding the GPU
            props = None
        keys = _uuid_keys(getattr(props, "uuid", None)) + _pci_key(props) if props is not None else []
        if keys:
            return tuple(keys)
    entries = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    entry = entries[index] if index < len(entries) else ""
    if entry.isdigit():
        return (("index", int(entry)),)
    if entry[:4].upper() in ("GPU-", "MIG-") and _uuid_keys(entry):
        return tuple(_uuid_keys(entry))
    return (("index", index),)


class _Sampler(threading.Thread):
    """One run's sampling thread: every NVML call of that run happens here.

    Args:
        nvml: the ``pynvml`` module (or a stand-in with its functions and error classes).
        targets: the watched GPUs.
        interval: seconds between two samples.
        warn: the monitor's failure report (counted, warned once per kind).
    """

    def __init__(self, nvml: Any, targets: list[_Target], interval: float, warn: Callable[..., None]) -> None:
        super().__init__(name=THREAD_NAME, daemon=True)
        self.nvml, self.targets, self.interval, self.warn = nvml, targets, interval, warn
        self.stopping = threading.Event()
        self.sampled = threading.Event()  # set when the first round ended (or NVML could not start)
        self.snapshot: Snapshot = (None, [])

    def call(self, function: str, *args: Any) -> Any:
        """Call an NVML function unless stop() was requested (so stop is honoured between calls)."""
        if self.stopping.is_set():
            raise _Stopped
        return getattr(self.nvml, function)(*args)

    def run(self) -> None:
        try:
            self.call("nvmlInit")
        except _Stopped:
            return self.sampled.set()
        except Exception as exc:
            if isinstance(exc, getattr(self.nvml, "NVMLError_LibraryNotFound", ())):
                message = "GPU monitoring is off: the NVML library was not found (%s); is the NVIDIA driver installed?"
                self.warn("library_not_found", message, describe(exc))
            else:
                self.warn("init_failed", "GPU monitoring is off: nvmlInit failed: %s", describe(exc))
            self.snapshot = (0, [])
            return self.sampled.set()
        try:
            while True:
                self._round()
                self.sampled.set()
                if self.stopping.wait(self.interval):
                    break
        except _Stopped:
            pass
        finally:
            self.sampled.set()
            try:
                self.nvml.nvmlShutdown()
            except Exception as exc:  # pragma: no cover - a driver that fails to shut down
                logger.debug("nvmlShutdown failed: %s", exc)

    def _round(self) -> None:
        """Sample every watched GPU once and publish the result as one snapshot."""
        samples, ok = [], True
        for target in self.targets:
            try:
                if target.handle is None:
                    self._resolve(target)
            except Exception as exc:
                ok = False
                keys = ", ".join(f"{kind} {key}" for kind, key in target.keys)
                message = "GPU monitoring cannot find GPU %d in NVML (looked up by %s): %s"
                self.warn("device_not_found", message, target.gpu, keys, describe(exc))
                continue
            try:
                samples.append((target.labels, self._sample(target)))
            except Exception as exc:
                ok = False
                message = "GPU sampling failed for GPU %d (%s): %s; its figures are left out until sampling works again"
                self.warn("sample_failed", message, target.gpu, target.labels[1], describe(exc))
        previous, self.snapshot = self.snapshot[0], (int(ok), samples)
        if ok and previous == 0:
            logger.info("GPU sampling works again")

    def _resolve(self, target: _Target) -> None:
        """Find the target's NVML handle by its keys in order and cache it with its UUID and name."""
        error: BaseException = LookupError("no way to look the GPU up")
        for kind, key in target.keys:
            try:
                handle = self.call(_LOOKUPS[kind], key)
            except getattr(self.nvml, "NVMLError", Exception) as exc:
                error = exc
                continue
            uuid_, name = (str(self.call(function, handle)) for function in ("nvmlDeviceGetUUID", "nvmlDeviceGetName"))
            target.handle, target.labels = handle, (str(target.gpu), uuid_, name)
            return
        raise error

    def _sample(self, target: _Target) -> dict[str, float]:
        """Read the figures of one GPU; a function the GPU does not support is left out and not asked again."""
        answers: dict[str, Any] = {}
        figures: dict[str, float] = {}
        for suffix, (function, value) in _NVML_FIGURES.items():
            if function in target.unsupported:
                continue
            if function not in answers:
                sensor = (self.nvml.NVML_TEMPERATURE_GPU,) if function == "nvmlDeviceGetTemperature" else ()
                try:
                    answers[function] = self.call(function, target.handle, *sensor)
                except getattr(self.nvml, "NVMLError_NotSupported", ()):
                    logger.debug("GPU %d does not support %s", target.gpu, function)
                    target.unsupported.add(function)
                    continue
            figures[suffix] = value(answers[function])
        return figures


@dataclass(frozen=True)
class _Run:
    """State of one start()..stop() run; no sampler when ``pynvml`` could not even be imported."""

    label_names: list[str]
    label_values: list[str]
    cuda_devices: tuple[int, ...]
    sampler: _Sampler | None


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
        errors: Where every failure is counted (as ``gpu``); by default the monitor's own.
        peaks: The allocator's peaks that the capacity sampling reset (the
            :class:`~dgdn_lightning_monitor.capacity.PeaksBeforeReset` of its sampler), so that the peak gauge
            keeps them.

    Raises:
        ValueError: ``devices`` (``gpu_devices`` on the callback) is neither ``"auto"``, ``None`` nor a
            list of distinct non-negative ints; ``poll_interval_s`` (``gpu_poll_interval_s``) is not a
            finite number > 0; ``namespace`` is not a valid metric name prefix; ``nvml`` has no ``nvmlInit``.
    """

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
        errors: MonitorErrors | None = None,
        peaks: PeaksBeforeReset | None = None,
    ) -> None:
        self._namespace = check_namespace(namespace)
        self.peaks = peaks if peaks is not None else PeaksBeforeReset()
        #: The watched devices as configured, ``"auto"``, a tuple of indices, or ``None`` (off).
        self.devices: Literal["auto"] | tuple[int, ...] | None = (
            devices
            if devices is None or devices == "auto"
            else _indices("gpu_devices (devices)", devices, "'auto', None or a list of distinct GPU indices") or None
        )
        real = isinstance(poll_interval_s, numbers.Real) and not isinstance(poll_interval_s, bool)
        valid = real and math.isfinite(poll_interval_s) and poll_interval_s > 0
        check("gpu_poll_interval_s (poll_interval_s)", poll_interval_s, valid, "a finite number of seconds > 0")
        self.poll_interval_s = float(poll_interval_s)
        valid = nvml is None or callable(getattr(nvml, "nvmlInit", None))
        self._nvml_module = check("nvml", nvml, valid, "the pynvml module or a stand-in with nvmlInit")
        self._warn_once = WarnOnce(logger)
        self.errors = errors if errors is not None else MonitorErrors(logger)
        self._run: _Run | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Configuration only (for ``ddp_spawn`` and friends): a copy starts without a run or past warnings.

        A monitor built with ``nvml=None`` pickles; a module given as ``nvml`` does not.
        """
        return {**self.__dict__, "_run": None}

    def after_fork_in_child(self) -> None:
        """The sampling thread does not exist in a forked child: drop the run (its series would never update);
        the child starts its own with :meth:`start`."""
        self._run = None

    @property
    def running(self) -> bool:
        """Whether a run is active (between :meth:`start` and :meth:`stop`)."""
        return self._run is not None

    def start(self, cuda_devices: Sequence[int], labels: Mapping[str, str]) -> None:
        """Begin a run: start the sampling thread for the watched GPUs (no NVML call happens here).

        Call once per run from the training thread at setup. A run that is still active is stopped
        first, so calling again after :meth:`stop` (a second fit) is fine. With ``devices="auto"`` and
        no CUDA devices this does nothing. Waits at most :attr:`FIRST_SAMPLE_TIMEOUT_S` for the first
        sample so that the first scrape has figures (the ``up`` gauge is absent until that sample ends).

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
        cuda = _indices("cuda_devices", cuda_devices)
        check("labels", labels, isinstance(labels, Mapping), "a mapping of label names to values")
        for name in labels:
            valid = isinstance(name, str) and bool(NAMESPACE.match(name + "x")) and not name.startswith("__")
            check("labels", name, valid and name not in _GPU_LABELS, "Prometheus label names other than gpu/uuid/name")
        names, values = list(labels), [str(value) for value in labels.values()]

        self.stop()
        watched = cuda if self.devices == "auto" else self.devices
        if not watched:
            return
        nvml = self._nvml_module
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except Exception as exc:
                message = "GPU monitoring is off: nvidia-ml-py (pynvml) cannot be imported: %s"
                self._fail("nvml_missing", message, describe(exc))
                self._run = _Run(names, values, cuda, None)
                return
        ask_torch = self.devices == "auto" or torch.cuda.is_initialized()
        targets = [_Target(gpu=index, keys=_lookup_keys(index, ask_torch)) for index in watched]
        sampler = _Sampler(nvml, targets, self.poll_interval_s, self._fail)
        self._run = _Run(names, values, cuda, sampler)
        forget_threads_after_fork(self)  # only a monitor with a thread has something to forget after fork
        sampler.start()
        sampler.sampled.wait(self.FIRST_SAMPLE_TIMEOUT_S)

    def stop(self) -> None:
        """End the run: wake the sampling thread, wait for it (it calls ``nvmlShutdown``), drop all series.

        Idempotent and safe without :meth:`start`. Returns as soon as the thread has finished its
        current NVML call (at most :attr:`STOP_TIMEOUT_S` if NVML hangs; only in that case can the
        abandoned thread still call ``nvmlShutdown`` later).
        """
        run, self._run = self._run, None
        sampler = run.sampler if run is not None else None
        if sampler is None or sampler.ident is None:
            return
        sampler.stopping.set()
        sampler.join(self.STOP_TIMEOUT_S)
        if sampler.is_alive():
            logger.warning(
                "the GPU sampling thread did not finish within %.0f s (an NVML call hangs)", self.STOP_TIMEOUT_S
            )

    def describe(self) -> list[Metric]:
        """Every family this collector can export, without samples: the registry learns the names (for the
        ``name[]`` filter and duplicate checks) without sampling."""
        return [GaugeMetricFamily(f"{self._namespace}_{suffix}", doc) for suffix, doc in _HELP.items()]

    def collect(self) -> Iterable[Metric]:
        """The GPU series of the current run: the last NVML sample and the allocator figures right now.

        Makes no NVML call. Yields nothing outside a run or when GPU monitoring has nothing to watch.
        """
        run = self._run
        if run is None:
            return []
        names, values = run.label_names, run.label_values
        up, samples = run.sampler.snapshot if run.sampler is not None else (0, [])
        families = [self._gauge(_UP, names)]
        if up is not None:
            families[0].add_metric(values, float(up))
        for suffix in _NVML_FIGURES:
            families.append(family := self._gauge(suffix, [*names, *_GPU_LABELS]))
            for gpu_labels, figures in samples:
                if suffix in figures:
                    family.add_metric([*values, *gpu_labels], figures[suffix])
        if run.cuda_devices and torch.cuda.is_initialized():  # allocator figures, read now
            allocator = {suffix: self._gauge(suffix, [*names, "gpu"]) for suffix in _ALLOCATOR_FIGURES}
            families += allocator.values()
            for index in run.cuda_devices:
                try:
                    stats = torch.cuda.memory_stats(index)
                except Exception as exc:
                    message = "reading the PyTorch CUDA allocator statistics of GPU %d failed: %s"
                    self._fail("allocator_failed", message, index, describe(exc))
                    continue
                if _PEAK_KEY in stats:  # the capacity sampling resets the peak: what it reset is kept
                    stats[_PEAK_KEY] = self.peaks.peak(index, stats[_PEAK_KEY])
                for suffix, key in _ALLOCATOR_FIGURES.items():
                    if key in stats:
                        allocator[suffix].add_metric([*values, str(index)], float(stats[key]))
        return [family for family in families if family.samples]

    def _fail(self, kind: str, message: str, *args: Any) -> None:
        """A GPU figure could not be read: counted as a ``gpu`` error, warned once per kind."""
        self.errors.report("gpu")
        self._warn_once(kind, message, *args)

    def _gauge(self, suffix: str, label_names: list[str]) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{self._namespace}_{suffix}", _HELP[suffix], labels=label_names)
