"""A device vector on its way to the host without stalling the device (:class:`HostCopy`): how the callbacks read
a step's numbers one step later."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class HostCopy:
    """A device vector on its way to the host without stalling the device: a non-blocking copy into pinned memory,
    read later (:meth:`values`), when the copy is surely done, typically one step on. On the CPU the vector is
    already in host memory and is kept as it is.

    The pinned buffer and the CUDA event that marks the copy's end are taken from a small pool and given back once
    read. CUDA API calls are slow while the device is busy with the backward pass: reusing the buffer and the event
    leaves only the copy's launch and the event's record on the host's clock.
    """

    def __init__(self, tensor: Tensor) -> None:
        tensor = tensor.detach()
        self._event: Any = None
        self._values: list[float] | None = None
        if tensor.device.type == "cuda":
            self._key = (tensor.device, tensor.dtype, tuple(tensor.shape))
            free = _PINNED.get(self._key)
            if free:
                self._buffer, self._event = free.pop()
            else:
                self._buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                self._event = torch.cuda.Event()
            self._buffer.copy_(tensor, non_blocking=True)
            self._event.record(torch.cuda.current_stream(tensor.device))  # the stream the copy went on
        else:
            self._buffer = tensor

    def values(self) -> list[float]:
        """The copied values; waits only for the copy itself (long done one step later)."""
        if self._values is None:
            if self._event is None:
                self._values = self._buffer.tolist()
            else:
                self._event.synchronize()
                self._values = self._buffer.tolist()
                free = _PINNED.setdefault(self._key, [])
                if len(free) < _PINNED_PER_SHAPE:  # back to the pool: the next copy of this shape reuses them
                    free.append((self._buffer, self._event))
                self._buffer = self._event = None
        return self._values


#: Pinned buffers and their events, free for reuse, per (device, dtype, shape): at most a few of each (one per copy
#: in flight at once).
_PINNED: dict[tuple[torch.device, torch.dtype, tuple[int, ...]], list[tuple[Tensor, Any]]] = {}
_PINNED_PER_SHAPE = 4
