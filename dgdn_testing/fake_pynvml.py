"""A stand-in for the ``pynvml`` module (nvidia-ml-py) for tests on machines without an NVIDIA GPU.

It has the function names, argument order, return shapes and error classes of the real module for
the calls ``dgdn_lightning_monitor.gpu`` makes, plus test controls: configurable devices and values,
error injection (also mid-run), per-call delays, and a record of every call with its calling thread.

Two ways to use it:

* ``FakeNVML(...)`` builds an independent stand-in (a :class:`types.ModuleType`), the usual choice::

      import fake_pynvml
      nvml = fake_pynvml.FakeNVML([fake_pynvml.FakeDevice(utilization=42)])
      monitor = GPUMonitor(devices=[0], nvml=nvml)

* this module itself works as a stand-in, forwarding to a default instance that :func:`reset`
  replaces: ``fake_pynvml.reset([...]); GPUMonitor(devices=[0], nvml=fake_pynvml)``.

Like the real library, every device call made while NVML is not initialised (before ``nvmlInit`` or
after the matching ``nvmlShutdown``) raises ``NVMLError_Uninitialized``; it is still recorded.
"""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The real module's constants and error classes, so that the code under test catches exactly what it would catch.
from pynvml import (  # noqa: E402
    NVML_SUCCESS,
    NVML_TEMPERATURE_GPU,
    NVMLError,
    NVMLError_DriverNotLoaded,
    NVMLError_GpuIsLost,
    NVMLError_InvalidArgument,
    NVMLError_LibraryNotFound,
    NVMLError_NotFound,
    NVMLError_NotSupported,
    NVMLError_Timeout,
    NVMLError_Uninitialized,
    NVMLError_Unknown,
)


@dataclass
class FakeDevice:
    """One simulated GPU. A figure set to ``None`` raises ``NVMLError_NotSupported`` when queried.

    Args:
        uuid: NVML UUID (``GPU-...``); derived from the index when empty.
        name: Product name.
        pci_bus_id: PCI bus id (``DDDDDDDD:BB:DD.0``); derived from the index when empty.
        utilization: GPU utilisation in percent (0..100), as NVML reports it.
        memory_used: Used memory in bytes.
        memory_total: Total memory in bytes.
        temperature: Core temperature in degrees Celsius.
        power_mw: Power draw in milliwatts, as NVML reports it.

    Example:
        >>> FakeDevice(utilization=50, power_mw=None).power_mw is None
        True
    """

    uuid: str = ""
    name: str = "NVIDIA Fake GPU"
    pci_bus_id: str = ""
    utilization: int | None = 0
    memory_used: int | None = 1 << 30
    memory_total: int | None = 80 << 30
    temperature: int | None = 40
    power_mw: int | None = 100_000
    lost: bool = False


@dataclass(frozen=True)
class Call:
    """One recorded call: function name, arguments, calling thread and time (``time.monotonic``)."""

    function: str
    args: tuple[Any, ...]
    thread_id: int
    thread_name: str
    time: float


@dataclass(frozen=True)
class FakeHandle:
    """Device handle returned by the ``nvmlDeviceGetHandleBy*`` functions."""

    index: int


@dataclass
class _Utilization:
    gpu: int
    memory: int


@dataclass
class _Memory:
    total: int
    free: int
    used: int


@dataclass
class _PciInfo:
    busId: str  # noqa: N815 (the real structure's field name)
    busIdLegacy: str  # noqa: N815


@dataclass
class _Failure:
    error: NVMLError
    device: int | None
    remaining: int | None


_NO_HANDLE = object()


class FakeNVML(types.ModuleType):
    """An independent pynvml stand-in with its own devices, failures and call record.

    Args:
        devices: The simulated GPUs in NVML index order, or a count of default devices.
        library_missing: ``nvmlInit`` raises ``NVMLError_LibraryNotFound`` (no driver installed).
        init_error: ``nvmlInit`` raises this error (e.g. ``NVMLError_DriverNotLoaded()``).

    Example:
        >>> nvml = FakeNVML([FakeDevice(utilization=30)])
        >>> nvml.nvmlInit()
        >>> nvml.nvmlDeviceGetUtilizationRates(nvml.nvmlDeviceGetHandleByIndex(0)).gpu
        30
        >>> nvml.nvmlShutdown()
        >>> [call.function for call in nvml.calls][0]
        'nvmlInit'
    """

    NVML_SUCCESS = NVML_SUCCESS
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_Timeout = NVMLError_Timeout
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_Unknown = NVMLError_Unknown

    def __init__(
        self,
        devices: Sequence[FakeDevice] | int = 1,
        *,
        library_missing: bool = False,
        init_error: NVMLError | None = None,
    ) -> None:
        super().__init__("pynvml", "stand-in for nvidia-ml-py")
        if isinstance(devices, int):
            devices = [FakeDevice() for _ in range(devices)]
        self.devices: list[FakeDevice] = list(devices)
        for index, device in enumerate(self.devices):
            device.uuid = device.uuid or f"GPU-{index:08x}-0000-4000-8000-{index:012x}"
            device.pci_bus_id = device.pci_bus_id or f"00000000:{0x10 + index:02X}:00.0"
        self.library_missing = library_missing
        self.init_error = init_error
        self.calls: list[Call] = []
        self.init_count = 0
        self.refcount = 0
        self._failures: dict[str, list[_Failure]] = {}
        self._delays: dict[str, float] = {}
        self._lock = threading.RLock()
        # Like a real module, list the API in the instance dict (so dir() and vars() show it).
        for name in dir(type(self)):
            if name.startswith(("nvml", "NVML")):
                setattr(self, name, getattr(self, name))

    # ----------------------------------------------------------------------------- test controls
    def set_values(self, index: int, **figures: Any) -> None:
        """Change figures of device ``index`` (field names of :class:`FakeDevice`)."""
        with self._lock:
            device = self.devices[index]
            for name, value in figures.items():
                if not hasattr(device, name):
                    raise AttributeError(f"FakeDevice has no field {name!r}")
                setattr(device, name, value)

    def lose(self, index: int, lost: bool = True) -> None:
        """Make every query of device ``index`` raise ``NVMLError_GpuIsLost`` (or undo it)."""
        self.set_values(index, lost=lost)

    def fail(
        self, function: str, error: NVMLError | None = None, *, device: int | None = None, times: int | None = None
    ) -> None:
        """Make ``function`` raise ``error`` (default ``NVMLError_Unknown``).

        Args:
            function: NVML function name, e.g. ``"nvmlDeviceGetPowerUsage"``.
            error: The error to raise.
            device: Only for this device index (``None``: every device, and calls without a device).
            times: Only the next ``times`` calls (``None``: until :meth:`clear_failures`).

        Example:
            >>> nvml = FakeNVML(1)
            >>> nvml.fail("nvmlInit", NVMLError_DriverNotLoaded(), times=1)
            >>> try:
            ...     nvml.nvmlInit()
            ... except NVMLError_DriverNotLoaded:
            ...     print("failed once")
            failed once
            >>> nvml.nvmlInit()
        """
        if not hasattr(self, function):
            raise AttributeError(f"no NVML function {function!r} in the stand-in")
        with self._lock:
            self._failures.setdefault(function, []).append(_Failure(error or NVMLError_Unknown(), device, times))

    def clear_failures(self) -> None:
        """Remove every injected failure and lost flag."""
        with self._lock:
            self._failures.clear()
            for device in self.devices:
                device.lost = False

    def delay(self, function: str, seconds: float) -> None:
        """Make ``function`` take ``seconds`` before it answers (to test a slow or hanging NVML)."""
        self._delays[function] = seconds

    def calls_to(self, function: str) -> list[Call]:
        """The recorded calls of ``function``."""
        with self._lock:
            return [call for call in self.calls if call.function == function]

    def call_threads(self) -> set[int]:
        """Ids of every thread that called into the stand-in."""
        with self._lock:
            return {call.thread_id for call in self.calls}

    @property
    def initialized(self) -> bool:
        """Whether NVML is initialised (more ``nvmlInit`` than ``nvmlShutdown`` calls)."""
        return self.refcount > 0

    # ----------------------------------------------------------------------------- machinery
    def _enter(self, function: str, args: tuple[Any, ...], handle: Any = _NO_HANDLE, needs_init: bool = True) -> Any:
        """Record the call, then apply delay, the initialisation check, injected failures and the lost flag."""
        thread = threading.current_thread()
        with self._lock:
            self.calls.append(Call(function, args, threading.get_ident(), thread.name, time.monotonic()))
        delay = self._delays.get(function)
        if delay:
            time.sleep(delay)
        with self._lock:
            if needs_init and self.refcount == 0:
                raise NVMLError_Uninitialized()
            index = handle.index if isinstance(handle, FakeHandle) else None
            for failure in self._failures.get(function, []):
                if failure.device is not None and failure.device != index:
                    continue
                if failure.remaining is not None:
                    if failure.remaining <= 0:
                        continue
                    failure.remaining -= 1
                raise failure.error
            if handle is _NO_HANDLE:
                return None
            if index is None or not 0 <= index < len(self.devices):
                raise NVMLError_InvalidArgument()
            device = self.devices[index]
            if device.lost:
                raise NVMLError_GpuIsLost()
            return device

    @staticmethod
    def _figure(value: Any) -> Any:
        if value is None:
            raise NVMLError_NotSupported()
        return value

    # ----------------------------------------------------------------------------- NVML API
    def nvmlInit(self) -> None:  # noqa: N802 (NVML's names)
        self._enter("nvmlInit", (), needs_init=False)
        if self.library_missing:
            raise NVMLError_LibraryNotFound()
        if self.init_error is not None:
            raise self.init_error
        with self._lock:
            self.init_count += 1
            self.refcount += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self._enter("nvmlShutdown", ())
        with self._lock:
            self.refcount -= 1

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        self._enter("nvmlSystemGetDriverVersion", ())
        return "999.99"

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._enter("nvmlDeviceGetCount", ())
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:  # noqa: N802
        self._enter("nvmlDeviceGetHandleByIndex", (index,))
        if not isinstance(index, int) or not 0 <= index < len(self.devices):
            raise NVMLError_InvalidArgument()
        return FakeHandle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeHandle:  # noqa: N802
        self._enter("nvmlDeviceGetHandleByUUID", (uuid,))
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        for index, device in enumerate(self.devices):
            if device.uuid == text:
                return FakeHandle(index)
        raise NVMLError_NotFound()

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: str | bytes) -> FakeHandle:  # noqa: N802
        self._enter("nvmlDeviceGetHandleByPciBusId", (bus_id,))
        text = (bus_id.decode() if isinstance(bus_id, bytes) else bus_id).upper()
        for index, device in enumerate(self.devices):
            if device.pci_bus_id.upper() == text:
                return FakeHandle(index)
        raise NVMLError_NotFound()

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:  # noqa: N802
        device = self._enter("nvmlDeviceGetUUID", (handle,), handle)
        return device.uuid

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:  # noqa: N802
        device = self._enter("nvmlDeviceGetName", (handle,), handle)
        return device.name

    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> _PciInfo:  # noqa: N802
        device = self._enter("nvmlDeviceGetPciInfo", (handle,), handle)
        return _PciInfo(busId=device.pci_bus_id, busIdLegacy=device.pci_bus_id[4:])

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> _Utilization:  # noqa: N802
        device = self._enter("nvmlDeviceGetUtilizationRates", (handle,), handle)
        return _Utilization(gpu=self._figure(device.utilization), memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> _Memory:  # noqa: N802
        device = self._enter("nvmlDeviceGetMemoryInfo", (handle,), handle)
        used, total = self._figure(device.memory_used), self._figure(device.memory_total)
        return _Memory(total=total, free=total - used, used=used)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:  # noqa: N802
        device = self._enter("nvmlDeviceGetTemperature", (handle, sensor), handle)
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError_InvalidArgument()
        return self._figure(device.temperature)

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:  # noqa: N802
        device = self._enter("nvmlDeviceGetPowerUsage", (handle,), handle)
        return self._figure(device.power_mw)


_default = FakeNVML()


def reset(
    devices: Sequence[FakeDevice] | int = 1,
    *,
    library_missing: bool = False,
    init_error: NVMLError | None = None,
) -> FakeNVML:
    """Replace the default instance that this module's own attributes forward to, and return it.

    Args:
        devices: As for :class:`FakeNVML`.
        library_missing: As for :class:`FakeNVML`.
        init_error: As for :class:`FakeNVML`.

    Example:
        >>> nvml = reset(2)
        >>> len(nvml.devices)
        2
    """
    global _default
    _default = FakeNVML(devices, library_missing=library_missing, init_error=init_error)
    return _default


def default() -> FakeNVML:
    """The instance this module's own attributes forward to."""
    return _default


def __getattr__(name: str) -> Any:
    """Forward ``fake_pynvml.nvml...`` to the default instance, so the module itself is a stand-in."""
    if name.startswith("nvml"):
        return getattr(_default, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
