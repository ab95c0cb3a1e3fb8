"""Reading scalar tensors into Python numbers without synchronising the GPU.

A CPU tensor is read at once. A CUDA tensor is copied into pinned host memory on the current stream with
``non_blocking=True`` and a CUDA event is recorded behind the copy; the value is taken later, once
``event.query()`` says the copy is done. Nothing here ever synchronises the device, not even at the end of a run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

Apply = Callable[[float], None]


class DeferredScalars:
    """A queue of scalar reads that complete when the device is done with them.

    Example::

        scalars = DeferredScalars()
        scalars.submit(loss, lambda value: print(value))  # prints now on CPU, later on CUDA
        scalars.poll()  # call from the training thread at later hooks
    """

    def __init__(self) -> None:
        # Reads still waiting for their copy; a plain attribute so the step path can test it without a call.
        self.pending: list[tuple[torch.Tensor, Any, Apply]] = []

    def submit(self, value: Any, apply: Apply) -> None:
        """Deliver ``float(value)`` to ``apply``, now when that costs no synchronisation, else when ready."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return
            if value.device.type == "cuda":
                self._submit_cuda(value, apply)
                return
            if value.device.type != "cpu":  # other accelerators: no portable async read, skip rather than sync
                return
            apply(float(value.item()))
        elif isinstance(value, (int, float)):
            apply(float(value))

    def _submit_cuda(self, value: torch.Tensor, apply: Apply) -> None:
        host = torch.empty((), dtype=value.dtype, pin_memory=True)
        host.copy_(value.detach().reshape(()), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((host, event, apply))

    def poll(self) -> None:
        """Deliver the values whose copies have finished; never blocks."""
        if not self.pending:
            return
        waiting = []
        for host, event, apply in self.pending:
            if event.query():
                apply(float(host.item()))
            else:
                waiting.append((host, event, apply))
        self.pending = waiting

    def flush(self, timeout_s: float = 1.0) -> None:
        """At the end of a run: deliver what is pending, polling (not synchronising) for up to ``timeout_s``.

        The copies were queued behind the last training work, so they complete as soon as the device catches
        up; a device that does not within the bound keeps its last values unread.
        """
        deadline = time.monotonic() + timeout_s
        self.poll()
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.001)
            self.poll()
        self.pending = []

    def __len__(self) -> int:
        return len(self.pending)
