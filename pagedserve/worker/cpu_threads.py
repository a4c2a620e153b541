"""How many compute threads a CPU worker runs.

torch's default is one per core of the machine, which oversubscribes it as
soon as anything else runs: the engine's own loop, Serve's proxies, a second
replica. On a 2-core machine with other load, 2 threads ran several times
slower than one. So the count comes from the CPUs this process may use (its
affinity and its cgroup's quota), less one for the engine's loop, as vLLM's
CPU backend keeps a core for its serving process; a worker actor takes the
CPUs it reserves; `engine.cpu_threads` overrides both.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, within its cgroup's CPU quota."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:  # cgroup v2: "<quota> <period>", or "max <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count or 1)


def choose(configured: int | None, reserved_cpus: float | None = None) -> tuple[int, str]:
    """(threads, why): engine.cpu_threads, else the actor's reservation, else usable CPUs - 1."""
    if configured is not None:
        return configured, "engine.cpu_threads"
    if reserved_cpus is not None:
        return max(1, int(reserved_cpus)), f"the {reserved_cpus:g} CPUs its actor reserves"
    usable = usable_cpus()
    return max(1, usable - 1), f"{usable} usable CPUs, one left for the engine's loop"


def apply(configured: int | None, reserved_cpus: float | None = None) -> int:
    threads, why = choose(configured, reserved_cpus)
    torch.set_num_threads(threads)
    logger.info("CPU worker: %d compute threads (%s)", threads, why)
    return threads
