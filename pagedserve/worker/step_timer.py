"""Where a step's time goes: building its inputs on the host, and the device's run.

`ModelRunner` calls `start` before it builds a step's inputs, `launch` when
they are built and the first kernel is about to be queued, and `stop` once
the sampled ids are back on the host. On CUDA the device's part (launch to
the last kernel's end) is timed with events on the stream, so the host never
waits for the timing; `summary()` reads them afterwards. A step's wall time
beyond its device time is host work the device waited for: building inputs
here, and (timed by the caller around the whole engine step) scheduling and
detokenizing.
"""

from __future__ import annotations

import time

import torch


class StepTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: list[tuple] = []
        self._host: list[float] = []
        self._prepare: list[float] = []
        self._t0 = 0.0
        self._e0 = None
        self._prepared: float | None = None  # the open step's host time before its launch

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._prepared, self._e0 = None, None

    def launch(self) -> None:
        self._prepared = time.perf_counter() - self._t0
        if self.cuda:
            self._e0 = torch.cuda.Event(enable_timing=True)
            self._e0.record()

    def stop(self) -> None:
        """Close the step. A step this timer did not see launched (one already in flight
        when the timer was attached, under async scheduling) is left out."""
        if self._prepared is None:
            return
        self._host.append(time.perf_counter() - self._t0)
        self._prepare.append(self._prepared)
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._e0, end))
        self._prepared = None

    def summary(self) -> dict[str, list[float]]:
        """Seconds per step: `prepare` (host, before the first launch), `runner` (the
        runner's wall time) and `device` (first launch to last kernel: events on CUDA,
        the host's clock elsewhere, where the host does the work)."""
        if self.cuda:
            torch.cuda.synchronize()
            device = [start.elapsed_time(end) / 1e3 for start, end in self._events]
        else:
            device = [total - prepare
                      for total, prepare in zip(self._host, self._prepare, strict=True)]
        return {"prepare": list(self._prepare), "runner": list(self._host), "device": device}

    def reset(self) -> None:
        self._events.clear()
        self._host.clear()
        self._prepare.clear()
